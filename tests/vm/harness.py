"""Boots the memd test guest under plain QEMU (TCG, no libvirt) for real-VM tests.

A :class:`GuestVM` owns one QEMU process (argv from :func:`hypervisor.vmimage.qemu_argv`) and its
unix sockets in a work directory: the serial console (driven by :class:`GuestShell`, see
tests/vm/console.py), a QMP monitor, and the host end of each virtio-serial port (``org.memd.0``
by default). QEMU starts paused (``-S``) so the console is attached before the first byte of boot
output, then QMP ``cont``; the guest reboots in place (no ``-no-reboot``), so a reboot keeps the
QEMU process, its pid and its sockets.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths, qemu_argv

from .console import CommandResult, GuestCommandError, GuestError, GuestShell

__all__ = ["CommandResult", "GuestCommandError", "GuestError", "GuestShell", "GuestVM",
           "qemu_available"]


class _Qmp:
    """A minimal synchronous QMP client: one command at a time, events kept in a list."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count()
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise GuestError(f"no QMP greeting on {path}: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise GuestError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request_id = f"h{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == request_id:
                if "error" in reply:
                    raise GuestError(f"QMP {command}: {reply['error'].get('desc', reply)}")
                return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class GuestVM:
    """One TCG guest booted from ``image``; use as a context manager or call start()/stop().

    Shell helpers (run, check, check_bytes, read_file, write_file, reboot) forward to
    :attr:`shell`.
    """

    def __init__(self, image: ImagePaths, workdir: Path, *, name: str = "memd-g0",
                 memory_mib: int = 256, ports: tuple[str, ...] = (CHANNEL_NAME,),
                 append: str = "", nbd_disks: tuple[Path, ...] = ()) -> None:
        self.image = image
        self.name = name
        self.memory_mib = memory_mib
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.console_socket = workdir / f"{name}.console.sock"
        self.qmp_socket = workdir / f"{name}.qmp.sock"
        self.console_log = workdir / f"{name}.console.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self.channel_sockets = {port: workdir / f"{name}.{port}.sock" for port in ports}
        self._append = append
        self.nbd_disks = nbd_disks  #: virtio disks served over NBD on these sockets
        self._process: subprocess.Popen[bytes] | None = None
        self._shell: GuestShell | None = None
        self._qmp: _Qmp | None = None

    def argv(self) -> list[str]:
        return qemu_argv(self.image, name=self.name, memory_mib=self.memory_mib,
                         console_socket=self.console_socket, qmp_socket=self.qmp_socket,
                         channels=self.channel_sockets, append=self._append, start_paused=True,
                         nbd_disks=self.nbd_disks)

    def start(self, timeout: float = 120.0) -> None:
        """Launch QEMU, attach console and QMP, run the guest and wait for its shell."""
        if self._process is not None:
            raise GuestError(f"{self.name} is already started")
        for path in (self.console_socket, self.qmp_socket, *self.channel_sockets.values()):
            path.unlink(missing_ok=True)
        with open(self.qemu_log, "wb") as log:
            self._process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
        try:
            self._wait_for_sockets(timeout=20.0)
            self._qmp = _Qmp(self.qmp_socket, timeout=30.0)
            self._shell = GuestShell(self.console_socket, self.console_log)
            self._qmp.execute("cont")
            self._shell.wait_ready(0, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_sockets(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while not (self.qmp_socket.exists() and self.console_socket.exists()):
            if self._process.poll() is not None:
                raise GuestError(f"QEMU exited with {self._process.returncode}: "
                                 f"{self.qemu_log.read_text(errors='replace').strip()}")
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU created no sockets within {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        """Quit QEMU (QMP quit, then SIGKILL) and close everything; safe to call twice."""
        if self._qmp is not None:
            with contextlib.suppress(GuestError, OSError):
                self._qmp.execute("quit")
            self._qmp.close()
            self._qmp = None
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._shell is not None:
            self._shell.close()
            self._shell = None

    def __enter__(self) -> GuestVM:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """PID of the QEMU process (for /proc/<pid>/mem, pagemap, ksm_stat)."""
        if self._process is None:
            raise GuestError(f"{self.name} is not running")
        return self._process.pid

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
        if self._qmp is None:
            raise GuestError(f"{self.name} is not running")
        return self._qmp.execute(command, **arguments)

    @property
    def qmp_events(self) -> list[dict[str, Any]]:
        """QMP events seen so far (collected while waiting for command replies)."""
        return self._qmp.events if self._qmp is not None else []

    def connect_port(self, port: str = CHANNEL_NAME, timeout: float = 10.0) -> socket.socket:
        """Connect to the host end of a virtio-serial port (QEMU listens; one client at a time)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.channel_sockets[port]))
        return sock


def qemu_available() -> bool:
    """True if qemu-system-x86_64 is on PATH (the VM tests skip otherwise)."""
    return any(os.access(Path(d) / "qemu-system-x86_64", os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep) if d)
