"""Boots the memd test guest under plain QEMU (TCG, no libvirt) and drives its shell.

A :class:`GuestVM` owns one QEMU process and three kinds of unix socket in its work directory:
the serial console (a login shell, see vm-images/inittab), a QMP monitor, and one host socket per
virtio-serial port (``org.memd.0`` by default). QEMU starts paused (``-S``) so the console reader
is attached before the first byte of boot output; then QMP ``cont``.

Commands run through the console without trusting the tty: the script travels base64-encoded
into a file, runs under ``sh`` with stdin from /dev/null, and its stdout, stderr and exit status
come back base64-encoded between markers that carry a per-command token. The markers are printed
with ``printf '%s:%s'`` so the command line itself never contains them (echo is switched off
anyway), and base64 keeps every byte exact through the tty's newline translation.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hypervisor.vmimage import CHANNEL_NAME, READY_MARKER, ImagePaths, qemu_argv

_LINE_CHUNK = 768  # base64 chars per console line: far below the tty's 4095-byte line limit
# Bytes sent before waiting for the shell to catch up: the guest tty buffers only a few KiB of
# unread input (n_tty) plus its flip buffers, and drops what overflows.
_BATCH_BYTES = 3072


class GuestError(Exception):
    """The guest or its QEMU did not behave: no boot, a timeout, garbled console output."""


class GuestCommandError(GuestError):
    """A command run by :meth:`GuestVM.check` exited non-zero."""

    def __init__(self, command: str, result: CommandResult) -> None:
        super().__init__(f"guest command {command!r} exited {result.status}: "
                         f"{result.stderr.strip() or result.stdout.strip()}")
        self.result = result


@dataclass(frozen=True)
class CommandResult:
    status: int
    stdout_bytes: bytes
    stderr_bytes: bytes

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")


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


class _Console:
    """Reads the serial console socket on a thread into one growing buffer (also logged)."""

    def __init__(self, path: Path, log_path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by close()
        self._buffer = bytearray()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name=f"console:{path.name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._changed:
                if not data:
                    self._closed = True
                    self._changed.notify_all()
                    return
                self._buffer += data
                self._log.write(data)
                self._log.flush()
                self._changed.notify_all()

    @property
    def position(self) -> int:
        with self._changed:
            return len(self._buffer)

    def text(self, start: int = 0) -> str:
        with self._changed:
            return self._buffer[start:].decode(errors="replace")

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def wait_for(self, pattern: re.Pattern[bytes], start: int, timeout: float) -> re.Match[bytes]:
        """First match of ``pattern`` in the output from ``start`` on, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = pattern.search(self._buffer, start)
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    tail = self._buffer[-600:].decode(errors="replace")
                    why = "console closed" if self._closed else f"timed out after {timeout:.0f} s"
                    raise GuestError(f"{why} waiting for {pattern.pattern!r}; last output:\n{tail}")
                self._changed.wait(min(remaining, 1.0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)
        self._log.close()


class GuestVM:
    """One TCG guest booted from ``image``; use as a context manager or call start()/stop()."""

    def __init__(self, image: ImagePaths, workdir: Path, *, name: str = "memd-g0",
                 memory_mib: int = 256, ports: tuple[str, ...] = (CHANNEL_NAME,),
                 append: str = "") -> None:
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
        self._process: subprocess.Popen[bytes] | None = None
        self._console: _Console | None = None
        self._qmp: _Qmp | None = None
        self._tokens = itertools.count()
        self.boot_uptime: float | None = None  # guest uptime (s) at the last ready marker

    # --- lifecycle ------------------------------------------------------------------------

    def argv(self) -> list[str]:
        return qemu_argv(self.image, name=self.name, memory_mib=self.memory_mib,
                         console_socket=self.console_socket, qmp_socket=self.qmp_socket,
                         channels=self.channel_sockets, append=self._append, start_paused=True)

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
            self._console = _Console(self.console_socket, self.console_log)
            self._qmp.execute("cont")
            self._wait_shell(start=0, timeout=timeout)
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

    def _wait_shell(self, start: int, timeout: float) -> None:
        """Wait for the ready marker after ``start``, then make the shell quiet and check it."""
        console = self._require_console()
        ready = console.wait_for(re.compile(rb"MEMD-GUEST-READY uptime=([0-9.]+)"), start, timeout)
        assert READY_MARKER.encode() in ready.group(0)
        self.boot_uptime = float(ready.group(1))
        # Echo off also turns off busybox line editing (its cursor queries and redraws).
        token = self._token()
        console.send(f"stty -echo; printf '%s:%s\\n' MEMD-SYNC {token}\n".encode())
        console.wait_for(re.compile(rb"MEMD-SYNC:" + token.encode() + rb"\r?\n"),
                         ready.end(), 30.0)

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
        if self._console is not None:
            self._console.close()
            self._console = None

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
    def console_text(self) -> str:
        """Everything the console printed since start (also in :attr:`console_log`)."""
        return self._require_console().text()

    def reboot(self, timeout: float = 120.0, *, force: bool = True) -> None:
        """Reboot the guest from inside (``reboot -f``, or a clean ``reboot``); wait for its shell.

        QEMU keeps running (no ``-no-reboot``) and so do the host-side sockets.
        """
        console = self._require_console()
        start = console.position
        console.send(b"reboot -f\n" if force else b"reboot\n")
        self._wait_shell(start=start, timeout=timeout)

    # --- commands -------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run ``command`` with /bin/sh in the guest; return its exit status, stdout and stderr."""
        console = self._require_console()
        token = self._token()
        tmp = f"/tmp/.h{token}"
        encoded = base64.b64encode(command.encode()).decode()
        lines = [f": > {tmp}.b64"]
        lines += [f"echo {encoded[i:i + _LINE_CHUNK]} >> {tmp}.b64"
                  for i in range(0, len(encoded), _LINE_CHUNK)]
        lines.append(
            f"base64 -d {tmp}.b64 > {tmp}.sh; sh {tmp}.sh < /dev/null > {tmp}.out 2> {tmp}.err;"
            f" rc=$?; printf '%s:%s\\n' MEMD-OUT {token}; base64 {tmp}.out;"
            f" printf '%s:%s\\n' MEMD-ERR {token}; base64 {tmp}.err;"
            f" printf '%s:%s:%s\\n' MEMD-END {token} $rc; rm -f {tmp}.*")
        start = self._send_lines(lines[:-1], token)
        console.send(lines[-1].encode() + b"\n")
        pattern = re.compile(rb"MEMD-OUT:%s\r?\n(.*?)MEMD-ERR:%s\r?\n(.*?)MEMD-END:%s:(\d+)\r?\n"
                             % ((token.encode(),) * 3), re.DOTALL)
        try:
            match = console.wait_for(pattern, start, timeout)
        except GuestError:
            console.send(b"\x03")  # interrupt the command so the shell is usable again
            raise
        try:
            out = base64.b64decode(re.sub(rb"\s", b"", match.group(1)), validate=True)
            err = base64.b64decode(re.sub(rb"\s", b"", match.group(2)), validate=True)
        except ValueError as e:
            raise GuestError(f"garbled console output for {command!r}: {match.group(0)!r}") from e
        return CommandResult(int(match.group(3)), out, err)

    def _send_lines(self, lines: list[str], token: str) -> int:
        """Send ``lines`` in batches the tty can hold, each acknowledged; return the console
        position after the last acknowledgement (where the command's own output starts)."""
        console = self._require_console()
        start = console.position
        batches: list[list[str]] = [[]]
        for line in lines:
            if batches[-1] and sum(len(x) + 1 for x in batches[-1]) + len(line) >= _BATCH_BYTES:
                batches.append([])
            batches[-1].append(line)
        for number, batch in enumerate(batches):
            ack = f"{token}.{number}"
            text = "".join(f"{line}\n" for line in batch) + f"printf '%s:%s\\n' MEMD-ACK {ack}\n"
            console.send(text.encode())
            pattern = re.compile(rb"MEMD-ACK:" + re.escape(ack.encode()) + rb"\r?\n")
            start = console.wait_for(pattern, start, 30.0).end()
        return start

    def check(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command``; return its stdout, or raise GuestCommandError if it exits non-zero."""
        result = self.run(command, timeout)
        if result.status != 0:
            raise GuestCommandError(command, result)
        return result.stdout

    def write_file(self, path: str, data: bytes, timeout: float = 60.0) -> None:
        encoded = base64.b64encode(data).decode()
        self.check(f"base64 -d > {path} <<'EOF'\n{encoded}\nEOF\n", timeout)

    def check_bytes(self, command: str, timeout: float = 60.0) -> bytes:
        """Like :meth:`check`, but the exact stdout bytes."""
        result = self.run(command, timeout)
        if result.status != 0:
            raise GuestCommandError(command, result)
        return result.stdout_bytes

    def read_file(self, path: str, timeout: float = 60.0) -> bytes:
        return self.check_bytes(f"cat {path}", timeout)

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

    def _token(self) -> str:
        return f"{next(self._tokens)}x{secrets.token_hex(4)}"

    def _require_console(self) -> _Console:
        if self._console is None:
            raise GuestError(f"{self.name} is not running")
        return self._console


def qemu_available() -> bool:
    """True if qemu-system-x86_64 is on PATH (the VM tests skip otherwise)."""
    return any(os.access(Path(d) / "qemu-system-x86_64", os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep) if d)
