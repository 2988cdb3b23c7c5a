"""The asyncio host agent: one session per guest channel, plus lifecycle.

A *channel* is the host end of one guest's virtio-serial port: a unix socket.  Two
modes, because the two kinds of guest differ in who listens:

* ``connect`` — QEMU (or libvirt's ``<source mode='bind'/>``) listens; the agent
  connects, and reconnects with backoff whenever the socket drops or is not there yet
  (VM still starting, agent restarted).
* ``listen``  — the agent listens and one peer connects (simulated guests of the
  embedded default, tests).  A new connection replaces the old one, as a rebooted
  guest reopening its port would.

Per session: bytes are received straight into the agent's one receive buffer (a
:class:`asyncio.BufferedProtocol`: no allocation per read, no stream-reader copies, no
receive memory for an idle connection) and fed to the connection's
:class:`~memd.wire.FrameDecoder`; complete frames are dispatched in order and their
replies written — after the tmem store commit that every session dispatching in the
same event-loop turn shares (group commit, :meth:`Agent._dispatch`).  Reading pauses
while decoded frames wait for dispatch and until the replies are drained, which applies
backpressure to a guest that does not read its replies.  An incomplete frame whose first
byte came ``PARTIAL_FRAME_TIMEOUT`` ago is abandoned (the writer was cut mid-frame), and
the bytes held in incomplete frames across all connections are capped
(:class:`PartialFrames`); a connection producing more than ``MAX_BAD_FRAMES`` corrupt
frames is closed — that guest only.

Runstate: ``IDLE → RUNNING → STOPPING → STOPPED``; channels may be added in RUNNING only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from memd import wire
from memd.agent.dispatch import Dispatcher, GuestState
from memd.errors import BackendError, FrameError, NotFound

log = logging.getLogger("memd.agent")

READ_CHUNK = 512 * 1024  # the agent's one receive buffer; a 128-page batch frame is ~516 KiB
#: Bytes all connections together may hold in incomplete frames (see PartialFrames).
MAX_PARTIAL_BYTES = 64 << 20
MAX_BAD_FRAMES = 64  # per connection, before the agent hangs up on that guest
RECONNECT_MIN = 0.1
RECONNECT_MAX = 2.0


class Runstate(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(eq=False)
class Channel:
    """One guest channel.  ``task`` runs the accept/connect loop."""

    name: str
    path: str
    mode: str  # "connect" | "listen"
    guest: GuestState
    task: asyncio.Task[None] | None = None
    server: asyncio.Server | None = None
    writer: asyncio.BaseTransport | None = None  #: the current connection, if any
    sessions: int = 0
    last_error: str | None = None
    #: Set once the first connect attempt has ended, either way (connect mode).
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict[str, object]:
        g = self.guest
        return {
            "name": self.name, "path": self.path, "mode": self.mode, "connected": g.connected,
            "sessions": self.sessions, "requests": g.requests, "errors": g.errors,
            "bad_frames": g.bad_frames, "reboots": g.reboots,
            "boot_id": g.boot_id.hex() if g.boot_id else None, "last_error": self.last_error,
            "memory": g.memory_dict(),
        }


class Agent:
    """Owns the channels; the Dispatcher owns the meaning of the bytes."""

    def __init__(self, dispatcher: Dispatcher, *,
                 max_partial_bytes: int = MAX_PARTIAL_BYTES) -> None:
        self.dispatcher = dispatcher
        #: Bytes held in incomplete frames, all connections (loop thread).
        self.partials = PartialFrames(max_partial_bytes)
        self._scratch = _ScratchBuffer(READ_CHUNK)
        self.channels: dict[str, Channel] = {}
        self.guests: dict[str, GuestState] = {}  # outlives channels: boot ids, counters
        self.runstate = Runstate.IDLE
        self._stopped = asyncio.Event()
        #: Replies held for this event-loop turn's store commit (None: nothing held).
        #: Loop thread only, like everything here.
        self._outbox: list[tuple[asyncio.Transport, list[bytes], asyncio.Future[None]]] | (
            None) = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.runstate is not Runstate.IDLE:
            raise BackendError(f"agent cannot start from state {self.runstate.value}")
        self.runstate = Runstate.RUNNING

    async def stop(self) -> None:
        if self.runstate in (Runstate.STOPPING, Runstate.STOPPED):
            return
        self.runstate = Runstate.STOPPING
        for name in list(self.channels):
            await self.remove_channel(name)
        self.runstate = Runstate.STOPPED
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- group commit ----------------------------------------------------------------------

    async def _dispatch(self, guest: GuestState, items: list[wire.Frame | FrameError],
                        transport: asyncio.Transport) -> None:
        """Dispatch frames that arrived together; return once their replies are written.

        Group commit across requests and guests: every session that dispatches in the
        same event-loop turn shares one store commit (the first holds commits and
        schedules :meth:`_flush`, which runs after the others), and no reply leaves
        before that commit — an acknowledged put is a committed put."""
        loop = asyncio.get_running_loop()
        if self._outbox is None:
            self.dispatcher.tmem.hold_commits()
            self._outbox = []
            loop.call_soon(self._flush)
        replies = self.dispatcher.handle_all(guest, items)
        written = loop.create_future()
        self._outbox.append((transport, replies, written))
        await written

    def _flush(self) -> None:
        """Commit what this loop turn held, then write every reply it covered."""
        outbox, self._outbox = self._outbox or [], None
        try:
            self.dispatcher.tmem.release_commits()
        except Exception:  # nothing may be acknowledged: those guests reconnect and retry
            log.critical("tmem store commit failed: %d connections dropped unanswered",
                         len(outbox), exc_info=True)
            for transport, _, written in outbox:
                transport.abort()
                if not written.done():  # its session may have been cancelled meanwhile
                    written.set_result(None)
            return
        for transport, replies, written in outbox:
            if not transport.is_closing():
                for reply in replies:
                    transport.write(reply)
            if not written.done():
                written.set_result(None)

    # -- channels --------------------------------------------------------------------------

    async def add_channel(self, name: str, path: str, mode: str = "connect", *,
                          require_peer: float | None = None) -> Channel:
        """Attach a guest channel.  ``require_peer``: for an operator's attach, wait up to
        that many seconds for the first connection and fail with one sentence (leaving
        nothing attached) if the socket is missing or nobody listens on it; the libvirt
        follower passes None, since a starting QEMU may not listen yet."""
        if self.runstate is not Runstate.RUNNING:
            raise BackendError(f"agent is {self.runstate.value}: cannot attach {name!r}",
                               target=name)
        if mode not in ("connect", "listen"):
            raise BackendError(f"unknown channel mode {mode!r}", target=name)
        if name in self.channels:
            old = self.channels[name]
            if old.path == path and old.mode == mode:
                return old
            await self.remove_channel(name)
        if require_peer is not None and mode == "connect":
            _check_socket(name, path)
        guest = self.guests.setdefault(name, GuestState(name))
        channel = Channel(name, path, mode, guest)
        self.channels[name] = channel
        if mode == "listen":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            loop = asyncio.get_running_loop()
            try:
                channel.server = await loop.create_unix_server(
                    lambda: _GuestConnection(lambda conn: self._accepted(channel, conn),
                                             self._scratch, self.partials),
                    path=path)
            except OSError as err:
                del self.channels[name]
                raise BackendError(f"cannot listen for guest {name!r} on {path}: "
                                   f"{err.strerror or err}", target=name) from None
            os.chmod(path, 0o600)
        else:
            channel.task = asyncio.create_task(self._connect_loop(channel), name=f"chan-{name}")
            if require_peer is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(channel.first_attempt.wait(), require_peer)
                if not channel.guest.connected:
                    why = channel.last_error or f"no answer within {require_peer:g} s"
                    await self.remove_channel(name)
                    raise BackendError(f"cannot attach {name!r}: connecting to {path} failed "
                                       f"({why}); is the VM running with its memd channel "
                                       "on that socket?", target=name)
        log.info("attached guest %s (%s %s)", name, mode, path,
                 extra={"event": "attach", "vm": name})
        return channel

    async def remove_channel(self, name: str) -> None:
        channel = self.channels.pop(name, None)
        if channel is None:
            raise NotFound(f"no guest named {name!r} is attached", target=name)
        if channel.server is not None:
            channel.server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(channel.path)
        if channel.writer is not None:
            channel.writer.close()
        if channel.task is not None:
            channel.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel.task
        channel.guest.on_disconnect()
        log.info("detached guest %s", name, extra={"event": "detach", "vm": name})

    def forget_guest(self, name: str) -> None:
        """The guest is gone for good (domain destroyed): drop its tmem client too."""
        self.guests.pop(name, None)
        if self.dispatcher.tmem.has_client(name):
            self.dispatcher.tmem.remove_client(name)

    async def _connect_loop(self, channel: Channel) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                _, conn = await asyncio.get_running_loop().create_unix_connection(
                    lambda: _GuestConnection(None, self._scratch, self.partials),
                    channel.path)
            except OSError as err:
                channel.last_error = f"{type(err).__name__}: {err.strerror or err}"
                channel.first_attempt.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._session(channel, conn)
            await asyncio.sleep(RECONNECT_MIN)

    async def _accepted(self, channel: Channel, conn: _GuestConnection) -> None:
        if channel.writer is not None:
            channel.writer.close()  # one peer per port: the newest wins
        await self._session(channel, conn)

    async def _session(self, channel: Channel, conn: _GuestConnection) -> None:
        guest = channel.guest
        guest.on_disconnect()  # a new connection must HELLO again
        guest.connected = True
        transport = conn.transport
        assert transport is not None
        channel.writer = transport
        channel.sessions += 1
        channel.last_error = None
        channel.first_attempt.set()
        log.info("guest %s connected", guest.name, extra={"event": "connect", "vm": guest.name})
        # Corrupt stretches (one decoder episode each) plus frames the dispatcher
        # rejected as malformed: both count against this connection's allowance.
        bad_at_start = guest.bad_frames
        try:
            while True:
                if not conn.items and not conn.eof:
                    await conn.wait_input()
                    conn.abandon_if_stalled()
                if conn.error is not None and not conn.items:
                    channel.last_error = f"{type(conn.error).__name__}: {conn.error}"
                    break
                items, conn.items = conn.items, []
                if not items:  # woken by EOF, or by the stall timer
                    if conn.eof:
                        break
                    continue
                await self._dispatch(guest, items, transport)
                bad = guest.bad_frames - bad_at_start
                if bad > MAX_BAD_FRAMES:
                    log.warning("guest %s: %d corrupt frames, hanging up", guest.name, bad)
                    channel.last_error = "too many corrupt frames"
                    break
                await conn.drain()
                conn.resume_reading()
        except (ConnectionError, OSError) as err:
            channel.last_error = f"{type(err).__name__}: {err}"
        finally:
            if channel.writer is transport:
                channel.writer = None
                guest.on_disconnect()
            guest.disconnects += 1
            transport.close()
            await conn.closed
            log.info("guest %s disconnected%s", guest.name,
                     f" ({channel.last_error})" if channel.last_error else "",
                     extra={"event": "disconnect", "vm": guest.name})


def _check_socket(name: str, path: str) -> None:
    """One sentence for the operator's usual mistakes before any connect is tried."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"cannot attach {name!r}: {path} does not exist (is the VM running, "
                       "and is that its memd channel socket?)", target=name) from None
    except OSError as err:
        raise BackendError(f"cannot attach {name!r}: {path}: {err.strerror or err}",
                           target=name) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BackendError(f"cannot attach {name!r}: {path} is not a unix socket",
                           target=name)


