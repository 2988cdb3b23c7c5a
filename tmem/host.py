"""TmemHost: clients, pools and the tmem operations over one memory budget.

Overview
--------
Each guest is a *client* with up to 16 pools.  A pool is ephemeral or persistent,
private or shared.  Pages are found by handle through :class:`PageTable` and their
contents live in the de-duplicating :class:`PageStore`.  Everything the host holds
(blob data rounded to its size class, plus per-page, per-blob and per-object
metadata) is charged against one byte budget which the operator may lower at any
time.  When a put would exceed it, ephemeral pages are evicted bottom-up: the victim
client is the one whose ephemeral page count per unit of weight is highest, and
within a client the least recently used page goes first.  Persistent pages are never
evicted: a successful persistent put is a promise that lasts until the guest flushes.

Coherency rules (from the tmem ABI):

* a put to a handle that holds a page replaces it; if the new put fails the old page
  is flushed first, so stale data is never readable;
* a get that missed keeps missing until the next put of that handle;
* a get from a private ephemeral pool is exclusive (the page leaves the pool);
* shared pools are ephemeral only and are joined by UUID, only by clients the host has
  authorised for that UUID; everyone else is refused, never silently given a private
  pool.

Locking
-------
One ``threading.Lock`` (``_lock``) protects every structure below: the client and
pool tables, the PageTable, the PageStore and all counters.  The expensive,
pure parts of a put (zero check, xxh3, lz4) run *before* taking it, and a get copies
the payload out under the lock and decompresses after releasing it, so the lock is
held for table updates and memcpy only; lz4 releases the GIL, so threads really
compress in parallel.  Batched operations take the lock once per batch.

Shared pools are charged to their *owner* (the first client to create them); when the
owner leaves, ownership passes to another member together with the pages' charge.

Persistence
-----------
With a :class:`~tmem.durable.PersistentLog` (``memd serve`` always has one), every
mutation of persistent state — clients, pools, persistent pages and their blobs — is
also written to the log under ``_lock``, and each public operation commits the log
before it releases the lock (:meth:`_writing`), so the committed store always equals
the persistent part of memory when the lock is free.  :meth:`deferred` lets the one
thread that acknowledges requests (the agent's event loop) commit once for many
operations.  Persistent blob payloads live only in the log; the budget is charged the
log's real size (:meth:`PersistentLog.bytes_used`).  Ephemeral pages never touch it.
"""

from __future__ import annotations

import sys
import threading
import uuid as uuidlib
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from memd.errors import (
    AccessDenied,
    ClientFrozen,
    InvalidArgument,
    NoSpace,
    NoSuchClient,
    NoSuchPool,
    TmemError,
)
from tmem.durable import EXTERNAL_SCOPE, PersistentLog, StoredState
from tmem.journal import client_record, pool_record, write_dirty_chunks
from tmem.pages import (
    CHUNK_META_BYTES,
    OBJ_META_BYTES,
    RADIX_BITS,
    SLOT_META_BYTES,
    LruList,
    PageTable,
)
from tmem.store import (
    BLOB_META_BYTES,
    EncodedPage,
    PageStore,
    compress_page,
    decode_payload,
    hash_pages,
)
from tmem.types import (
    DEFAULT_WEIGHT,
    MAX_BATCH,
    MAX_POOLS_PER_CLIENT,
    PAGE_SIZE,
    ClientStats,
    Oid,
    OpCounters,
    PoolFlag,
    PoolStats,
    StoreStats,
    check_index,
    check_oid,
    check_page,
)

_OID_TUPLE_BYTES = 64 + 3 * 36  # a 3-tuple plus three (mostly large) ints
#: Most budget one put can add: a raw page, its blob, slot, object and radix chunk.
_MAX_PUT_COST = (
    PAGE_SIZE + BLOB_META_BYTES + SLOT_META_BYTES + OBJ_META_BYTES + CHUNK_META_BYTES
)
#: The same for a persistent page kept in the log: a raw page there takes two database
#: pages (a 4 KiB value plus its header overflows one), plus its page record.
_MAX_LOGGED_PUT_COST = _MAX_PUT_COST + 2 * PAGE_SIZE + 256


@dataclass(slots=True, eq=False)
class _Pool:
    gid: int
    persistent: bool
    shared: bool
    uuid: bytes | None
    owner: str
    members: dict[str, int] = field(default_factory=dict)  # client → its local pool id
    objects: dict[Oid, int] = field(default_factory=dict)  # oid → objno
    pages: int = 0
    bytes_stored: int = 0
    ops: OpCounters = field(default_factory=OpCounters)


