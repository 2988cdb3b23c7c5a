"""The asyncio shell of the NBD server: one unix socket per swap disk, moving bytes only.

Per connection: the handshake (:mod:`memd.nbd.handshake`) and then the request parser
(:mod:`memd.nbd.transmission`) are fed what arrives; the parsed requests go to the
disk (:mod:`memd.nbd.export`) in order, as many as have arrived (up to
``MAX_BATCH_REQUESTS``), and their replies are written in one go.  Requests are
carried out in arrival order; many may be in flight (QEMU pipelines up to 16 per
connection, ``qemu-img bench -d 32`` 32).

Bounds, because the client is untrusted: reading pauses while more than
``READ_HIGH_WATER`` bytes wait to be parsed (one full 32 MiB write always fits, so the
connection always progresses), while a batch runs in a thread, and while the replies
not yet taken by the client exceed the transport's high-water mark; a batch holds at
most ``BATCH_BYTES`` of payload (plus one request), which bounds the replies it makes;
a handshake not finished within ``HANDSHAKE_SECONDS`` is hung up on; an export takes at
most ``MAX_CONNECTIONS`` connections at a time.  A protocol violation closes that
connection only (after the replies to the requests before it); the agent and every
other disk carry on.

Batches larger than ``INLINE_BYTES`` run in a worker thread so that one guest's 32 MiB
request does not stall the event loop for every other guest; smaller ones run inline,
where a thread hop would cost more than the work.

A ``hold`` (memd.agent.holds) makes requests wait while the guest's pages are still
arriving with a migration.  Two things pass: the handshake (a QEMU started with
``-incoming`` opens its disk at once), and reads within the disk's first page — QEMU
reads sector 0 while it creates the virtio disk (its geometry guess), before the guest
can run, and waits for the answer with its main loop stopped (libvirt's migration would
wait for it too); a swap disk's first page is its header, which the guest reads only at
``swapon``.  A batch with anything else waits whole, and reading pauses meanwhile.

The socket is created mode 0600 (umask 0177 while it is made: no window where others
could connect) and owned by the agent's user; ``owner`` hands it to a given uid/gid
(a libvirt domain's QEMU user), and ``peer_pid`` then admits only that QEMU process (and
root), checked with SO_PEERCRED at accept — see docs/operators.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from typing import Any, Protocol

from memd import paths
from memd.errors import BackendError, NbdProtocolError
from memd.nbd.export import TRANSMISSION_FLAGS, SwapDisk
from memd.nbd.handshake import Closed, ExportInfo, Negotiated, ServerHandshake
from memd.nbd.proto import MAX_PAYLOAD, Cmd
from memd.nbd.transmission import NEED_DATA, Rejected, Request, RequestParser
from memd.vocab import PAGE_SIZE

log = logging.getLogger("memd.nbd")

READ_HIGH_WATER = MAX_PAYLOAD + (1 << 20)
MAX_BATCH_REQUESTS = 256
BATCH_BYTES = 8 << 20
INLINE_BYTES = 1 << 20
HANDSHAKE_SECONDS = 10.0
MAX_CONNECTIONS = 8


class RequestHold(Protocol):
    """Tells the server when its guest's requests must wait (memd.agent.holds)."""

    def held(self) -> bool: ...

    async def wait(self, also: asyncio.Future[Any] | None = None) -> None:
        """Return once the hold ends, or *also* is done."""


