"""A QEMU with no guest OS, for tests that need a QEMU process and its monitor, not a
running system: ``-accel tcg -nodefaults`` and no disk to boot, so SeaBIOS finds nothing
and idles, and guest RAM stays as QEMU allocated it.  (The real-guest launcher is the
product's hypervisor.vmlaunch; benchmarks, which may not import tests, launch their own.)
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64")


def start_bare_qemu(
    qmp: Sequence[Path], *args: str, log: Path, timeout: float = 20.0
) -> subprocess.Popen[bytes]:
    """Start QEMU with a QMP server on each socket of *qmp* and the extra *args*; its
    output goes to *log*.  Returns once every QMP socket exists; if QEMU exits or is too
    slow first, it is killed and RuntimeError carries its log."""
    assert QEMU is not None, "qemu-system-x86_64 is not installed"
    argv = [QEMU, "-accel", "tcg", "-nodefaults", "-display", "none"]
    for sock in qmp:
        argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while not all(sock.exists() for sock in qmp):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_bare_qemu(proc)
            raise RuntimeError(f"QEMU did not start: {log.read_text(errors='replace')}")
        time.sleep(0.02)
    return proc


def stop_bare_qemu(proc: subprocess.Popen[bytes]) -> None:
    """Kill it (a guest-less QEMU holds nothing worth a clean quit) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
