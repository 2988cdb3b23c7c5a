"""Stats of a TmemHost: per pool, per client and for the whole store.

Overview
--------
Builds the records of :mod:`tmem.types` (``PoolStats``, ``ClientStats``,
``StoreStats``) from the counters the operations keep incrementally; nothing is
recounted here (:mod:`tmem.audit` does that).  A client's figures sum its pools'
counters and those of pools it destroyed; bytes are counted for the pools it *owns*
(shared pools are charged to their owner).  ``metadata_bytes`` is the memory really
allocated for bookkeeping (arrays at capacity, dicts, slab free lists), not the
budget's per-item charges (:mod:`tmem.budget`).

Locking
-------
Functions of a :class:`~tmem.state.HostState`; the caller holds ``TmemHost._lock``.
The records returned are copies, safe to use after the lock is released.
"""

from __future__ import annotations

import sys
import uuid as uuidlib
from typing import TYPE_CHECKING

from tmem.budget import used_bytes
from tmem.types import PAGE_SIZE, ClientStats, OpCounters, PoolStats, StoreStats

if TYPE_CHECKING:
    from tmem.state import Client, HostState, Pool

_OID_TUPLE_BYTES = 64 + 3 * 36  # a 3-tuple plus three (mostly large) ints


def pool_stats(cname: str, local: int, pool: Pool) -> PoolStats:
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


def client_stats(state: HostState, client: Client) -> ClientStats:
    ops = OpCounters(**client.retired_ops.to_dict())
    raw = stored = npools = 0
    for gid in client.pools:
        if gid is None:
            continue
        npools += 1
        pool = state.pools[gid]
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


def store_stats(state: HostState) -> StoreStats:
    pages, store = state.pages, state.store
    persistent = sum(c.persistent_pages for c in state.clients.values())
    return StoreStats(
        budget_bytes=state.budget,
        used_bytes=used_bytes(state),
        data_bytes=store.data_bytes,
        metadata_bytes=metadata_bytes(state),
        reserved_bytes=store.arena.reserved_bytes,
        pages=pages.live_slots,
        ephemeral_pages=pages.live_slots - persistent,
        persistent_pages=persistent,
        unique_blobs=store.live_blobs,
        zero_pages=store.zero_refs(),
        dedup_hits=store.dedup_hits,
        evictions=state.evictions,
    )


def metadata_bytes(state: HostState) -> int:
    # Object ids live in per-pool dicts: the dict tables plus one 3-tuple of ints each.
    dicts = sum(
        sys.getsizeof(p.objects) + len(p.objects) * _OID_TUPLE_BYTES for p in state.pools.values()
    )
    return state.store.metadata_bytes() + state.pages.metadata_bytes() + dicts
