"""A minimal NBD client over a raw socket, for bad-input tests: it can send anything.

Written from the protocol's field layout (not with memd.nbd's helpers)."""

from __future__ import annotations

import socket
import struct

IHAVEOPT = b"IHAVEOPT"


class RawNbd:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def closed_by_peer(self) -> bool:
        """True when the server hung up (EOF or reset) within the timeout."""
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    def greet(self, flags: int = 3) -> None:
        greeting = self.recv_exact(18)
        assert greeting[:16] == b"NBDMAGIC" + IHAVEOPT
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies (type, data) up to ACK or an error."""
        self.sock.sendall(IHAVEOPT + struct.pack(">II", option, len(data)) + data)
        out = []
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == 0x3E889045565A9 and opt == option
            out.append((rtype, self.recv_exact(length)))
            if rtype == 1 or rtype & 0x80000000:
                return out

    def go(self, name: bytes = b"") -> int:
        """NBD_OPT_GO; → export size."""
        replies = self.option(7, struct.pack(">I", len(name)) + name + b"\0\0")
        assert replies[-1][0] == 1, replies
        (_, size, _flags) = struct.unpack(">HQH", replies[0][1])
        return int(size)

    def connect(self) -> int:
        self.greet()
        return self.go()

    def send_request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        cookie: int = 1,
        flags: int = 0,
        data: bytes = b"",
    ) -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length) + data
        )

    def reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data only when error is 0."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == 0x67446698
        return error, cookie, self.recv_exact(data_len) if error == 0 and data_len else b""

    def write(self, offset: int, data: bytes, cookie: int = 1) -> int:
        self.send_request(1, offset, len(data), cookie=cookie, data=data)
        error, got, _ = self.reply()
        assert got == cookie
        return error

    def read(self, offset: int, length: int, cookie: int = 2) -> tuple[int, bytes]:
        self.send_request(0, offset, length, cookie=cookie)
        error, got, data = self.reply(length)
        assert got == cookie
        return error, data

    def close(self) -> None:
        self.sock.close()
