"""audit(): recompute the sharing state from its structures and list every discrepancy.

What is checked (the Xen audit, extended to the counters and back pointers):

* each sharing record (frame with a non-zero version): owner is ``DOMID_COW``,
  reverse map non-empty and acyclic, its length equals the machine's mapcount,
  its version is below the next version to hand out and unique;
* each reverse-map entry: its domain exists, its gfn maps back to this frame
  with type SHARED, its back pointer (``slot``) points at it, no (domain, gfn)
  appears twice;
* each frame owned by ``DOMID_COW`` has a record; each SHARED p2m entry of every
  domain is on a reverse map; no back pointer names a dead entry;
* consent (:mod:`sharing.consent`): a record's ``_home`` names the one domain of all
  its gfns unless it is MIXED, and every domain with a gfn on a MIXED frame merges
  across guests;
* the entry pool: live entries + free entries = pool size;
* counters ``nr_shared_mfns``, ``nr_saved_mfns`` and every ``shr_pages[d]``, and
  the invariant ``sum(shr_pages) == nr_saved_mfns + nr_shared_mfns``.

The audit holds the manager lock for its whole run, so it sees one consistent
state; per-entry checks are vectorised, only the list walks are Python loops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sharing.batch import MIXED
from sharing.machine import DOMID_COW, PageType
from sharing.rmap import NO_ENTRY

if TYPE_CHECKING:
    from sharing.manager import SharingManager

#: Findings listed in full; beyond this they are only counted (``truncated``).
MAX_FINDINGS = 1000


@dataclass(frozen=True)
class Finding:
    """One discrepancy.  ``kind`` is a stable machine-readable name."""

    kind: str
    message: str
    mfn: int | None = None
    domain: int | None = None
    gfn: int | None = None
    expected: int | None = None
    found: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class AuditReport:
    """What the audit recomputed, and every discrepancy it found."""

    nr_shared_mfns: int = 0
    nr_saved_mfns: int = 0
    shr_pages: dict[int, int] = field(default_factory=dict)
    rmap_entries: int = 0
    findings: list[Finding] = field(default_factory=list)
    truncated: int = 0

    @property
    def errors(self) -> int:
        return len(self.findings) + self.truncated

    @property
    def clean(self) -> bool:
        return self.errors == 0

    def add(self, kind: str, message: str, **where: int | None) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(Finding(kind, message, **where))
        else:
            self.truncated += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "errors": self.errors,
            "nr_shared_mfns": self.nr_shared_mfns,
            "nr_saved_mfns": self.nr_saved_mfns,
            "shr_pages": {str(d): n for d, n in sorted(self.shr_pages.items())},
            "rmap_entries": self.rmap_entries,
            "findings": [f.to_dict() for f in self.findings],
            "truncated": self.truncated,
        }


def _copy(arr: Any, dtype: Any) -> Any:
    """A NumPy copy of an array.array (the temporary export ends at once)."""
    return np.frombuffer(arr, dtype=dtype).copy()


def audit(mgr: SharingManager) -> AuditReport:
    """Recompute everything about ``mgr`` and its machine; see the module docstring."""
    with mgr._lock:
        return _audit_locked(mgr)


def _audit_locked(mgr: SharingManager) -> AuditReport:
    report = AuditReport()
    m = mgr._machine
    rmap = mgr._rmap
    versions = _copy(mgr._version, np.uint64)
    records = np.flatnonzero(versions).astype(np.int64)
    pool = len(rmap.next)
    live = np.zeros(pool, dtype=bool)

    # Records: versions, owner, list walk, refcount.
    rec_versions = versions[records]
    for mfn in records[rec_versions >= np.uint64(mgr._next_version)].tolist():
        report.add(
            "version_range",
            f"mfn {mfn:#x} has a version never handed out",
            mfn=mfn,
            found=int(versions[mfn]),
            expected=mgr._next_version - 1,
        )
    uniq, counts = np.unique(rec_versions, return_counts=True)
    for v in uniq[counts > 1].tolist():
        for mfn in records[rec_versions == v].tolist():
            report.add(
                "version_duplicate", f"version {v:#x} names several frames", mfn=mfn, found=int(v)
            )
    owners, mapcounts = m.frame_info_many(records)
    entries: list[int] = []
    entry_mfns: list[int] = []
    nxt = rmap.next
    for i, mfn in enumerate(records.tolist()):
        if owners[i] != DOMID_COW:
            report.add(
                "record_owner",
                f"shared mfn {mfn:#x} is owned by {owners[i]}",
                mfn=mfn,
                expected=DOMID_COW,
                found=int(owners[i]),
            )
        n = 0
        e = rmap.head[mfn]
        while e != NO_ENTRY and n <= pool:
            if live[e]:
                break  # a cycle, or two lists sharing an entry
            live[e] = True
            entries.append(e)
            entry_mfns.append(mfn)
            n += 1
            e = nxt[e]
        if e != NO_ENTRY:
            report.add(
                "rmap_cycle",
                f"the reverse map of mfn {mfn:#x} loops or merges into another",
                mfn=mfn,
                found=e,
            )
        if n == 0:
            report.add("record_empty", f"mfn {mfn:#x} has a record but no gfns", mfn=mfn)
        if n != mapcounts[i]:
            report.add(
                "refcount",
                f"mfn {mfn:#x}: {n} gfns in its reverse map, {mapcounts[i]} p2m references",
                mfn=mfn,
                expected=n,
                found=int(mapcounts[i]),
            )
    _check_heads_without_record(report, rmap, versions)

    # Entries: domain, p2m, back pointer, duplicates.
    ent = np.asarray(entries, dtype=np.int64)
    ent_mfn = np.asarray(entry_mfns, dtype=np.int64)
    doms = _copy(rmap.dom, np.uint16)[ent].astype(np.int64)
    gfns = _copy(rmap.gfn, np.uint32)[ent].astype(np.int64)
    keys = (doms << 32) | gfns
    uk, kc = np.unique(keys, return_counts=True)
    for k in uk[kc > 1].tolist():
        report.add(
            "rmap_duplicate",
            f"gfn {k & 0xFFFFFFFF:#x} of domain {k >> 32} is on reverse maps more than once",
            domain=k >> 32,
            gfn=k & 0xFFFFFFFF,
        )
    _check_consent(report, mgr, doms, gfns, ent_mfn)
    machine_domains = set(m.domains())
    p2m: dict[int, tuple[Any, Any]] = {}
    for d in machine_domains:
        p2m[d] = m.lookup_range(d, 0, m.nr_gfns(d))
    slot_np = {d: _copy(s, np.int32) for d, s in rmap.slot.items()}
    for d in np.unique(doms).tolist():
        sel = doms == d
        if d not in machine_domains:
            for g, mfn in zip(gfns[sel].tolist(), ent_mfn[sel].tolist(), strict=True):
                report.add(
                    "rmap_domain",
                    f"mfn {mfn:#x} lists gfn {g:#x} of unknown domain {d}",
                    mfn=mfn,
                    domain=d,
                    gfn=g,
                )
            continue
        mfns_d, types_d = p2m[d]
        g = gfns[sel]
        inrange = g < len(mfns_d)
        for gg, mfn in zip(g[~inrange].tolist(), ent_mfn[sel][~inrange].tolist(), strict=True):
            report.add(
                "rmap_p2m_mfn",
                f"mfn {mfn:#x} lists gfn {gg:#x} outside domain {d}",
                mfn=mfn,
                domain=d,
                gfn=gg,
            )
        g, emfn, e = g[inrange], ent_mfn[sel][inrange], ent[sel][inrange]
        bad = np.flatnonzero(mfns_d[g] != emfn)
        for i in bad.tolist():
            report.add(
                "rmap_p2m_mfn",
                f"gfn {g[i]:#x} of domain {d} maps mfn "
                f"{mfns_d[g[i]]:#x}, not the frame whose reverse map lists it",
                mfn=int(emfn[i]),
                domain=d,
                gfn=int(g[i]),
                expected=int(emfn[i]),
                found=int(mfns_d[g[i]]),
            )
        bad = np.flatnonzero(types_d[g] != PageType.SHARED)
        for i in bad.tolist():
            report.add(
                "rmap_p2m_type",
                f"gfn {g[i]:#x} of domain {d} is on a reverse map "
                f"but has p2m type {PageType(int(types_d[g[i]])).name}",
                mfn=int(emfn[i]),
                domain=d,
                gfn=int(g[i]),
                expected=int(PageType.SHARED),
                found=int(types_d[g[i]]),
            )
        slots = slot_np.get(d)
        found = (
            slots[g]
            if slots is not None and len(slots) == len(mfns_d)
            else np.full(len(g), NO_ENTRY)
        )
        for i in np.flatnonzero(found != e).tolist():
            report.add(
                "rmap_slot",
                f"the back pointer of gfn {g[i]:#x} of domain {d} does not name its entry",
                domain=d,
                gfn=int(g[i]),
                expected=int(e[i]),
                found=int(found[i]),
            )

    # Frames and p2m entries the reverse maps do not know about.
    for mfn in np.setdiff1d(m.frames_owned_by(DOMID_COW), records).tolist():
        report.add(
            "orphan_cow_frame",
            f"mfn {mfn:#x} is owned by dom_cow but has no sharing record",
            mfn=mfn,
        )
    for d in sorted(machine_domains):
        mfns_d, types_d = p2m[d]
        shared = np.flatnonzero(types_d == PageType.SHARED)
        slots = slot_np.get(d)
        if slots is None or len(slots) != len(mfns_d):
            slots = np.full(len(mfns_d), NO_ENTRY, dtype=np.int32)
        ok = slots[shared] != NO_ENTRY
        ok[ok] = live[slots[shared][ok]]
        for g in shared[~ok].tolist():
            report.add(
                "untracked_shared_gfn",
                f"gfn {g:#x} of domain {d} is SHARED but on no reverse map",
                domain=d,
                gfn=g,
                mfn=int(mfns_d[g]),
            )
    for d, slots in slot_np.items():
        used = np.flatnonzero(slots != NO_ENTRY)
        targets = slots[used]
        valid = (targets >= 0) & (targets < pool)
        ok = np.zeros(len(used), dtype=bool)
        ok[valid] = live[targets[valid]]
        for g in used[~ok].tolist():
            report.add(
                "stale_slot",
                f"the back pointer of gfn {g:#x} of domain {d} names a dead entry",
                domain=d,
                gfn=g,
                found=int(slots[g]),
            )

    # The entry pool.
    nr_free = 0
    e = rmap.free_head
    while e != NO_ENTRY and nr_free <= pool:
        nr_free += 1
        e = nxt[e]
    if len(entries) + nr_free != pool:
        report.add(
            "entry_leak",
            f"{len(entries)} live + {nr_free} free entries, but the pool holds {pool}",
            expected=pool,
            found=len(entries) + nr_free,
        )
    if nr_free != rmap.nr_free:
        report.add(
            "counter_nr_free", "free-entry count is wrong", expected=nr_free, found=rmap.nr_free
        )

    # Counters.
    report.rmap_entries = len(entries)
    report.nr_shared_mfns = len(records)
    report.nr_saved_mfns = len(entries) - len(records)
    uniq_d, per_d = np.unique(doms, return_counts=True)
    report.shr_pages = dict(zip(uniq_d.tolist(), per_d.tolist(), strict=True))
    if mgr._nr_shared_mfns != report.nr_shared_mfns:
        report.add(
            "counter_nr_shared_mfns",
            "nr_shared_mfns is wrong",
            expected=report.nr_shared_mfns,
            found=mgr._nr_shared_mfns,
        )
    if mgr._nr_saved_mfns != report.nr_saved_mfns:
        report.add(
            "counter_nr_saved_mfns",
            "nr_saved_mfns is wrong",
            expected=report.nr_saved_mfns,
            found=mgr._nr_saved_mfns,
        )
    for d in sorted(set(report.shr_pages) | set(mgr._shr_pages)):
        want, have = report.shr_pages.get(d, 0), mgr._shr_pages.get(d, 0)
        if want != have:
            report.add(
                "counter_shr_pages",
                f"shr_pages of domain {d} is wrong",
                domain=d,
                expected=want,
                found=have,
            )
    total = sum(mgr._shr_pages.values())
    if total != mgr._nr_saved_mfns + mgr._nr_shared_mfns:
        report.add(
            "invariant",
            "sum(shr_pages) != nr_saved_mfns + nr_shared_mfns",
            expected=mgr._nr_saved_mfns + mgr._nr_shared_mfns,
            found=total,
        )
    return report


def _check_heads_without_record(report: AuditReport, rmap: Any, versions: Any) -> None:
    heads = _copy(rmap.head, np.int32)
    n = min(len(heads), len(versions))
    for mfn in np.flatnonzero((heads[:n] != NO_ENTRY) & (versions[:n] == 0)).tolist():
        report.add("rmap_without_record", f"mfn {mfn:#x} has a reverse map but no record", mfn=mfn)


def _check_consent(
    report: AuditReport, mgr: SharingManager, doms: Any, gfns: Any, ent_mfn: Any
) -> None:
    """Each entry against its frame's home: the home's own domain, or (MIXED) a domain
    that merges across guests."""
    home = _copy(mgr._home, np.int32)[ent_mfn] if len(ent_mfn) else np.zeros(0, np.int32)
    for i in np.flatnonzero((home != MIXED) & (home != doms)).tolist():
        report.add(
            "home_domain",
            f"mfn {int(ent_mfn[i]):#x} is marked as domain "
            f"{int(home[i])}'s alone but maps gfn {int(gfns[i]):#x} of domain "
            f"{int(doms[i])}",
            mfn=int(ent_mfn[i]),
            domain=int(doms[i]),
            gfn=int(gfns[i]),
            expected=int(home[i]),
            found=int(doms[i]),
        )
    mixed = home == MIXED
    for d in np.unique(doms[mixed]).tolist():
        if mgr.merges_across(d):
            continue
        for i in np.flatnonzero(mixed & (doms == d)).tolist():
            report.add(
                "merged_without_consent",
                f"gfn {int(gfns[i]):#x} of domain {d}, "
                "which does not merge across guests, is on a frame other domains "
                f"may map ({int(ent_mfn[i]):#x})",
                mfn=int(ent_mfn[i]),
                domain=d,
                gfn=int(gfns[i]),
            )
