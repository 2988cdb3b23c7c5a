#!/usr/bin/env bash
# Sets up a development checkout on a fresh Debian 12 machine (run as root for the Debian packages).
#   scripts/setup.sh          Python packages for the embedded default (memd demo)
#   scripts/setup.sh --all    plus QEMU, libvirt, guest-image and validation tools: the full test suite
# Python packages go into the project venv .venv (editable, with the test extra), made from
# $PYTHON (default python3) — never into that interpreter itself, where an editable install would
# re-point its `memd` command (for root often /usr/local/bin/memd) at this checkout.  The host
# service is `make install` (scripts/install.sh), not this.
# Idempotent: a second run installs nothing new and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

want_all=0
[[ "${1:-}" == "--all" ]] && want_all=1

# QEMU + libvirt for the real-VM tests; libvirt-dev, pkg-config, gcc, python3-dev so pip can build
# libvirt-python; busybox-static, cpio, zstd, xz-utils, kmod for the guest image (vm-images/build.sh);
# libxml2-utils for xmllint, which virt-xml-validate runs (tests/hypervisor/vm/test_domain_template.py);
# systemd for systemd-analyze, which checks the installed unit (tests/install);
# libnbd-bin (nbdinfo, nbdcopy), python3-libnbd (for /usr/bin/python3) and nbdkit: independent
# NBD clients and the memory-plugin baseline of the swap disk (tests/nbd, benchmarks/swap_bench.py);
# prometheus (and its promtool) for the metrics tests (tests/agent/test_metrics_*), which run a
# Prometheus of their own on a free loopback port with its config and storage in a tmp dir; the
# package's own service (started by systemd where there is one, on :9090) is left alone;
# openssl and iproute2 for the migration tests (tests/migrate: certificates, network namespaces).
DEBS_ALL=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
          gcc python3-dev busybox-static cpio zstd xz-utils kmod libxml2-utils systemd
          nbdkit libnbd-bin python3-libnbd prometheus ksmtuned openssl iproute2)

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

PY=${PYTHON:-python3}
had_ksmtuned=0
dpkg-query -W -f='${Status}' ksmtuned 2>/dev/null | grep -q "install ok installed" && had_ksmtuned=1
if command -v apt-get >/dev/null; then
    if ((want_all)); then apt_install "${DEBS_ALL[@]}"; fi
fi
# ksmtuned is installed only as a peer the KSM benchmark runs by hand: its package enables
# ksm.service and ksmtuned.service, which would retune KSM under memd and the tests.  Only
# when this run installed it: a host that had it keeps its operator's choice.
if ((want_all && !had_ksmtuned)) && command -v systemctl >/dev/null; then
    systemctl disable --now ksmtuned.service ksm.service >/dev/null 2>&1 || true
fi

# /dev/kvm as Debian's udev rule leaves it (root:kvm 0660; libvirt-qemu is in group kvm).
# Machines without udev (containers, microVMs) may have it root-only: then libvirtd finds
# KVM when it probes QEMU's capabilities but not afterwards as the QEMU user, throws the
# cache away and re-probes on every domain call (about a minute per define here).
if ((want_all)) && [[ -c /dev/kvm && $(id -u) -eq 0 ]] && getent group kvm >/dev/null \
        && [[ "$(stat -c %G:%a /dev/kvm)" != kvm:6[67]? ]]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if command -v apt-get >/dev/null; then
    # Debian's python3 comes without venv/ensurepip, and without the headers C extensions need.
    if [[ "$(readlink -f "$(command -v "$PY")")" == /usr/bin/* ]]; then
        apt_install python3-venv python3-dev gcc
    fi
fi

# A venv whose interpreter no longer runs (its base Python was removed or upgraded) is made anew.
if ! .venv/bin/python -c '' 2>/dev/null; then
    "$PY" -m venv --clear .venv
fi
extras="test"
((want_all)) && extras="test,libvirt"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
