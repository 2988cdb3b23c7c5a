"""Rebuilding a TmemHost from its persistent log after a restart (pure: records in).

The log holds clients, pools, persistent pages and blobs; everything else — refcounts,
per-pool and per-client counters, the dedup index, object maps, free lists — is
recomputed here, which is why the log needs one chunk record per 64 neighbouring pages
(``tmem.journal``) and none per counter.  Records that cannot be used (a page of a
missing pool or blob, a pool whose owner is missing) are dropped from the log as well
and reported; a blob no page references (one an in-flight put had pinned when the agent
died) is dropped silently.
The audit then finds memory and store equal.

Runs under the host's lock (:meth:`TmemHost.restore`), into a host with no clients:
a function of its :class:`~tmem.state.HostState`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tmem.durable import EXTERNAL_SCOPE, StoredState
from tmem.pages import RADIX_BITS
from tmem.state import Client, HostState, Pool
from tmem.types import MAX_POOLS_PER_CLIENT


def restore_host(host: HostState, state: StoredState) -> list[str]:
    """Fill *host* (empty, lock held) from *state*; → one finding per dropped record."""
    log = host.log
    assert log is not None and not host.clients, "restore needs an empty host with a log"
    findings: list[str] = []
    for c in state.clients:
        host.clients[c.name] = Client(
            c.name,
            c.scope,
            weight=c.weight,
            cap_pages=c.cap_pages,
            dedup=c.dedup,
            frozen=c.frozen,
            authorised=set(c.authorised),
            meta=dict(c.meta),
        )
        host.next_scope = max(host.next_scope, c.scope + 1)
    for p in state.pools:
        host.next_gid = max(host.next_gid, p.gid + 1)
        members = {
            m: local
            for m, local in p.members.items()
            if m in host.clients
            and 0 <= local < MAX_POOLS_PER_CLIENT
            and host.clients[m].pools[local] is None
        }
        if p.owner not in members or (p.persistent and p.shared):
            findings.append(f"pool {p.gid}: owner {p.owner!r} or members unusable; dropped")
            log.drop_pool(p.gid)
            continue
        pool = Pool(p.gid, p.persistent, p.shared, p.uuid, owner=p.owner, members=members)
        host.pools[p.gid] = pool
        for m, local in members.items():
            host.clients[m].pools[local] = p.gid
        if p.uuid is not None:
            host.shared_by_uuid[p.uuid] = p.gid
        if members != p.members:
            host.journal.pool_changed(pool)

    # Pages: vectorised, a restart of a million pages must take about a second.
    pages, blobs = state.pages, state.blobs
    external = (blobs["scope"] & EXTERNAL_SCOPE) != 0
    for blob in blobs["blob"][~external].tolist():  # never written by a host: not ours
        findings.append(f"blob {blob}: not a persistent page's blob; dropped")
        log.drop_blob(blob)
    blobs = blobs[external & (blobs["blob"] != 0)]
    persistent = np.array([g for g, p in host.pools.items() if p.persistent], dtype=np.uint32)
    pool_ok = np.isin(pages["gid"], persistent)
    blob_ok = (pages["blob"] == 0) | np.isin(pages["blob"], blobs["blob"])
    for gid, o0, o1, o2, index, blob in pages[~(pool_ok & blob_ok)].tolist():
        found = host.pools.get(gid)
        why = (
            "its pool is gone"
            if found is None
            else "its pool is ephemeral"
            if not found.persistent
            else "its blob is gone"
        )
        findings.append(f"page {gid}/{o0:x}.{o1:x}.{o2:x}/{index} -> blob {blob}: {why}; dropped")
        host.journal.dirty.add((gid, (o0, o1, o2), index >> RADIX_BITS))  # rewritten at commit
    good = pages[pool_ok & blob_ok]
    top = int(max(blobs["blob"].max(initial=0), good["blob"].max(initial=0))) + 1
    refs = np.bincount(good["blob"], minlength=top)
    referenced = refs[blobs["blob"]] > 0
    # Unreferenced: normal after a crash — a put had pinned this blob as a duplicate, the
    # page that owned it was flushed, and the agent died before the put stored its page.
    for blob in blobs["blob"][~referenced].tolist():
        log.drop_blob(blob)
    host.store.restore(blobs[referenced], refs)
    if len(good):
        _rebuild_objects(host, good)
    return findings


def _rebuild_objects(host: HostState, good: npt.NDArray[np.void]) -> None:
    """Objects, slots and per-pool/per-client counters for the usable pages."""
    n = len(good)
    gid, o0, o1, o2 = good["gid"], good["o0"], good["o1"], good["o2"]
    change = np.ones(n, dtype=bool)
    change[1:] = (
        (gid[1:] != gid[:-1]) | (o0[1:] != o0[:-1]) | (o1[1:] != o1[:-1]) | (o2[1:] != o2[:-1])
    )
    starts = np.flatnonzero(change)
    table = host.pages
    objnos = []
    for g, a, b, c in zip(
        gid[starts].tolist(),
        o0[starts].tolist(),
        o1[starts].tolist(),
        o2[starts].tolist(),
        strict=True,
    ):
        oid = (a, b, c)
        objno = host.pools[g].objects[oid] = table.new_object(g, oid)
        objnos.append(objno)
    counts = np.diff(np.append(starts, n))
    table.add_many(
        np.repeat(np.array(objnos, dtype=np.int64), counts).tolist(),
        good["index"].tolist(),
        good["blob"].tolist(),
        None,
    )
    lengths = host.store.payload_lengths(good["blob"])
    gids, inverse, per_pool = np.unique(gid, return_inverse=True, return_counts=True)
    stored = np.bincount(inverse, weights=lengths)
    for g, pages_in_pool, nbytes in zip(
        gids.tolist(), per_pool.tolist(), stored.tolist(), strict=True
    ):
        pool = host.pools[g]
        pool.pages += pages_in_pool
        pool.bytes_stored += int(nbytes)
        host.clients[pool.owner].persistent_pages += pages_in_pool
