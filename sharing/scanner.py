"""Scanner: find identical pages in opted-in domains and share them.

Each :meth:`Scanner.scan` pass:

1. asks the machine which gfns each opted-in domain wrote since the previous
   pass (``collect_dirty``; the first pass of a domain takes all of them) and
   re-hashes only those, in batches (``read_frames`` → xxh3_64 per page), into a
   per-domain uint64 hash array;
2. groups all RAM and SHARED pages of the opted-in domains by hash with one
   vectorised sort, and keeps the groups of two or more pages that contain a
   page re-hashed in this pass (nothing else can have become shareable);
3. in each group picks a representative (a page that is already shared if there
   is one, so the zero page keeps one frame), nominates the representatives and
   then the other pages (``nominate_many``, per domain), and shares every other
   page into its representative with one ``share_many`` over all groups.
   ``share`` compares the bytes, so a hash collision or a write racing with the
   pass costs a failed share, never a wrong merge; a page the pass nominated for
   nothing is made private again.

Cross-domain de-duplication leaks content through timing (a guest can probe for
pages it does not own), so two opt-ins apply: only domains passed to
:meth:`Scanner.enable` are hashed at all, and pages of a domain whose guest does not
merge across guests (``SharingManager.merges_across``, set from
:mod:`sharing.consent`) are grouped only with that domain's own pages — its own
duplicates still merge, as tmem de-duplicates a non-consenting guest within its own
scope.  The grouping only saves futile attempts: the manager itself refuses any
merge the consent rule forbids.

State per opted-in domain: ``hashes`` uint64 per gfn (valid where ``known``),
``known`` bool per gfn, ``across`` the consent the last pass saw (a change makes all
its known pages fresh: their possible partners changed).  The scanner is
single-threaded (one caller at a time) and is the only consumer of the machine's
dirty tracking.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from memd.errors import ContentMismatch, NoSuchDomain, SharingError
from sharing.batch import SharePair
from sharing.machine import FrameView, PageType
from sharing.manager import SharingManager


@dataclass
class ScanReport:
    """What one pass did."""

    pages_scanned: int = 0  #: pages (re-)hashed
    candidates: int = 0  #: pages whose hash matched another page's: share attempts
    shared: int = 0  #: successful shares
    saved: int = 0  #: change of nr_saved_mfns over the pass
    mismatches: int = 0  #: shares refused because the bytes differ
    skipped: int = 0  #: shares given up (stale handle, page changed or went away)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _DomainHashes:
    hashes: npt.NDArray[np.uint64]
    known: npt.NDArray[np.bool_]
    #: merges_across as the last pass saw it (None before the first pass): a change
    #: makes every known page fresh, as its possible partners changed.
    across: bool | None = None


class Scanner:
    """Incremental hash-and-share pass over the opted-in domains."""

    def __init__(self, manager: SharingManager, batch_pages: int = 1024) -> None:
        if batch_pages <= 0:
            raise ValueError("batch_pages must be positive")
        self._mgr = manager
        self._machine: FrameView = manager.machine
        self._batch = batch_pages
        self._domains: dict[int, _DomainHashes] = {}

    # --- opt-in -------------------------------------------------------------------------

    def enable(self, domid: int) -> None:
        """Opt a domain in.  Raises NoSuchDomain for an unknown domain."""
        if domid not in self._domains:
            n = self._machine.nr_gfns(domid)
            self._domains[domid] = _DomainHashes(
                np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=bool)
            )

    def disable(self, domid: int) -> None:
        """Opt a domain out: it is no longer hashed nor used as a share partner.
        Pages already shared stay shared until written."""
        self._domains.pop(domid, None)

    @property
    def enabled(self) -> list[int]:
        return sorted(self._domains)

    # --- the pass -----------------------------------------------------------------------

    def scan(self) -> ScanReport:
        """One incremental pass; see the module docstring."""
        t0 = time.perf_counter()
        report = ScanReport()
        saved0 = self._mgr.nr_saved_mfns
        live = set(self._machine.domains())
        for domid in [d for d in self._domains if d not in live]:
            del self._domains[domid]  # gone: forget its hashes
        parts: list[
            tuple[
                int,
                npt.NDArray[np.int64],
                npt.NDArray[np.int64],
                npt.NDArray[np.uint8],
                npt.NDArray[np.bool_],
            ]
        ] = []
        for domid, state in self._domains.items():
            fresh = self._rehash(domid, state, report)
            across = self._mgr.merges_across(domid)
            if state.across is not across:
                fresh |= state.known
                state.across = across
            mfns, types = self._machine.lookup_range(domid, 0, len(state.hashes))
            usable = state.known & ((types == PageType.RAM) | (types == PageType.SHARED))
            gfns = np.flatnonzero(usable)
            parts.append((domid, gfns, mfns[gfns], types[gfns], fresh[gfns]))
        self._share_groups(parts, report)
        report.saved = self._mgr.nr_saved_mfns - saved0
        report.seconds = time.perf_counter() - t0
        return report

    def _rehash(
        self, domid: int, state: _DomainHashes, report: ScanReport
    ) -> npt.NDArray[np.bool_]:
        """Re-hash the domain's dirty pages; returns a per-gfn 'fresh' mask."""
        m = self._machine
        dirty = m.collect_dirty(domid)
        if not state.known.any():
            dirty = np.arange(len(state.hashes), dtype=np.int64)  # first pass: everything
        fresh = np.zeros(len(state.hashes), dtype=bool)
        if len(dirty) == 0:
            return fresh
        mfns, types = m.lookup_range(domid, 0, len(state.hashes))
        state.known[dirty] = False
        # Private pages and shared ones (read-only, so their hash stays valid): a page a
        # guest nominated before our first pass must still find its twins.
        kind = types[dirty]
        dirty = dirty[(kind == PageType.RAM) | (kind == PageType.SHARED)]
        hash_page = xxhash.xxh3_64_intdigest
        ps = m.page_size
        for start in range(0, len(dirty), self._batch):
            gfns = dirty[start : start + self._batch]
            buf = m.read_frames(mfns[gfns]).data.cast("B")
            state.hashes[gfns] = [hash_page(buf[i * ps : (i + 1) * ps]) for i in range(len(gfns))]
        state.known[dirty] = True
        fresh[dirty] = True
        report.pages_scanned += len(dirty)
        return fresh

    def _share_groups(self, parts: list[Any], report: ScanReport) -> None:
        if not parts:
            return
        hashes = np.concatenate([self._domains[p[0]].hashes[p[1]] for p in parts])
        doms = np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in parts])
        gfns = np.concatenate([p[1] for p in parts])
        mfns = np.concatenate([p[2] for p in parts])
        shared = np.concatenate([p[3] for p in parts]) == PageType.SHARED
        fresh = np.concatenate([p[4] for p in parts])
        if len(hashes) < 2:
            return
        # Consent scope: 0 for the domains that merge across guests, else one of its own.
        scope = np.concatenate(
            [
                np.full(len(p[1]), 0 if self._domains[p[0]].across else p[0] + 1, dtype=np.int64)
                for p in parts
            ]
        )
        # Sort by hash and scope, shared pages first within a group (representatives).
        order = np.lexsort((~shared, scope, hashes))
        h = hashes[order]
        sc = scope[order]
        starts = np.flatnonzero(np.r_[True, (h[1:] != h[:-1]) | (sc[1:] != sc[:-1])])
        ends = np.r_[starts[1:], len(h)]
        fresh_sorted = fresh[order].astype(np.int64)
        fresh_count = np.add.reduceat(fresh_sorted, starts)
        worth = (ends - starts >= 2) & (fresh_count > 0)
        groups = [
            order[s:e] for s, e in zip(starts[worth].tolist(), ends[worth].tolist(), strict=True)
        ]
        self._share_all(groups, doms, gfns, mfns, shared, report)

    def _share_all(
        self,
        groups: list[npt.NDArray[np.intp]],
        doms: npt.NDArray[np.int64],
        gfns: npt.NDArray[np.int64],
        mfns: npt.NDArray[np.int64],
        shared: npt.NDArray[np.bool_],
        report: ScanReport,
    ) -> None:
        """Nominate every group's representative, then its other pages, then share
        them all into their representatives with one ``share_many`` (types and mfns
        as this pass saw them: share re-checks everything under the lock)."""
        mgr = self._mgr
        if not groups:
            return
        firsts = np.array([g[0] for g in groups], dtype=np.intp)
        rep_dom, rep_gfn = doms[firsts].tolist(), gfns[firsts].tolist()
        rep_mfn, rep_private = mfns[firsts].tolist(), (~shared[firsts]).tolist()
        rep_handle = self._nominate_all(rep_dom, rep_gfn)
        members: list[tuple[int, int, int, bool]] = []  # (group, domain, gfn, was private)
        for k, idx in enumerate(groups):
            if isinstance(rep_handle[k], SharingError):
                report.skipped += len(idx) - 1
                continue
            rest = idx[1:][mfns[idx[1:]] != rep_mfn[k]]  # not yet on the rep's frame
            members.extend(
                (k, d, g, not s)
                for d, g, s in zip(
                    doms[rest].tolist(), gfns[rest].tolist(), shared[rest].tolist(), strict=True
                )
            )
        report.candidates += len(members)
        handles = self._nominate_all([m[1] for m in members], [m[2] for m in members])
        pairs: list[SharePair] = []
        paired: list[tuple[int, int, int, bool]] = []
        for member, handle in zip(members, handles, strict=True):
            k, d, g, _ = member
            rh = rep_handle[k]
            if isinstance(handle, SharingError) or isinstance(rh, SharingError):
                report.skipped += 1  # went away or changed since it was hashed
                continue
            pairs.append((rep_dom[k], rep_gfn[k], rh, d, g, handle))
            paired.append(member)
        merged = [False] * len(groups)
        for (k, d, g, was_private), err in zip(paired, mgr.share_many(pairs), strict=True):
            if err is None:
                report.shared += 1
                merged[k] = True
                continue
            if isinstance(err, ContentMismatch):
                report.mismatches += 1
            else:
                report.skipped += 1  # stale: the page or the representative changed
            if was_private:
                mgr.unshare(d, g)  # our lone record, for nothing: private again, in place
        for k in range(len(groups)):
            if rep_private[k] and not merged[k]:
                try:
                    if mgr.gfns_of(rep_mfn[k]) == [(rep_dom[k], rep_gfn[k])]:
                        mgr.unshare(rep_dom[k], rep_gfn[k])  # nominated for nothing
                except NoSuchDomain:
                    pass

    def _nominate_all(self, doms: list[int], gfns: list[int]) -> list[int | SharingError]:
        """Nominate (domain, gfn) pages with one ``nominate_many`` per domain; results
        in the order given."""
        by_domain: dict[int, list[int]] = {}
        for i, d in enumerate(doms):
            by_domain.setdefault(d, []).append(i)
        out: list[int | SharingError] = [0] * len(doms)
        for d, idx in by_domain.items():
            for i, r in zip(idx, self._mgr.nominate_many(d, [gfns[i] for i in idx]), strict=True):
                out[i] = r
        return out
