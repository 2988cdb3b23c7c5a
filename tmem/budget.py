"""The budget: what a TmemHost is charged, and eviction to get back under it.

Overview
--------
Charged bytes are blob data rounded to its size class, plus fixed costs per blob,
per page slot, per object and per radix chunk (``tmem.store``, ``tmem.pages``), plus
what the persistent log's file really occupies (``PersistentLog.bytes_used``).  The
operator may lower the budget at any time.

Eviction is bottom-up and touches ephemeral pages only: the victim client is the one
with the most evictable ephemeral pages per unit of weight, and within it the tail of
its LRU (the least recently used page) goes first.  Each eviction goes through
:meth:`HostState.drop_slot`, which updates every structure in the same step.
Persistent pages are never evicted.

Locking
-------
Functions of a :class:`~tmem.state.HostState`; the caller holds ``TmemHost._lock``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmem.pages import CHUNK_META_BYTES, OBJ_META_BYTES, SLOT_META_BYTES
from tmem.store import BLOB_META_BYTES
from tmem.types import PAGE_SIZE

if TYPE_CHECKING:
    from tmem.state import Client, HostState

#: Most budget one put can add: a raw page, its blob, slot, object and radix chunk.
MAX_PUT_COST = PAGE_SIZE + BLOB_META_BYTES + SLOT_META_BYTES + OBJ_META_BYTES + CHUNK_META_BYTES
#: The same for a persistent page kept in the log: a raw page there takes two database
#: pages (a 4 KiB value plus its header overflows one), plus its page record.
MAX_LOGGED_PUT_COST = MAX_PUT_COST + 2 * PAGE_SIZE + 256


def used_bytes(state: HostState) -> int:
    """What the budget is charged now."""
    pages = state.pages
    return (
        (0 if state.log is None else state.log.bytes_used())
        + state.store.charged_bytes()
        + pages.live_slots * SLOT_META_BYTES
        + pages.live_objects * OBJ_META_BYTES
        + pages.live_chunks * CHUNK_META_BYTES
    )


def pick_victim(state: HostState, protect: Client | None = None) -> Client | None:
    """The client with the most evictable ephemeral pages per unit of weight.

    *protect* has just had a page pushed at its LRU head; that page is not
    evictable, so it does not count (and never reaches the tail being evicted).
    """
    best: Client | None = None
    best_score = 0.0
    for client in state.clients.values():
        count = client.lru.count - (client is protect)
        if count > 0:
            score = count / client.weight
            if score > best_score:
                best, best_score = client, score
    return best


def evict_one(state: HostState, client: Client) -> None:
    """Evict the least recently used ephemeral page *client* is charged for."""
    slot = client.lru.tail
    pages = state.pages
    pool = state.pools[pages.obj_pool[pages.obj[slot]]]
    state.drop_slot(pool, slot)
    pool.ops.evictions += 1
    state.evictions += 1


def evict_client_to(
    state: HostState, client: Client, *, pages: int | None = None, used: int | None = None
) -> int:
    """Evict *client*'s LRU pages while it holds more than *pages* pages or the host is
    charged more than *used* bytes, as long as it has any.  → pages evicted."""
    evicted = 0
    while client.lru.count and (
        (pages is not None and client.pages > pages)
        or (used is not None and used_bytes(state) > used)
    ):
        evict_one(state, client)
        evicted += 1
    return evicted


def shrink_to(state: HostState, target: int) -> int:
    """Evict across clients until charged at most *target* bytes (or nothing is
    evictable).  → pages evicted."""
    evicted = 0
    while used_bytes(state) > target:
        victim = pick_victim(state)
        if victim is None:
            break
        evict_one(state, victim)
        evicted += 1
    return evicted


def trim_for(state: HostState, protect: Client | None) -> bool:
    """Evict until within budget, sparing the page just pushed on *protect*'s LRU;
    False if that is impossible."""
    while used_bytes(state) > state.budget:
        victim = pick_victim(state, protect)
        if victim is None:
            return False
        evict_one(state, victim)
    return True
