#!/usr/bin/env bash
# Boots the memd test guest under plain QEMU (TCG, no libvirt), or prints the command line.
#   vm-images/qemu-cmdline.sh [--print] [NAME] [DIR]
# NAME defaults to memd-g0, DIR (sockets) to /tmp/memd-vm. The command line comes from
# hypervisor.vmimage.qemu_argv(), the same function the tests use. Sockets in DIR:
#   NAME.console.sock   serial console, a root shell:  socat -,raw,echo=0 UNIX-CONNECT:DIR/NAME.console.sock
#   NAME.qmp.sock       QMP monitor
#   NAME.memd.sock      host end of the virtio-serial port org.memd.0 (the host agent connects here)
set -euo pipefail
print=0
[[ "${1:-}" == "--print" ]] && { print=1; shift; }
name=${1:-memd-g0}
dir=${2:-/tmp/memd-vm}
mkdir -p "$dir"
cd "$(dirname "$0")/.."
cmd=$(python3 -m hypervisor.vmimage argv "$name" "$dir")
if ((print)); then
    echo "$cmd"
else
    eval "exec $cmd"
fi
