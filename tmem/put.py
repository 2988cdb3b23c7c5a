"""The locked half of the put pipeline: storing encoded pages in a pool.

Overview
--------
:meth:`TmemHost.put` and :meth:`TmemHost.put_batch` hash, pin duplicates and
compress with the lock mostly free (docs/tmem.md, "The put pipeline"); what is left
for the lock is here: intern each blob, insert its slot, keep the counters, and
enforce frozen clients, page caps and the budget, page by page in order.  When the
whole batch is sure to fit (budget headroom at worst-case cost, no cap in the way, not
frozen, no handle twice) one hoisted loop does it all (:func:`_put_batch_fast`), with
the same outcome as the page-by-page path.

A put to an occupied handle drops the old page first, so whatever happens to the new
one, the old data can never be read again.

Locking
-------
Functions of a :class:`~tmem.state.HostState`; the caller holds ``TmemHost._lock``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memd.errors import ClientFrozen, NoSpace, TmemError
from tmem.budget import MAX_LOGGED_PUT_COST, MAX_PUT_COST, evict_one, trim_for, used_bytes
from tmem.pages import RADIX_BITS, RADIX_FANOUT, LruList
from tmem.store import EncodedPage
from tmem.types import Oid

if TYPE_CHECKING:
    from tmem.state import Client, HostState, Pool

#: One page to store: its handle and its encoding (hash, lz4 payload, pinned blob).
PutItem = tuple[Oid, int, EncodedPage]
#: A whole radix chunk to install: object, chunk number, and its pages as (index, hash,
#: stored payload) in strictly increasing index order (a migration's CHUNK).
WholeChunk = tuple[Oid, int, Sequence[tuple[int, int, bytes]]]


def unpin(state: HostState, encoded: list[EncodedPage]) -> None:
    """Release the duplicates a put pinned outside the lock and will not use."""
    for _, _, pin in encoded:
        if pin >= 0:
            state.store.release(pin)


def put_many(
    state: HostState, client: Client, pool: Pool, items: list[PutItem]
) -> list[TmemError | None]:
    """Store pages in order; one result each.  The hot path of every put."""
    pages, store, objects = state.pages, state.store, pool.objects
    owner = state.clients[pool.owner]
    lru = None if pool.persistent else owner.lru
    scope = state.scope(client, pool)
    journal = state.journal
    dirty = journal.dirty if pool.persistent and journal.tracking else None
    # With room for the whole batch at worst-case cost, skip per-page budget checks.
    cost = MAX_LOGGED_PUT_COST if pool.persistent and state.log is not None else MAX_PUT_COST
    headroom = state.budget - used_bytes(state) >= len(items) * cost
    if (
        headroom
        and len(items) > 1
        and not client.frozen
        and (owner.cap_pages is None or owner.pages + len(items) <= owner.cap_pages)
    ):
        done = _put_batch_fast(state, pool, items, scope, lru)
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
                state.drop_slot(pool, old)
                objno = objects.get(oid)
        error: TmemError | None = None
        if client.frozen:
            error = _put_error(ClientFrozen, "client is frozen", client, oid, index)
        elif owner.cap_pages is not None and owner.pages >= owner.cap_pages:
            if lru is None or not lru.count:
                error = _put_error(NoSpace, "client page cap reached", client, oid, index)
                refused += 1
            else:
                evict_one(state, owner)  # an ephemeral put displaces the owner's LRU page
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
        if dirty is not None:
            dirty.add((pool.gid, oid, index >> RADIX_BITS))
        pool.pages += 1
        pool.bytes_stored += store.payload_length(blob)
        if lru is None:
            owner.persistent_pages += 1
        if not headroom and not trim_for(state, owner if lru is not None else None):
            state.drop_slot(pool, slot)
            results.append(_put_error(NoSpace, "tmem store is full", client, oid, index))
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
    state: HostState,
    pool: Pool,
    items: list[PutItem],
    scope: int,
    lru: LruList | None,
) -> list[TmemError | None] | None:
    """All-or-nothing fast path when every page is sure to fit (the caller checked
    budget headroom, cap and frozen).  Same outcome as putting the pages one by one;
    None (nothing done) when a handle repeats inside the batch, which needs the
    ordered per-page path."""
    handles = [(oid, index) for oid, index, _ in items]
    if len(set(handles)) != len(handles):
        return None
    pages, objects = state.pages, pool.objects
    # Two passes: dropping a replaced page may free its object, so no objno is
    # resolved until every replaced page is gone.
    dups = 0
    for oid, index in handles:
        objno = objects.get(oid)
        if objno is not None:
            old = pages.lookup(objno, index)
            if old >= 0:
                dups += 1
                state.drop_slot(pool, old)  # old data first: never readable again
    objnos: list[int] = []
    for oid, _ in handles:
        objno = objects.get(oid)
        if objno is None:
            objno = objects[oid] = pages.new_object(pool.gid, oid)
        objnos.append(objno)
    store = state.store
    blobs = store.intern_many([enc for _, _, enc in items], scope)
    pages.add_many(objnos, [index for _, index in handles], blobs, lru)
    journal = state.journal
    if lru is None and journal.tracking:
        gid = pool.gid
        journal.dirty.update([(gid, oid, index >> RADIX_BITS) for oid, index in handles])
    n = len(items)
    pool.pages += n
    length = store.payload_length
    pool.bytes_stored += sum(length(b) for b in blobs)
    if lru is None:
        state.clients[pool.owner].persistent_pages += n
    ops = pool.ops
    ops.puts += n
    ops.good_puts += n
    ops.dup_puts += dups
    return [None] * n


def install_chunks(
    state: HostState, client: Client, pool: Pool, chunks: Sequence[WholeChunk]
) -> bool:
    """Store whole radix chunks a persistent *pool* holds nothing of yet, in one pass:
    no per-page lookup of a page to replace, one page-table insert for all, one dirty
    mark per chunk.  All or nothing: → False, with nothing done, unless every page is
    sure to fit (budget headroom at worst-case cost, no cap in the way, not frozen) and
    every chunk is absent, distinct and well formed; the caller then uses
    :func:`put_many`, whose outcome this one equals."""
    owner = state.clients[pool.owner]
    total = sum(len(pages) for _, _, pages in chunks)
    if (
        not pool.persistent
        or client.frozen
        or (owner.cap_pages is not None and owner.pages + total > owner.cap_pages)
    ):
        return False
    cost = MAX_LOGGED_PUT_COST if state.log is not None else MAX_PUT_COST
    if state.budget - used_bytes(state) < total * cost:
        return False
    pages, objects = state.pages, pool.objects
    radix_of = pages.radix
    seen: set[tuple[Oid, int]] = set()
    for oid, chunk_no, chunk_pages in chunks:
        objno = objects.get(oid)
        radix = None if objno is None else radix_of[objno]
        if (radix is not None and chunk_no in radix) or (oid, chunk_no) in seen:
            return False
        seen.add((oid, chunk_no))
        base = chunk_no << RADIX_BITS
        last = base - 1
        for index, _, _ in chunk_pages:
            if not last < index < base + RADIX_FANOUT:
                return False
            last = index
    objnos: list[int] = []
    indexes: list[int] = []
    hashes: list[int] = []
    payloads: list[bytes] = []
    for oid, _, chunk_pages in chunks:
        if not chunk_pages:
            continue
        objno = objects.get(oid)
        if objno is None:
            objno = objects[oid] = pages.new_object(pool.gid, oid)
        objnos += [objno] * len(chunk_pages)
        indexes += [index for index, _, _ in chunk_pages]
        hashes += [h for _, h, _ in chunk_pages]
        payloads += [payload for _, _, payload in chunk_pages]
    store = state.store
    blobs = store.intern_payloads(hashes, payloads, state.scope(client, pool))
    pages.add_many(objnos, indexes, blobs, None)
    journal = state.journal
    if journal.tracking:
        gid = pool.gid
        journal.dirty.update([(gid, oid, chunk_no) for oid, chunk_no, p in chunks if p])
    pool.pages += total
    pool.bytes_stored += sum(map(len, payloads))  # a blob's length is its payload's
    owner.persistent_pages += total
    ops = pool.ops
    ops.puts += total
    ops.good_puts += total
    return True


def _put_error(
    kind: type[TmemError], message: str, client: Client, oid: Oid, index: int
) -> TmemError:
    return kind(message, op="put", client=client.name, oid=oid, index=index)