class NbdServer:
    """Serves one disk on one unix socket."""

    def __init__(
        self,
        disk: SwapDisk,
        name: str,
        path: str,
        *,
        owner: tuple[int, int] | None = None,
        peer_pid: int | None = None,
        hold: RequestHold | None = None,
    ) -> None:
        self.disk = disk
        #: While held, requests wait (not the handshake); None: never.
        self.hold = hold
        self.name = name
        self.path = path
        self.owner = owner
        #: when set, only this process (the domain's QEMU) and root may connect: every
        #: libvirt QEMU runs as the same user, so the socket's owner alone cannot tell
        #: one domain's QEMU from another's (SO_PEERCRED can)
        self.peer_pid = peer_pid
        self.refused = 0
        self.export = ExportInfo(name, disk.size, TRANSMISSION_FLAGS, f"memd swap disk of {name}")
        self.connections: set[_NbdConnection] = set()
        self.sessions = 0
        self.protocol_errors = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if os.path.exists(self.path):
            if paths.socket_accepts(self.path):
                raise BackendError(f"something already serves {self.path}", target=self.path)
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        old_umask = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(
                lambda: _NbdConnection(self), path=self.path
            )
        finally:
            os.umask(old_umask)
        if self.owner is not None:
            os.chown(self.path, *self.owner)
        log.info(
            "swap disk of %s (%d MiB) on %s",
            self.name,
            self.disk.size >> 20,
            self.path,
            extra={"event": "swap-disk", "vm": self.name},
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def describe(self) -> dict[str, Any]:
        stats = self.disk.stats(self.name).to_dict()
        stats.update(
            path=self.path,
            connections=len(self.connections),
            sessions=self.sessions,
            protocol_errors=self.protocol_errors,
            refused=self.refused,
            qemu_pid=self.peer_pid,
        )
        return stats


class _NbdConnection(asyncio.Protocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.handshake: ServerHandshake | None = ServerHandshake(server.export)
        self.parser: RequestParser | None = None
        self._wake = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        #: the worker owns the request stream (a batch in a thread, or waiting for the
        #: client to read its replies); _drain leaves everything to it meanwhile
        self._busy = False
        self._pending: list[Request | Rejected] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: the worker waits for the server's hold before requests are carried out
        self._held = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning(
                "swap disk of %s: more than %d connections, refused",
                self.server.name,
                MAX_CONNECTIONS,
                extra={"event": "nbd-refused", "vm": self.server.name},
            )
            transport.abort()
            return
        if not self._peer_allowed(transport):
            self.server.refused += 1
            transport.abort()
            return
        self.server.connections.add(self)
        assert self.handshake is not None
        transport.write(self.handshake.data_to_send())
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_SECONDS, self._handshake_timeout)
        self._worker = loop.create_task(self._work())

    def _peer_allowed(self, transport: asyncio.Transport) -> bool:
        if self.server.peer_pid is None:
            return True
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
        except (OSError, AttributeError):
            return False
        if pid == self.server.peer_pid or uid == 0:
            return True
        log.warning(
            "swap disk of %s: refused a connection from pid %d (uid %d): only its "
            "QEMU (pid %d) may connect",
            self.server.name,
            pid,
            uid,
            self.server.peer_pid,
            extra={"event": "nbd-refused", "vm": self.server.name},
        )
        return False

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self.handshake is not None:
            self._negotiate(data)
            return
        assert self.parser is not None
        self.parser.receive_data(data)
        if self.transport is not None and (self._busy or self.parser.buffered > READ_HIGH_WATER):
            # The worker owns the stream (a batch in a thread, or a client that does not
            # read its replies), or enough waits to be parsed: take no more for now.
            self.transport.pause_reading()
            self._reading_paused = True
        self._drain()

    def eof_received(self) -> bool | None:
        self._closing = True
        self._wake.set()
        return True  # the worker answers what arrived before the EOF, then closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._can_write.set()
        self._wake.set()
        if not self._lost.done():
            self._lost.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        if self._worker is not None:
            self._worker.cancel()

    # -- the phases ----------------------------------------------------------------------

    def _negotiate(self, data: bytes) -> None:
        assert self.handshake is not None and self.transport is not None
        events = self.handshake.receive_data(data)
        self.transport.write(self.handshake.data_to_send())
        for event in events:
            if isinstance(event, Closed):
                if not event.clean:
                    self.server.protocol_errors += 1
                    log.info(
                        "swap disk of %s: handshake failed: %s",
                        self.server.name,
                        event.reason,
                        extra={"event": "nbd-bad", "vm": self.server.name},
                    )
                self._close()
            elif isinstance(event, Negotiated):
                self.handshake = None
                if self._timer is not None:
                    self._timer.cancel()
                self.server.sessions += 1
                self.parser = RequestParser(self.server.disk.size)
                if event.trailing:
                    self.data_received(event.trailing)

    def _handshake_timeout(self) -> None:
        if self.handshake is not None:
            log.info(
                "swap disk of %s: handshake not finished in %.0f s",
                self.server.name,
                HANDSHAKE_SECONDS,
                extra={"event": "nbd-bad", "vm": self.server.name},
            )
            self._close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()  # after what is buffered has been written
        self._wake.set()

    async def _work(self) -> None:
        """Takes over from :meth:`_drain` when a batch must run in a thread or the client
        stopped reading its replies; hands back once that is over."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._closing and not self._busy:
                    self._drain()
                    self._close()
                    return
                if not self._busy:
                    continue
                if self._held:
                    assert self.server.hold is not None
                    await self.server.hold.wait(self._lost)
                    self._held = False
                pending, self._pending = self._pending, None
                if pending is not None:
                    replies = await asyncio.to_thread(self.server.disk.execute, pending)
                    if self.transport is None or self.transport.is_closing():
                        return
                    self.transport.writelines(replies)
                await self._can_write.wait()  # the client must read its replies
                self._busy = False
                if self._closing and (self.transport is None or self.transport.is_closing()):
                    return
                self._drain()
        except Exception:  # a bug costs this connection, never the agent
            log.exception("swap disk of %s: connection failed", self.server.name)
            self.abort()

    def _must_wait(self, batch: list[Request | Rejected]) -> bool:
        """Whether the server's hold applies to this batch (see the module docstring)."""
        hold = self.server.hold
        if hold is None or not hold.held():
            return False
        return not all(
            isinstance(r, Request) and r.cmd is Cmd.READ and r.offset + r.length <= PAGE_SIZE
            for r in batch
        )

    def _drain(self) -> None:
        """Carry out every complete request buffered, inline while the batches are small
        and the client reads its replies; otherwise leave the rest to the worker."""
        parser, transport = self.parser, self.transport
        if parser is None or transport is None or self._busy:
            return
        while not transport.is_closing():
            if not self._can_write.is_set():
                self._busy = True
                self._wake.set()
                return
            batch: list[Request | Rejected] = []
            fatal: NbdProtocolError | None = None
            size = 0
            while len(batch) < MAX_BATCH_REQUESTS:
                try:
                    event = parser.next_event()
                except NbdProtocolError as err:
                    fatal = err
                    break
                if event is NEED_DATA:
                    break
                assert isinstance(event, Request | Rejected)
                batch.append(event)
                if isinstance(event, Request):
                    if event.cmd is Cmd.READ or event.cmd is Cmd.WRITE:
                        size += event.length
                        if size >= BATCH_BYTES:
                            break  # bounds the replies one batch makes
                    elif event.cmd is Cmd.DISC:
                        break
            if fatal is not None or parser.disconnected:
                # the end of this connection: answer what came before, then close
                if batch:
                    transport.writelines(self.server.disk.execute(batch))
                if fatal is not None:
                    self.server.protocol_errors += 1
                    log.info(
                        "swap disk of %s: %s; closing the connection",
                        self.server.name,
                        fatal,
                        extra={"event": "nbd-bad", "vm": self.server.name},
                    )
                self._close()
                return
            if not batch:
                if self._reading_paused and parser.buffered <= READ_HIGH_WATER:
                    self._reading_paused = False
                    transport.resume_reading()
                return
            if self._must_wait(batch):
                # The guest's pages are still arriving: the worker waits for them, then
                # carries the batch out; nothing more is read meanwhile.
                self._pending = batch
                self._held = self._busy = True
                transport.pause_reading()
                self._reading_paused = True
                self._wake.set()
                return
            if size > INLINE_BYTES:
                self._pending = batch
                self._busy = True
                self._wake.set()
                return
            transport.writelines(self.server.disk.execute(batch))
