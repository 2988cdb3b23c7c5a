"""One client's persistent state out of a TmemHost and into another (pure: no I/O).

Owns three things a live migration of a guest's tmem needs, and nothing of the transfer:

* :class:`ChangeFeed` — a change listener (:class:`~tmem.durable.RecordSink`, given to
  ``TmemHost(listeners=...)`` at construction) that tells its watchers which radix
  chunks of persistent pools changed.  The host's journal (``tmem.journal``) hands every
  listener a record of each changed chunk just before each commit, so the feed sees
  every change the store sees, and TmemHost itself is not touched.  The feed is called
  under the host lock; watchers are added, drained and removed under it too.
* :class:`Exporter` — the source: the client's pool table and, chunk by chunk, every
  persistent page as ``(index, xxh3, stored payload)``: the lz4 block (or raw page) the
  store holds, never recompressed.  Ephemeral pages are not exported (tmem may drop
  them at any time); ephemeral pools are, empty, so the guest's pool ids stay valid.
* :class:`Importer` — the destination: holds the incoming guest as a *staged* client
  (``STAGING_PREFIX`` + name, which no channel names) whose pages go through the normal
  put path, so they are persisted in the destination's store as they arrive, crash-safe
  like any persistent page; :meth:`Importer.commit` then renames the staged client to the
  guest's name in one transaction (all or nothing), :meth:`Importer.abort` drops it.  A
  destination that dies mid-transfer finds the staged client at restart and drops it
  (:func:`drop_leftovers`).

Like ``tmem.put``, ``tmem.restore`` and ``tmem.audit`` this works on the host's
:class:`~tmem.state.HostState`; every function here takes the host lock (``_writing``
where it writes, so the store commits before the lock is released).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import TYPE_CHECKING, Any

import numpy as np

from memd.errors import InvalidArgument, NoSpace, TmemError
from tmem.durable import ClientRecord, PoolRecord
from tmem.pages import RADIX_BITS, RADIX_FANOUT
from tmem.put import PutItem, WholeChunk, install_chunks, put_many
from tmem.types import Oid

if TYPE_CHECKING:
    from tmem.host import TmemHost
    from tmem.state import Client, HostState, Pool

#: Staged clients are named so; a channel name with this prefix is not a real guest.
STAGING_PREFIX = "migrating:"
#: The slots of a chunk that holds no page (Exporter.read: a chunk read after its last
#: page went).
_NO_SLOTS = array("i", [-1] * RADIX_FANOUT)
#: (pool gid, oid, chunk number): the unit of change tracking and of transfer.
ChunkKey = tuple[int, Oid, int]


# --- change feed -----------------------------------------------------------------------


class ChangeFeed:
    """A change listener that records changed chunks for its watchers.

    Every method runs under the TmemHost lock (the journal calls it so), and so do
    :meth:`watch`, :meth:`unwatch` and the draining of a watcher's set (Exporter).
    Client and pool records are not needed: the Exporter reads the pool table whole.
    """

    def __init__(self) -> None:
        self._watchers: list[set[ChunkKey]] = []

    def watch(self) -> set[ChunkKey]:
        changed: set[ChunkKey] = set()
        self._watchers.append(changed)
        return changed

    def unwatch(self, changed: set[ChunkKey]) -> None:
        self._watchers = [w for w in self._watchers if w is not changed]

    def _note(self, gid: int, oid: Oid, chunk: int) -> None:
        for changed in self._watchers:
            changed.add((gid, oid, chunk))

    # RecordSink ---------------------------------------------------------------------------

    def put_chunk(self, gid: int, oid: Oid, chunk: int, entries: Sequence[tuple[int, int]]) -> None:
        self._note(gid, oid, chunk)

    def drop_chunk(self, gid: int, oid: Oid, chunk: int) -> None:
        self._note(gid, oid, chunk)

    def put_client(self, record: ClientRecord) -> None:
        pass

    def drop_client(self, name: str) -> None:
        pass

    def put_pool(self, record: PoolRecord) -> None:
        pass

    def drop_pool(self, gid: int) -> None:
        pass


def _listens(host: TmemHost, feed: ChangeFeed) -> bool:
    """Whether *feed* hears *host*'s changes (a host built with it as a listener)."""
    return host._state.journal.reports_to(feed)


