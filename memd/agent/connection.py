"""A guest connection's bytes: the receive buffer, the decoder, the stall rule, the cap.

What the server (:mod:`memd.agent.server`) needs below the meaning of frames:

* :class:`ScratchBuffer` — the one receive buffer every connection of an agent reads
  into (a connection costs no receive memory while it sends nothing);
* :class:`PartialFrames` — the bytes all connections hold in incomplete frames, with a
  cap past which the oldest incomplete frames are abandoned;
* :class:`GuestConnection` — the asyncio protocol of one connection: bytes into its
  :class:`~memd.wire.FrameDecoder`, decoded frames queued for the session, the stall rule
  of docs/protocol.md (an incomplete frame whose first byte came
  ``PARTIAL_FRAME_TIMEOUT`` ago is abandoned), read and write backpressure.

Everything here is used by the event loop thread only: no locks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

from memd import wire
from memd.errors import FrameError

log = logging.getLogger("memd.agent")

READ_CHUNK = 512 * 1024  # the agent's one receive buffer; a 128-page batch frame is ~516 KiB
#: Bytes all connections together may hold in incomplete frames (see PartialFrames).
MAX_PARTIAL_BYTES = 64 << 20
#: Kernel send buffer asked for each connection (Linux caps it at net.core.wmem_max and
#: doubles it).  The default (~208 KiB) is less than one 128-page GET_BATCH reply (~516
#: KiB), so each such reply took several sends, loop turns and guest reads, and asyncio
#: copied the part the kernel did not take twice.  Kernel memory is used only while the
#: guest has not read its replies, and reading stays paused meanwhile (backpressure).
SEND_BUFFER = 2 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class ScratchBuffer:
    """The one receive buffer every connection of an agent reads into.

    Why one is enough: the event loop calls ``get_buffer``, ``recv_into`` and
    ``buffer_updated`` in one callback, with no other connection's read in between, and
    ``buffer_updated`` hands the bytes to the connection's decoder, which copies what it
    keeps.  So the buffer is scratch space for one read at a time, and a connection costs
    no receive memory while it sends nothing (it used to cost 512 KiB from its accept).
    :attr:`reader` records who was lent it last, so that an event loop that interleaved
    two reads would be caught instead of mixing two guests' bytes.  Loop thread only.
    """

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
        self.reader: GuestConnection | None = None

    def lend(self, reader: GuestConnection) -> memoryview:
        self.reader = reader
        return self.view


class PartialFrames:
    """Bytes the agent holds in incomplete frames, per connection and in all, with a cap.

    Each connection's decoder keeps at most one frame plus one read, but a thousand
    connections that each send half a frame and then nothing would still hold a thousand
    half frames (they go after PARTIAL_FRAME_TIMEOUT, and come back).  Past ``cap`` bytes,
    the oldest incomplete frames are abandoned first — before their timeout — until the
    total is under the cap: a legitimate frame arrives whole within milliseconds, so the
    oldest are the dead or hostile ones.  Each abandoned frame counts as a bad frame of
    its connection (the decoder reports the episode), so a connection that keeps doing
    it is hung up on like any corrupt stream.  Loop thread only.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0  #: bytes held now
        self.high_water = 0  #: the most ever held (the cap is checked after each read)
        self.shed = 0  #: incomplete frames abandoned early to stay under the cap
        #: Connections holding bytes → how many; insertion order is the age of each one's
        #: incomplete frame (a connection is moved to the end when a new one begins).
        self._held: dict[GuestConnection, int] = {}
        self._shedding = False

    def account(self, conn: GuestConnection, held: int, *, new_frame: bool) -> None:
        """Record what ``conn`` holds after a decode; ``new_frame``: what it holds now
        began after what it held before."""
        old = self._held.pop(conn, 0) if new_frame or not held else self._held.get(conn, 0)
        if held:
            self._held[conn] = held
        self.total += held - old
        if self.total > self.high_water:
            self.high_water = self.total
        if self.total > self.cap and not self._shedding:
            self._shed()

    def forget(self, conn: GuestConnection) -> None:
        self.total -= self._held.pop(conn, 0)

    def _shed(self) -> None:
        self._shedding = True
        try:
            for victim in list(self._held):
                if self.total <= self.cap:
                    break
                if victim.items:  # not while its decoded frames wait (see GuestConnection)
                    continue
                self.shed += 1
                victim.abandon_partial()
        finally:
            self._shedding = False