@dataclass(slots=True, eq=False)
class _Client:
    name: str
    scope: int  # dedup scope used when this client has not opted in
    weight: int = DEFAULT_WEIGHT
    cap_pages: int | None = None
    dedup: bool = False
    frozen: bool = False
    pools: list[int | None] = field(default_factory=lambda: [None] * MAX_POOLS_PER_CLIENT)
    lru: LruList = field(default_factory=LruList)  # ephemeral pages charged here
    persistent_pages: int = 0
    retired_ops: OpCounters = field(default_factory=OpCounters)  # from destroyed pools
    authorised: set[bytes] = field(default_factory=set)
    meta: dict[str, Any] = field(default_factory=dict)  # the agent's (boot id, reboots)

    @property
    def pages(self) -> int:
        return self.lru.count + self.persistent_pages


class TmemHost:
    """The tmem core of the host agent; safe for concurrent callers."""

    def __init__(self, budget_bytes: int = 256 << 20, log: PersistentLog | None = None) -> None:
        if budget_bytes < 0:
            raise InvalidArgument("budget must be non-negative", op="set_budget")
        self._lock = threading.Lock()
        self._budget = budget_bytes
        self._log = log
        #: Thread that holds a :meth:`deferred` section, and how deeply; guarded by _lock.
        self._deferring: int | None = None
        self._defer_depth = 0
        if log is not None:
            log.set_budget(budget_bytes)
        self._store = PageStore(log)
        self._pages = PageTable()
        self._clients: dict[str, _Client] = {}
        self._pools: dict[int, _Pool] = {}
        self._shared_by_uuid: dict[bytes, int] = {}
        self._next_gid = 0
        self._next_scope = 1
        self._evictions = 0
        #: Blob references taken by puts between their two locked phases (the audit
        #: counts them: the slot that will own each does not exist yet).
        self._pins: Counter[int] = Counter()
        #: Radix chunks of persistent objects changed since the last commit:
        #: (pool gid, oid, chunk number); written to the log just before it commits.
        self._dirty: set[tuple[int, Oid, int]] = set()

    # =====================================================================================
    # host control
    # =====================================================================================

    def add_client(
        self, name: str, *, weight: int = DEFAULT_WEIGHT, cap_pages: int | None = None,
        dedup: bool = False,
    ) -> None:
        """Register a guest.  Idempotent for an existing client (settings unchanged)."""
        _check_weight(weight)
        _check_cap(cap_pages)
        with self._writing():
            if name not in self._clients:
                self._add_client_locked(name, weight, cap_pages, dedup)

    def _add_client_locked(self, name: str, weight: int, cap_pages: int | None,
                           dedup: bool) -> _Client:
        client = self._clients[name] = _Client(
            name, self._next_scope, weight=weight, cap_pages=cap_pages, dedup=dedup
        )
        self._next_scope += 1
        self._log_client(client)
        return client

    def remove_client(self, name: str) -> None:
        """Forget a guest and everything it stored (guest destroyed)."""
        with self._writing():
            client = self._client(name, "remove_client")
            self._drop_all_pools(client)
            del self._clients[name]
            if self._log is not None:
                self._log.drop_client(name)

    def reset_client(self, name: str, keep: Collection[int] = ()) -> int:
        """Destroy every pool of a guest that rebooted, except the local pool ids in
        ``keep`` (a disk the host serves it, which outlives its kernel); keep its
        settings.  → pools destroyed."""
        with self._writing():
            client = self._client(name, "reset_client")
            return self._drop_all_pools(client, keep)

    def open_session(self, name: str, *, cap_pages: int | None, dedup: bool,
                     meta: dict[str, Any], reset: bool, keep: Collection[int] = ()) -> int:
        """A guest said HELLO: register it if new (with *cap_pages*), drop all its pools
        but those in *keep* (a swap disk the host serves it) if *reset* (it rebooted),
        set its dedup consent and the agent's *meta* (its boot id) — one transaction, so
        a crash can never keep a previous boot's pools under the new boot id.
        → pools dropped."""
        _check_cap(cap_pages)
        with self._writing():
            client = self._clients.get(name)
            if client is None:
                client = self._add_client_locked(name, DEFAULT_WEIGHT, cap_pages, dedup)
            dropped = self._drop_all_pools(client, keep) if reset else 0
            client.dedup = dedup
            client.meta = dict(meta)
            self._log_client(client)
            return dropped

    def client_meta(self, name: str) -> dict[str, Any]:
        """The agent's metadata of a client (as restored after a restart)."""
        with self._lock:
            return dict(self._client(name, "client_meta").meta)

    def has_client(self, name: str) -> bool:
        with self._lock:
            return name in self._clients

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Group commit: operations of this thread inside the block share one log commit,
        made when the block ends.  The caller must not acknowledge any of them before
        the block has ended.  Other threads still commit their own operations (which
        commits this thread's writes too: committing early is always safe)."""
        self.hold_commits()
        try:
            yield
        finally:
            self.release_commits()

    def hold_commits(self) -> None:
        """Start a :meth:`deferred` section without a ``with`` block (the agent opens
        one in one event-loop callback and ends it in a later one); nests."""
        me = threading.get_ident()
        with self._lock:
            if self._deferring not in (None, me):
                raise RuntimeError("deferred commits are for one acknowledging thread")
            self._deferring = me
            self._defer_depth += 1

    def release_commits(self) -> None:
        """End a :meth:`hold_commits`; the outermost one commits (and may raise)."""
        with self._lock:
            assert self._deferring == threading.get_ident() and self._defer_depth > 0
            self._defer_depth -= 1
            if not self._defer_depth:
                self._deferring = None
                if self._log is not None:
                    self._commit_log()

    def restore(self, state: StoredState) -> list[str]:
        """Rebuild an empty host from what its log held (a restart).  → findings about
        records that could not be used (dropped from the store as well)."""
        from tmem.restore import restore_host  # local: restore fills our private state

        with self._writing():
            return restore_host(self, state)

    def freeze(self, name: str) -> None:
        with self._writing():
            client = self._client(name, "freeze")
            client.frozen = True
            self._log_client(client)

    def thaw(self, name: str) -> None:
        with self._writing():
            client = self._client(name, "thaw")
            client.frozen = False
            self._log_client(client)

    def set_weight(self, name: str, weight: int) -> None:
        _check_weight(weight)
        with self._writing():
            client = self._client(name, "set_weight")
            client.weight = weight
            self._log_client(client)

    def set_cap(self, name: str, cap_pages: int | None) -> int:
        """Cap a client's stored pages; evicts its ephemeral pages above it.  → evicted."""
        _check_cap(cap_pages)
        with self._writing():
            client = self._client(name, "set_cap")
            client.cap_pages = cap_pages
            self._log_client(client)
            evicted = 0
            while cap_pages is not None and client.pages > cap_pages and client.lru.count:
                self._evict_one(client)
                evicted += 1
            return evicted

    def set_dedup(self, name: str, enabled: bool) -> None:
        """Opt a client in or out of cross-guest de-duplication (for future puts)."""
        with self._writing():
            client = self._client(name, "set_dedup")
            if client.dedup != enabled:
                client.dedup = enabled
                self._log_client(client)

    def authorize_shared(self, name: str, pool_uuid: bytes | uuidlib.UUID) -> None:
        """Allow a client to create or join the shared pool with this UUID."""
        key = _uuid_bytes(pool_uuid, "authorize_shared")
        with self._writing():
            client = self._client(name, "authorize_shared")
            client.authorised.add(key)
            self._log_client(client)

    def revoke_shared(self, name: str, pool_uuid: bytes | uuidlib.UUID) -> None:
        """Withdraw an authorisation (pools already joined stay joined)."""
        key = _uuid_bytes(pool_uuid, "revoke_shared")
        with self._writing():
            client = self._client(name, "revoke_shared")
            client.authorised.discard(key)
            self._log_client(client)

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def set_budget(self, budget_bytes: int) -> int:
        """Change the memory budget; evict ephemeral pages to fit.  → pages evicted.

        Persistent pages are never dropped: if they alone exceed the new budget the
        store stays above it and every put fails until guests flush.
        """
        if type(budget_bytes) is not int or budget_bytes < 0:
            raise InvalidArgument("budget must be a non-negative integer", op="set_budget")
        with self._lock:
            self._budget = budget_bytes
            if self._log is not None:
                self._log.set_budget(budget_bytes)
            return self._shrink_to(budget_bytes)

    def flush_kib(self, kib: int, client: str | None = None) -> int:
        """Evict ephemeral pages until *kib* KiB of budget is freed.  → bytes freed."""
        if type(kib) is not int or kib < 0:
            raise InvalidArgument("flush size must be a non-negative KiB count", op="flush_kib")
        with self._lock:
            start = self._used_bytes()
            target = max(0, start - kib * 1024)
            if client is None:
                self._shrink_to(target)
            else:
                victim = self._client(client, "flush_kib")
                while self._used_bytes() > target and victim.lru.count:
                    self._evict_one(victim)
            return start - self._used_bytes()

    # =====================================================================================
    # guest operations
    # =====================================================================================

    def new_pool(
        self, name: str, flags: int, pool_uuid: bytes | uuidlib.UUID | None = None
    ) -> int:
        """Create (or, for a shared pool, join) a pool; return the client's pool id."""
        op = "new_pool"
        # A plain-int mask: ~ of an IntFlag only complements within the enum's own bits.
        known = int(PoolFlag.PERSISTENT) | int(PoolFlag.SHARED)
        if not isinstance(flags, int) or isinstance(flags, bool) or int(flags) & ~known:
            raise InvalidArgument("unknown pool flags", op=op, client=name)
        persistent = bool(flags & PoolFlag.PERSISTENT)
        shared = bool(flags & PoolFlag.SHARED)
        if shared and persistent:
            raise InvalidArgument("shared persistent pools are not supported", op=op, client=name)
        key = _uuid_bytes(pool_uuid, op) if shared else None
        with self._writing():
            client = self._client(name, op)
            try:
                local = client.pools.index(None)
            except ValueError:
                raise NoSpace(
                    f"client already has {MAX_POOLS_PER_CLIENT} pools", op=op, client=name
                ) from None
            return self._new_pool_locked(client, local, persistent, shared, key, op)

    def new_pool_at(self, name: str, pool_id: int, flags: int) -> int:
        """Create a private pool at a given local id (a swap disk's pool, which the host
        and not the guest places).  → the pool id."""
        op = "new_pool_at"
        if type(pool_id) is not int or not 0 <= pool_id < MAX_POOLS_PER_CLIENT:
            raise InvalidArgument("pool id out of range", op=op, client=name)
        if not isinstance(flags, int) or int(flags) & ~int(PoolFlag.PERSISTENT):
            raise InvalidArgument("only private pools are placed by id", op=op, client=name)
        with self._writing():
            client = self._client(name, op)
            if client.pools[pool_id] is not None:
                raise InvalidArgument("pool id already in use", op=op, client=name,
                                      pool=pool_id)
            return self._new_pool_locked(
                client, pool_id, bool(flags & PoolFlag.PERSISTENT), False, None, op)

    def _new_pool_locked(
        self, client: _Client, local: int, persistent: bool, shared: bool, key: bytes | None,
        op: str,
    ) -> int:
        name = client.name
        if shared:
            if key is None or key not in client.authorised:
                raise AccessDenied(
                    "the host has not authorised this client for that shared pool",
                    op=op, client=name,
                )
            gid = self._shared_by_uuid.get(key)
            if gid is not None:
                pool = self._pools[gid]
                if name in pool.members:
                    return pool.members[name]
                pool.members[name] = local
                client.pools[local] = gid
                self._log_pool(pool)
                return local
        pool = _Pool(self._next_gid, persistent, shared, key, owner=name)
        self._next_gid += 1
        pool.members[name] = local
        self._pools[pool.gid] = pool
        if key is not None:
            self._shared_by_uuid[key] = pool.gid
        client.pools[local] = pool.gid
        self._log_pool(pool)
        return local

    def destroy_pool(self, name: str, pool_id: int) -> None:
        """Destroy a private pool, or leave a shared one (destroyed with its last member)."""
        with self._writing():
            client = self._client(name, "destroy_pool")
            pool = self._pool(client, pool_id, "destroy_pool")
            self._leave_pool(client, pool)

    def put(self, name: str, pool_id: int, oid: Oid, index: int, page: bytes) -> None:
        """Store a page; raises NoSpace/ClientFrozen/... when the store declines."""
        op = "put"
        check_oid(oid, op)
        check_index(index, op)
        error = self._put_pages(name, pool_id, [(oid, index)], [check_page(page, op)], op)[0]
        if error is not None:
            raise error

    def get(self, name: str, pool_id: int, oid: Oid, index: int) -> bytes | None:
        """The page at the handle, or None.  Exclusive for private ephemeral pools."""
        op = "get"
        check_oid(oid, op)
        check_index(index, op)
        with self._lock:
            client = self._client(name, op)
            pool = self._pool(client, pool_id, op)
            payload = self._get_locked(pool, oid, index)
        return None if payload is None else decode_payload(payload)

    def flush_page(self, name: str, pool_id: int, oid: Oid, index: int) -> bool:
        """Remove one page.  → whether a page was there."""
        op = "flush_page"
        check_oid(oid, op)
        check_index(index, op)
        with self._writing():
            client = self._client(name, op)
            pool = self._pool(client, pool_id, op)
            objno = pool.objects.get(oid)
            slot = -1 if objno is None else self._pages.lookup(objno, index)
            if slot < 0:
                return False
            self._drop_slot(pool, slot)
            pool.ops.flushes += 1
            return True

    def flush_object(self, name: str, pool_id: int, oid: Oid) -> int:
        """Remove every page of one object.  → pages removed."""
        op = "flush_object"
        check_oid(oid, op)
        with self._writing():
            client = self._client(name, op)
            pool = self._pool(client, pool_id, op)
            pool.ops.flush_objects += 1
            objno = pool.objects.get(oid)
            if objno is None:
                return 0
            slots = self._pages.object_slots(objno)
            for slot in slots:
                self._drop_slot(pool, slot)
            pool.ops.flushes += len(slots)
            return len(slots)

    def flush_pool(self, name: str, pool_id: int) -> int:
        """Remove every page of a pool but keep the pool.  → pages removed."""
        with self._writing():
            client = self._client(name, "flush_pool")
            pool = self._pool(client, pool_id, "flush_pool")
            removed = self._empty_pool(pool)
            pool.ops.flushes += removed
            return removed

    def put_batch(
        self, name: str, pool_id: int, handles: Sequence[tuple[Oid, int]],
        pages: Sequence[bytes],
    ) -> list[TmemError | None]:
        """Put many pages of one pool; one result per page (None = stored).

        Arguments are validated for the whole batch first (a bad one fails it all);
        after that each page succeeds or fails on its own, in order.
        """
        op = "put_batch"
        if len(handles) != len(pages) or len(handles) > MAX_BATCH:
            raise InvalidArgument(
                f"a batch holds 0..{MAX_BATCH} handles, one page each", op=op, client=name
            )
        for oid, index in handles:
            check_oid(oid, op)
            check_index(index, op)
        return self._put_pages(name, pool_id, handles, [check_page(p, op) for p in pages], op)

    def get_batch(
        self, name: str, pool_id: int, handles: Sequence[tuple[Oid, int]]
    ) -> list[bytes | None]:
        """Get many pages of one pool (None for each miss)."""
        op = "get_batch"
        if len(handles) > MAX_BATCH:
            raise InvalidArgument(f"a batch holds at most {MAX_BATCH} handles", op=op)
        for oid, index in handles:
            check_oid(oid, op)
            check_index(index, op)
        with self._lock:
            client = self._client(name, op)
            pool = self._pool(client, pool_id, op)
            payloads = [self._get_locked(pool, oid, index) for oid, index in handles]
        return [None if p is None else decode_payload(p) for p in payloads]

    # =====================================================================================
    # introspection
    # =====================================================================================

    def client_names(self) -> list[str]:
        with self._lock:
            return sorted(self._clients)

    def pool_ids(self, name: str) -> list[tuple[int, int]]:
        """(local pool id, PoolFlag) of each pool the client has."""
        with self._lock:
            client = self._client(name, "list_pools")
            out = []
            for local, gid in enumerate(client.pools):
                if gid is not None:
                    pool = self._pools[gid]
                    flags = (PoolFlag.PERSISTENT if pool.persistent else 0) | (
                        PoolFlag.SHARED if pool.shared else 0
                    )
                    out.append((local, int(flags)))
            return out

    def pool_stats(self, name: str | None = None) -> list[PoolStats]:
        with self._lock:
            names = [name] if name is not None else sorted(self._clients)
            out = []
            for cname in names:
                client = self._client(cname, "pool_stats")
                for local, gid in enumerate(client.pools):
                    if gid is not None:
                        out.append(self._pool_stats(cname, local, self._pools[gid]))
            return out

    def client_stats(self, name: str | None = None) -> list[ClientStats]:
        with self._lock:
            names = [name] if name is not None else sorted(self._clients)
            return [self._client_stats(self._client(n, "client_stats")) for n in names]

    def store_stats(self) -> StoreStats:
        with self._lock:
            pers = sum(c.persistent_pages for c in self._clients.values())
            return StoreStats(
                budget_bytes=self._budget,
                used_bytes=self._used_bytes(),
                data_bytes=self._store.data_bytes,
                metadata_bytes=self._metadata_bytes(),
                reserved_bytes=self._store.arena.reserved_bytes,
                pages=self._pages.live_slots,
                ephemeral_pages=self._pages.live_slots - pers,
                persistent_pages=pers,
                unique_blobs=self._store.live_blobs,
                zero_pages=self._store.zero_refs(),
                dedup_hits=self._store.dedup_hits,
                evictions=self._evictions,
            )

    def audit(self) -> list[str]:
        """Recompute every count and link from the structures; list each discrepancy."""
        from tmem.audit import audit_host, audit_log  # local: they read our private state

        with self._writing():
            issues = audit_host(self)
            if self._log is not None:
                self._commit_log()  # a deferring thread's writes too: compare like with like
                issues += audit_log(self, self._log.load())
            return issues

    # =====================================================================================
    # internals (caller holds _lock)
    # =====================================================================================

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """``_lock``, and the log committed before it is released (unless this thread
        defers), whatever happened in between: memory and store stay equal."""
        with self._lock:
            try:
                yield
            finally:
                if self._log is not None and self._deferring != threading.get_ident():
                    self._commit_log()

    def _commit_log(self) -> None:
        """Write the dirty chunks' records from memory, then commit (lock held)."""
        log = self._log
        assert log is not None
        if self._dirty:
            write_dirty_chunks(self, log)
        log.commit()

    def _log_client(self, client: _Client) -> None:
        if self._log is not None:
            self._log.put_client(client_record(client))

    def _log_pool(self, pool: _Pool) -> None:
        if self._log is not None:
            self._log.put_pool(pool_record(pool))

    def _client(self, name: str, op: str) -> _Client:
        try:
            return self._clients[name]
        except KeyError:
            raise NoSuchClient(f"no tmem client named {name!r}", op=op, client=name) from None

    def _pool(self, client: _Client, pool_id: int, op: str) -> _Pool:
        gid = (
            client.pools[pool_id]
            if type(pool_id) is int and 0 <= pool_id < MAX_POOLS_PER_CLIENT
            else None
        )
        if gid is None:
            raise NoSuchPool(
                f"pool {pool_id!r} does not exist", op=op, client=client.name,
                pool=pool_id if type(pool_id) is int else None,
            )
        return self._pools[gid]

    def _owner_lru(self, pool: _Pool) -> LruList | None:
        return None if pool.persistent else self._clients[pool.owner].lru

    def _used_bytes(self) -> int:
        return (
            (0 if self._log is None else self._log.bytes_used())
            + self._store.charged_bytes()
            + self._pages.live_slots * SLOT_META_BYTES
            + self._pages.live_objects * OBJ_META_BYTES
            + self._pages.live_chunks * CHUNK_META_BYTES
        )

    def _metadata_bytes(self) -> int:
        # Object ids live in per-pool dicts: the dict tables plus one 3-tuple of ints each.
        dicts = sum(
            sys.getsizeof(p.objects) + len(p.objects) * _OID_TUPLE_BYTES
            for p in self._pools.values()
        )
        return self._store.metadata_bytes() + self._pages.metadata_bytes() + dicts

    def _put_pages(
        self, name: str, pool_id: int, handles: Sequence[tuple[Oid, int]], pages: list[bytes],
        op: str,
    ) -> list[TmemError | None]:
        """The put pipeline (see tmem.store): hash, pin duplicates, compress, insert."""
        hashes = hash_pages(pages)  # no lock
        with self._lock:
            client = self._client(name, op)
            pool = self._pool(client, pool_id, op)
            scope = self._scope(client, pool)
            pins = self._store.pin_matches(hashes, pages, scope)
            pinned = [p for p in pins if p >= 0]
            if pinned:
                self._pins.update(pinned)
        encoded: list[EncodedPage] = [
            (h, b"" if h < 0 or pin >= 0 else compress_page(page), pin)
            for h, page, pin in zip(hashes, pages, pins, strict=True)
        ]  # no lock: lz4 runs here, in parallel across threads
        with self._writing():
            if pinned:  # from here on each is a slot's reference, or released
                self._pins.subtract(pinned)
                self._pins += Counter()  # drop the zeros
            try:
                client = self._client(name, op)
                pool = self._pool(client, pool_id, op)
            except TmemError:
                self._unpin(encoded)
                raise
            now = self._scope(client, pool)
            if now != scope:  # dedup consent changed in between: pins were for the old scope
                self._unpin(encoded)
                encoded = [(h, b"" if h < 0 else compress_page(p), -1)
                           for h, p in zip(hashes, pages, strict=True)]
            items = [(oid, index, enc) for (oid, index), enc in zip(handles, encoded,
                                                                  strict=True)]
            return self._put_many(client, pool, items)

    def _scope(self, client: _Client, pool: _Pool) -> int:
        """Dedup scope of a put: shared by opted-in clients, else the pool owner's own;
        with a log, persistent pools' blobs are a world of their own (EXTERNAL_SCOPE)."""
        scope = 0 if client.dedup else self._clients[pool.owner].scope
        if pool.persistent and self._log is not None:
            scope |= EXTERNAL_SCOPE
        return scope

    def _unpin(self, encoded: list[EncodedPage]) -> None:
        for _, _, pin in encoded:
            if pin >= 0:
                self._store.release(pin)

    def _put_many(
        self, client: _Client, pool: _Pool, items: list[tuple[Oid, int, EncodedPage]]
    ) -> list[TmemError | None]:
        """Store pages in order; one result each.  The hot path of every put."""
        pages, store, objects = self._pages, self._store, pool.objects
        owner = self._clients[pool.owner]
        lru = None if pool.persistent else owner.lru
        scope = self._scope(client, pool)
        log = self._log if pool.persistent else None
        # With room for the whole batch at worst-case cost, skip per-page budget checks.
        cost = _MAX_PUT_COST if log is None else _MAX_LOGGED_PUT_COST
        headroom = self._budget - self._used_bytes() >= len(items) * cost
        if (headroom and len(items) > 1 and not client.frozen
                and (owner.cap_pages is None or owner.pages + len(items) <= owner.cap_pages)):
            done = self._put_batch_fast(pool, items, scope, lru)
            if done is not None:
                return done
        results: list[TmemError | None] = []
        stored = dups = refused = 0
        for oid, index, (h, payload, pin) in items:
            objno = objects.get(oid)
            if objno is not None:
                old = pages.lookup(objno, index)
                if old >= 0:
                    # Duplicate put: the old data goes first, so whatever happens next
                    # it can never be read again.
                    dups += 1
                    self._drop_slot(pool, old)
                    objno = objects.get(oid)
            error: TmemError | None = None
            if client.frozen:
                error = self._put_error(ClientFrozen, "client is frozen", client, oid, index)
            elif owner.cap_pages is not None and owner.pages >= owner.cap_pages:
                if lru is None or not lru.count:
                    error = self._put_error(NoSpace, "client page cap reached", client, oid,
                                            index)
                    refused += 1
                else:
                    self._evict_one(owner)  # an ephemeral put displaces the owner's LRU page
                    objno = objects.get(oid)
            if error is not None:
                if pin >= 0:
                    store.release(pin)
                results.append(error)
                continue
            blob = pin if pin >= 0 else store.intern(h, payload, scope)
            if objno is None:
                objno = objects[oid] = pages.new_object(pool.gid, oid)
            slot = pages.add(objno, index, blob, lru)  # the slot now owns the reference
            if log is not None:
                self._dirty.add((pool.gid, oid, index >> RADIX_BITS))
            pool.pages += 1
            pool.bytes_stored += store.payload_length(blob)
            if lru is None:
                owner.persistent_pages += 1
            if not headroom and not self._trim_for(slot, owner if lru is not None else None):
                self._drop_slot(pool, slot)
                results.append(self._put_error(NoSpace, "tmem store is full", client, oid,
                                               index))
                refused += 1
                continue
            stored += 1
            results.append(None)
        ops = pool.ops
        ops.puts += len(items)
        ops.good_puts += stored
        ops.dup_puts += dups
        ops.no_space += refused
        return results

    def _put_batch_fast(
        self, pool: _Pool, items: list[tuple[Oid, int, EncodedPage]], scope: int,
        lru: LruList | None,
    ) -> list[TmemError | None] | None:
        """All-or-nothing fast path when every page is sure to fit (the caller checked
        budget headroom, cap and frozen).  Same outcome as putting the pages one by one;
        None (nothing done) when a handle repeats inside the batch, which needs the
        ordered per-page path."""
        handles = [(oid, index) for oid, index, _ in items]
        if len(set(handles)) != len(handles):
            return None
        pages, objects = self._pages, pool.objects
        # Two passes: dropping a replaced page may free its object, so no objno is
        # resolved until every replaced page is gone.
        dups = 0
        for oid, index in handles:
            objno = objects.get(oid)
            if objno is not None:
                old = pages.lookup(objno, index)
                if old >= 0:
                    dups += 1
                    self._drop_slot(pool, old)  # old data first: never readable again
        objnos: list[int] = []
        for oid, _ in handles:
            objno = objects.get(oid)
            if objno is None:
                objno = objects[oid] = pages.new_object(pool.gid, oid)
            objnos.append(objno)
        store = self._store
        blobs = store.intern_many([enc for _, _, enc in items], scope)
        pages.add_many(objnos, [index for _, index in handles], blobs, lru)
        log = self._log
        if lru is None and log is not None:
            gid = pool.gid
            self._dirty.update([(gid, oid, index >> RADIX_BITS) for oid, index in handles])
        n = len(items)
        pool.pages += n
        length = store.payload_length
        pool.bytes_stored += sum(length(b) for b in blobs)
        if lru is None:
            self._clients[pool.owner].persistent_pages += n
        ops = pool.ops
        ops.puts += n
        ops.good_puts += n
        ops.dup_puts += dups
        return [None] * n

    def _trim_for(self, slot: int, protect: _Client | None) -> bool:
        """Evict until within budget, sparing *slot*; False if that is impossible."""
        while self._used_bytes() > self._budget:
            victim = self._pick_victim(protect)
            if victim is None:
                return False
            self._evict_one(victim)
        return True

    def _put_error(
        self, kind: type[TmemError], message: str, client: _Client, oid: Oid, index: int
    ) -> TmemError:
        return kind(message, op="put", client=client.name, oid=oid, index=index)

    def _get_locked(self, pool: _Pool, oid: Oid, index: int) -> bytes | None:
        """Payload at the handle (copied out), honouring get exclusivity."""
        pool.ops.gets += 1
        objno = pool.objects.get(oid)
        if objno is None:
            return None
        slot = self._pages.lookup(objno, index)
        if slot < 0:
            return None
        pool.ops.found_gets += 1
        blob = self._pages.blob[slot]
        payload = self._store.payload(blob)
        if pool.persistent:
            pass
        elif not pool.shared:
            self._drop_slot(pool, slot)  # private ephemeral: exclusive get
        else:
            lru = self._owner_lru(pool)
            assert lru is not None
            self._pages.touch(slot, lru)
        return payload

    def _drop_slot(self, pool: _Pool, slot: int) -> None:
        """Remove one page of *pool* from every structure and release its blob."""
        pages = self._pages
        objno = pages.obj[slot]
        lru = self._owner_lru(pool)
        if pool.persistent and self._log is not None:
            self._dirty.add((pool.gid, pages.oid_of(objno), pages.index[slot] >> RADIX_BITS))
        blob = pages.remove(slot, lru)
        pool.pages -= 1
        pool.bytes_stored -= self._store.payload_length(blob)
        if pool.persistent:
            self._clients[pool.owner].persistent_pages -= 1
        self._store.release(blob)
        if pages.obj_count[objno] == 0:
            del pool.objects[pages.oid_of(objno)]
            pages.free_object(objno)

    def _pick_victim(self, protect: _Client | None = None) -> _Client | None:
        """The client with the most evictable ephemeral pages per unit of weight.

        *protect* has just had a page pushed at its LRU head; that page is not
        evictable, so it does not count (and never reaches the tail being evicted).
        """
        best: _Client | None = None
        best_score = 0.0
        for client in self._clients.values():
            count = client.lru.count - (client is protect)
            if count > 0:
                score = count / client.weight
                if score > best_score:
                    best, best_score = client, score
        return best

    def _evict_one(self, client: _Client) -> None:
        self._evict_slot(client, client.lru.tail)

    def _evict_slot(self, client: _Client, slot: int) -> None:
        pool = self._pools[self._pages.obj_pool[self._pages.obj[slot]]]
        self._drop_slot(pool, slot)
        pool.ops.evictions += 1
        self._evictions += 1

    def _shrink_to(self, target: int) -> int:
        evicted = 0
        while self._used_bytes() > target:
            victim = self._pick_victim()
            if victim is None:
                break
            self._evict_one(victim)
            evicted += 1
        return evicted

    def _empty_pool(self, pool: _Pool) -> int:
        removed = 0
        for objno in list(pool.objects.values()):
            for slot in self._pages.object_slots(objno):
                self._drop_slot(pool, slot)
                removed += 1
        return removed

    def _leave_pool(self, client: _Client, pool: _Pool) -> None:
        local = pool.members.pop(client.name)
        client.pools[local] = None
        if not pool.members:
            self._empty_pool(pool)
            client.retired_ops.add(pool.ops)
            del self._pools[pool.gid]
            if pool.uuid is not None:
                del self._shared_by_uuid[pool.uuid]
            if self._log is not None:
                self._log.drop_pool(pool.gid)
        else:
            if pool.owner == client.name:
                self._transfer_ownership(pool, client,
                                         self._clients[next(iter(pool.members))])
            self._log_pool(pool)

    def _transfer_ownership(self, pool: _Pool, old: _Client, new: _Client) -> None:
        for objno in pool.objects.values():
            for slot in self._pages.object_slots(objno):
                self._pages.move_lru(slot, old.lru, new.lru)
        pool.owner = new.name

    def _drop_all_pools(self, client: _Client, keep: Collection[int] = ()) -> int:
        gids = [g for local, g in enumerate(client.pools) if g is not None and local not in keep]
        for gid in gids:
            self._leave_pool(client, self._pools[gid])
        return len(gids)

    def _pool_stats(self, cname: str, local: int, pool: _Pool) -> PoolStats:
        return PoolStats(
            client=cname,
            pool_id=local,
            kind="persistent" if pool.persistent else "ephemeral",
            shared=pool.shared,
            uuid=str(uuidlib.UUID(bytes=pool.uuid)) if pool.uuid else None,
            pages=pool.pages,
            objects=len(pool.objects),
            bytes_raw=pool.pages * PAGE_SIZE,
            bytes_stored=pool.bytes_stored,
            ops=OpCounters(**pool.ops.to_dict()),
        )

    def _client_stats(self, client: _Client) -> ClientStats:
        ops = OpCounters(**client.retired_ops.to_dict())
        raw = stored = npools = 0
        for gid in client.pools:
            if gid is None:
                continue
            npools += 1
            pool = self._pools[gid]
            ops.add(pool.ops)
            if pool.owner == client.name:
                raw += pool.pages * PAGE_SIZE
                stored += pool.bytes_stored
        return ClientStats(
            client=client.name,
            frozen=client.frozen,
            weight=client.weight,
            cap_pages=client.cap_pages,
            dedup=client.dedup,
            pools=npools,
            ephemeral_pages=client.lru.count,
            persistent_pages=client.persistent_pages,
            bytes_raw=raw,
            bytes_stored=stored,
            ops=ops,
        )


def _uuid_bytes(value: object, op: str) -> bytes:
    if isinstance(value, uuidlib.UUID):
        return value.bytes
    if isinstance(value, bytes) and len(value) == 16:
        return value
    raise InvalidArgument("a shared pool needs a 16-byte UUID", op=op)


def _check_weight(weight: object) -> None:
    if type(weight) is not int or not 1 <= weight <= 1_000_000:
        raise InvalidArgument("weight must be an integer in 1..1000000", op="set_weight")


def _check_cap(cap: object) -> None:
    if cap is not None and (type(cap) is not int or cap < 0):
        raise InvalidArgument("cap must be a non-negative page count or None", op="set_cap")
