"""Fixtures for real-QEMU tests: plain QEMU processes (no guest OS) and KSM settings.

A guest here is ``qemu-system-x86_64 -accel tcg -nodefaults`` with no disk: SeaBIOS runs,
finds nothing to boot and idles, and guest RAM stays as QEMU allocated it (lazily).  Tests
plant bytes in guest RAM by writing ``/proc/<pid>/mem`` as root and check the planted
bytes through the monitor's ``xp``.  Every process is killed at teardown, and every KSM
knob is put back as it was, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor import ksm
from hypervisor.qmp import QmpMonitor

QEMU = shutil.which("qemu-system-x86_64")
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
        assert QEMU is not None
        sock = Path(tmp_path_factory.mktemp("q", numbered=True)) / "qmp.sock"
        proc = subprocess.Popen(
            [
                QEMU,
                "-accel",
                "tcg",
                "-nographic",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                f"unix:{sock},server=on,wait=off",
                *(args or ("-m", "128")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"QEMU {name} did not start: {err}")
                time.sleep(0.02)
            guest = PlainQemu(name, proc, QmpMonitor.connect(str(sock)))
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.monitor.close()
        if guest.proc.poll() is None:
            guest.proc.kill()
        guest.proc.wait(10)
        if guest.proc.stderr:
            guest.proc.stderr.close()


@pytest.fixture
def ksm_restored() -> Iterator[dict[str, int | str]]:
    """Snapshot every writable KSM knob; restore them after the test (pass or fail)."""
    saved = ksm.snapshot()
    try:
        yield saved
    finally:
        ksm.restore(saved)
