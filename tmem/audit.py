"""tmem audit: recompute every count and link from the raw structures.

Like ``ksm.c``'s counters, every number the host keeps incrementally (pages per
pool, per client, blob reference counts, LRU lengths, bytes stored) is recomputed
here from the arrays themselves and compared; each mismatch becomes one line of the
report.  The caller holds the host lock.  An empty list means consistent.

:func:`audit_log` compares a host with a persistent log to what the log committed:
the same clients and pools, exactly the persistent pages (handle → blob), exactly the
external blobs (hash, scope, length), and every stored payload decodes to a page whose
hash is the recorded one.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING

from tmem.budget import used_bytes
from tmem.durable import StoredState
from tmem.journal import client_record, pool_record
from tmem.store import ZERO_BLOB, decode_payload, hash_pages

if TYPE_CHECKING:
    from tmem.state import HostState


def audit_host(host: HostState) -> list[str]:
    pages, store = host.pages, host.store
    issues: list[str] = []
    live = pages.live_slot_ids()
    if len(live) != pages.live_slots:
        issues.append(f"live_slots counter {pages.live_slots} != {len(live)} slots in use")
    if pages.indexed_slots() != set(live):
        issues.append("handle index does not hold exactly the live slots")

    refs: Counter[int] = Counter()
    per_obj: Counter[int] = Counter()
    per_pool_pages: Counter[int] = Counter()
    per_pool_bytes: Counter[int] = Counter()
    for slot in live:
        blob, objno = pages.blob[slot], pages.obj[slot]
        refs[blob] += 1
        per_obj[objno] += 1
        gid = pages.obj_pool[objno]
        if gid < 0 or gid not in host.pools:
            issues.append(f"slot {slot} belongs to dead object {objno} / pool {gid}")
            continue
        per_pool_pages[gid] += 1
        per_pool_bytes[gid] += store.payload_length(blob)
        if pages.lookup(objno, pages.index[slot]) != slot:
            issues.append(f"slot {slot} is not found by its own handle")
        pool = host.pools[gid]
        if pool.persistent == pages.on_lru(slot):
            issues.append(f"slot {slot}: LRU membership does not match pool kind")

    live_objs = {o for o, g in enumerate(pages.obj_pool) if g >= 0}
    if len(live_objs) != pages.live_objects:
        issues.append(f"live_objects counter {pages.live_objects} != {len(live_objs)}")
    for objno in live_objs:
        listed = pages.object_slots(objno)
        if len(listed) != pages.obj_count[objno] or len(listed) != per_obj[objno]:
            issues.append(
                f"object {objno}: count {pages.obj_count[objno]}, list {len(listed)}, "
                f"slots {per_obj[objno]}"
            )
        if not listed:
            issues.append(f"object {objno} is empty but still allocated")
        owner_pool = host.pools.get(pages.obj_pool[objno])
        if owner_pool is None or owner_pool.objects.get(pages.oid_of(objno)) != objno:
            issues.append(f"object {objno} is not in its pool's object map")
    for gid, pool in host.pools.items():
        if pool.pages != per_pool_pages[gid] or pool.bytes_stored != per_pool_bytes[gid]:
            issues.append(
                f"pool {gid}: pages {pool.pages}/{per_pool_pages[gid]}, "
                f"bytes {pool.bytes_stored}/{per_pool_bytes[gid]} (counter/recount)"
            )
        for cname, local in pool.members.items():
            member = host.clients.get(cname)
            if member is None or member.pools[local] != gid:
                issues.append(f"pool {gid}: member {cname} does not map it at {local}")

    refs.update(host.pins)  # references held by puts in flight (between their phases)
    blobs = store.live_blob_ids()
    if len(blobs) != store.live_blobs:
        issues.append(f"live_blobs counter {store.live_blobs} != {len(blobs)}")
    for blob in set(blobs) | set(refs):
        if blob != ZERO_BLOB and store.refs(blob) != refs[blob]:
            issues.append(f"blob {blob}: refs {store.refs(blob)} != {refs[blob]} slots")
    if store.refs(ZERO_BLOB) != refs[ZERO_BLOB]:
        issues.append(f"zero page refs {store.refs(ZERO_BLOB)} != {refs[ZERO_BLOB]}")
    if store.dedup_members() != set(blobs):
        issues.append("dedup index does not hold exactly the live blobs")
    data = sum(store.payload_length(b) for b in blobs)
    if data != store.data_bytes:
        issues.append(f"data_bytes {store.data_bytes} != {data}")

    for client in host.clients.values():
        walk = pages.lru_walk(client.lru, client.lru.count + 1)
        if len(walk) != client.lru.count or (walk and walk[-1] != client.lru.tail):
            issues.append(f"client {client.name}: LRU list length/tail mismatch")
        for prev, slot in itertools.pairwise(walk):
            if pages.lru_prev[slot] != prev:
                issues.append(f"client {client.name}: broken LRU back link at slot {slot}")
                break
        owned_eph = sum(
            p.pages for p in host.pools.values() if p.owner == client.name and not p.persistent
        )
        owned_pers = sum(
            p.pages for p in host.pools.values() if p.owner == client.name and p.persistent
        )
        if owned_eph != client.lru.count:
            issues.append(
                f"client {client.name}: {owned_eph} ephemeral pages, LRU has {client.lru.count}"
            )
        if owned_pers != client.persistent_pages:
            issues.append(
                f"client {client.name}: persistent_pages {client.persistent_pages} != {owned_pers}"
            )
    if used_bytes(host) > host.budget and any(c.lru.count for c in host.clients.values()):
        issues.append("over budget while ephemeral pages remain evictable")
    return issues


def audit_log(host: HostState, state: StoredState) -> list[str]:
    """Memory against the committed log (the caller committed it, under the lock)."""
    issues: list[str] = []
    stored_clients = {c.name: c for c in state.clients}
    for name, c in host.clients.items():
        want = client_record(c)
        if stored_clients.get(name) != want:
            issues.append(f"store: client {name} is {stored_clients.get(name)}, memory {want}")
    for name in stored_clients.keys() - host.clients.keys():
        issues.append(f"store: client {name} is not in memory")
    stored_pools = {p.gid: p for p in state.pools}
    for gid, p in host.pools.items():
        want_pool = pool_record(p)
        if stored_pools.get(gid) != want_pool:
            issues.append(f"store: pool {gid} is {stored_pools.get(gid)}, memory {want_pool}")
    for gid in stored_pools.keys() - host.pools.keys():
        issues.append(f"store: pool {gid} is not in memory")

    pages, store = host.pages, host.store
    memory_pages: set[tuple[int, int, int, int, int, int]] = set()
    for gid, pool in host.pools.items():
        if pool.persistent:
            for oid, objno in pool.objects.items():
                for slot in pages.object_slots(objno):
                    memory_pages.add((gid, *oid, pages.index[slot], pages.blob[slot]))
    stored_pages: set[tuple[int, int, int, int, int, int]] = set(state.pages.tolist())
    for page in sorted(memory_pages - stored_pages)[:20]:
        issues.append(f"store: persistent page {page} (gid, oid, index, blob) is missing")
    for page in sorted(stored_pages - memory_pages)[:20]:
        issues.append(f"store: page {page} (gid, oid, index, blob) is not in memory")
    if len(stored_pages) != len(state.pages):
        issues.append("store: a page handle is stored twice")

    memory_blobs = {
        (b, store.blob_hash(b), store.blob_scope(b), store.payload_length(b))
        for b in store.live_blob_ids()
        if store.is_external(b)
    }
    stored_blobs: set[tuple[int, int, int, int]] = set(state.blobs.tolist())
    for rec in sorted(memory_blobs ^ stored_blobs)[:20]:
        where = "missing from the store" if rec in memory_blobs else "not in memory"
        issues.append(f"store: blob {rec} (id, hash, scope, length) is {where}")
    log = host.log
    assert log is not None
    for blob, h, _scope, length in sorted(stored_blobs & memory_blobs):
        payload = log.payload(blob)
        if len(payload) != length or hash_pages([decode_payload(payload)])[0] != h:
            issues.append(f"store: blob {blob}: payload does not match its hash/length")
    return issues