class _ScratchBuffer:
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
        self.reader: _GuestConnection | None = None

    def lend(self, reader: _GuestConnection) -> memoryview:
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
        self._held: dict[_GuestConnection, int] = {}
        self._shedding = False

    def account(self, conn: _GuestConnection, held: int, *, new_frame: bool) -> None:
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

    def forget(self, conn: _GuestConnection) -> None:
        self.total -= self._held.pop(conn, 0)

    def _shed(self) -> None:
        self._shedding = True
        try:
            for victim in list(self._held):
                if self.total <= self.cap:
                    break
                if victim.items:  # not while its decoded frames wait (see _GuestConnection)
                    continue
                self.shed += 1
                victim.abandon_partial()
        finally:
            self._shedding = False


class _GuestConnection(asyncio.BufferedProtocol):
    """One guest connection's byte plumbing; :meth:`Agent._session` owns the meaning.

    Receive: the transport ``recv_into``s the agent's :class:`_ScratchBuffer` and the bytes
    go straight into :attr:`decoder`; decoded items wait in :attr:`items` for the session,
    and reading pauses while any wait (the session resumes it after dispatch and drain).
    So the decoder is never fed, nor made to abandon a frame, while frames it returned
    wait: a frame's payload need not outlive the next call into its decoder.
    The incomplete frame the decoder holds is dated by its first byte
    (:attr:`partial_since`), not by the last byte that arrived: bytes that do not complete
    it — a guest's resync after a cut, garbage — must not keep a dead frame alive (see
    the stall rule in docs/protocol.md).  The time reading was paused does not count: the
    guest cannot send while the agent does not read.
    Send: ``pause_writing``/``resume_writing`` gate :meth:`drain`, as for a stream
    writer.  Everything runs on the event loop thread: no locks.
    """

    def __init__(self, on_connect: Callable[[_GuestConnection], Awaitable[None]] | None,
                 scratch: _ScratchBuffer, partials: PartialFrames) -> None:
        self._on_connect = on_connect
        self._scratch = scratch
        self._partials = partials
        self._loop = asyncio.get_running_loop()
        self.decoder = wire.FrameDecoder()
        self.items: list[wire.Frame | FrameError] = []
        #: loop.time() when the first byte of the incomplete frame held by the decoder
        #: arrived (moved on by the time reading was paused); None when it holds nothing.
        self.partial_since: float | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False  #: no more bytes will arrive
        self.error: Exception | None = None  #: why the connection was lost, if not a clean EOF
        self._reading = True
        self._paused_at = 0.0  # loop.time() when reading was last paused
        self._input: asyncio.Future[None] | None = None  # set while the session waits
        self._writable: asyncio.Future[None] | None = None  # set while the session drains
        self._write_paused = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None  # the session of an accepted peer

    # -- protocol callbacks (event loop) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._on_connect is not None:
            self._task = asyncio.ensure_future(self._on_connect(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch.lend(self)

    def buffer_updated(self, nbytes: int) -> None:
        if self._scratch.reader is not self:  # see _ScratchBuffer: must never happen
            log.critical("receive buffer shared by two reads at once: connection dropped")
            self.items.append(FrameError("receive buffer reused during a read"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._decoded(self.decoder.feed(self._scratch.view[:nbytes]), new_frame=False)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self.partial_since = None  # no stall rule for a closed connection
        self._partials.forget(self)  # its bytes go with it (frames may still wait)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

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
        if items:
            self.items.extend(items)
            if self._reading and self.transport is not None:
                self._reading = False
                self._paused_at = self._loop.time()
                self.transport.pause_reading()
        if not self.closed.done():  # connection_lost forgot it
            self._partials.account(self, held, new_frame=new_frame)
        self._wake()

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
        deadline = self.partial_deadline()
        timer = None if deadline is None else self._loop.call_at(deadline, self._wake)
        try:
            await self._input
        finally:
            self._input = None
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
            self.transport.resume_reading()

    async def drain(self) -> None:
        """Return once the transport's write buffer is below its high-water mark."""
        if self.eof and self.error is not None:
            raise ConnectionResetError("connection lost")
        while self._write_paused and not self.closed.done():
            self._writable = self._loop.create_future()
            await self._writable
        if self.closed.done() and self.error is not None:
            raise ConnectionResetError("connection lost")

    def _wake(self) -> None:
        if self._input is not None and not self._input.done():
            self._input.set_result(None)
