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
replies written — after the tmem store commit that every read dispatched in the same
event-loop turn shares (group commit, :meth:`Agent._hold`).  While the session waits,
frames are dispatched in the read's own callback (one loop turn per read, then one for
the commit and the replies); frames that arrive while it is busy are queued and reading
pauses.  Reading also pauses while the replies are not drained (the transport's
``pause_writing``), which applies backpressure to a guest that does not read them.
An incomplete frame whose first byte came ``PARTIAL_FRAME_TIMEOUT`` ago is abandoned
(the writer was cut mid-frame), and the bytes held in incomplete frames across all
connections are capped (the byte
plumbing is :mod:`memd.agent.connection`); a connection producing more than
``MAX_BAD_FRAMES`` corrupt frames is closed — that guest only.

Runstate: ``IDLE → RUNNING → STOPPING → STOPPED``; channels may be added in RUNNING only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import stat
from dataclasses import dataclass, field

from memd import wire
from memd.agent.connection import (
    MAX_PARTIAL_BYTES,
    READ_CHUNK,
    GuestConnection,
    PartialFrames,
    ScratchBuffer,
)
from memd.agent.dispatch import Dispatcher, GuestState
from memd.agent.holds import IncomingHolds
from memd.errors import BackendError, FrameError, NotFound

log = logging.getLogger("memd.agent")

#: One read's share of a group commit: its connection, the parts of its replies, and the
#: future its session waits on until they are written (None: nobody waits).
_Held = tuple[GuestConnection, list[wire.Buffer], asyncio.Future[None] | None]

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
            "name": self.name,
            "path": self.path,
            "mode": self.mode,
            "connected": g.connected,
            "sessions": self.sessions,
            "requests": g.requests,
            "errors": g.errors,
            "bad_frames": g.bad_frames,
            "reboots": g.reboots,
            "boot_id": g.boot_id.hex() if g.boot_id else None,
            "last_error": self.last_error,
            # What the last HELLO was granted (names of wire.Capability bits).
            "capabilities": [
                c.name.lower() for c in wire.Capability if c.name and g.capabilities & c
            ],
            "memory": g.memory_dict(),
        }


