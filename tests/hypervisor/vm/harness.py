"""Boots the memd test guest under plain QEMU (TCG, no libvirt) for real-VM tests.

A :class:`GuestVM` is the product's launcher (:class:`hypervisor.vmlaunch.LaunchedVm`: one
QEMU process, its sockets in a work directory, its QMP monitor) plus a shell on the serial
console (:class:`GuestShell`, see tests/hypervisor/vm/console.py), attached before the guest
runs so no
boot output is lost.  The host end of each virtio-serial port (``org.memd.0`` by default) is
``<workdir>/<name>.<port>.sock``.  The guest reboots in place, so a reboot keeps the QEMU
process, its pid and its sockets.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths
from hypervisor.vmlaunch import LaunchedVm
from memd.errors import BackendError

from .console import CommandResult, GuestCommandError, GuestError, GuestShell

__all__ = [
    "CommandResult",
    "GuestCommandError",
    "GuestError",
    "GuestShell",
    "GuestVM",
    "qemu_available",
]


class GuestVM(LaunchedVm):
    """One TCG guest booted from ``image``, with a shell; use as a context manager or call
    start()/stop().

    Shell helpers (run, check, check_bytes, read_file, write_file, reboot) forward to
    :attr:`shell`.
    """

    def __init__(
        self,
        image: ImagePaths,
        workdir: Path,
        *,
        name: str = "memd-g0",
        memory_mib: int = 256,
        ports: tuple[str, ...] = (CHANNEL_NAME,),
        append: str = "",
        nbd_disks: tuple[Path, ...] = (),
    ) -> None:
        super().__init__(
            image,
            workdir,
            name=name,
            memory_mib=memory_mib,
            append=append,
            channels={port: workdir / f"{name}.{port}.sock" for port in ports},
            nbd_disks=nbd_disks,
        )
        self._shell: GuestShell | None = None

    def start(self, timeout: float = 120.0) -> None:
        """Launch QEMU, attach the console's shell, run the guest and wait for the shell."""
        self.launch()
        try:
            self._shell = GuestShell(self.console_socket, self.console_log)
            self.resume()
            self._shell.wait_ready(0, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Quit QEMU (QMP quit, then SIGKILL) and close everything; safe to call twice."""
        super().stop(timeout)
        if self._shell is not None:
            self._shell.close()
            self._shell = None

    def __enter__(self) -> GuestVM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def shell(self) -> GuestShell:
        if self._shell is None:
            raise GuestError(f"{self.name} is not running")
        return self._shell

    @property
    def boot_uptime(self) -> float | None:
        """Guest uptime (s) when its shell last became ready (first boot or reboot)."""
        return self.shell.boot_uptime

    # --- shell helpers (see GuestShell) ----------------------------------------------------

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        return self.shell.run(command, timeout)

    def check(self, command: str, timeout: float = 60.0) -> str:
        return self.shell.check(command, timeout)

    def check_bytes(self, command: str, timeout: float = 60.0) -> bytes:
        return self.shell.check_bytes(command, timeout)

    def read_file(self, path: str, timeout: float = 60.0) -> bytes:
        return self.shell.read_file(path, timeout)

    def write_file(self, path: str, data: bytes, timeout: float = 60.0) -> None:
        self.shell.write_file(path, data, timeout)

    def reboot(self, *, force: bool = True, timeout: float = 120.0) -> None:
        """Reboot from inside the guest; QEMU, its pid and the host sockets stay."""
        self.shell.reboot(force=force, timeout=timeout)

    # --- host side ------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Execute a QMP command on this guest's QEMU; returns its ``return`` value."""
        try:
            return self.monitor.execute(command, arguments or None)
        except BackendError as err:
            raise GuestError(f"QMP {command}: {err}") from err

    def connect_port(self, port: str = CHANNEL_NAME, timeout: float = 10.0) -> socket.socket:
        """Connect to the host end of a virtio-serial port (QEMU listens; one client at a time)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.channel_sockets[port]))
        return sock


def qemu_available() -> bool:
    """True if qemu-system-x86_64 is on PATH (the VM tests skip otherwise)."""
    return any(
        os.access(Path(d) / "qemu-system-x86_64", os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d
    )
