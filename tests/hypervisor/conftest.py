"""The real libvirtd the hypervisor tests share (started as root when none runs)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hypervisor.libvirt_host import LibvirtHost
from hypervisor.libvirtd import ensure_libvirtd
from memd.errors import MemdError


@pytest.fixture(scope="module")
def host() -> Iterator[LibvirtHost]:
    """A connection to qemu:///system; the module is skipped without root or libvirtd."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run libvirtd and read QEMU's pid")
    try:
        ensure_libvirtd()
    except MemdError as err:
        pytest.skip(f"no libvirtd: {err}")
    with LibvirtHost("qemu:///system") as h:
        yield h
