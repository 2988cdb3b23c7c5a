"""An in-memory :class:`~memd.guest.transport.Transport` for guest-client tests."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

from memd.guest.transport import Transport
from memd.wire import Buffer


class MockTransport(Transport):
    """In-memory stream.  Bytes from ``incoming`` (and whatever ``responder`` returns for
    each ``send``) are handed out by ``recv``; everything sent is kept in ``sent``.  An
    exhausted mock times out at once, or reports EOF once ``eof`` is set."""

    def __init__(
        self,
        incoming: Iterable[bytes] = (),
        responder: Callable[[bytes], bytes] | None = None,
        name: str = "mock",
    ) -> None:
        self.name = name
        self.sent = bytearray()
        self.incoming: collections.deque[bytes] = collections.deque(incoming)
        self.responder = responder
        self.eof = False
        self.closed = False

    def send(self, data: Buffer) -> None:
        if self.closed:
            raise OSError("mock transport is closed")
        chunk = bytes(data)
        self.sent += chunk
        if self.responder is not None:
            reply = self.responder(chunk)
            if reply:
                self.incoming.append(reply)

    def recv(self, max_bytes: int, timeout: float | None) -> bytes:
        if self.closed:
            raise OSError("mock transport is closed")
        if not self.incoming:
            if self.eof:
                return b""
            raise TimeoutError("mock transport has nothing to read")
        chunk = self.incoming.popleft()
        if len(chunk) > max_bytes:
            self.incoming.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    def close(self) -> None:
        self.closed = True
