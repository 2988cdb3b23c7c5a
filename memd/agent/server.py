"""The asyncio host agent: one session per guest channel, plus lifecycle.

A *channel* is the host end of one guest's virtio-serial port: a unix socket.  Two
modes, because the two kinds of guest differ in who listens:

* ``connect`` — QEMU (or libvirt's ``<source mode='bind'/>``) listens; the agent
  connects, and reconnects with backoff whenever the socket drops or is not there yet
  (VM still starting, agent restarted).
* ``listen``  — the agent listens and one peer connects (simulated guests of the
  embedded default, tests).  A new connection replaces the old one, as a rebooted
  guest reopening its port would.

Per session: bytes go through a :class:`~memd.wire.FrameDecoder`; complete frames are
dispatched in order and their replies written; ``drain()`` after each read applies
backpressure to a guest that does not read its replies.  A partial frame older than
``PARTIAL_FRAME_TIMEOUT`` is abandoned (the writer was cut mid-frame); a connection
producing more than ``MAX_BAD_FRAMES`` corrupt frames is closed — that guest only.

Runstate: ``IDLE → RUNNING → STOPPING → STOPPED``; channels may be added in RUNNING only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from dataclasses import dataclass, field

from memd import wire
from memd.agent.dispatch import Dispatcher, GuestState
from memd.errors import BackendError, FrameError, NotFound

log = logging.getLogger("memd.agent")

READ_CHUNK = 256 * 1024
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
    writer: asyncio.StreamWriter | None = None
    sessions: int = 0
    last_error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        g = self.guest
        return {
            "name": self.name, "path": self.path, "mode": self.mode, "connected": g.connected,
            "sessions": self.sessions, "requests": g.requests, "errors": g.errors,
            "bad_frames": g.bad_frames, "reboots": g.reboots,
            "boot_id": g.boot_id.hex() if g.boot_id else None, "last_error": self.last_error,
            **self.extra,
        }


class Agent:
    """Owns the channels; the Dispatcher owns the meaning of the bytes."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.channels: dict[str, Channel] = {}
        self.guests: dict[str, GuestState] = {}  # outlives channels: boot ids, counters
        self.runstate = Runstate.IDLE
        self._stopped = asyncio.Event()

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

    # -- channels --------------------------------------------------------------------------

    async def add_channel(self, name: str, path: str, mode: str = "connect") -> Channel:
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
        guest = self.guests.setdefault(name, GuestState(name))
        channel = Channel(name, path, mode, guest)
        self.channels[name] = channel
        if mode == "listen":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            channel.server = await asyncio.start_unix_server(
                lambda r, w: self._accepted(channel, r, w), path=path)
            os.chmod(path, 0o600)
        else:
            channel.task = asyncio.create_task(self._connect_loop(channel), name=f"chan-{name}")
        log.info("attached guest %s (%s %s)", name, mode, path)
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
        log.info("detached guest %s", name)

    def forget_guest(self, name: str) -> None:
        """The guest is gone for good (domain destroyed): drop its tmem client too."""
        self.guests.pop(name, None)
        if self.dispatcher.tmem.has_client(name):
            self.dispatcher.tmem.remove_client(name)

    async def _accepted(self, channel: Channel, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        if channel.writer is not None:
            channel.writer.close()  # one peer per port: the newest wins
        await self._session(channel, reader, writer)

    async def _connect_loop(self, channel: Channel) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(channel.path)
            except OSError as err:
                channel.last_error = f"{type(err).__name__}: {err.strerror or err}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._session(channel, reader, writer)
            await asyncio.sleep(RECONNECT_MIN)

    async def _session(self, channel: Channel, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        guest = channel.guest
        guest.on_disconnect()  # a new connection must HELLO again
        guest.connected = True
        channel.writer = writer
        channel.sessions += 1
        channel.last_error = None
        decoder = wire.FrameDecoder()
        # Corrupt stretches (one decoder episode each) plus frames the dispatcher
        # rejected as malformed: both count against this connection's allowance.
        bad_at_start = guest.bad_frames
        try:
            while True:
                timeout = wire.PARTIAL_FRAME_TIMEOUT if decoder.buffered else None
                try:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
                except TimeoutError:
                    items = decoder.abandon_partial()
                else:
                    if not data:
                        break
                    items = decoder.feed(data)
                for item in items:
                    if isinstance(item, FrameError):
                        guest.bad_frames += 1
                        continue
                    reply = self.dispatcher.handle(guest, item)
                    if reply:
                        writer.write(reply)
                bad = guest.bad_frames - bad_at_start
                if bad > MAX_BAD_FRAMES:
                    log.warning("guest %s: %d corrupt frames, hanging up", guest.name, bad)
                    channel.last_error = "too many corrupt frames"
                    break
                await writer.drain()
        except (ConnectionError, OSError) as err:
            channel.last_error = f"{type(err).__name__}: {err}"
        finally:
            if channel.writer is writer:
                channel.writer = None
                guest.on_disconnect()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
