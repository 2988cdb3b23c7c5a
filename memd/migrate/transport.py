"""Moving one guest's tmem between two agents: mutual TLS, the two sessions, progress.

Owns the order of a transfer between a source agent and a destination agent; the
connection is :mod:`memd.migrate.link`'s, the bytes :mod:`memd.migrate.proto`'s, the
pages :mod:`tmem.migration`'s.  All of it runs on the agent's event loop thread; the tmem work
that writes the store (staging, committing and dropping the guest, which take the
TmemHost lock) runs in worker threads (``asyncio.to_thread``), one at a time per session
— except the source's chunk reads and the destination's chunk installs, which run on the
loop thread like a guest's put batch, a bounded piece at a time: the source reads and
frames one batch of chunks (CHUNKS_PER_BATCH, ~1.2 ms) before each send, the
destination installs one received read (at most 1 MiB of frames, in practice ~256 KiB,
~160 pages, ~0.5 ms).  In a worker thread they cost more, because the loop thread,
encrypting or decrypting meanwhile, keeps taking the GIL from the worker (measured:
installs 0.59 s → 0.25 s per 256 MiB, 0.44 → 0.70 GB/s end to end; the source's first
pass 0.184 → 0.154 s of CPU, mean of 8 alternating runs).

Authentication: TLS both ways (:mod:`memd.migrate.tls`); a peer that does not speak TLS
fails the handshake.

Source (:class:`SourceTransfer`)::

    connect → BEGIN → READY → pre-copy rounds (POOLS + every chunk, then the chunks the
    guest changed meanwhile, until few change) → [wait for switchover] → final delta
    (POOLS + changed chunks) + COMMIT → CONFIRM → [wait for QEMU to complete] → DONE

It never changes the source's tmem: if anything fails before DONE the guest's state is
exactly as it was, and the agent drops the guest only after DONE is sent.

Destination (:class:`IncomingTransfer`): stages the guest (tmem.migration.Importer),
installs it under its name at COMMIT and answers CONFIRM; an ABORT or a lost connection
before COMMIT drops everything staged; an ABORT after CONFIRM (QEMU failed at the very
end) drops the installed guest; a lost connection after CONFIRM keeps it (the source may
have gone after QEMU completed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memd.errors import MemdError, MigrationFailed, TmemError
from memd.migrate import proto
from memd.migrate.link import PEER_TIMEOUT, Link
from memd.migrate.tls import parse_address
from tmem.host import TmemHost
from tmem.migration import (
    STAGING_PREFIX,
    ChangeFeed,
    ChunkKey,
    ChunkPages,
    ClientSettings,
    Exporter,
    Importer,
    PoolInfo,
)

log = logging.getLogger("memd.migrate")

#: Chunks the source reads and frames per send: up to 1024 pages, ~1.2 MiB of frames,
#: ~1.2 ms of the loop.  Small enough that the first bytes leave soon; the kernel's
#: socket buffer keeps the destination fed while the next batch is framed.
CHUNKS_PER_BATCH = 16
#: Pre-copy ends when a round finds at most this many changed chunks, or after
#: MAX_ROUNDS rounds: the rest goes in the final delta.
CONVERGED_CHUNKS = 64
MAX_ROUNDS = 10
#: While waiting for QEMU's switch-over, changes are sent this often.
TRICKLE_SECONDS = 0.2


# --- progress --------------------------------------------------------------------------------


@dataclass(slots=True)
class Progress:
    """What ``memd status`` and the metrics show about one transfer (loop thread)."""

    guest: str
    direction: str  # "out" | "in"
    peer: str
    phase: str = "connecting"
    started: float = field(default_factory=time.monotonic)
    pages_sent: int = 0  # pages shipped (out) or received (in), resent ones included
    bytes_sent: int = 0  # their payload bytes (a duplicate's whole payload each time)
    #: The CHUNK frames' bytes on the connection: a duplicate's payload crosses once.
    wire_bytes: int = 0
    chunks_remaining: int = 0
    rounds: int = 0
    switchover_ms: float | None = None
    #: Seconds the first full pass took (connect excluded): the transfer rate's basis.
    first_round_s: float | None = None
    first_round_pages: int = 0
    error: str | None = None
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        elapsed = max(end - self.started, 1e-6)
        return {
            "guest": self.guest,
            "direction": self.direction,
            "peer": self.peer,
            "phase": self.phase,
            "pages": self.pages_sent,
            "bytes": self.bytes_sent,
            "wire_bytes": self.wire_bytes,
            "chunks_remaining": self.chunks_remaining,
            "rounds": self.rounds,
            "pages_per_s": round(self.pages_sent / elapsed, 1),
            "elapsed_s": round(elapsed, 3),
            "switchover_ms": self.switchover_ms,
            "first_round_s": self.first_round_s,
            "first_round_pages": self.first_round_pages,
            "error": self.error,
        }


def _phase(progress: Progress, phase: str, **extra: Any) -> None:
    progress.phase = phase
    log.info(
        "migration of %s %s %s: %s",
        progress.guest,
        "to" if progress.direction == "out" else "from",
        progress.peer,
        phase,
        extra={"event": f"migrate-{phase}", "vm": progress.guest, **extra},
    )


# --- source --------------------------------------------------------------------------------


class SourceTransfer:
    """Ships one guest's tmem to a destination agent.  Loop thread; one task drives it
    (:meth:`precopy`, then :meth:`switchover`, then :meth:`finish` or :meth:`abort`)."""

    def __init__(
        self, host: TmemHost, feed: ChangeFeed, guest: str, dest: str, ssl_context: ssl.SSLContext
    ) -> None:
        self.exporter = Exporter(host, feed, guest)
        self.guest, self.dest = guest, dest
        self._ssl = ssl_context
        self.progress = Progress(guest, "out", dest)
        self._link: Link | None = None
        #: Frames the chunks (kept payloads, references): one batch at a time, on the
        #: loop thread, in the order they are sent.
        self._encoder = proto.Encoder()
        self._pending: list[ChunkKey] = []
        self._settings: ClientSettings | None = None
        self._pages_committed = 0
        self._inbox: list[proto.Message] = []
        #: Set once the first full pass has been sent (memd is then ready for QEMU).
        self.first_pass = asyncio.Event()
        #: A read of the destination's next message, pending while we send (ABORT watch).
        self._reader: asyncio.Future[proto.Message] | None = None

    async def connect(self) -> None:
        host, port = parse_address(self.dest)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                _, link = await loop.create_connection(
                    lambda: Link(self.dest), host, port, ssl=self._ssl, server_hostname=host
                )
        except ssl.SSLError as err:
            raise MigrationFailed(
                f"TLS with {self.dest} failed: {err.reason}", target=self.dest
            ) from None
        except (OSError, TimeoutError) as err:
            raise MigrationFailed(
                f"cannot connect to the memd agent at {self.dest}: {err}", target=self.dest
            ) from None
        self._link = link
        settings, self._pending = await asyncio.to_thread(self.exporter.start)
        self._settings = settings
        await self._link.send([proto.Begin(self.guest, settings.to_json())])
        reply = await self._expect(proto.Ready)
        _phase(self.progress, "precopy", staged=reply.staged)

    async def _expect(self, kind: type[Any]) -> Any:
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                msg = await self._next()
        except TimeoutError:
            raise MigrationFailed(
                f"{self.dest} did not answer within {PEER_TIMEOUT:g} s", target=self.dest
            ) from None
        if isinstance(msg, proto.Abort):
            raise MigrationFailed(f"{self.dest} aborted: {msg.reason}", target=self.dest)
        if not isinstance(msg, kind):
            raise MigrationFailed(
                f"{self.dest} sent {type(msg).__name__} out of turn", target=self.dest
            )
        return msg

    async def _next(self) -> proto.Message:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            return await reader
        return await self._read_one()

    async def _read_one(self) -> proto.Message:
        if not self._inbox:
            assert self._link is not None
            self._inbox = await self._link.recv_some(timeout=24 * 3600.0)
        return self._inbox.pop(0)

    async def _send(self, msgs: Sequence[proto.Message]) -> None:
        await self._send_frames(proto.encode_many(msgs))

    async def _send_frames(self, data: bytes) -> None:
        """Send; when the destination hung up, say why if it told us (its ABORT)."""
        assert self._link is not None
        try:
            await self._link.send_frames(data)
        except (OSError, ssl.SSLError) as err:
            with contextlib.suppress(MigrationFailed, TimeoutError):
                async with asyncio.timeout(2):
                    last = await self._next()
                if isinstance(last, proto.Abort):
                    raise MigrationFailed(
                        f"{self.dest} aborted: {last.reason}", target=self.dest
                    ) from None
            raise MigrationFailed(
                f"the connection to {self.dest} failed: {err}", target=self.dest
            ) from None

    async def _send_round(self, keys: list[ChunkKey]) -> None:
        """POOLS, then every chunk of *keys*, CHUNKS_PER_BATCH at a time, each batch
        read and framed on the loop thread just before it is sent (see the module
        docstring: a read-ahead worker thread cost more CPU than it overlapped)."""
        table = await asyncio.to_thread(self.exporter.pool_table)
        await self._send([_pools_message(table)])
        self.progress.chunks_remaining = len(keys)
        for start in range(0, len(keys), CHUNKS_PER_BATCH):
            await self._check_peer()
            framed = self._frame(keys[start : start + CHUNKS_PER_BATCH])
            await self._send_frames(framed.data)
            # A send that fits the write buffer does not suspend: let the loop's other
            # work (guests' channels, NBD, control, the peer's bytes) in between batches.
            await asyncio.sleep(0)
            self.progress.pages_sent += framed.pages
            self.progress.bytes_sent += framed.payload_bytes
            self.progress.wire_bytes += len(framed.data)
            self.progress.chunks_remaining = max(0, len(keys) - start - CHUNKS_PER_BATCH)
        self.progress.rounds += 1

    def _frame(self, keys: list[ChunkKey]) -> _Framed:
        """Read chunks (under the host lock) and frame them: one bounded piece of the
        loop thread's time."""
        chunks = self.exporter.read(keys)
        data = self._encoder.encode_many([_chunk_message(c) for c in chunks])
        return _Framed(
            data,
            sum(len(c.pages) for c in chunks),
            sum(_payload_bytes(c.pages) for c in chunks),
        )

    async def _check_peer(self) -> None:
        """Raise on an ABORT the destination sent while we were sending (it ran out of
        room, or its operator stopped it) or a closed connection."""
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read_one())
        if self._reader.done():
            reader, self._reader = self._reader, None
            msg = reader.result()  # raises MigrationFailed at EOF
            if isinstance(msg, proto.Abort):
                raise MigrationFailed(f"{self.dest} aborted: {msg.reason}", target=self.dest)
            raise MigrationFailed(
                f"{self.dest} sent {type(msg).__name__} out of turn", target=self.dest
            )

    async def precopy(self, until: asyncio.Event | None = None) -> None:
        """Rounds until few chunks change.  With *until* (QEMU's switch-over): keep
        sending changes until it is set, and stop as soon as it is (the final delta
        takes the rest while the guest is paused)."""
        keys, self._pending = self._pending, []
        t0 = time.monotonic()
        await self._send_round(keys)
        self.progress.first_round_s = round(time.monotonic() - t0, 4)
        self.progress.first_round_pages = self.progress.pages_sent
        self.first_pass.set()
        while True:
            keys = await asyncio.to_thread(self.exporter.take_changed)
            if until is not None and until.is_set():
                break
            converged = len(keys) <= CONVERGED_CHUNKS or self.progress.rounds >= MAX_ROUNDS
            if converged and until is None:
                break
            if converged and until is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TRICKLE_SECONDS):
                        await until.wait()
                if until.is_set():
                    break
                keys = sorted(set(keys) | set(await asyncio.to_thread(self.exporter.take_changed)))
            await self._send_round(keys)
        self._pending = keys
        _phase(self.progress, "converged")

    async def switchover(self) -> None:
        """The final delta and COMMIT, the guest paused: → once the destination has
        installed it (CONFIRM).  The source still holds everything."""
        t0 = time.monotonic()
        _phase(self.progress, "switchover")
        keys = sorted(set(self._pending) | set(await asyncio.to_thread(self.exporter.take_changed)))
        self._pending = []
        await self._send_round(keys)
        self._pages_committed = await asyncio.to_thread(self.exporter.persistent_pages)
        await self._send([proto.Commit(self._pages_committed)])
        await self._expect(proto.Confirm)
        self.progress.switchover_ms = round((time.monotonic() - t0) * 1000, 2)
        _phase(self.progress, "confirmed", ms=self.progress.switchover_ms)

    async def finish(self) -> None:
        """QEMU completed: tell the destination the guest is its own (the caller then
        drops the guest here)."""
        assert self._link is not None
        await self._link.send([proto.Done(self._pages_committed)])
        await self._close()
        self.progress.finished = time.monotonic()
        _phase(self.progress, "done")

    async def abort(self, reason: str) -> None:
        """Tell the destination to forget everything (best effort: a destination that
        lost the connection drops it by itself); the source keeps the guest."""
        self.progress.error = reason
        if self._link is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._link.send([proto.Abort(reason)])
        await self._close()
        self.progress.finished = time.monotonic()
        log.warning(
            "migration of %s to %s aborted: %s; the guest's pages stay here",
            self.guest,
            self.dest,
            reason,
            extra={"event": "migrate-aborted", "vm": self.guest},
        )
        self.progress.phase = "aborted"

    async def _close(self) -> None:
        self.exporter.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
            self._reader = None
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()