# --- what moves ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolInfo:
    local: int
    persistent: bool
    shared: bool
    uuid: bytes | None
    generation: int  # the source's gid of the pool


@dataclass(frozen=True, slots=True)
class ChunkPages:
    """One radix chunk of one persistent pool: every page in it (empty: none)."""

    pool: int  # local pool id
    generation: int
    oid: Oid
    chunk: int
    pages: tuple[tuple[int, int, bytes], ...]  # (index, xxh3-64, stored payload)
    #: Indexes whose blob other pages share too (the source's dedup): the transfer
    #: sends such a payload once and refers to it after (memd.migrate.proto).
    shared: frozenset[int] = frozenset()


@dataclass(slots=True)
class ClientSettings:
    """What the destination needs to recreate the client (not its counters)."""

    weight: int
    cap_pages: int | None
    dedup: bool
    frozen: bool
    authorised: list[bytes] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "cap_pages": self.cap_pages,
            "dedup": self.dedup,
            "frozen": self.frozen,
            "authorised": [a.hex() for a in self.authorised],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ClientSettings:
        try:
            cap = obj["cap_pages"]
            return cls(
                int(obj["weight"]),
                None if cap is None else int(cap),
                bool(obj["dedup"]),
                bool(obj["frozen"]),
                [bytes.fromhex(a) for a in obj["authorised"]],
                dict(obj["meta"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(f"malformed client settings: {err}", op="migrate") from None


# --- source ----------------------------------------------------------------------------


class Exporter:
    """Reads one client's state for transfer; never changes the host.

    Owned by one task (the source session); every method takes the host lock.
    """

    def __init__(self, host: TmemHost, feed: ChangeFeed, name: str) -> None:
        if not _listens(host, feed):
            raise InvalidArgument(
                "migration needs the host built with its ChangeFeed as a listener",
                op="migrate",
                client=name,
            )
        self.host = host
        self.feed = feed
        self.name = name
        self._changed: set[ChunkKey] | None = None

    def start(self) -> tuple[ClientSettings, list[ChunkKey]]:
        """Start watching; → the client's settings and every chunk of its persistent
        pools now (a change from here on shows in :meth:`take_changed`)."""
        with self.host._writing() as state:
            client = state.client(self.name, "migrate")
            self._changed = self.feed.watch()
            settings = ClientSettings(
                client.weight,
                client.cap_pages,
                client.dedup,
                client.frozen,
                sorted(client.authorised),
                dict(client.meta),
            )
            keys: list[ChunkKey] = []
            radix = state.pages.radix
            for pool in _pools(state, client):
                if pool.persistent:
                    for oid, objno in pool.objects.items():
                        chunks = radix[objno]
                        assert chunks is not None
                        keys.extend((pool.gid, oid, c) for c in chunks)
            return settings, sorted(keys)

    def close(self) -> None:
        if self._changed is not None:
            with self.host._lock:
                self.feed.unwatch(self._changed)
            self._changed = None

    def pool_table(self) -> list[PoolInfo]:
        with self.host._lock:
            state = self.host._state
            client = state.client(self.name, "migrate")
            return [
                PoolInfo(local, p.persistent, p.shared, p.uuid, p.gid)
                for local, p in (
                    (lc, state.pools[g]) for lc, g in enumerate(client.pools) if g is not None
                )
            ]

    def take_changed(self) -> list[ChunkKey]:
        """Chunks of this client's persistent pools changed since the last call (or
        since :meth:`start`), after committing what the host had not yet written."""
        assert self._changed is not None, "start() first"
        with self.host._writing() as state:
            client = state.client(self.name, "migrate")
            mine = {p.gid for p in _pools(state, client) if p.persistent}
            out = sorted(k for k in self._changed if k[0] in mine)
            self._changed.clear()
            return out

    def read(self, keys: Iterable[ChunkKey]) -> list[ChunkPages]:
        """The chunks as they are now (a chunk of a pool that is gone is left out).

        The chunks' slots are gathered into one array and their pages' columns read
        with numpy (``PageStore.export_columns``: the payloads kept in the host's
        persistent log in one call, each blob once — a duplicate page is one blob for
        many pages); per page only the result tuple is built, in C (``zip``)."""
        heads: list[tuple[int, int, Oid, int]] = []
        slots = array("i")
        with self.host._lock:
            state = self.host._state
            client = state.client(self.name, "migrate")
            local_of = {g: lc for lc, g in enumerate(client.pools) if g is not None}
            pages = state.pages
            for gid, oid, chunk_no in keys:
                local = local_of.get(gid)
                if local is None:
                    continue
                objno = state.pools[gid].objects.get(oid)
                radix = None if objno is None else pages.radix[objno]
                chunk = None if radix is None else radix.get(chunk_no)
                # A chunk's slots are in index order (slot i holds index chunk * 64 + i).
                slots += _NO_SLOTS if chunk is None else chunk
                heads.append((local, gid, oid, chunk_no))
            if not heads:
                return []
            grid = np.frombuffer(slots, dtype=np.int32).reshape(len(heads), RADIX_FANOUT)
            held = grid >= 0
            counts = held.sum(axis=1).tolist()
            live = grid[held]
            del grid  # the view of `slots` (numpy copies on the gathers below)
            indexes = np.frombuffer(pages.index, dtype=np.uint32)[live].tolist()
            blobs = np.frombuffer(pages.blob, dtype=np.int32)[live]
            hashes, shared, payloads = state.store.export_columns(blobs)
        rows = list(zip(indexes, hashes, payloads, strict=True))
        out: list[ChunkPages] = []
        at = 0
        for (local, gid, oid, chunk_no), n in zip(heads, counts, strict=True):
            end = at + n
            out.append(
                ChunkPages(
                    local,
                    gid,
                    oid,
                    chunk_no,
                    tuple(rows[at:end]),
                    frozenset(compress(indexes[at:end], shared[at:end])),
                )
            )
            at = end
        return out

    def persistent_pages(self) -> int:
        with self.host._lock:
            return self.host._state.client(self.name, "migrate").persistent_pages

    def holds_pages(self, local: int) -> int:
        """Pages in one local pool (0 when it does not exist)."""
        with self.host._lock:
            state = self.host._state
            gid = state.client(self.name, "migrate").pools[local]
            return 0 if gid is None else state.pools[gid].pages


def _pools(state: HostState, client: Client) -> list[Pool]:
    return [state.pools[g] for g in client.pools if g is not None]


# --- destination -----------------------------------------------------------------------


class Importer:
    """Builds the incoming client under a staging name; nothing is visible under the
    guest's name until :meth:`commit`.  Owned by one task (the destination session)."""

    def __init__(self, host: TmemHost, name: str, settings: ClientSettings) -> None:
        self.host = host
        self.name = name
        self.staged = STAGING_PREFIX + name
        self.settings = settings
        #: local pool id → the source generation it holds (host lock not needed: ours).
        self._generation: dict[int, int] = {}

    def begin(self) -> None:
        """Create the staged client (a leftover of an earlier attempt goes first).
        Refused when the guest's name already holds pages here."""
        s = self.settings
        with self.host._writing() as state:
            existing = state.clients.get(self.name)
            if existing is not None and existing.pages:
                raise InvalidArgument(
                    f"this agent already holds {existing.pages} pages of {self.name}",
                    op="migrate",
                    client=self.name,
                )
            leftover = state.clients.get(self.staged)
            if leftover is not None:
                state.remove_client(leftover)
            client = state.add_client(self.staged, s.weight, None, s.dedup)
            client.authorised = set(s.authorised)
            state.journal.client_changed(client)

    def apply_pools(self, pools: Sequence[PoolInfo]) -> None:
        """Make the staged pool table the source's: pools that went (or were made anew)
        go, new ones are created empty."""
        with self.host._writing() as state:
            client = state.client(self.staged, "migrate")
            wanted = {p.local: p for p in pools}
            for local, gid in enumerate(client.pools):
                if gid is None:
                    continue
                pool, want = state.pools[gid], wanted.get(local)
                if (
                    want is None
                    or want.generation != self._generation.get(local)
                    or want.persistent != pool.persistent
                    or want.shared != pool.shared
                ):
                    state.leave_pool(client, pool)
                    self._generation.pop(local, None)
            for local, p in sorted(wanted.items()):
                if client.pools[local] is None:
                    if p.shared and (p.uuid is None or p.uuid not in client.authorised):
                        continue  # an unauthorised shared pool: nothing to carry
                    state.new_pool(client, local, p.persistent, p.shared, p.uuid, "migrate")
                    self._generation[local] = p.generation

    def apply_chunks(self, chunks: Sequence[ChunkPages]) -> None:
        """Replace each chunk's pages with the ones given.  Raises NoSpace (budget) —
        the transfer then aborts.

        Chunks the staged client holds nothing of (every chunk of the first pass) are
        installed whole, many at a time (:func:`tmem.put.install_chunks`); the others
        (and a chunk given twice) page by page against what is held.  The outcome is
        that of applying the chunks one by one, in the order given."""
        with self.host._writing() as state:
            client = state.client(self.staged, "migrate")
            pages = state.pages
            fresh: list[tuple[int, list[WholeChunk]]] = []  # runs of one pool's new chunks
            waiting: set[tuple[int, Oid, int]] = set()
            for ch in chunks:
                gid = client.pools[ch.pool]
                if gid is None or self._generation.get(ch.pool) != ch.generation:
                    continue  # a pool the table dropped since: its chunks do not matter
                pool = state.pools[gid]
                if not pool.persistent:
                    continue
                key = (gid, ch.oid, ch.chunk)
                objno = pool.objects.get(ch.oid)
                radix = None if objno is None else pages.radix[objno]
                if key not in waiting and (radix is None or ch.chunk not in radix):
                    if not fresh or fresh[-1][0] != gid:
                        fresh.append((gid, []))
                    fresh[-1][1].append((ch.oid, ch.chunk, ch.pages))
                    waiting.add(key)
                    continue
                self._install_fresh(state, client, fresh)  # in order: those before go first
                fresh, waiting = [], set()
                self._replace_chunk(state, client, pool, ch)
            self._install_fresh(state, client, fresh)

    def _install_fresh(
        self, state: HostState, client: Client, fresh: list[tuple[int, list[WholeChunk]]]
    ) -> None:
        for gid, whole in fresh:
            pool = state.pools[gid]
            if install_chunks(state, client, pool, whole):
                continue
            for oid, chunk_no, chunk_pages in whole:  # not sure to fit: page by page
                self._put(state, client, pool, chunk_no, oid, chunk_pages)

    def _replace_chunk(self, state: HostState, client: Client, pool: Pool, ch: ChunkPages) -> None:
        store, pages = state.store, state.pages
        _check_in_chunk(ch.chunk, ch.pages)  # before anything held is dropped
        incoming = {index: (h, payload) for index, h, payload in ch.pages}
        objno = pool.objects.get(ch.oid)
        radix = None if objno is None else pages.radix[objno]
        held = None if radix is None else radix.get(ch.chunk)
        for slot in list(held) if held is not None else []:
            if slot < 0:
                continue
            index = pages.index[slot]
            new = incoming.get(index)
            if new is None:
                state.drop_slot(pool, slot)
            elif store.payload(pages.blob[slot]) == new[1]:
                del incoming[index]  # unchanged: lz4 is deterministic
        self._put(
            state,
            client,
            pool,
            ch.chunk,
            ch.oid,
            [(index, h, payload) for index, (h, payload) in sorted(incoming.items())],
        )

    def _put(
        self,
        state: HostState,
        client: Client,
        pool: Pool,
        chunk_no: int,
        oid: Oid,
        chunk_pages: Sequence[tuple[int, int, bytes]],
    ) -> None:
        _check_in_chunk(chunk_no, chunk_pages)
        items: list[PutItem] = [(oid, index, (h, payload, -1)) for index, h, payload in chunk_pages]
        if not items:
            return
        failed = next((e for e in put_many(state, client, pool, items) if e is not None), None)
        if failed is not None:
            raise NoSpace(
                f"this agent cannot take {self.name}'s pages: {failed}",
                op="migrate",
                client=self.name,
            )

    def staged_pages(self) -> int:
        with self.host._lock:
            return self.host._state.client(self.staged, "migrate").persistent_pages

    def commit(self, expected_pages: int) -> None:
        """Give the staged client the guest's name, in one store transaction: a client
        the guest's name had here (empty: a swap disk served before the guest arrived)
        is folded in — its pools where the staged client has none, its cap."""
        s = self.settings
        with self.host._writing() as state:
            staged = state.client(self.staged, "migrate")
            if staged.persistent_pages != expected_pages:
                raise InvalidArgument(
                    f"{self.name}: {staged.persistent_pages} pages arrived, the source "
                    f"holds {expected_pages}",
                    op="migrate",
                    client=self.name,
                )
            cap = s.cap_pages
            existing = state.clients.get(self.name)
            if existing is not None:
                if existing.pages:
                    raise InvalidArgument(
                        f"this agent already holds pages of {self.name}",
                        op="migrate",
                        client=self.name,
                    )
                cap = existing.cap_pages
                for local, gid in enumerate(existing.pools):
                    if gid is None:
                        continue
                    pool = state.pools[gid]
                    if staged.pools[local] is None and not pool.shared:
                        existing.pools[local] = None
                        pool.members = {self.staged: local}
                        pool.owner = self.staged
                        staged.pools[local] = gid
                    else:
                        state.leave_pool(existing, pool)
                del state.clients[self.name]
            del state.clients[self.staged]
            state.journal.client_dropped(self.staged)
            staged.name = self.name
            staged.cap_pages, staged.frozen, staged.meta = cap, s.frozen, dict(s.meta)
            state.clients[self.name] = staged
            state.journal.client_changed(staged)
            for gid in staged.pools:
                if gid is None:
                    continue
                pool = state.pools[gid]
                pool.members[self.name] = pool.members.pop(self.staged)
                if pool.owner == self.staged:
                    pool.owner = self.name
                state.journal.pool_changed(pool)

    def abort(self) -> None:
        """Forget the staged client and every page it received (idempotent)."""
        with self.host._writing() as state:
            staged = state.clients.get(self.staged)
            if staged is not None:
                state.remove_client(staged)


def _check_in_chunk(chunk_no: int, chunk_pages: Sequence[tuple[int, int, bytes]]) -> None:
    base = chunk_no << RADIX_BITS
    if any(not base <= index < base + RADIX_FANOUT for index, _, _ in chunk_pages):
        raise InvalidArgument("a page outside its chunk", op="migrate")


def drop_leftovers(host: TmemHost) -> list[str]:
    """Drop staged clients a destination that died mid-transfer left in its store.
    → the guests they were for."""
    dropped = []
    for name in host.client_names():
        if name.startswith(STAGING_PREFIX):
            try:
                host.remove_client(name)
            except TmemError:
                continue
            dropped.append(name[len(STAGING_PREFIX) :])
    return dropped
