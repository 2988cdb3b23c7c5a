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

This class is the public face and the lock choreography; the work is done beside it:

=================  ===============================================================
``tmem.state``     :class:`HostState`: the tables and counters, and the structural
                   steps (look up, create/leave pools, take or drop a page)
``tmem.put``       the put pipeline's locked half (insert, caps, budget, fast path)
``tmem.budget``    what is charged, victim choice and eviction
``tmem.stats``     the stats records
``tmem.journal``   every change of persistent state, to the log and listeners;
                   group commit
``tmem.restore``   rebuild after a restart; ``tmem.audit``: recount and compare
=================  ===============================================================

Locking
-------
One ``threading.Lock`` (``_lock``) protects everything in ``_state`` (the client and
pool tables, the PageTable, the PageStore, the journal and all counters): each of the
modules above runs with it held and takes no lock of its own.  The expensive, pure
parts of a put (zero check, xxh3, lz4) run *before* taking it, and a get copies the
payload out under the lock and decompresses after releasing it, so the lock is held
for table updates and memcpy only; lz4 releases the GIL, so threads really compress in
parallel.  Batched operations take the lock once per batch.

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
*listeners* (:class:`~tmem.durable.RecordSink`) hear the same records as the log, at
the same points, with or without a log.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from memd.errors import InvalidArgument, NoSpace, TmemError
from tmem.audit import audit_host, audit_log
from tmem.budget import evict_client_to, shrink_to, used_bytes
from tmem.durable import PersistentLog, RecordSink, StoredState
from tmem.put import put_many, unpin
from tmem.restore import restore_host
from tmem.state import HostState
from tmem.stats import client_stats, pool_stats, store_stats
from tmem.store import EncodedPage, compress_page, decode_payload, hash_pages
from tmem.types import (
    DEFAULT_WEIGHT,
    MAX_BATCH,
    MAX_POOLS_PER_CLIENT,
    ClientStats,
    Oid,
    PageBuffer,
    PoolFlag,
    PoolStats,
    StoreStats,
    check_cap,
    check_index,
    check_oid,
    check_page,
    check_weight,
    uuid_bytes,
)


