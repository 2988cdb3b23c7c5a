"""The batch paths of :class:`sharing.manager.SharingManager`: nominate and share in bulk.

``SharingManager.nominate_many`` / ``share_many`` (the scanner's calls) run here: per
item the handle / None or the exception the single call would have raised, with exactly
the single calls' outcome in order, at one lock hold and one batch lookup per chunk of
:data:`BATCH_CHUNK` items.  Each fast path decides what it can from the up-front lookups
and hands anything else to the manager's single-item code (which looks up again), so
the exact exception is always the single call's.

These functions own no state: they read and write the manager's columns (documented in
:mod:`sharing.manager`) while holding its lock, as the manager's own methods do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from memd.errors import (
    ContentMismatch,
    MergeNotConsented,
    SharingError,
    StaleClientHandle,
    StaleSourceHandle,
)
from sharing.machine import INVALID_MFN, Machine, PageType, free_frames, set_entries
from sharing.rmap import NO_ENTRY

if TYPE_CHECKING:
    from sharing.manager import SharingManager

_RAM = int(PageType.RAM)
_SHARED = int(PageType.SHARED)

#: One share request: (source_domain, source_gfn, source_handle,
#: client_domain, client_gfn, client_handle).
SharePair = tuple[int, int, int, int, int, int]

#: Items per lock hold in the batched operations: long enough to amortise the
#: per-batch set-up, short enough that a guest write waits well under 10 ms.
BATCH_CHUNK = 4096

#: ``SharingManager._home`` of a frame whose gfns may belong to several domains.
MIXED = -1


def stale_source(domain: int, gfn: int, mfn: int, handle: int) -> StaleSourceHandle:
    return StaleSourceHandle(
        f"source handle {handle:#x} is stale for gfn {gfn:#x} of domain {domain}",
        op="share",
        domain=domain,
        gfn=gfn,
        mfn=mfn,
        handle=handle,
    )


def stale_client(domain: int, gfn: int, mfn: int, handle: int) -> StaleClientHandle:
    return StaleClientHandle(
        f"client handle {handle:#x} is stale for gfn {gfn:#x} of domain {domain}",
        op="share",
        domain=domain,
        gfn=gfn,
        mfn=mfn,
        handle=handle,
    )


def mismatch(smfn: int, cmfn: int, domain: int, gfn: int, handle: int) -> ContentMismatch:
    return ContentMismatch(
        f"frames {smfn:#x} and {cmfn:#x} hold different bytes",
        op="share",
        domain=domain,
        gfn=gfn,
        mfn=cmfn,
        handle=handle,
    )


def not_consented(smfn: int, cmfn: int, domain: int, gfn: int, handle: int) -> MergeNotConsented:
    return MergeNotConsented(
        f"frames {smfn:#x} and {cmfn:#x} belong to different guests that have not both "
        "consented to cross-guest merging",
        op="share",
        domain=domain,
        gfn=gfn,
        mfn=cmfn,
        handle=handle,
    )


@dataclass(eq=False)
class MergeQueue:
    """Machine updates of merges made by a batch and not yet applied: repoint
    (dom[i], gfn[i]) to mfn[i] as SHARED, in order; then free the frames in
    ``free`` (their last mappings are among the repoints)."""

    dom: list[int] = field(default_factory=list)
    gfn: list[int] = field(default_factory=list)
    mfn: list[int] = field(default_factory=list)
    free: list[int] = field(default_factory=list)

    def flush(self, machine: Machine) -> None:
        """Apply the queued repoints, then the frees; empty the queue."""
        if self.dom:
            doms = np.array(self.dom, dtype=np.int64)
            gfns = np.array(self.gfn, dtype=np.int64)
            mfns = np.array(self.mfn, dtype=np.int64)
            for domid in np.unique(doms).tolist():
                sel = doms == domid
                set_entries(machine, domid, gfns[sel], mfns[sel], _SHARED)
        if self.free:
            free_frames(machine, np.array(self.free, dtype=np.int64))
        self.dom.clear()
        self.gfn.clear()
        self.mfn.clear()
        self.free.clear()


# --- nominate ----------------------------------------------------------------------------


def nominate_many(
    mgr: SharingManager, domid: int, gfns: Iterable[int], chunk: int
) -> list[int | SharingError]:
    """See :meth:`SharingManager.nominate_many`."""
    todo = list(gfns)
    results: list[int | SharingError] = []
    step = max(chunk, 1)
    for start in range(0, len(todo), step):
        with mgr._lock:
            _nominate_chunk_locked(mgr, domid, todo[start : start + step], results)
    return results


def _nominate_chunk_locked(
    mgr: SharingManager, domid: int, gfns: list[int], results: list[int | SharingError]
) -> None:
    """The batch fast path.  Exact because within a chunk only the nominated
    gfn's own entry changes: a gfn seen SHARED stays on its frame with its
    version, and a RAM gfn whose frame has a version was nominated earlier in
    this chunk (its frame maps nothing else).  Anything else — a lookup that
    would fail, a dying domain, an unmapped page, a frame with other
    references — runs the single-page code for the exact exception."""
    mfns, types = lookup_batch(mgr, [domid] * len(gfns), gfns)
    owners: list[int] = []
    mapcounts: list[int] = []
    if gfns:
        frames = np.maximum(np.array(mfns, dtype=np.int64), 0)
        own, cnt = mgr._machine.frame_info_many(frames)
        owners, mapcounts = own.tolist(), cnt.tolist()
        if max(mfns) >= len(mgr._version):
            mgr._grow(mgr._machine.nr_frames)
    version = mgr._version
    fast = domid not in mgr._dying
    append = results.append
    for i, gfn in enumerate(gfns):
        ptype = types[i]
        mfn = mfns[i]
        if ptype == _SHARED:
            append(version[mfn])
        elif fast and ptype == _RAM and owners[i] == domid and mapcounts[i] == 1:
            append(version[mfn] or mgr._new_record_locked(domid, gfn, mfn))
        else:
            try:
                append(mgr._nominate_locked(domid, gfn))
            except SharingError as err:
                append(err)


# --- share -------------------------------------------------------------------------------


def share_many(
    mgr: SharingManager, pairs: Iterable[SharePair], chunk: int
) -> list[SharingError | None]:
    """See :meth:`SharingManager.share_many`."""
    todo = list(pairs)
    results: list[SharingError | None] = []
    step = max(chunk, 1)
    lock = mgr._lock
    for start in range(0, len(todo), step):
        lock.acquire()
        try:
            _share_chunk_locked(mgr, todo[start : start + step], results)
        finally:
            lock.release()
    return results


def _share_chunk_locked(
    mgr: SharingManager, pairs: list[SharePair], results: list[SharingError | None]
) -> None:
    """The batch fast path, with the single-pair code for what it cannot decide.

    Why the lookups done up front stay exact through the chunk: a merge changes
    only the p2m entries of gfns on the client frame, and that frame dies
    (version 0, freed; nothing allocates frames here).  So a gfn whose
    up-front frame still has a version maps that frame now, with the same type
    and bytes; a gfn seen SHARED on a frame with version 0 was moved by an
    earlier pair, and a lookup that would fail needs its exact exception: both
    go to the single-pair code, which looks up again.

    The merges' repoints and frees are queued and applied in one batch per
    domain; nothing in the fast path reads them back from the machine, and the
    queue is flushed before the single-pair code runs and before the lock is
    released."""
    if not pairs:
        return
    sds, sgs, shs, cds, cgs, chs = zip(*pairs, strict=True)
    smfns, stypes = lookup_batch(mgr, sds, sgs)
    cmfns, ctypes = lookup_batch(mgr, cds, cgs)
    version = mgr._version
    home = mgr._home
    cross, cross_default = mgr._cross.get, mgr._cross_default
    equal = mgr._frames_equal
    rmap = mgr._rmap
    splice, entry_dom, entry_gfn = rmap.splice, rmap.dom, rmap.gfn
    head, nxt, prv = rmap.head, rmap.next, rmap.prev
    queue = MergeQueue()
    repoint_dom, repoint_gfn, repoint_mfn = queue.dom, queue.gfn, queue.mfn
    dead = queue.free
    append = results.append
    try:
        for i in range(len(pairs)):
            stype = stypes[i]
            ctype = ctypes[i]
            if stype >= 0 and ctype >= 0:
                smfn = smfns[i]
                sv = version[smfn] if stype == _SHARED else None
                sh = shs[i]
                if sv != sh or not sv:
                    if sv != 0:  # None (not shared) or another version: stale
                        append(stale_source(sds[i], sgs[i], smfn, sh))
                        continue
                    # 0: the gfn was moved by an earlier pair, see below
                else:
                    cmfn = cmfns[i]
                    cv = version[cmfn] if ctype == _SHARED else None
                    ch = chs[i]
                    if cv != ch or not cv:
                        if cv != 0:
                            append(stale_client(cds[i], cgs[i], cmfn, ch))
                            continue
                    elif smfn == cmfn:
                        append(None)
                        continue
                    elif not equal(smfn, cmfn):
                        append(mismatch(smfn, cmfn, cds[i], cgs[i], ch))
                        continue
                    else:
                        hs, hc = home[smfn], home[cmfn]
                        if hs != hc or hs == MIXED:
                            # Two domains' gfns would meet: both must merge across
                            # (a MIXED frame holds only such domains' gfns);
                            # SharingManager.merges_across, inline.
                            if not (
                                (hs == MIXED or cross(hs, cross_default))
                                and (hc == MIXED or cross(hc, cross_default))
                            ):
                                append(not_consented(smfn, cmfn, cds[i], cgs[i], ch))
                                continue
                            home[smfn] = MIXED
                        e = head[cmfn]
                        if nxt[e] == NO_ENTRY:
                            # One gfn on the client frame (the common case): the
                            # list move of ReverseMaps.splice, inline.
                            first = head[smfn]
                            nxt[e] = first
                            if first != NO_ENTRY:
                                prv[first] = e
                            head[smfn] = e
                            head[cmfn] = NO_ENTRY
                            repoint_dom.append(cds[i])
                            repoint_gfn.append(cgs[i])
                            repoint_mfn.append(smfn)
                        else:
                            for e in splice(cmfn, smfn):
                                repoint_dom.append(entry_dom[e])
                                repoint_gfn.append(entry_gfn[e])
                                repoint_mfn.append(smfn)
                        version[cmfn] = 0
                        dead.append(cmfn)
                        append(None)
                        continue
            _flush_locked(mgr, queue)
            try:
                mgr._share_locked(*pairs[i])
            except SharingError as err:
                append(err)
            else:
                append(None)
    finally:
        _flush_locked(mgr, queue)


def _flush_locked(mgr: SharingManager, queue: MergeQueue) -> None:
    """Apply a batch's queued merges to the machine and to the counters (each
    queued free is one merge: one record fewer, one frame saved)."""
    merges = len(queue.free)
    mgr._nr_shared_mfns -= merges
    mgr._nr_saved_mfns += merges
    queue.flush(mgr._machine)


# --- lookups -----------------------------------------------------------------------------


def lookup_batch(
    mgr: SharingManager, doms: Sequence[int], gfns: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Mfn and type of each (domain, gfn), one batch lookup per domain; type -1
    where :meth:`Machine.lookup` would raise (unknown domain, gfn out of range,
    a value that is no index at all)."""
    n = len(doms)
    try:
        d = np.array(doms, dtype=np.int64)
        g = np.array(gfns, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        return [INVALID_MFN] * n, [-1] * n
    mfns = np.full(n, INVALID_MFN, dtype=np.int64)
    types = np.full(n, -1, dtype=np.int16)
    if n == 0 or d.shape != (n,) or g.shape != (n,):
        return mfns.tolist(), types.tolist()
    first = int(d[0])
    domids = [first] if bool((d == first).all()) else np.unique(d).tolist()
    machine = mgr._machine
    live = set(machine.domains())
    for domid in domids:
        if domid not in live:
            continue
        idx = np.arange(n) if len(domids) == 1 else np.flatnonzero(d == domid)
        sel = g[idx]
        ok = (sel >= 0) & (sel < machine.nr_gfns(domid))
        if not ok.all():
            idx, sel = idx[ok], sel[ok]
        mfns[idx], types[idx] = mgr._lookup_many(domid, sel)
    return mfns.tolist(), types.tolist()
