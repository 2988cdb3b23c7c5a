"""The state a TmemHost guards: clients, pools, the page table, the blob store.

Overview
--------
:class:`HostState` is the one bundle of mutable tmem state: the client and pool tables,
the :class:`~tmem.pages.PageTable` (handles → slots), the
:class:`~tmem.store.PageStore` (refcounted blobs), the budget and the counters, and the
:class:`~tmem.journal.Journal` that records changes to persistent state.  Its methods
are the structural steps every operation is made of — look a client or pool up, create
or leave a pool, take a page out of the tables — each keeping every structure
consistent in one step, so no caller ever sees a dangling handle.

The operations that combine these steps live beside it, as functions of the state:
the put pipeline's locked half in :mod:`tmem.put`, budget and eviction in
:mod:`tmem.budget`, stats in :mod:`tmem.stats`, the audit in :mod:`tmem.audit` and the
rebuild after a restart in :mod:`tmem.restore`.

Locking
-------
Nothing here takes a lock.  Every field of :class:`HostState`, :class:`Client` and
:class:`Pool` is guarded by its host's ``TmemHost._lock``, which every caller holds
(the only lock of the tmem core).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from memd.errors import AccessDenied, NoSuchClient, NoSuchPool
from tmem.durable import EXTERNAL_SCOPE, PersistentLog, RecordSink
from tmem.journal import Journal
from tmem.pages import RADIX_BITS, LruList, PageTable
from tmem.store import PageStore
from tmem.types import DEFAULT_WEIGHT, MAX_POOLS_PER_CLIENT, Oid, OpCounters, PoolFlag


@dataclass(slots=True, eq=False)
class Pool:
    """One pool; ``gid`` is host-wide, each member names it by its own local id."""

    gid: int
    persistent: bool
    shared: bool
    uuid: bytes | None
    owner: str  # the client charged for its pages (the creator, until it leaves)
    members: dict[str, int] = field(default_factory=dict)  # client → its local pool id
    objects: dict[Oid, int] = field(default_factory=dict)  # oid → objno
    pages: int = 0
    bytes_stored: int = 0
    ops: OpCounters = field(default_factory=OpCounters)

    @property
    def flags(self) -> int:
        return int(
            (PoolFlag.PERSISTENT if self.persistent else 0)
            | (PoolFlag.SHARED if self.shared else 0)
        )


@dataclass(slots=True, eq=False)
class Client:
    """One guest: its settings, its pool ids and the LRU of the ephemeral pages it owns."""

    name: str
    scope: int  # dedup scope used when this client has not opted in
    weight: int = DEFAULT_WEIGHT
    cap_pages: int | None = None
    dedup: bool = False
    frozen: bool = False
    pools: list[int | None] = field(default_factory=lambda: [None] * MAX_POOLS_PER_CLIENT)
    lru: LruList = field(default_factory=LruList)  # ephemeral pages charged here
    persistent_pages: int = 0
    retired_ops: OpCounters = field(default_factory=OpCounters)  # dead pools'
    authorised: set[bytes] = field(default_factory=set)
    meta: dict[str, Any] = field(default_factory=dict)  # the agent's (boot id, reboots)

    @property
    def pages(self) -> int:
        return self.lru.count + self.persistent_pages


class HostState:
    """Everything a TmemHost holds; every field guarded by ``TmemHost._lock``."""

    def __init__(
        self, budget_bytes: int, log: PersistentLog | None, listeners: Collection[RecordSink] = ()
    ) -> None:
        self.budget = budget_bytes
        #: Wiring, fixed at construction: the store of persistent state, if any.
        self.log = log
        self.store = PageStore(log)
        # ``pages`` and ``pools`` are never rebound: the journal reads the same objects.
        self.pages = PageTable()
        self.clients: dict[str, Client] = {}
        self.pools: dict[int, Pool] = {}
        self.shared_by_uuid: dict[bytes, int] = {}
        self.journal = Journal(log, listeners, self.pages, self.pools)
        self.next_gid = 0
        self.next_scope = 1
        self.evictions = 0
        #: Blob references taken by puts between their two locked phases (the audit
        #: counts them: the slot that will own each does not exist yet).
        self.pins: Counter[int] = Counter()

    # -- lookups ---------------------------------------------------------------------------

    def client(self, name: str, op: str) -> Client:
        try:
            return self.clients[name]
        except KeyError:
            raise NoSuchClient(f"no tmem client named {name!r}", op=op, client=name) from None

    def pool(self, client: Client, pool_id: int, op: str) -> Pool:
        gid = (
            client.pools[pool_id]
            if type(pool_id) is int and 0 <= pool_id < MAX_POOLS_PER_CLIENT
            else None
        )
        if gid is None:
            raise NoSuchPool(
                f"pool {pool_id!r} does not exist",
                op=op,
                client=client.name,
                pool=pool_id if type(pool_id) is int else None,
            )
        return self.pools[gid]

    def owner_lru(self, pool: Pool) -> LruList | None:
        return None if pool.persistent else self.clients[pool.owner].lru

    def scope(self, client: Client, pool: Pool) -> int:
        """Dedup scope of a put: shared by opted-in clients, else the pool owner's own;
        with a log, persistent pools' blobs are a world of their own (EXTERNAL_SCOPE)."""
        scope = 0 if client.dedup else self.clients[pool.owner].scope
        if pool.persistent and self.log is not None:
            scope |= EXTERNAL_SCOPE
        return scope

    # -- clients and pools -----------------------------------------------------------------

    def add_client(self, name: str, weight: int, cap_pages: int | None, dedup: bool) -> Client:
        client = self.clients[name] = Client(
            name, self.next_scope, weight=weight, cap_pages=cap_pages, dedup=dedup
        )
        self.next_scope += 1
        self.journal.client_changed(client)
        return client

    def remove_client(self, client: Client) -> None:
        self.drop_all_pools(client)
        del self.clients[client.name]
        self.journal.client_dropped(client.name)

    def new_pool(
        self, client: Client, local: int, persistent: bool, shared: bool, key: bytes | None, op: str
    ) -> int:
        """Create a pool at *local*, or join the shared pool *key* names.  → local id."""
        name = client.name
        if shared:
            if key is None or key not in client.authorised:
                raise AccessDenied(
                    "the host has not authorised this client for that shared pool",
                    op=op,
                    client=name,
                )
            gid = self.shared_by_uuid.get(key)
            if gid is not None:
                pool = self.pools[gid]
                if name in pool.members:
                    return pool.members[name]
                pool.members[name] = local
                client.pools[local] = gid
                self.journal.pool_changed(pool)
                return local
        pool = Pool(self.next_gid, persistent, shared, key, owner=name)
        self.next_gid += 1
        pool.members[name] = local
        self.pools[pool.gid] = pool
        if key is not None:
            self.shared_by_uuid[key] = pool.gid
        client.pools[local] = pool.gid
        self.journal.pool_changed(pool)
        return local

    def leave_pool(self, client: Client, pool: Pool) -> None:
        """*client* leaves *pool*: the last member destroys it, an owner hands it on."""
        local = pool.members.pop(client.name)
        client.pools[local] = None
        if not pool.members:
            self.empty_pool(pool)
            client.retired_ops.add(pool.ops)
            del self.pools[pool.gid]
            if pool.uuid is not None:
                del self.shared_by_uuid[pool.uuid]
            self.journal.pool_dropped(pool.gid)
        else:
            if pool.owner == client.name:
                self._transfer_ownership(pool, client, self.clients[next(iter(pool.members))])
            self.journal.pool_changed(pool)

    def _transfer_ownership(self, pool: Pool, old: Client, new: Client) -> None:
        """The pages' charge (their LRU places) moves with the ownership."""
        for objno in pool.objects.values():
            for slot in self.pages.object_slots(objno):
                self.pages.move_lru(slot, old.lru, new.lru)
        pool.owner = new.name

    def drop_all_pools(self, client: Client, keep: Collection[int] = ()) -> int:
        """Leave every pool of *client* but the local ids in *keep*.  → pools left."""
        gids = [g for local, g in enumerate(client.pools) if g is not None and local not in keep]
        for gid in gids:
            self.leave_pool(client, self.pools[gid])
        return len(gids)

    # -- pages -----------------------------------------------------------------------------

    def empty_pool(self, pool: Pool) -> int:
        """Drop every page of *pool*.  → pages dropped."""
        removed = 0
        for objno in list(pool.objects.values()):
            for slot in self.pages.object_slots(objno):
                self.drop_slot(pool, slot)
                removed += 1
        return removed

    def find(self, pool: Pool, oid: Oid, index: int) -> int:
        """The slot at the handle, or -1."""
        objno = pool.objects.get(oid)
        return -1 if objno is None else self.pages.lookup(objno, index)

    def take(self, pool: Pool, oid: Oid, index: int) -> bytes | None:
        """A get: the payload at the handle (copied out), honouring get exclusivity."""
        pool.ops.gets += 1
        objno = pool.objects.get(oid)  # find(), inlined: every get comes here
        if objno is None:
            return None
        slot = self.pages.lookup(objno, index)
        if slot < 0:
            return None
        pool.ops.found_gets += 1
        payload = self.store.payload(self.pages.blob[slot])
        if pool.persistent:
            pass
        elif not pool.shared:
            self.drop_slot(pool, slot)  # private ephemeral: exclusive get
        else:
            lru = self.owner_lru(pool)
            assert lru is not None
            self.pages.touch(slot, lru)
        return payload

    def drop_slot(self, pool: Pool, slot: int) -> None:
        """Remove one page of *pool* from every structure and release its blob."""
        pages = self.pages
        objno = pages.obj[slot]
        lru = self.owner_lru(pool)
        if pool.persistent and self.journal.tracking:
            self.journal.dirty.add((pool.gid, pages.oid_of(objno), pages.index[slot] >> RADIX_BITS))
        blob = pages.remove(slot, lru)
        pool.pages -= 1
        pool.bytes_stored -= self.store.payload_length(blob)
        if pool.persistent:
            self.clients[pool.owner].persistent_pages -= 1
        self.store.release(blob)
        if pages.obj_count[objno] == 0:
            del pool.objects[pages.oid_of(objno)]
            pages.free_object(objno)
