"""Real memd-image guests for the KSM tests (the steering benchmark boots its own through
hypervisor.vmlaunch: benchmarks never import tests).

:class:`VmMonitor` lets :class:`~hypervisor.qemu_machine.QemuMachine` use the QMP
connection a :class:`~tests.hypervisor.vm.harness.GuestVM` already holds (a QMP socket takes one
client at a time).  :func:`boot_many` boots several guests at once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypervisor.vmimage import ImagePaths
from hypervisor.vmlaunch import boot_in_parallel
from memd.errors import CommandFailed
from tests.hypervisor.vm.harness import GuestError, GuestVM


class VmMonitor:
    """The :class:`hypervisor.qmp.Monitor` protocol over a GuestVM's QMP client."""

    def __init__(self, vm: GuestVM) -> None:
        self.vm = vm
        self.target = vm.name
        self._lock = threading.Lock()  # the harness's QMP client is one-at-a-time

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        with self._lock:
            try:
                return self.vm.qmp(command, **dict(arguments or {}))
            except GuestError as err:
                raise CommandFailed(
                    f"QEMU refused {command} on {self.target}: {err}",
                    target=self.target,
                    command=command,
                ) from err

    def hmp(self, command_line: str) -> str:
        out = self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    def close(self) -> None:
        return None


def boot_many(
    image: ImagePaths, workdir: Path, names: list[str], *, memory_mib: int = 256
) -> list[GuestVM]:
    """Boot guests in parallel threads; on any failure stop them all and re-raise."""
    vms = [GuestVM(image, workdir / n, name=n, memory_mib=memory_mib) for n in names]
    return boot_in_parallel(vms, lambda vm: vm.start(timeout=180))
