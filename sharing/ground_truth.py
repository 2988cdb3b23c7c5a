"""Ground truth of page sharing, keyed by mfn, from per-guest gfn → mfn arrays (pure).

Input: for each domain, an int64 array indexed by gfn holding the host frame (mfn,
on Linux the PFN from pagemap) or -1 where the gfn maps no frame.  Output: for every
frame mapped by at least one gfn, its list of (domain, gfn) — the reverse map the Xen
RFC keeps on the shared frame's record, here recomputed from what the host really
maps — and the figures derived from it.

Layout (compressed rows, no object per page): ``mfns`` sorted unique frames,
``refs[i]`` gfns mapping ``mfns[i]``, and that frame's gfns are
``entry_dom[starts[i]:starts[i+1]]`` / ``entry_gfn[...]`` (sorted by domain, gfn).

Figures, named like the manager's counters where they mean the same thing:

* ``nr_shared_mfns``: frames mapped by two or more gfns;
* ``nr_saved_mfns``: frames that would be needed without sharing and are not,
  ``sum(refs - 1)`` over shared frames;
* ``matrix[a][b]`` (a ≠ b): frames mapped by at least one gfn of each of a and b;
  ``matrix[a][a]``: frames mapped by two or more gfns of a (sharing within a).

:func:`compare_ledger` checks a sharing ledger (what a manager believes is shared)
against the truth and lists every discrepancy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GroundTruth:
    """Who maps which frame; see the module docstring for the layout."""

    domids: tuple[int, ...]
    mfns: I64
    refs: I64
    starts: I64
    entry_dom: I64
    entry_gfn: I64
    p2m: Mapping[int, I64]

    # --- frames ---------------------------------------------------------------------------

    @property
    def nr_frames(self) -> int:
        """Frames mapped by at least one gfn."""
        return len(self.mfns)

    @property
    def nr_shared_mfns(self) -> int:
        return int(np.count_nonzero(self.refs >= 2))

    @property
    def nr_saved_mfns(self) -> int:
        shared = self.refs[self.refs >= 2]
        return int((shared - 1).sum())

    def index_of(self, mfns: I64) -> I64:
        """Row of each mfn in :attr:`mfns`, -1 for frames no gfn maps."""
        mfns = np.asarray(mfns, dtype=np.int64)
        if len(self.mfns) == 0:
            return np.full(len(mfns), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.mfns, mfns), len(self.mfns) - 1)
        return np.where(self.mfns[pos] == mfns, pos, -1).astype(np.int64)

    def refs_of(self, mfns: I64) -> I64:
        idx = self.index_of(mfns)
        return np.where(idx >= 0, self.refs[np.maximum(idx, 0)], 0).astype(np.int64)

    def gfns_of(self, mfn: int, limit: int | None = None) -> list[tuple[int, int]]:
        """The (domain, gfn) pairs mapping one frame (at most ``limit``)."""
        i = int(self.index_of(np.array([mfn], dtype=np.int64))[0])
        if i < 0:
            return []
        lo, hi = int(self.starts[i]), int(self.starts[i + 1])
        if limit is not None:
            hi = min(hi, lo + limit)
        return list(
            zip(self.entry_dom[lo:hi].tolist(), self.entry_gfn[lo:hi].tolist(), strict=True)
        )

    def top(self, k: int) -> I64:
        """Rows of the ``k`` most-referenced frames, most first (ties: lower mfn first)."""
        k = min(k, len(self.refs))
        order = np.lexsort((self.mfns, -self.refs))
        return order[:k].astype(np.int64)

    def refs_by_domain(self, row: int) -> dict[int, int]:
        lo, hi = int(self.starts[row]), int(self.starts[row + 1])
        d, c = np.unique(self.entry_dom[lo:hi], return_counts=True)
        return dict(zip(d.tolist(), c.tolist(), strict=True))

    # --- domains --------------------------------------------------------------------------

    def per_domain(self) -> dict[int, dict[str, int]]:
        """Per domain: gfns, present (mapping a frame), shared_gfns (on frames with ≥2
        refs anywhere), private, and frames (distinct frames it maps)."""
        out = {}
        for d in self.domids:
            p2m = self.p2m[d]
            present = p2m >= 0
            refs = self.refs_of(p2m[present])
            shared = int(np.count_nonzero(refs >= 2))
            out[d] = {
                "gfns": len(p2m),
                "present": int(present.sum()),
                "shared_gfns": shared,
                "private": int(present.sum()) - shared,
                "frames": len(np.unique(p2m[present])),
            }
        return out

    def matrix(self) -> I64:
        """The VM × VM sharing matrix in :attr:`domids` order (module docstring)."""
        n = len(self.domids)
        if n == 0 or len(self.mfns) == 0:
            return np.zeros((n, n), dtype=np.int64)
        dom_col = np.searchsorted(np.asarray(self.domids, dtype=np.int64), self.entry_dom)
        row = np.repeat(np.arange(len(self.mfns)), self.refs)
        counts = np.zeros((len(self.mfns), n), dtype=np.int64)
        np.add.at(counts, (row, dom_col), 1)
        present = (counts > 0).astype(np.int64)
        m = present.T @ present
        np.fill_diagonal(m, np.count_nonzero(counts >= 2, axis=0))
        return m


def compute(p2m: Mapping[int, I64]) -> GroundTruth:
    """Build the per-mfn gfn lists of all domains (one sort over every present page)."""
    domids = tuple(sorted(p2m))
    doms, gfns, mfns = [], [], []
    for d in domids:
        arr = np.asarray(p2m[d], dtype=np.int64)
        g = np.flatnonzero(arr >= 0).astype(np.int64)
        doms.append(np.full(len(g), d, dtype=np.int64))
        gfns.append(g)
        mfns.append(arr[g])
    dom_a = np.concatenate(doms) if doms else np.zeros(0, np.int64)
    gfn_a = np.concatenate(gfns) if gfns else np.zeros(0, np.int64)
    mfn_a = np.concatenate(mfns) if mfns else np.zeros(0, np.int64)
    order = np.lexsort((gfn_a, dom_a, mfn_a))
    sorted_mfns = mfn_a[order]
    uniq, first, refs = np.unique(sorted_mfns, return_index=True, return_counts=True)
    starts = np.concatenate((first, [len(sorted_mfns)])).astype(np.int64)
    return GroundTruth(
        domids,
        uniq.astype(np.int64),
        refs.astype(np.int64),
        starts,
        dom_a[order],
        gfn_a[order],
        {d: np.asarray(p2m[d], dtype=np.int64) for d in domids},
    )


#: A ledger: mfn the manager believes shared → the (domain, gfn) it lists on it.
Ledger = Mapping[int, Sequence[tuple[int, int]]]


def compare_ledger(
    truth: GroundTruth, ledger: Ledger, *, limit: int = 1000
) -> tuple[list[dict[str, Any]], int]:
    """Every way the ledger disagrees with the truth; returns (findings, truncated).

    Kinds: ``gfn_moved`` (the ledger lists a gfn on a frame it no longer maps: written
    and copied, or never merged), ``gfn_unknown_domain``, ``frame_not_shared`` (a ledger
    frame listing several gfns that at most one gfn maps), ``gfn_missing_from_ledger``
    (the frame is mapped by a gfn the ledger does not list on it), ``gfn_listed_twice``.
    Frames shared in truth but absent from the ledger are not findings (KSM merges on
    its own); :func:`untracked_shared` counts them.
    """
    findings: list[dict[str, Any]] = []
    truncated = 0

    def add(kind: str, message: str, **where: int) -> None:
        nonlocal truncated
        if len(findings) < limit:
            findings.append({"kind": kind, "message": message, **where})
        else:
            truncated += 1

    seen: set[tuple[int, int]] = set()
    for mfn in sorted(ledger):
        listed = list(ledger[mfn])
        for d, g in listed:
            if (d, g) in seen:
                add(
                    "gfn_listed_twice",
                    f"gfn {g:#x} of domain {d} is on more than one ledger frame (or twice on one)",
                    domain=d,
                    gfn=g,
                    mfn=mfn,
                )
            seen.add((d, g))
            p2m = truth.p2m.get(d)
            if p2m is None:
                add(
                    "gfn_unknown_domain",
                    f"ledger frame {mfn:#x} lists gfn {g:#x} of domain {d}, which is not attached",
                    domain=d,
                    gfn=g,
                    mfn=mfn,
                )
                continue
            now = int(p2m[g]) if 0 <= g < len(p2m) else -1
            if now != mfn:
                add(
                    "gfn_moved",
                    f"ledger has gfn {g:#x} of domain {d} on frame {mfn:#x}, "
                    f"the host maps it to {'no frame' if now < 0 else hex(now)}",
                    domain=d,
                    gfn=g,
                    mfn=mfn,
                    expected=mfn,
                    found=now,
                )
        actual = truth.gfns_of(mfn)
        if len(listed) >= 2 and len(actual) < 2:
            add(
                "frame_not_shared",
                f"ledger frame {mfn:#x} is mapped by {len(actual)} gfn(s) on the host",
                mfn=mfn,
                expected=len(listed),
                found=len(actual),
            )
        for d, g in sorted(set(actual) - set(listed)):
            add(
                "gfn_missing_from_ledger",
                f"frame {mfn:#x} is also mapped by gfn {g:#x} "
                f"of domain {d}, which the ledger does not list",
                domain=d,
                gfn=g,
                mfn=mfn,
            )
    return findings, truncated


def untracked_shared(truth: GroundTruth, ledger: Ledger) -> int:
    """Frames shared in truth that the ledger does not know about."""
    shared = truth.mfns[truth.refs >= 2]
    known = np.fromiter(ledger.keys(), dtype=np.int64, count=len(ledger))
    return int(np.count_nonzero(~np.isin(shared, known)))
