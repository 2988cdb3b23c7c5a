#!/usr/bin/env bash
# Installs everything memd needs on a fresh Debian 12 machine (run as root).
#   scripts/setup.sh          Python packages for the embedded default (memd demo)
#   scripts/setup.sh --all    plus QEMU, libvirt and guest-image tools, for the full test suite
# Idempotent: a second run installs nothing new and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

want_all=0
[[ "${1:-}" == "--all" ]] && want_all=1

# QEMU + libvirt for the real-VM tests; libvirt-dev + pkg-config so pip can build libvirt-python;
# busybox-static, cpio, zstd, debootstrap to build the guest image (vm-images/build.sh).
DEBS_ALL=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev pkg-config gcc
          busybox-static cpio zstd debootstrap kmod)

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "setup: need root to install Debian packages: ${missing[*]}" >&2; exit 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

if command -v apt-get >/dev/null; then
    if ((want_all)); then apt_install "${DEBS_ALL[@]}"; fi
fi

PY=${PYTHON:-python3}
# Debian's own python3 is "externally managed" (PEP 668) and may lack pip: then install
# into a project venv (.venv, which the Makefile prefers when it exists).
externally_managed() {
    "$PY" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'
}
if ! "$PY" -m pip --version >/dev/null 2>&1 || externally_managed; then
    command -v apt-get >/dev/null && apt_install python3-venv python3-pip python3-dev gcc
    [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
    PY=.venv/bin/python
fi
extras="test"
((want_all)) && extras="test,libvirt"
"$PY" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
