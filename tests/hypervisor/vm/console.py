"""Runs shell commands in a memd test guest through a serial port's shell (a unix socket).

Works for any guest booted from the vm-images image, whoever started its QEMU: the plain-QEMU
harness (tests/hypervisor/vm/harness.py: ttyS0, the only serial port) or libvirt
(vm-images/domain.xml.in:
ttyS1, ``<serial type='unix'>`` port 1, while ttyS0 is the pty ``virsh console`` opens).

The console is a login shell on ttyS0 (vm-images/inittab), so nothing about the tty is trusted:
each command travels base64-encoded into a file, runs under ``sh`` with stdin from /dev/null,
and its stdout, stderr and exit status come back base64-encoded between markers that carry a
per-command token. Markers are printed with ``printf '%s:%s'`` so that the command line itself
never contains them (echo is switched off too), and base64 keeps every byte exact through the
tty's newline translation. Input is sent in batches the guest tty can hold, each acknowledged.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hypervisor.vmimage import READY_MARKER

_READY = re.compile(re.escape(READY_MARKER).encode() + rb" uptime=([0-9.]+)")
_LINE_CHUNK = 768  # base64 chars per console line: far below the tty's 4095-byte line limit
# Bytes sent before waiting for the shell to catch up: the guest tty buffers only a few KiB of
# unread input (n_tty) plus its flip buffers, and drops what overflows.
_BATCH_BYTES = 3072


class GuestError(Exception):
    """The guest or its QEMU did not behave: no boot, a timeout, garbled console output."""


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


class GuestCommandError(GuestError):
    """A command run by :meth:`GuestShell.check` exited non-zero."""

    def __init__(self, command: str, result: CommandResult) -> None:
        super().__init__(
            f"guest command {command!r} exited {result.status}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
        self.result = result


class _ConsoleReader:
    """Reads the console socket on a thread into one growing buffer (also appended to a log)."""

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


class GuestShell:
    """The guest's console shell. Connect before the guest runs and call :meth:`wait_ready`, or
    attach to a running guest (e.g. one libvirt started) with :meth:`attach`."""

    def __init__(self, console_socket: Path, log_path: Path) -> None:
        self._console = _ConsoleReader(console_socket, log_path)
        self._tokens = itertools.count()
        self.boot_uptime: float | None = None  # guest uptime (s) at the last ready marker

    @property
    def position(self) -> int:
        """Bytes of console output so far (a start point for :meth:`wait_ready`)."""
        return self._console.position

    @property
    def text(self) -> str:
        """Everything the console printed since connecting."""
        return self._console.text()

    def wait_ready(self, start: int = 0, timeout: float = 120.0) -> None:
        """Wait for the ready marker printed after ``start``, then quiet the shell and check it."""
        ready = self._console.wait_for(_READY, start, timeout)
        self.boot_uptime = float(ready.group(1))
        self._sync(ready.end(), attempts=1, timeout=30.0)

    def attach(self, timeout: float = 120.0) -> None:
        """Take over a shell that may have printed its ready marker before we connected (or may
        still be booting): prod it until it answers."""
        attempts = max(1, int(timeout / 3))
        self._sync(self._console.position, attempts=attempts, timeout=3.0)

    def _sync(self, start: int, *, attempts: int, timeout: float) -> None:
        # Echo off also turns off busybox line editing (its cursor queries and redraws).
        for attempt in range(attempts):
            token = self._token()
            self._console.send(f"stty -echo; printf '%s:%s\\n' MEMD-SYNC {token}\n".encode())
            pattern = re.compile(rb"MEMD-SYNC:" + token.encode() + rb"\r?\n")
            try:
                self._console.wait_for(pattern, start, timeout)
                return
            except GuestError:
                if attempt == attempts - 1:
                    raise

    def reboot(self, *, force: bool = True, timeout: float = 120.0) -> None:
        """Reboot from inside (``reboot -f``, or a clean ``reboot``); wait for the new shell."""
        start = self._console.position
        self._console.send(b"reboot -f\n" if force else b"reboot\n")
        self.wait_ready(start, timeout)

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run ``command`` with /bin/sh in the guest; return its exit status, stdout and stderr."""
        token = self._token()
        tmp = f"/tmp/.h{token}"
        encoded = base64.b64encode(command.encode()).decode()
        lines = [f": > {tmp}.b64"]
        lines += [
            f"echo {encoded[i : i + _LINE_CHUNK]} >> {tmp}.b64"
            for i in range(0, len(encoded), _LINE_CHUNK)
        ]
        start = self._send_lines(lines, token)
        self._console.send(
            f"base64 -d {tmp}.b64 > {tmp}.sh; sh {tmp}.sh < /dev/null > {tmp}.out 2> {tmp}.err;"
            f" rc=$?; printf '%s:%s\\n' MEMD-OUT {token}; base64 {tmp}.out;"
            f" printf '%s:%s\\n' MEMD-ERR {token}; base64 {tmp}.err;"
            f" printf '%s:%s:%s\\n' MEMD-END {token} $rc; rm -f {tmp}.*\n".encode()
        )
        pattern = re.compile(
            rb"MEMD-OUT:%s\r?\n(.*?)MEMD-ERR:%s\r?\n(.*?)MEMD-END:%s:(\d+)\r?\n"
            % ((token.encode(),) * 3),
            re.DOTALL,
        )
        try:
            match = self._console.wait_for(pattern, start, timeout)
        except GuestError:
            self._console.send(b"\x03")  # interrupt the command so the shell is usable again
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
        start = self._console.position
        batches: list[list[str]] = [[]]
        for line in lines:
            if batches[-1] and sum(len(x) + 1 for x in batches[-1]) + len(line) >= _BATCH_BYTES:
                batches.append([])
            batches[-1].append(line)
        for number, batch in enumerate(batches):
            ack = f"{token}.{number}"
            text = "".join(f"{line}\n" for line in batch) + f"printf '%s:%s\\n' MEMD-ACK {ack}\n"
            self._console.send(text.encode())
            pattern = re.compile(rb"MEMD-ACK:" + re.escape(ack.encode()) + rb"\r?\n")
            start = self._console.wait_for(pattern, start, 30.0).end()
        return start

    def check(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command``; return its stdout, or raise GuestCommandError if it exits non-zero."""
        return self.check_bytes(command, timeout).decode(errors="replace")

    def check_bytes(self, command: str, timeout: float = 60.0) -> bytes:
        """Like :meth:`check`, but the exact stdout bytes."""
        result = self.run(command, timeout)
        if result.status != 0:
            raise GuestCommandError(command, result)
        return result.stdout_bytes

    def write_file(self, path: str, data: bytes, timeout: float = 60.0) -> None:
        encoded = base64.b64encode(data).decode()
        self.check(f"base64 -d > {path} <<'EOF'\n{encoded}\nEOF\n", timeout)

    def read_file(self, path: str, timeout: float = 60.0) -> bytes:
        return self.check_bytes(f"cat {path}", timeout)

    def close(self) -> None:
        self._console.close()

    def _token(self) -> str:
        return f"{next(self._tokens)}x{secrets.token_hex(4)}"
