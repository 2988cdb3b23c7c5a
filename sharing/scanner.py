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
   is one, so the zero page keeps one frame) and nominates + shares every other
   page into it.  ``share`` compares the bytes, so a hash collision or a write
   racing with the pass costs a failed share, never a wrong merge.

Cross-domain de-duplication leaks content through timing (a guest can probe for
pages it does not own), so it is per-domain opt-in: only domains passed to
:meth:`Scanner.enable` are hashed or shared.

State per opted-in domain: ``hashes`` uint64 per gfn (valid where ``known``),
``known`` bool per gfn.  The scanner is single-threaded (one caller at a time)
and is the only consumer of the machine's dirty tracking.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from memd.errors import ContentMismatch, NoSuchDomain, NotShareable, StaleHandle
from sharing.machine import Machine, PageType
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


class Scanner:
    """Incremental hash-and-share pass over the opted-in domains."""

    def __init__(self, manager: SharingManager, batch_pages: int = 1024) -> None:
        if batch_pages <= 0:
            raise ValueError("batch_pages must be positive")
        self._mgr = manager
        self._machine: Machine = manager.machine
        self._batch = batch_pages
        self._domains: dict[int, _DomainHashes] = {}

    # --- opt-in -------------------------------------------------------------------------

    def enable(self, domid: int) -> None:
        """Opt a domain in.  Raises NoSuchDomain for an unknown domain."""
        if domid not in self._domains:
            n = self._machine.nr_gfns(domid)
            self._domains[domid] = _DomainHashes(np.zeros(n, dtype=np.uint64),
                                                 np.zeros(n, dtype=bool))

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
        parts: list[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64],
                          npt.NDArray[np.uint8], npt.NDArray[np.bool_]]] = []
        for domid, state in self._domains.items():
            fresh = self._rehash(domid, state, report)
            mfns, types = self._machine.lookup_range(domid, 0, len(state.hashes))
            usable = state.known & ((types == PageType.RAM) | (types == PageType.SHARED))
            gfns = np.flatnonzero(usable)
            parts.append((domid, gfns, mfns[gfns], types[gfns], fresh[gfns]))
        self._share_groups(parts, report)
        report.saved = self._mgr.nr_saved_mfns - saved0
        report.seconds = time.perf_counter() - t0
        return report

    def _rehash(self, domid: int, state: _DomainHashes,
                report: ScanReport) -> npt.NDArray[np.bool_]:
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
            gfns = dirty[start:start + self._batch]
            buf = m.read_frames(mfns[gfns]).data.cast("B")
            state.hashes[gfns] = [hash_page(buf[i * ps:(i + 1) * ps]) for i in range(len(gfns))]
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
        # Sort by hash, shared pages first within a hash (they become representatives).
        order = np.lexsort((~shared, hashes))
        h = hashes[order]
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
        ends = np.r_[starts[1:], len(h)]
        fresh_sorted = fresh[order].astype(np.int64)
        fresh_count = np.add.reduceat(fresh_sorted, starts)
        worth = (ends - starts >= 2) & (fresh_count > 0)
        for s, e in zip(starts[worth].tolist(), ends[worth].tolist(), strict=True):
            idx = order[s:e]
            self._share_group(doms[idx].tolist(), gfns[idx].tolist(), mfns[idx].tolist(),
                              report)

    def _share_group(self, doms: list[int], gfns: list[int], mfns: list[int],
                     report: ScanReport) -> None:
        mgr = self._mgr
        rep_dom, rep_gfn, rep_mfn = doms[0], gfns[0], mfns[0]
        try:
            rep_was_private = mgr.handle_of(rep_dom, rep_gfn) is None
            rep_handle = mgr.nominate(rep_dom, rep_gfn)
        except (NotShareable, NoSuchDomain):
            report.skipped += len(doms) - 1
            return
        merged = False
        for dom, gfn, mfn in zip(doms[1:], gfns[1:], mfns[1:], strict=True):
            if mfn == rep_mfn:
                continue  # already on the representative's frame
            report.candidates += 1
            try:
                handle = mgr.nominate(dom, gfn)
                mgr.share(rep_dom, rep_gfn, rep_handle, dom, gfn, handle)
            except ContentMismatch:
                report.mismatches += 1
                mgr.unshare(dom, gfn)  # a lone record: back to private, in place
                continue
            except StaleHandle as err:
                report.skipped += 1
                if err.fields.get("domain") == rep_dom and err.fields.get("gfn") == rep_gfn:
                    break  # the representative itself changed: retry next pass
                continue
            except (NotShareable, NoSuchDomain):
                report.skipped += 1
                continue
            report.shared += 1
            merged = True
        if rep_was_private and not merged:
            try:
                if mgr.gfns_of(rep_mfn) == [(rep_dom, rep_gfn)]:
                    mgr.unshare(rep_dom, rep_gfn)  # nominated for nothing: make it private
            except NoSuchDomain:
                pass
