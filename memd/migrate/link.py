"""One TLS connection between two agents carrying migration frames.

Owns the connection's bytes in both directions: what arrives is decrypted by asyncio's
TLS transport straight into the link's buffer and decoded (:mod:`memd.migrate.proto`)
into messages the session takes with :meth:`Link.recv_some`; what the session sends is
written whole and waited for as a StreamWriter's ``drain`` would.  The order of a
transfer is :mod:`memd.migrate.transport`'s.  Everything here runs on the agent's event
loop thread; one session's task reads at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from memd.errors import FrameError, MemdError, MigrationFailed
from memd.migrate import proto

#: A peer that says nothing for this long during a transfer is gone.
PEER_TIMEOUT = 60.0
#: The buffer asyncio's TLS transport decrypts into (it hands over at most 256 KiB of
#: records at a time), and how many bytes of decoded messages may wait for the session
#: before the link stops reading.
READ_BUFFER = 1 << 20
READ_AHEAD = 4 << 20


class Link(asyncio.BufferedProtocol):
    """One TLS connection carrying migration frames: the asyncio protocol of the
    connection and the session's view of it (loop thread; one session's task reads).

    A buffered protocol rather than a StreamReader: asyncio's TLS transport decrypts
    straight into :attr:`_inbound` and the bytes go to the decoder with one copy (the
    stream path copied each read three times and woke a future per read; measured: see
    docs/operators.md §9).  Reading pauses while more than :data:`READ_AHEAD` bytes of
    decoded messages wait for the session (its installs run on this same thread, so the
    transport cannot run far ahead of them anyway); writing follows the transport's
    pause/resume like a StreamWriter's drain."""

    def __init__(self, peer: str = "?", connected: Callable[[Link], None] | None = None) -> None:
        self.peer = peer
        self._connected = connected  # told once the TLS handshake is done (an accepted link)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.transport: asyncio.Transport | None = None
        self._decoder = proto.Decoder()
        self._inbound = memoryview(bytearray(READ_BUFFER))
        self._ready: list[proto.Message] = []
        self._ready_bytes = 0  # bytes of frames decoded into _ready
        self._paused_reading = False
        self._lost: BaseException | None = None  # set (an error or EOF) once the peer is gone
        self._eof = False
        self._wake: asyncio.Future[None] | None = None  # the reader waiting for messages
        self._paused_writing = False
        self._drained: asyncio.Future[None] | None = None
        self._closed = asyncio.get_running_loop().create_future()

    # -- asyncio protocol callbacks (the loop calls these) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.peer == "?":
            peer = transport.get_extra_info("peername")
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._connected is not None:
            self._connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inbound

    def buffer_updated(self, nbytes: int) -> None:
        try:
            msgs = self._decoder.feed(self._inbound[:nbytes].tobytes())
        except FrameError as err:
            self._gone(err)
            assert self.transport is not None
            self.transport.abort()
            return
        if msgs:
            self._ready += msgs
        self._ready_bytes += nbytes
        self.bytes_received += nbytes
        if self._ready_bytes > READ_AHEAD and not self._paused_reading:
            assert self.transport is not None
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(exc if exc is not None else EOFError())
        if not self._closed.done():
            self._closed.set_result(None)
        self._paused_writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _gone(self, why: BaseException) -> None:
        if self._lost is None:
            self._lost = why
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- the session's side --

    async def send(self, msgs: Sequence[proto.Message]) -> None:
        await self.send_frames(proto.encode_many(msgs))

    async def send_frames(self, data: bytes) -> None:
        """Send encoded frames: one write, so TLS cuts them into full-size records."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lost is not None:
            raise ConnectionResetError(f"the connection to {self.peer} is closed")
        self.bytes_sent += len(data)
        transport.write(data)
        if self._paused_writing:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
            if self._lost is not None and not isinstance(self._lost, EOFError):
                raise ConnectionResetError(f"the connection to {self.peer} failed: {self._lost}")

    async def recv_some(self, timeout: float = PEER_TIMEOUT) -> list[proto.Message]:
        """Every message that has arrived (at least one); MigrationFailed at EOF."""
        if not self._ready:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the wait completing.
            try:
                async with asyncio.timeout(timeout):
                    while not self._ready and self._lost is None and not self._eof:
                        self._wake = asyncio.get_running_loop().create_future()
                        try:
                            await self._wake
                        finally:
                            self._wake = None
            except TimeoutError:
                raise MigrationFailed(
                    f"{self.peer} said nothing for {timeout:g} s", target=self.peer
                ) from None
        if not self._ready:
            lost = self._lost
            if lost is None or isinstance(lost, EOFError):
                raise MigrationFailed(f"{self.peer} closed the connection", target=self.peer)
            if isinstance(lost, FrameError):
                raise lost
            raise MigrationFailed(f"the connection to {self.peer} failed: {lost}", target=self.peer)
        out, self._ready, self._ready_bytes = self._ready, [], 0
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        return out

    async def discard_until_eof(self) -> None:
        """Read and drop whatever the peer still sends until it hangs up."""
        while True:
            try:
                await self.recv_some()
            except MemdError:
                return

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await asyncio.shield(self._closed)
