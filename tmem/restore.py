"""Rebuilding a TmemHost from its persistent log after a restart (pure: records in).

The log holds clients, pools, persistent pages and blobs; everything else — refcounts,
per-pool and per-client counters, the dedup index, object maps, free lists — is
recomputed here, which is why the log needs one record write per page and none per
counter.  Records that cannot be used (a page of a missing pool or blob, a pool whose
owner is missing) are dropped from the log as well and reported; a blob no page
references (one an in-flight put had pinned when the agent died) is dropped silently.
The audit then finds memory and store equal.

Runs under the host's lock (:meth:`TmemHost.restore`), into a host with no clients.
"""

from __future__ import annotations

from itertools import groupby
from typing import TYPE_CHECKING

from tmem.durable import EXTERNAL_SCOPE, StoredState
from tmem.pages import RADIX_BITS
from tmem.types import MAX_POOLS_PER_CLIENT

if TYPE_CHECKING:
    from tmem.host import TmemHost


def restore_host(host: TmemHost, state: StoredState) -> list[str]:
    """Fill *host* (empty, lock held) from *state*; → one finding per dropped record."""
    from tmem.host import _Client, _Pool  # local: host imports this module lazily too

    log = host._log
    assert log is not None and not host._clients, "restore needs an empty host with a log"
    findings: list[str] = []
    for c in state.clients:
        host._clients[c.name] = _Client(
            c.name, c.scope, weight=c.weight, cap_pages=c.cap_pages, dedup=c.dedup,
            frozen=c.frozen, authorised=set(c.authorised), meta=dict(c.meta))
        host._next_scope = max(host._next_scope, c.scope + 1)
    for p in state.pools:
        host._next_gid = max(host._next_gid, p.gid + 1)
        members = {m: local for m, local in p.members.items()
                   if m in host._clients and 0 <= local < MAX_POOLS_PER_CLIENT
                   and host._clients[m].pools[local] is None}
        if p.owner not in members or (p.persistent and p.shared):
            findings.append(f"pool {p.gid}: owner {p.owner!r} or members unusable; dropped")
            log.drop_pool(p.gid)
            continue
        pool = _Pool(p.gid, p.persistent, p.shared, p.uuid, owner=p.owner, members=members)
        host._pools[p.gid] = pool
        for m, local in members.items():
            host._clients[m].pools[local] = p.gid
        if p.uuid is not None:
            host._shared_by_uuid[p.uuid] = p.gid
        if members != p.members:
            host._log_pool(pool)

    lengths = {b: length for b, _h, scope, length in state.blobs if scope & EXTERNAL_SCOPE}
    top = max(lengths, default=0) + 1
    refs = [0] * top
    usable: list[tuple[int, int, int, int, int, int]] = []
    for rec in state.pages:
        gid, o0, o1, o2, index, blob = rec
        found = host._pools.get(gid)
        if found is None or not found.persistent or (blob and blob not in lengths):
            why = ("its pool is gone" if found is None else "its pool is ephemeral"
                   if not found.persistent else "its blob is gone")
            findings.append(f"page {gid}/{o0:x}.{o1:x}.{o2:x}/{index} -> blob {blob}: "
                            f"{why}; dropped")
            host._dirty.add((gid, (o0, o1, o2), index >> RADIX_BITS))  # rewritten at commit
            continue
        refs[blob] += 1
        usable.append(rec)
    kept = []
    for blob_rec in state.blobs:
        blob = blob_rec[0]
        if blob in lengths and blob and refs[blob]:
            kept.append(blob_rec)
        else:
            # Normal after a crash: a put had pinned this blob as a duplicate, the page
            # that owned it was flushed, and the agent died before the put stored its page.
            log.drop_blob(blob)
    host._store.restore(kept, refs)

    table = host._pages
    for (gid, o0, o1, o2), group in groupby(usable, key=lambda r: r[:4]):
        rows = list(group)
        pool = host._pools[gid]
        oid = (o0, o1, o2)
        objno = pool.objects[oid] = table.new_object(gid, oid)
        blobs = [r[5] for r in rows]
        table.add_many([objno] * len(rows), [r[4] for r in rows], blobs, None)
        pool.pages += len(rows)
        pool.bytes_stored += sum(lengths.get(b, 0) for b in blobs)
        host._clients[pool.owner].persistent_pages += len(rows)
    return findings