@dataclass(frozen=True, slots=True)
class _Framed:
    """A batch of chunks ready to send: its frames, pages and payload bytes."""

    data: bytes
    pages: int
    payload_bytes: int


def _payload_bytes(pages: Sequence[proto.ChunkPage]) -> int:
    return sum(map(len, map(_PAYLOAD, pages)))  # C loops: ~100k pages a second pass here


_PAYLOAD = operator.itemgetter(2)


def _pools_message(table: list[PoolInfo]) -> proto.Pools:
    return proto.Pools(
        tuple(proto.PoolEntry(p.local, p.persistent, p.shared, p.uuid, p.generation) for p in table)
    )


def _chunk_message(c: ChunkPages) -> proto.Chunk:
    return proto.Chunk(c.pool, c.generation, c.oid, c.chunk, c.pages, c.shared)


# --- destination -----------------------------------------------------------------------------

#: Called on the loop once a guest is installed here: (guest, its settings).
Installed = Callable[[str, ClientSettings], Awaitable[None]]
#: Called on the loop when an installed guest must go again (ABORT after CONFIRM).
Revoked = Callable[[str], Awaitable[None]]


class IncomingTransfer:
    """One source's connection: stage, install at COMMIT, confirm.  One task."""

    def __init__(
        self,
        host: TmemHost,
        link: Link,
        *,
        busy: Callable[[str], bool],
        installed: Installed,
        revoked: Revoked,
    ) -> None:
        self.host = host
        self.link = link
        self._busy = busy
        self._installed = installed
        self._revoked = revoked
        self.progress = Progress("?", "in", link.peer)
        self.importer: Importer | None = None

    async def run(self) -> None:
        committed = False
        try:
            committed = await self._receive()
            if committed:
                await self._after_confirm()
        except MemdError as err:
            reason = str(err)
            self.progress.error = reason
            if not committed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await self.link.send([proto.Abort(reason)])
                    # Read (and drop) what the source still sends until it hangs up:
                    # closing with unread bytes would reset the connection, and the
                    # source could lose the ABORT that says why.
                    async with asyncio.timeout(3):
                        await self.link.discard_until_eof()
            log.warning(
                "incoming migration from %s failed: %s",
                self.link.peer,
                reason,
                extra={"event": "migrate-aborted", "vm": self.progress.guest},
            )
            self.progress.phase = "aborted"
        finally:
            if not committed and self.importer is not None:
                await asyncio.to_thread(self.importer.abort)
            self.progress.finished = time.monotonic()
            await self.link.close()

    async def _receive(self) -> bool:
        link = self.link
        first = await link.recv_some()
        begin = first[0]
        if not isinstance(begin, proto.Begin):
            raise MigrationFailed("a migration starts with BEGIN", target=link.peer)
        if begin.version != proto.VERSION:
            raise MigrationFailed(
                f"migration protocol {begin.version} is not this agent's {proto.VERSION}",
                target=link.peer,
            )
        guest = begin.guest
        self.progress.guest = guest
        if guest.startswith(STAGING_PREFIX) or self._busy(guest):
            raise MigrationFailed(f"{guest} is already migrating here", target=guest)
        settings = ClientSettings.from_json(begin.client)
        self.importer = importer = Importer(self.host, guest, settings)
        await asyncio.to_thread(importer.begin)
        await link.send([proto.Ready(importer.staged)])
        _phase(self.progress, "receiving")
        backlog = first[1:]
        while True:
            msgs = backlog or await link.recv_some()
            backlog = []
            self.progress.wire_bytes = link.bytes_received
            chunks: list[ChunkPages] = []
            for msg in msgs:
                if isinstance(msg, proto.Chunk):
                    chunks.append(
                        ChunkPages(msg.pool, msg.generation, msg.oid, msg.chunk, msg.pages)
                    )
                    self.progress.pages_sent += len(msg.pages)
                    self.progress.bytes_sent += _payload_bytes(msg.pages)
                    continue
                if chunks:
                    importer.apply_chunks(chunks)  # on the loop: see the module docstring
                    chunks = []
                if isinstance(msg, proto.Pools):
                    table = [
                        PoolInfo(p.local, p.persistent, p.shared, p.uuid, p.generation)
                        for p in msg.pools
                    ]
                    await asyncio.to_thread(importer.apply_pools, table)
                elif isinstance(msg, proto.Commit):
                    _phase(self.progress, "committing")
                    await asyncio.to_thread(importer.commit, msg.pages)
                    await self._installed(guest, settings)
                    await link.send([proto.Confirm(msg.pages)])
                    _phase(self.progress, "installed", pages=msg.pages)
                    return True
                elif isinstance(msg, proto.Abort):
                    raise MigrationFailed(f"the source aborted: {msg.reason}", target=link.peer)
                else:
                    raise MigrationFailed(f"{type(msg).__name__} out of turn", target=link.peer)
            if chunks:
                importer.apply_chunks(chunks)  # on the loop: see the module docstring

    async def _after_confirm(self) -> None:
        guest = self.progress.guest
        try:
            msgs = await self.link.recv_some(timeout=24 * 3600.0)
        except MigrationFailed:
            log.warning(
                "the source of %s went away after the transfer was confirmed: "
                "keeping the guest's pages here",
                guest,
                extra={"event": "migrate-done", "vm": guest},
            )
            self.progress.phase = "done"
            return
        if isinstance(msgs[0], proto.Abort):
            log.warning(
                "the source revoked %s after the transfer (QEMU failed at "
                "switch-over: %s): dropping it here",
                guest,
                msgs[0].reason,
                extra={"event": "migrate-revoked", "vm": guest},
            )
            with contextlib.suppress(TmemError):
                await self._revoked(guest)
            self.progress.phase = "revoked"
            return
        _phase(self.progress, "done")