class GuestConnection(asyncio.BufferedProtocol):
    """One guest connection's byte plumbing; :meth:`Agent._session` owns the meaning.

    Receive: the transport ``recv_into``s the agent's :class:`ScratchBuffer` and the bytes
    go straight into :attr:`decoder`.  While the session waits with nothing queued it
    sets :attr:`deliver`, and decoded items go to it within the read's callback (it
    dispatches them at once); otherwise they wait in :attr:`items` and reading pauses
    while any wait (the session resumes it after dispatch and drain).  Either way the
    decoder is never fed, nor made to abandon a frame, while frames it returned wait: a
    frame's payload need not outlive the next call into its decoder.
    The incomplete frame the decoder holds is dated by its first byte
    (:attr:`partial_since`), not by the last byte that arrived: bytes that do not complete
    it — a guest's resync after a cut, garbage — must not keep a dead frame alive (see
    the stall rule in docs/protocol.md).  The time reading was paused does not count: the
    guest cannot send while the agent does not read.
    Send: :meth:`send` writes reply parts with one ``writev``;
    ``pause_writing``/``resume_writing`` gate :meth:`drain`, as for a stream writer, and
    pause reading meanwhile (backpressure on a guest that does not read its replies).
    Everything runs on the event loop thread: no locks.
    """

    def __init__(
        self,
        on_connect: Callable[[GuestConnection], Awaitable[None]] | None,
        scratch: ScratchBuffer,
        partials: PartialFrames,
    ) -> None:
        self._on_connect = on_connect
        self._scratch = scratch
        self._partials = partials
        self._loop = asyncio.get_running_loop()
        self.decoder = wire.FrameDecoder()
        self.items: list[wire.Frame | FrameError] = []
        #: Set by the session while it waits with nothing queued: what the decoder
        #: returns then is handed to it at once, in the read's own callback (no queue,
        #: no pause of reading, no task wake-up per read).  None: queue and pause.
        self.deliver: Callable[[list[wire.Frame | FrameError]], None] | None = None
        #: Why the session must end, set by ``deliver`` (e.g. too many corrupt frames).
        self.hangup: str | None = None
        #: loop.time() when the first byte of the incomplete frame held by the decoder
        #: arrived (moved on by the time reading was paused); None when it holds nothing.
        self.partial_since: float | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False  #: no more bytes will arrive
        self.error: Exception | None = None  #: why the connection was lost, if not a clean EOF
        self._reading = True
        self._paused_at = 0.0  # loop.time() when reading was last paused
        self._input: asyncio.Future[None] | None = None  # set while the session waits
        self._timer_armed = False  # wait_input armed a stall timer for this wait
        self._write_paused_reading = False  # reading was paused by pause_writing
        self._writable: asyncio.Future[None] | None = None  # set while the session drains
        self._write_paused = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None  # the session of an accepted peer
        self._fd = -1  # the socket's descriptor, for send() (-1: not a socket)

    # -- protocol callbacks (event loop) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self._fd = -1 if sock is None else sock.fileno()
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError as err:  # not a socket we may tune: its default then
                log.debug("cannot enlarge the send buffer: %s", err)
        if self._on_connect is not None:
            self._task = asyncio.ensure_future(self._on_connect(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch.lend(self)

    def buffer_updated(self, nbytes: int) -> None:
        if self._scratch.reader is not self:  # see ScratchBuffer: must never happen
            log.critical("receive buffer shared by two reads at once: connection dropped")
            self.items.append(FrameError("receive buffer reused during a read"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._decoded(self.decoder.feed(self._scratch.view[:nbytes]), new_frame=False)

    def eof_received(self) -> bool:
        self.eof = True
        self.wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self.partial_since = None  # no stall rule for a closed connection
        self._partials.forget(self)  # its bytes go with it (frames may still wait)
        self.wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        # A guest that does not read its replies gets no more requests read: with
        # frames delivered straight to the session, this is where backpressure starts.
        if self._reading:
            self._write_paused_reading = True
            self.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._write_paused_reading:
            self._write_paused_reading = False
            if not self.items and self.hangup is None:  # else the session resumes it
                self.resume_reading()

    # -- the incomplete frame --------------------------------------------------------------

    def _decoded(self, items: list[wire.Frame | FrameError], *, new_frame: bool) -> None:
        """Take what one decoder call returned.  ``new_frame``: whatever the decoder still
        holds began after what it held before (it abandoned that); so does it when a
        frame completed, since a decoder holds at most the bytes after its last frame."""
        if any(not isinstance(item, FrameError) for item in items):
            new_frame = True
        held = self.decoder.buffered
        if not held:
            self.partial_since = None
        elif new_frame or self.partial_since is None:
            self.partial_since = self._loop.time()
        queued = False
        if items:
            if self.deliver is not None and not self.items and not self._write_paused:
                self.deliver(items)
            else:
                queued = True
                self.items.extend(items)
                self.pause_reading()
        if not self.closed.done():  # connection_lost forgot it
            self._partials.account(self, held, new_frame=new_frame)
        # Wake the session for queued items, or to arm the stall timer for an incomplete
        # frame that began while it waited without one (a timer armed for an earlier
        # deadline wakes it early, and it re-arms: harmless).
        if queued or (self.partial_since is not None and not self._timer_armed):
            self.wake()

    def hold_back(self, items: list[wire.Frame | FrameError]) -> None:
        """For ``deliver``: frames that may not be dispatched yet (their guest is held,
        memd.agent.holds) wait in :attr:`items` like frames read while the session was
        busy, reading pauses, and the session is woken to wait for the hold."""
        self.items.extend(items)
        self.pause_reading()
        self.wake()

    def pause_reading(self) -> None:
        """Read nothing more until :meth:`resume_reading`."""
        if self._reading and self.transport is not None:
            self._reading = False
            self._paused_at = self._loop.time()
            self.transport.pause_reading()

    def partial_deadline(self) -> float | None:
        """loop.time() at which the held incomplete frame is abandoned, if any is held."""
        if self.partial_since is None:
            return None
        return self.partial_since + wire.PARTIAL_FRAME_TIMEOUT

    def abandon_partial(self) -> None:
        """Treat the incomplete frame as garbage (its writer is gone) and rescan after its
        first byte; what that finds (a resync's SYNC, say) goes to the session."""
        if self.decoder.buffered:
            self._decoded(self.decoder.abandon_partial(), new_frame=True)

    # -- for the session -------------------------------------------------------------------

    async def wait_input(self) -> None:
        """Wait until items or EOF arrive, or the incomplete frame's deadline passes (the
        session then calls :meth:`abandon_if_stalled`)."""
        self._input = self._loop.create_future()
        # No timer while reading is paused (that time does not count; resume_reading
        # wakes the session to arm it): a deadline already past would only spin.
        deadline = self.partial_deadline() if self._reading else None
        timer = None if deadline is None else self._loop.call_at(deadline, self.wake)
        self._timer_armed = timer is not None
        try:
            await self._input
        finally:
            self._input = None
            self._timer_armed = False
            if timer is not None:
                timer.cancel()

    def abandon_if_stalled(self) -> None:
        """Apply the stall rule: abandon an incomplete frame older than
        PARTIAL_FRAME_TIMEOUT (reading time only)."""
        deadline = self.partial_deadline()
        if deadline is not None and self._reading and self._loop.time() >= deadline:
            self.abandon_partial()

    def resume_reading(self) -> None:
        if not self._reading and self.transport is not None and not self.eof:
            self._reading = True
            if self.partial_since is not None:  # the guest could not send meanwhile
                self.partial_since += self._loop.time() - self._paused_at
                self.wake()  # a waiting session arms the stall timer again
            self.transport.resume_reading()

    def send(self, parts: Sequence[wire.Buffer]) -> None:
        """Write ``parts`` in order, as few vectored sends as the kernel allows.

        asyncio 3.11's ``writelines`` joins the parts (a copy of every page of a
        GET_BATCH reply) and, if the kernel takes only some, copies the rest twice more
        (a slice, then into its buffer).  So while the transport holds nothing, parts go
        to the socket with ``writev`` — safe behind the transport's back exactly then,
        as that is what its own ``write`` does.  Where the kernel stops taking them, the
        part it stopped in goes to the transport's ``write`` (which tries once more,
        then buffers); if that left bytes buffered the rest are appended behind them
        (one copy each, sent when the socket is writable again), else ``writev``
        resumes.  Part by part into an empty transport instead would cost one send
        system call per page while a fast reader keeps the socket draining."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        at = 0  # parts[:at] are written or with the transport
        while at < len(parts):
            if self._fd < 0 or transport.get_write_buffer_size():
                for part in parts[at:]:  # behind what the transport holds: appended
                    if len(part):
                        transport.write(part)
                return
            end = min(at + _IOV_MAX, len(parts))
            try:
                sent = os.writev(self._fd, parts[at:end])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the transport meets the same error and reports it its way
                self._fd = -1
                continue
            while at < end and sent >= len(parts[at]):
                sent -= len(parts[at])
                at += 1
            if at < end:  # the kernel is full: the transport takes the part it stopped in
                transport.write(memoryview(parts[at]).cast("B")[sent:])
                at += 1

    async def drain(self) -> None:
        """Return once the transport's write buffer is below its high-water mark."""
        if self.eof and self.error is not None:
            raise ConnectionResetError("connection lost")
        while self._write_paused and not self.closed.done():
            self._writable = self._loop.create_future()
            await self._writable
        if self.closed.done() and self.error is not None:
            raise ConnectionResetError("connection lost")

    def wake(self) -> None:
        """Wake the waiting session (for input, EOF, its stall timer, a hangup)."""
        if self._input is not None and not self._input.done():
            self._input.set_result(None)
