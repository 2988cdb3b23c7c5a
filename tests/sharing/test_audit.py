"""audit(): a clean state reports nothing; each kind of corruption is named."""

from __future__ import annotations

import pytest

from hypervisor.simmachine import SimMachine
from sharing.audit import AuditReport
from sharing.machine import PageType
from sharing.manager import SharingManager
from tests.sharing.sharing_helpers import page


@pytest.fixture
def state() -> tuple[SimMachine, SharingManager, int, int]:
    m = SimMachine(64)
    mgr = SharingManager(m, cross_domain_default=True)
    a, b = m.create_domain(8), m.create_domain(8)
    for g in range(4):
        m.write(a, g, page(b"%d" % g))
        m.write(b, g, page(b"%d" % g))
        mgr.share(a, g, mgr.nominate(a, g), b, g, mgr.nominate(b, g))
    mgr.nominate(a, 5)
    return m, mgr, a, b


def kinds(report: AuditReport) -> set[str]:
    return {f.kind for f in report.findings}


def test_clean_report(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    _, mgr, a, b = state
    report = mgr.audit()
    assert report.clean and report.errors == 0
    d = report.to_dict()
    assert d["nr_shared_mfns"] == 5 and d["nr_saved_mfns"] == 4
    assert d["shr_pages"] == {str(a): 5, str(b): 4} and d["findings"] == []


def test_wrong_counters(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    _, mgr, a, _ = state
    mgr._nr_saved_mfns += 1
    mgr._shr_pages[a] -= 2
    report = mgr.audit()
    assert kinds(report) == {"counter_nr_saved_mfns", "counter_shr_pages", "invariant"}
    f = next(f for f in report.findings if f.kind == "counter_shr_pages")
    assert (f.domain, f.expected, f.found) == (a, 5, 3)
    assert report.errors == 3 and not report.clean


def test_wrong_owner_and_p2m(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    m, mgr, a, b = state
    mfn = m.lookup(a, 1)[0]
    m.set_frame_owner(mfn, a)
    with m.lock:
        m.set_entry(b, 2, m.lookup(b, 2)[0], PageType.RAM)
    assert kinds(mgr.audit()) == {"record_owner", "rmap_p2m_type"}


def test_p2m_points_elsewhere(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    m, mgr, a, b = state
    with m.lock:
        m.set_entry(b, 0, m.lookup(a, 1)[0], PageType.SHARED)
    found = kinds(mgr.audit())
    assert {"rmap_p2m_mfn", "refcount"} <= found


def test_lost_and_duplicate_versions(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    m, mgr, a, _ = state
    mgr._version[m.lookup(a, 0)[0]] = mgr._version[m.lookup(a, 1)[0]]
    mgr._version[m.lookup(a, 2)[0]] = 10**12
    assert {"version_duplicate", "version_range"} <= kinds(mgr.audit())


def test_entry_dropped_from_reverse_map(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    m, mgr, _, b = state
    mfn = m.lookup(b, 3)[0]
    e = mgr._rmap.head[mfn]
    mgr._rmap.head[mfn] = mgr._rmap.next[e]  # unlink without fixing anything else
    found = kinds(mgr.audit())
    assert {"untracked_shared_gfn", "stale_slot", "refcount", "entry_leak"} <= found


def test_orphan_cow_frame_and_cycle(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    m, mgr, a, _ = state
    mfn = m.lookup(a, 0)[0]
    mgr._version[mfn] = 0
    mfn1 = m.lookup(a, 1)[0]
    e = mgr._rmap.head[mfn1]
    mgr._rmap.next[mgr._rmap.next[e]] = e
    found = kinds(mgr.audit())
    assert {"orphan_cow_frame", "rmap_without_record", "rmap_cycle"} <= found


def test_report_caps_findings(state: tuple[SimMachine, SharingManager, int, int]) -> None:
    _, mgr, _, _ = state
    report = AuditReport()
    for i in range(1005):
        report.add("x", "y", mfn=i)
    assert len(report.findings) == 1000 and report.truncated == 5 and report.errors == 1005
    assert mgr.audit().clean
