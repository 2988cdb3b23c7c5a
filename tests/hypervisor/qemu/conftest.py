"""Fixtures for real-QEMU tests: plain QEMU processes (no guest OS) and KSM settings.

A guest here is ``qemu-system-x86_64 -accel tcg -nodefaults`` with no disk: SeaBIOS runs,
finds nothing to boot and idles, and guest RAM stays as QEMU allocated it (lazily).  Tests
plant bytes in guest RAM by writing ``/proc/<pid>/mem`` as root and check the planted
bytes through the monitor's ``xp``.  Every process is killed at teardown, and every KSM
knob is put back as it was, whatever the test did.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor import ksm
from hypervisor.qmp import QmpMonitor
from tests.support.bare_qemu import QEMU, start_bare_qemu, stop_bare_qemu

FIXTURES = Path(__file__).parent / "fixtures"

needs_qemu_root = [
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="pagemap PFNs and KSM sysfs need root"),
]


@dataclass
class PlainQemu:
    name: str
    proc: subprocess.Popen[bytes]
    monitor: QmpMonitor

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def start_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PlainQemu]]:
    """Factory: ``start_qemu(name, "-m", "128", ...)``; all are killed at teardown."""
    started: list[PlainQemu] = []

    def start(name: str, *args: str) -> PlainQemu:
        workdir = Path(tmp_path_factory.mktemp("q", numbered=True))
        sock = workdir / "qmp.sock"
        proc = start_bare_qemu(
            [sock], "-nographic", *(args or ("-m", "128")), log=workdir / "qemu.log", timeout=10
        )
        try:
            guest = PlainQemu(name, proc, QmpMonitor.connect(str(sock)))
        except BaseException:
            stop_bare_qemu(proc)
            raise
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.monitor.close()
        stop_bare_qemu(guest.proc)


@pytest.fixture
def ksm_restored() -> Iterator[dict[str, int | str]]:
    """Snapshot every writable KSM knob; restore them after the test (pass or fail)."""
    saved = ksm.snapshot()
    try:
        yield saved
    finally:
        ksm.restore(saved)
