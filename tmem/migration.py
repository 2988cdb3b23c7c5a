"""One client's persistent state out of a TmemHost and into another (pure: no I/O).

Owns three things a live migration of a guest's tmem needs, and nothing of the transfer:

* :class:`ChangeFeed` — a :class:`~tmem.durable.PersistentLog` that passes every call on
  to the real store and tells its watchers which radix chunks changed.  TmemHost already
  writes every changed chunk of every persistent pool to its log just before each commit
  (``tmem.journal.write_dirty_chunks``), so wrapping the log at construction is the
  change path: TmemHost itself is not touched.  The feed is called under the host lock;
  watchers are added, drained and removed under it too.
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

Like ``tmem.journal``, ``tmem.restore`` and ``tmem.audit`` this reads TmemHost's private
structures; every function here takes the host lock (``_writing`` where it writes, so
the store commits before the lock is released).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memd.errors import InvalidArgument, NoSpace, TmemError
from tmem.durable import ClientRecord, PersistentLog, PoolRecord, StoredState
from tmem.pages import RADIX_BITS, RADIX_FANOUT
from tmem.types import Oid

if TYPE_CHECKING:
    from tmem.host import TmemHost, _Client, _Pool

#: Staged clients are named so; a channel name with this prefix is not a real guest.
STAGING_PREFIX = "migrating:"
#: (pool gid, oid, chunk number): the unit of change tracking and of transfer.
ChunkKey = tuple[int, Oid, int]


# --- change feed -----------------------------------------------------------------------


class ChangeFeed:
    """A PersistentLog wrapper that records changed chunks for its watchers.

    Every method runs under the TmemHost lock (TmemHost calls it so), and so do
    :meth:`watch`, :meth:`unwatch` and the draining of a watcher's set (Exporter).
    """

    def __init__(self, inner: PersistentLog) -> None:
        self.inner = inner
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

    # PersistentLog, passed on ------------------------------------------------------------

    def put_chunk(self, gid: int, oid: Oid, chunk: int,
                  entries: Sequence[tuple[int, int]]) -> None:
        self._note(gid, oid, chunk)
        self.inner.put_chunk(gid, oid, chunk, entries)

    def drop_chunk(self, gid: int, oid: Oid, chunk: int) -> None:
        self._note(gid, oid, chunk)
        self.inner.drop_chunk(gid, oid, chunk)

    def put_client(self, record: ClientRecord) -> None:
        self.inner.put_client(record)

    def drop_client(self, name: str) -> None:
        self.inner.drop_client(name)

    def put_pool(self, record: PoolRecord) -> None:
        self.inner.put_pool(record)

    def drop_pool(self, gid: int) -> None:
        self.inner.drop_pool(gid)

    def put_blob(self, blob: int, h: int, scope: int, payload: bytes) -> None:
        self.inner.put_blob(blob, h, scope, payload)

    def drop_blob(self, blob: int) -> None:
        self.inner.drop_blob(blob)

    def payload(self, blob: int) -> bytes:
        return self.inner.payload(blob)

    def commit(self) -> None:
        self.inner.commit()

    def bytes_used(self) -> int:
        return self.inner.bytes_used()

    def set_budget(self, budget_bytes: int) -> None:
        self.inner.set_budget(budget_bytes)

    def load(self) -> StoredState:
        return self.inner.load()


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
        return {"weight": self.weight, "cap_pages": self.cap_pages, "dedup": self.dedup,
                "frozen": self.frozen, "authorised": [a.hex() for a in self.authorised],
                "meta": self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ClientSettings:
        try:
            cap = obj["cap_pages"]
            return cls(int(obj["weight"]), None if cap is None else int(cap),
                       bool(obj["dedup"]), bool(obj["frozen"]),
                       [bytes.fromhex(a) for a in obj["authorised"]], dict(obj["meta"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(f"malformed client settings: {err}", op="migrate") from None


# --- source ----------------------------------------------------------------------------


class Exporter:
    """Reads one client's state for transfer; never changes the host.

    Owned by one task (the source session); every method takes the host lock.
    """

    def __init__(self, host: TmemHost, feed: ChangeFeed, name: str) -> None:
        if host._log is not feed:
            raise InvalidArgument("migration needs the host's log to be its ChangeFeed "
                                  "(memd serve with a store)", op="migrate", client=name)
        self.host = host
        self.feed = feed
        self.name = name
        self._changed: set[ChunkKey] | None = None

    def start(self) -> tuple[ClientSettings, list[ChunkKey]]:
        """Start watching; → the client's settings and every chunk of its persistent
        pools now (a change from here on shows in :meth:`take_changed`)."""
        host = self.host
        with host._writing():  # the commit hands pending chunk writes to older watchers
            client = host._client(self.name, "migrate")
            self._changed = self.feed.watch()
            settings = ClientSettings(client.weight, client.cap_pages, client.dedup,
                                      client.frozen, sorted(client.authorised),
                                      dict(client.meta))
            keys: list[ChunkKey] = []
            radix = host._pages.radix
            for pool in self._pools(client):
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

    def _pools(self, client: _Client) -> list[_Pool]:
        return [self.host._pools[g] for g in client.pools if g is not None]

    def pool_table(self) -> list[PoolInfo]:
        with self.host._lock:
            client = self.host._client(self.name, "migrate")
            return [PoolInfo(local, p.persistent, p.shared, p.uuid, p.gid)
                    for local, p in ((lc, self.host._pools[g]) for lc, g in
                                     enumerate(client.pools) if g is not None)]

    def take_changed(self) -> list[ChunkKey]:
        """Chunks of this client's persistent pools changed since the last call (or
        since :meth:`start`), after committing what the host had not yet written."""
        assert self._changed is not None, "start() first"
        host = self.host
        with host._writing():
            client = host._client(self.name, "migrate")
            mine = {p.gid for p in self._pools(client) if p.persistent}
            out = sorted(k for k in self._changed if k[0] in mine)
            self._changed.clear()
            return out

    def read(self, keys: Iterable[ChunkKey]) -> list[ChunkPages]:
        """The chunks as they are now (a chunk of a pool that is gone is left out)."""
        host = self.host
        out: list[ChunkPages] = []
        with host._lock:
            client = host._client(self.name, "migrate")
            local_of = {g: lc for lc, g in enumerate(client.pools) if g is not None}
            pages, store = host._pages, host._store
            for gid, oid, chunk_no in keys:
                local = local_of.get(gid)
                if local is None:
                    continue
                objno = host._pools[gid].objects.get(oid)
                radix = None if objno is None else pages.radix[objno]
                chunk = None if radix is None else radix.get(chunk_no)
                found: list[tuple[int, int, bytes]] = []
                for slot in chunk if chunk is not None else ():
                    if slot >= 0:
                        blob = pages.blob[slot]
                        found.append((pages.index[slot], store.blob_hash(blob) if blob else 0,
                                      store.payload(blob)))
                found.sort()
                out.append(ChunkPages(local, gid, oid, chunk_no, tuple(found)))
        return out

    def persistent_pages(self) -> int:
        with self.host._lock:
            return self.host._client(self.name, "migrate").persistent_pages

    def holds_pages(self, local: int) -> int:
        """Pages in one local pool (0 when it does not exist)."""
        with self.host._lock:
            gid = self.host._client(self.name, "migrate").pools[local]
            return 0 if gid is None else self.host._pools[gid].pages


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
        host = self.host
        s = self.settings
        with host._writing():
            existing = host._clients.get(self.name)
            if existing is not None and existing.pages:
                raise InvalidArgument(
                    f"this agent already holds {existing.pages} pages of {self.name}",
                    op="migrate", client=self.name)
            if self.staged in host._clients:
                self._drop_staged()
            client = host._add_client_locked(self.staged, s.weight, None, s.dedup)
            client.authorised = set(s.authorised)
            host._log_client(client)

    def apply_pools(self, pools: Sequence[PoolInfo]) -> None:
        """Make the staged pool table the source's: pools that went (or were made anew)
        go, new ones are created empty."""
        host = self.host
        with host._writing():
            client = host._client(self.staged, "migrate")
            wanted = {p.local: p for p in pools}
            for local, gid in enumerate(client.pools):
                if gid is None:
                    continue
                pool, want = host._pools[gid], wanted.get(local)
                if (want is None or want.generation != self._generation.get(local)
                        or want.persistent != pool.persistent or want.shared != pool.shared):
                    host._leave_pool(client, pool)
                    self._generation.pop(local, None)
            for local, p in sorted(wanted.items()):
                if client.pools[local] is None:
                    if p.shared and (p.uuid is None or p.uuid not in client.authorised):
                        continue  # an unauthorised shared pool: nothing to carry
                    host._new_pool_locked(client, local, p.persistent, p.shared, p.uuid,
                                          "migrate")
                    self._generation[local] = p.generation

    def apply_chunks(self, chunks: Sequence[ChunkPages]) -> None:
        """Replace each chunk's pages with the ones given.  Raises NoSpace (budget) —
        the transfer then aborts."""
        host = self.host
        with host._writing():
            client = host._client(self.staged, "migrate")
            store, pages = host._store, host._pages
            for ch in chunks:
                gid = client.pools[ch.pool]
                if gid is None or self._generation.get(ch.pool) != ch.generation:
                    continue  # a pool the table dropped since: its chunks do not matter
                pool = host._pools[gid]
                if not pool.persistent:
                    continue
                base = ch.chunk << RADIX_BITS
                incoming = {index: (h, payload) for index, h, payload in ch.pages}
                if any(not base <= i < base + RADIX_FANOUT for i in incoming):
                    raise InvalidArgument("a page outside its chunk", op="migrate")
                objno = pool.objects.get(ch.oid)
                radix = None if objno is None else pages.radix[objno]
                held = None if radix is None else radix.get(ch.chunk)
                for slot in [s for s in held] if held is not None else []:
                    if slot < 0:
                        continue
                    index = pages.index[slot]
                    new = incoming.get(index)
                    if new is None:
                        host._drop_slot(pool, slot)
                    elif store.payload(pages.blob[slot]) == new[1]:
                        del incoming[index]  # unchanged: lz4 is deterministic
                items = [(ch.oid, index, (h, payload, -1))
                         for index, (h, payload) in sorted(incoming.items())]
                if items:
                    errors = host._put_many(client, pool, items)
                    failed = next((e for e in errors if e is not None), None)
                    if failed is not None:
                        raise NoSpace(f"this agent cannot take {self.name}'s pages: "
                                      f"{failed}", op="migrate", client=self.name)

    def staged_pages(self) -> int:
        with self.host._lock:
            return self.host._client(self.staged, "migrate").persistent_pages

    def commit(self, expected_pages: int) -> None:
        """Give the staged client the guest's name, in one store transaction: a client
        the guest's name had here (empty: a swap disk served before the guest arrived)
        is folded in — its pools where the staged client has none, its cap."""
        host = self.host
        s = self.settings
        with host._writing():
            staged = host._client(self.staged, "migrate")
            if staged.persistent_pages != expected_pages:
                raise InvalidArgument(
                    f"{self.name}: {staged.persistent_pages} pages arrived, the source "
                    f"holds {expected_pages}", op="migrate", client=self.name)
            cap = s.cap_pages
            existing = host._clients.get(self.name)
            if existing is not None:
                if existing.pages:
                    raise InvalidArgument(f"this agent already holds pages of {self.name}",
                                          op="migrate", client=self.name)
                cap = existing.cap_pages
                for local, gid in enumerate(existing.pools):
                    if gid is None:
                        continue
                    pool = host._pools[gid]
                    if staged.pools[local] is None and not pool.shared:
                        existing.pools[local] = None
                        pool.members = {self.staged: local}
                        pool.owner = self.staged
                        staged.pools[local] = gid
                    else:
                        host._leave_pool(existing, pool)
                del host._clients[self.name]
            del host._clients[self.staged]
            if host._log is not None:
                host._log.drop_client(self.staged)
            staged.name = self.name
            staged.cap_pages, staged.frozen, staged.meta = cap, s.frozen, dict(s.meta)
            host._clients[self.name] = staged
            host._log_client(staged)
            for gid in staged.pools:
                if gid is None:
                    continue
                pool = host._pools[gid]
                pool.members[self.name] = pool.members.pop(self.staged)
                if pool.owner == self.staged:
                    pool.owner = self.name
                host._log_pool(pool)

    def abort(self) -> None:
        """Forget the staged client and every page it received (idempotent)."""
        with self.host._writing():
            if self.staged in self.host._clients:
                self._drop_staged()

    def _drop_staged(self) -> None:
        host = self.host
        client = host._clients[self.staged]
        host._drop_all_pools(client)
        del host._clients[self.staged]
        if host._log is not None:
            host._log.drop_client(self.staged)


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
            dropped.append(name[len(STAGING_PREFIX):])
    return dropped