class TmemHost:
    """The tmem core of the host agent; safe for concurrent callers."""

    def __init__(
        self,
        budget_bytes: int = 256 << 20,
        log: PersistentLog | None = None,
        listeners: Collection[RecordSink] = (),
    ) -> None:
        if budget_bytes < 0:
            raise InvalidArgument("budget must be non-negative", op="set_budget")
        self._lock = threading.Lock()
        if log is not None:
            log.set_budget(budget_bytes)
        #: Everything below the public API; guarded by _lock.
        self._state = HostState(budget_bytes, log, listeners)

    # =====================================================================================
    # host control
    # =====================================================================================

    def add_client(
        self,
        name: str,
        *,
        weight: int = DEFAULT_WEIGHT,
        cap_pages: int | None = None,
        dedup: bool = False,
    ) -> None:
        """Register a guest.  Idempotent for an existing client (settings unchanged)."""
        check_weight(weight)
        check_cap(cap_pages)
        with self._writing() as state:
            if name not in state.clients:
                state.add_client(name, weight, cap_pages, dedup)

    def remove_client(self, name: str) -> None:
        """Forget a guest and everything it stored (guest destroyed)."""
        with self._writing() as state:
            state.remove_client(state.client(name, "remove_client"))

    def reset_client(self, name: str, keep: Collection[int] = ()) -> int:
        """Destroy every pool of a guest that rebooted, except the local pool ids in
        ``keep`` (a disk the host serves it, which outlives its kernel); keep its
        settings.  → pools destroyed."""
        with self._writing() as state:
            return state.drop_all_pools(state.client(name, "reset_client"), keep)

    def open_session(
        self,
        name: str,
        *,
        cap_pages: int | None,
        dedup: bool,
        meta: dict[str, Any],
        reset: bool,
        keep: Collection[int] = (),
    ) -> int:
        """A guest said HELLO: register it if new (with *cap_pages*), drop all its pools
        but those in *keep* (a swap disk the host serves it) if *reset* (it rebooted),
        set its dedup consent and the agent's *meta* (its boot id) — one transaction, so
        a crash can never keep a previous boot's pools under the new boot id.
        → pools dropped."""
        check_cap(cap_pages)
        with self._writing() as state:
            client = state.clients.get(name)
            if client is None:
                client = state.add_client(name, DEFAULT_WEIGHT, cap_pages, dedup)
            dropped = state.drop_all_pools(client, keep) if reset else 0
            client.dedup = dedup
            client.meta = dict(meta)
            state.journal.client_changed(client)
            return dropped

    def client_meta(self, name: str) -> dict[str, Any]:
        """The agent's metadata of a client (as restored after a restart)."""
        with self._lock:
            return dict(self._state.client(name, "client_meta").meta)

    def has_client(self, name: str) -> bool:
        with self._lock:
            return name in self._state.clients

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
        with self._lock:
            self._state.journal.hold()

    def release_commits(self) -> None:
        """End a :meth:`hold_commits`; the outermost one commits (and may raise)."""
        with self._lock:
            journal = self._state.journal
            if journal.release() and journal.tracking:
                journal.commit()

    def restore(self, state: StoredState) -> list[str]:
        """Rebuild an empty host from what its log held (a restart).  → findings about
        records that could not be used (dropped from the store as well)."""
        with self._writing() as mine:
            return restore_host(mine, state)

    def freeze(self, name: str) -> None:
        with self._writing() as state:
            client = state.client(name, "freeze")
            client.frozen = True
            state.journal.client_changed(client)

    def thaw(self, name: str) -> None:
        with self._writing() as state:
            client = state.client(name, "thaw")
            client.frozen = False
            state.journal.client_changed(client)

    def set_weight(self, name: str, weight: int) -> None:
        check_weight(weight)
        with self._writing() as state:
            client = state.client(name, "set_weight")
            client.weight = weight
            state.journal.client_changed(client)

    def set_cap(self, name: str, cap_pages: int | None) -> int:
        """Cap a client's stored pages; evicts its ephemeral pages above it.  → evicted."""
        check_cap(cap_pages)
        with self._writing() as state:
            client = state.client(name, "set_cap")
            client.cap_pages = cap_pages
            state.journal.client_changed(client)
            if cap_pages is None:
                return 0
            return evict_client_to(state, client, pages=cap_pages)

    def set_dedup(self, name: str, enabled: bool) -> None:
        """Opt a client in or out of cross-guest de-duplication (for future puts)."""
        with self._writing() as state:
            client = state.client(name, "set_dedup")
            if client.dedup != enabled:
                client.dedup = enabled
                state.journal.client_changed(client)

    def authorize_shared(self, name: str, pool_uuid: bytes | uuidlib.UUID) -> None:
        """Allow a client to create or join the shared pool with this UUID."""
        key = uuid_bytes(pool_uuid, "authorize_shared")
        with self._writing() as state:
            client = state.client(name, "authorize_shared")
            client.authorised.add(key)
            state.journal.client_changed(client)

    def revoke_shared(self, name: str, pool_uuid: bytes | uuidlib.UUID) -> None:
        """Withdraw an authorisation (pools already joined stay joined)."""
        key = uuid_bytes(pool_uuid, "revoke_shared")
        with self._writing() as state:
            client = state.client(name, "revoke_shared")
            client.authorised.discard(key)
            state.journal.client_changed(client)

    @property
    def budget_bytes(self) -> int:
        return self._state.budget

    def set_budget(self, budget_bytes: int) -> int:
        """Change the memory budget; evict ephemeral pages to fit.  → pages evicted.

        Persistent pages are never dropped: if they alone exceed the new budget the
        store stays above it and every put fails until guests flush.
        """
        if type(budget_bytes) is not int or budget_bytes < 0:
            raise InvalidArgument("budget must be a non-negative integer", op="set_budget")
        with self._lock:
            state = self._state
            state.budget = budget_bytes
            if state.log is not None:
                state.log.set_budget(budget_bytes)
            return shrink_to(state, budget_bytes)

    def flush_kib(self, kib: int, client: str | None = None) -> int:
        """Evict ephemeral pages until *kib* KiB of budget is freed.  → bytes freed."""
        if type(kib) is not int or kib < 0:
            raise InvalidArgument("flush size must be a non-negative KiB count", op="flush_kib")
        with self._lock:
            state = self._state
            start = used_bytes(state)
            target = max(0, start - kib * 1024)
            if client is None:
                shrink_to(state, target)
            else:
                evict_client_to(state, state.client(client, "flush_kib"), used=target)
            return start - used_bytes(state)

    # =====================================================================================
    # guest operations
    # =====================================================================================

    def new_pool(self, name: str, flags: int, pool_uuid: bytes | uuidlib.UUID | None = None) -> int:
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
        key = uuid_bytes(pool_uuid, op) if shared else None
        with self._writing() as state:
            client = state.client(name, op)
            try:
                local = client.pools.index(None)
            except ValueError:
                raise NoSpace(
                    f"client already has {MAX_POOLS_PER_CLIENT} pools", op=op, client=name
                ) from None
            return state.new_pool(client, local, persistent, shared, key, op)

    def new_pool_at(self, name: str, pool_id: int, flags: int) -> int:
        """Create a private pool at a given local id (a swap disk's pool, which the host
        and not the guest places).  → the pool id."""
        op = "new_pool_at"
        if type(pool_id) is not int or not 0 <= pool_id < MAX_POOLS_PER_CLIENT:
            raise InvalidArgument("pool id out of range", op=op, client=name)
        if not isinstance(flags, int) or int(flags) & ~int(PoolFlag.PERSISTENT):
            raise InvalidArgument("only private pools are placed by id", op=op, client=name)
        with self._writing() as state:
            client = state.client(name, op)
            if client.pools[pool_id] is not None:
                raise InvalidArgument("pool id already in use", op=op, client=name, pool=pool_id)
            return state.new_pool(
                client, pool_id, bool(flags & PoolFlag.PERSISTENT), False, None, op
            )

    def destroy_pool(self, name: str, pool_id: int) -> None:
        """Destroy a private pool, or leave a shared one (destroyed with its last member)."""
        with self._writing() as state:
            client = state.client(name, "destroy_pool")
            state.leave_pool(client, state.pool(client, pool_id, "destroy_pool"))

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
            state = self._state
            pool = state.pool(state.client(name, op), pool_id, op)
            payload = state.take(pool, oid, index)
        return None if payload is None else decode_payload(payload)

    def flush_page(self, name: str, pool_id: int, oid: Oid, index: int) -> bool:
        """Remove one page.  → whether a page was there."""
        op = "flush_page"
        check_oid(oid, op)
        check_index(index, op)
        with self._writing() as state:
            pool = state.pool(state.client(name, op), pool_id, op)
            slot = state.find(pool, oid, index)
            if slot < 0:
                return False
            state.drop_slot(pool, slot)
            pool.ops.flushes += 1
            return True

    def flush_object(self, name: str, pool_id: int, oid: Oid) -> int:
        """Remove every page of one object.  → pages removed."""
        op = "flush_object"
        check_oid(oid, op)
        with self._writing() as state:
            pool = state.pool(state.client(name, op), pool_id, op)
            pool.ops.flush_objects += 1
            objno = pool.objects.get(oid)
            if objno is None:
                return 0
            slots = state.pages.object_slots(objno)
            for slot in slots:
                state.drop_slot(pool, slot)
            pool.ops.flushes += len(slots)
            return len(slots)

    def flush_pool(self, name: str, pool_id: int) -> int:
        """Remove every page of a pool but keep the pool.  → pages removed."""
        with self._writing() as state:
            pool = state.pool(state.client(name, "flush_pool"), pool_id, "flush_pool")
            removed = state.empty_pool(pool)
            pool.ops.flushes += removed
            return removed

    def put_batch(
        self,
        name: str,
        pool_id: int,
        handles: Sequence[tuple[Oid, int]],
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

    # -- entries for input a decoder already validated ------------------------------------
    # The guest protocol's decoder (memd.wire) proves every argument's shape on the way
    # in: oid words and indexes are unpacked from u64/u32 fields, a page is exactly
    # PAGE_SIZE bytes, a batch holds 1..MAX_BATCH handles with one page each.  These
    # entries skip checking it all again (and copying each page into ``bytes``, which
    # check_page does for a buffer); everything else (client, pool, caps, budget, frozen)
    # is checked exactly as by put/put_batch.  Anything not proven so must use those.

    def put_prevalidated(
        self, name: str, pool_id: int, oid: Oid, index: int, page: PageBuffer
    ) -> None:
        """:meth:`put` of arguments already validated as described above."""
        error = self._put_pages(name, pool_id, [(oid, index)], [page], "put")[0]
        if error is not None:
            raise error

    def put_batch_prevalidated(
        self,
        name: str,
        pool_id: int,
        handles: Sequence[tuple[Oid, int]],
        pages: Sequence[PageBuffer],
    ) -> list[TmemError | None]:
        """:meth:`put_batch` of arguments already validated as described above."""
        return self._put_pages(name, pool_id, handles, pages, "put_batch")

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
            state = self._state
            pool = state.pool(state.client(name, op), pool_id, op)
            payloads = [state.take(pool, oid, index) for oid, index in handles]
        return [None if p is None else decode_payload(p) for p in payloads]

    # =====================================================================================
    # introspection
    # =====================================================================================

    def client_names(self) -> list[str]:
        with self._lock:
            return sorted(self._state.clients)

    def pool_ids(self, name: str) -> list[tuple[int, int]]:
        """(local pool id, PoolFlag) of each pool the client has."""
        with self._lock:
            state = self._state
            client = state.client(name, "list_pools")
            return [
                (local, state.pools[gid].flags)
                for local, gid in enumerate(client.pools)
                if gid is not None
            ]

    def pool_stats(self, name: str | None = None) -> list[PoolStats]:
        with self._lock:
            state = self._state
            out = []
            for cname in [name] if name is not None else sorted(state.clients):
                client = state.client(cname, "pool_stats")
                out += [
                    pool_stats(cname, local, state.pools[gid])
                    for local, gid in enumerate(client.pools)
                    if gid is not None
                ]
            return out

    def client_stats(self, name: str | None = None) -> list[ClientStats]:
        with self._lock:
            state = self._state
            names = [name] if name is not None else sorted(state.clients)
            return [client_stats(state, state.client(n, "client_stats")) for n in names]

    def store_stats(self) -> StoreStats:
        with self._lock:
            return store_stats(self._state)

    def audit(self) -> list[str]:
        """Recompute every count and link from the structures; list each discrepancy."""
        with self._writing() as state:
            issues = audit_host(state)
            if state.log is not None:
                state.journal.commit()  # a deferring thread's writes too: compare like with like
                issues += audit_log(state, state.log.load())
            return issues

    # =====================================================================================
    # internals
    # =====================================================================================

    @contextmanager
    def _writing(self) -> Iterator[HostState]:
        """``_lock``, and the journal committed before it is released (unless this
        thread defers), whatever happened in between: memory and store stay equal."""
        with self._lock:
            state = self._state
            try:
                yield state
            finally:
                journal = state.journal
                if journal.tracking and journal.commit_due():
                    journal.commit()

    def _put_pages(
        self,
        name: str,
        pool_id: int,
        handles: Sequence[tuple[Oid, int]],
        pages: Sequence[PageBuffer],
        op: str,
    ) -> list[TmemError | None]:
        """The put pipeline (see docs/tmem.md): hash, pin duplicates, compress, insert."""
        hashes = hash_pages(pages)  # no lock
        state = self._state
        with self._lock:
            client = state.client(name, op)
            pool = state.pool(client, pool_id, op)
            scope = state.scope(client, pool)
            pins = state.store.pin_matches(hashes, pages, scope)
            pinned = [p for p in pins if p >= 0]
            if pinned:
                state.pins.update(pinned)
        encoded: list[EncodedPage] = [
            (h, b"" if h < 0 or pin >= 0 else compress_page(page), pin)
            for h, page, pin in zip(hashes, pages, pins, strict=True)
        ]  # no lock: lz4 runs here, in parallel across threads
        with self._writing():
            if pinned:  # from here on each is a slot's reference, or released
                state.pins.subtract(pinned)
                state.pins += Counter()  # drop the zeros
            try:
                client = state.client(name, op)
                pool = state.pool(client, pool_id, op)
            except TmemError:
                unpin(state, encoded)
                raise
            if state.scope(client, pool) != scope:
                # Dedup consent changed in between: the pins were for the old scope.
                unpin(state, encoded)
                encoded = [
                    (h, b"" if h < 0 else compress_page(p), -1)
                    for h, p in zip(hashes, pages, strict=True)
                ]
            items = [(oid, index, enc) for (oid, index), enc in zip(handles, encoded, strict=True)]
            return put_many(state, client, pool, items)