class Agent:
    """Owns the channels; the Dispatcher owns the meaning of the bytes."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_partial_bytes: int = MAX_PARTIAL_BYTES,
        holds: IncomingHolds | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        #: Guests whose frames wait for an incoming migration to install them (their
        #: sessions read nothing meanwhile; memd.agent.holds).
        self.holds = holds if holds is not None else IncomingHolds()
        #: Bytes held in incomplete frames, all connections (loop thread).
        self.partials = PartialFrames(max_partial_bytes)
        self._scratch = ScratchBuffer(READ_CHUNK)
        self.channels: dict[str, Channel] = {}
        self.guests: dict[str, GuestState] = {}  # outlives channels: boot ids, counters
        self.runstate = Runstate.IDLE
        self._stopped = asyncio.Event()
        #: Replies held for this event-loop turn's store commit (None: nothing held).
        #: Loop thread only, like everything here.
        self._outbox: list[_Held] | None = None

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

    def _hold(
        self,
        guest: GuestState,
        items: list[wire.Frame | FrameError],
        conn: GuestConnection,
        written: asyncio.Future[None] | None = None,
    ) -> None:
        """Dispatch frames that arrived together; their replies wait for :meth:`_flush`.

        Group commit across requests and guests: every read dispatched in the same
        event-loop turn shares one store commit (the first holds commits and schedules
        :meth:`_flush`, which runs after the others), and no reply leaves before that
        commit — an acknowledged put is a committed put.  Replies are written in the
        order their reads were dispatched, so a connection's replies stay in order."""
        if self._outbox is None:
            self.dispatcher.tmem.hold_commits()
            self._outbox = []
            asyncio.get_running_loop().call_soon(self._flush)
        parts = self.dispatcher.handle_all(guest, items)
        self._outbox.append((conn, parts, written))

    async def _dispatch(
        self, guest: GuestState, items: list[wire.Frame | FrameError], conn: GuestConnection
    ) -> None:
        """:meth:`_hold`, then return once the replies are written."""
        written = asyncio.get_running_loop().create_future()
        self._hold(guest, items, conn, written)
        await written

    def _flush(self) -> None:
        """Commit what this loop turn held, then write every reply it covered."""
        outbox, self._outbox = self._outbox or [], None
        try:
            self.dispatcher.tmem.release_commits()
        except Exception:  # nothing may be acknowledged: those guests reconnect and retry
            log.critical(
                "tmem store commit failed: %d connections dropped unanswered",
                len(outbox),
                exc_info=True,
            )
            for conn, _, written in outbox:
                if conn.transport is not None:
                    conn.transport.abort()
                # (its session may have been cancelled meanwhile)
                if written is not None and not written.done():
                    written.set_result(None)
            return
        for conn, parts, written in outbox:
            if parts:
                conn.send(parts)  # one vectored send for all of a read's replies
            if written is not None and not written.done():
                written.set_result(None)

    # -- channels --------------------------------------------------------------------------

    async def add_channel(
        self, name: str, path: str, mode: str = "connect", *, require_peer: float | None = None
    ) -> Channel:
        """Attach a guest channel.  ``require_peer``: for an operator's attach, wait up to
        that many seconds for the first connection and fail with one sentence (leaving
        nothing attached) if the socket is missing or nobody listens on it; the libvirt
        follower passes None, since a starting QEMU may not listen yet."""
        if self.runstate is not Runstate.RUNNING:
            raise BackendError(
                f"agent is {self.runstate.value}: cannot attach {name!r}", target=name
            )
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
                    lambda: GuestConnection(
                        lambda conn: self._accepted(channel, conn), self._scratch, self.partials
                    ),
                    path=path,
                )
            except OSError as err:
                del self.channels[name]
                raise BackendError(
                    f"cannot listen for guest {name!r} on {path}: {err.strerror or err}",
                    target=name,
                ) from None
            os.chmod(path, 0o600)
        else:
            channel.task = asyncio.create_task(self._connect_loop(channel), name=f"chan-{name}")
            if require_peer is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(channel.first_attempt.wait(), require_peer)
                if not channel.guest.connected:
                    why = channel.last_error or f"no answer within {require_peer:g} s"
                    await self.remove_channel(name)
                    raise BackendError(
                        f"cannot attach {name!r}: connecting to {path} failed "
                        f"({why}); is the VM running with its memd channel "
                        "on that socket?",
                        target=name,
                    )
        log.info(
            "attached guest %s (%s %s)", name, mode, path, extra={"event": "attach", "vm": name}
        )
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
                    lambda: GuestConnection(None, self._scratch, self.partials), channel.path
                )
            except OSError as err:
                channel.last_error = f"{type(err).__name__}: {err.strerror or err}"
                channel.first_attempt.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._session(channel, conn)
            await asyncio.sleep(RECONNECT_MIN)

    async def _accepted(self, channel: Channel, conn: GuestConnection) -> None:
        if channel.writer is not None:
            channel.writer.close()  # one peer per port: the newest wins
        await self._session(channel, conn)

    async def _session(self, channel: Channel, conn: GuestConnection) -> None:
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

        def deliver(items: list[wire.Frame | FrameError]) -> None:
            """Frames read while the session waits: dispatched in the read's callback
            (or, while the guest's pages are still arriving, queued for the session)."""
            if self.holds.held(guest.name):
                conn.hold_back(items)
                return
            self._hold(guest, items, conn)
            if guest.bad_frames - bad_at_start > MAX_BAD_FRAMES:
                conn.hangup = "too many corrupt frames"
                conn.deliver = None
                conn.pause_reading()
                # After the _flush already scheduled (FIFO): this read's replies go first.
                asyncio.get_running_loop().call_soon(conn.wake)

        try:
            while True:
                if not conn.items and not conn.eof and conn.hangup is None:
                    # Frames go straight to deliver() while we wait: one loop turn per
                    # read instead of a queue, a pause of reading and a task wake-up.
                    conn.deliver = deliver
                    try:
                        await conn.wait_input()
                    finally:
                        conn.deliver = None
                    conn.abandon_if_stalled()
                if conn.hangup is not None:
                    log.warning("guest %s: %s, hanging up", guest.name, conn.hangup)
                    channel.last_error = conn.hangup
                    break
                if conn.error is not None and not conn.items:
                    channel.last_error = f"{type(conn.error).__name__}: {conn.error}"
                    break
                if conn.items and self.holds.held(guest.name):
                    # A migration is bringing this guest's pages: its frames wait (and
                    # reading stays paused) until they are installed, or the hold ends.
                    await self.holds.wait(guest.name, conn.closed)
                    if conn.closed.done():
                        break  # nobody to answer; its frames are dropped unanswered
                items, conn.items = conn.items, []
                if not items:  # woken by EOF, or by the stall timer
                    if conn.eof:
                        break
                    continue
                await self._dispatch(guest, items, conn)
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
            log.info(
                "guest %s disconnected%s",
                guest.name,
                f" ({channel.last_error})" if channel.last_error else "",
                extra={"event": "disconnect", "vm": guest.name},
            )


def _check_socket(name: str, path: str) -> None:
    """One sentence for the operator's usual mistakes before any connect is tried."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(
            f"cannot attach {name!r}: {path} does not exist (is the VM running, "
            "and is that its memd channel socket?)",
            target=name,
        ) from None
    except OSError as err:
        raise BackendError(
            f"cannot attach {name!r}: {path}: {err.strerror or err}", target=name
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BackendError(f"cannot attach {name!r}: {path} is not a unix socket", target=name)
