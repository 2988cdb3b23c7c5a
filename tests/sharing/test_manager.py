"""SharingManager: one test per rule of the sharing semantics."""

from __future__ import annotations

from typing import Any

import pytest

from hypervisor.simmachine import SimMachine
from memd.errors import (
    ContentMismatch,
    NoSuchDomain,
    NotShareable,
    OutOfFrames,
    StaleClientHandle,
    StaleSourceHandle,
)
from sharing.machine import DOMID_COW, PageType
from sharing.manager import SharingManager
from tests.sharing.sharing_helpers import page


def counters(mgr: SharingManager) -> dict[str, Any]:
    return {k: v for k, v in mgr.stats().items() if k != "metadata_bytes"}


def shared_pair(
    m: SimMachine, mgr: SharingManager, content: bytes = b"same"
) -> tuple[int, int, int]:
    """Two domains whose gfn 0 holds ``content``, shared; returns (a, b, handle)."""
    a, b = m.create_domain(4), m.create_domain(4)
    m.write(a, 0, page(content))
    m.write(b, 0, page(content))
    ha, hb = mgr.nominate(a, 0), mgr.nominate(b, 0)
    mgr.share(a, 0, ha, b, 0, hb)
    return a, b, ha


def test_nominate_makes_a_record_with_a_fresh_version(
    machine: SimMachine, mgr: SharingManager
) -> None:
    d = machine.create_domain(4)
    h1, h2 = mgr.nominate(d, 0), mgr.nominate(d, 1)
    assert h1 != h2 and h1 > 0 and h2 > 0
    mfn, ptype = machine.lookup(d, 0)
    assert ptype == PageType.SHARED
    assert machine.frame_info(mfn) == (DOMID_COW, 1)
    assert mgr.gfns_of(mfn) == [(d, 0)]
    assert mgr.nominate(d, 0) == h1  # already shared: the record's current version
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns, mgr.shr_pages(d)) == (2, 0, 2)
    assert mgr.audit().clean


def test_renominate_after_unshare_gets_a_new_version(
    machine: SimMachine, mgr: SharingManager
) -> None:
    d = machine.create_domain(2)
    h1 = mgr.nominate(d, 0)
    mgr.unshare(d, 0)
    h2 = mgr.nominate(d, 0)
    assert h2 != h1
    e = machine.create_domain(2)
    he = mgr.nominate(e, 0)
    with pytest.raises(StaleSourceHandle):
        mgr.share(d, 0, h1, e, 0, he)


def test_nominate_refusals(machine: SimMachine, mgr: SharingManager) -> None:
    d = machine.create_domain(4)
    with pytest.raises(NoSuchDomain):
        mgr.nominate(d, 4)
    with pytest.raises(NoSuchDomain):
        mgr.nominate(77, 0)
    machine.balloon_out(d, 2)
    with pytest.raises(NotShareable):
        mgr.nominate(d, 2)
    mgr.nominate(d, 0)
    mgr.teardown_step(d, budget=0)  # dying from the first step on
    with pytest.raises(NotShareable):
        mgr.nominate(d, 1)
    assert mgr.audit().clean


def test_share_merges_and_frees_the_client_frame(machine: SimMachine, mgr: SharingManager) -> None:
    free0 = machine.nr_free_frames
    a, b, _ = shared_pair(machine, mgr)
    assert machine.lookup(a, 0)[0] == machine.lookup(b, 0)[0]
    assert machine.nr_free_frames == free0 - 8 + 1
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns) == (1, 1)
    assert mgr.shr_pages(a) + mgr.shr_pages(b) == mgr.nr_saved_mfns + mgr.nr_shared_mfns
    assert machine.read(b, 0) == page(b"same")
    assert mgr.audit().clean


def test_share_moves_every_gfn_of_the_client_frame(
    machine: SimMachine, mgr: SharingManager
) -> None:
    a = machine.create_domain(8)
    for g in range(6):
        machine.write(a, g, page(b"z"))
    hs = [mgr.nominate(a, g) for g in range(6)]
    mgr.share(a, 3, hs[3], a, 4, hs[4])
    mgr.share(a, 3, hs[3], a, 5, hs[5])  # client frame of 5 holds one gfn
    mgr.share(a, 0, hs[0], a, 1, hs[1])
    mgr.share(a, 0, hs[0], a, 3, hs[3])  # client frame holds gfns 3, 4, 5
    mfn = machine.lookup(a, 0)[0]
    assert sorted(mgr.gfns_of(mfn)) == [(a, g) for g in (0, 1, 3, 4, 5)]
    assert all(machine.lookup(a, g)[0] == mfn for g in (0, 1, 3, 4, 5))
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns) == (2, 4)
    assert mgr.audit().clean


def test_stale_source_and_client_are_distinct(machine: SimMachine, mgr: SharingManager) -> None:
    a, b = machine.create_domain(2), machine.create_domain(2)
    ha, hb = mgr.nominate(a, 0), mgr.nominate(b, 0)
    with pytest.raises(StaleSourceHandle) as src:
        mgr.share(a, 0, ha + 1000, b, 0, hb)
    assert src.value.fields["domain"] == a
    with pytest.raises(StaleClientHandle) as cli:
        mgr.share(a, 0, ha, b, 0, hb + 1000)
    assert cli.value.fields["domain"] == b
    with pytest.raises(StaleClientHandle):
        mgr.share(a, 0, ha, b, 1, hb)  # handle right, gfn never nominated
    mgr.share(a, 0, ha, b, 0, hb)
    with pytest.raises(StaleClientHandle):
        mgr.share(a, 0, ha, b, 0, hb)  # the client's version retired with its record


def test_stale_handle_never_matches_a_reused_mfn(machine: SimMachine, mgr: SharingManager) -> None:
    a, b = machine.create_domain(2), machine.create_domain(2)
    ha, hb = mgr.nominate(a, 0), mgr.nominate(b, 0)
    freed = machine.lookup(b, 0)[0]
    mgr.share(a, 0, ha, b, 0, hb)  # frees b's frame
    c = machine.create_domain(1)  # takes the freed frame (LIFO free stack)
    assert machine.lookup(c, 0)[0] == freed
    hc = mgr.nominate(c, 0)
    assert hc != hb
    with pytest.raises(StaleClientHandle):
        mgr.share(a, 0, ha, c, 0, hb)  # old handle, same mfn: ABA caught


def test_self_share_is_a_noop(machine: SimMachine, mgr: SharingManager) -> None:
    a, b, h = shared_pair(machine, mgr)
    before = counters(mgr)
    mgr.share(a, 0, h, b, 0, h)
    mgr.share(a, 0, h, a, 0, h)
    assert counters(mgr) == before
    assert mgr.audit().clean


def test_share_verifies_bytes(machine: SimMachine, mgr: SharingManager) -> None:
    a, b = machine.create_domain(2), machine.create_domain(2)
    machine.write(a, 0, page(b"one"))
    machine.write(b, 0, page(b"two"))
    ha, hb = mgr.nominate(a, 0), mgr.nominate(b, 0)
    before = counters(mgr)
    with pytest.raises(ContentMismatch):
        mgr.share(a, 0, ha, b, 0, hb)
    assert counters(mgr) == before
    assert machine.lookup(a, 0)[0] != machine.lookup(b, 0)[0]
    assert machine.read(b, 0) == page(b"two")
    assert mgr.audit().clean


def test_unshare_last_gfn_is_in_place(machine: SimMachine, mgr: SharingManager) -> None:
    d = machine.create_domain(2)
    machine.write(d, 0, page(b"mine"))
    mgr.nominate(d, 0)
    mfn = machine.lookup(d, 0)[0]
    free = machine.nr_free_frames
    assert mgr.unshare(d, 0) is True
    assert machine.lookup(d, 0) == (mfn, PageType.RAM)
    assert machine.frame_info(mfn) == (d, 1)
    assert machine.nr_free_frames == free  # no allocation
    assert (mgr.nr_shared_mfns, mgr.shr_pages(d)) == (0, 0)
    assert mgr.unshare(d, 0) is False  # not shared any more
    assert machine.read(d, 0) == page(b"mine")
    assert mgr.audit().clean


def test_unshare_copies_when_others_remain(machine: SimMachine, mgr: SharingManager) -> None:
    a, b, _ = shared_pair(machine, mgr)
    shared_mfn = machine.lookup(a, 0)[0]
    assert mgr.unshare(b, 0)
    mfn_b, ptype = machine.lookup(b, 0)
    assert ptype == PageType.RAM and mfn_b != shared_mfn
    assert machine.read(b, 0) == page(b"same")
    assert mgr.gfns_of(shared_mfn) == [(a, 0)]
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns, mgr.shr_pages(b)) == (1, 0, 0)
    assert mgr.audit().clean


def test_guest_write_unshares_first(machine: SimMachine, mgr: SharingManager) -> None:
    a, b, _ = shared_pair(machine, mgr)
    machine.write(b, 0, b"new")
    assert machine.read(b, 0)[:4] == b"newe"
    assert machine.read(a, 0) == page(b"same")
    assert machine.lookup(b, 0)[1] == PageType.RAM
    machine.write(a, 0, b"A")  # last gfn: private in place
    assert machine.read(a, 0)[:2] == b"Aa"
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns) == (0, 0)
    assert mgr.audit().clean


def test_unshare_out_of_frames_changes_nothing() -> None:
    m = SimMachine(4)
    mgr = SharingManager(m, cross_domain_default=True)
    a, b = m.create_domain(2), m.create_domain(2)
    ha, hb = mgr.nominate(a, 0), mgr.nominate(b, 0)
    mgr.share(a, 0, ha, b, 0, hb)
    filler = m.create_domain(1)  # takes the frame share freed
    assert m.nr_free_frames == 0
    before = counters(mgr)
    with pytest.raises(OutOfFrames):
        mgr.unshare(b, 0)
    with pytest.raises(OutOfFrames):
        m.write(b, 0, b"x")  # the CoW fault fails the same way
    assert counters(mgr) == before
    assert m.lookup(b, 0)[1] == PageType.SHARED
    assert mgr.audit().clean
    m.destroy_domain(filler)
    m.write(b, 0, b"x")
    assert mgr.audit().clean


def test_unshare_failure_after_allocation_rolls_back(
    machine: SimMachine, mgr: SharingManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    _a, b, _ = shared_pair(machine, mgr)
    before, free = counters(mgr), machine.nr_free_frames

    def broken_copy(src: int, dst: int) -> None:
        raise OSError("copy failed")

    monkeypatch.setattr(machine, "copy_frame", broken_copy)
    with pytest.raises(OSError):
        mgr.unshare(b, 0)
    assert counters(mgr) == before
    assert machine.nr_free_frames == free
    assert mgr.audit().clean


def test_teardown_is_incremental_and_releases_everything(
    machine: SimMachine, mgr: SharingManager
) -> None:
    a, b = machine.create_domain(40), machine.create_domain(40)
    ha = mgr.nominate(a, 0)
    for g in range(40):
        mgr.share(a, 0, ha, b, g, mgr.nominate(b, g))  # b: 40 refs on a's zero frame
    for g in range(1, 10):
        mgr.nominate(b, 0)
        mgr.share(b, 0, mgr.nominate(b, 0), a, g, mgr.nominate(a, g))
    remaining = [mgr.teardown_step(b, budget=16) for _ in range(3)]
    assert remaining == [24, 8, 0]
    assert mgr.shr_pages(b) == 0
    machine.destroy_domain(b)
    assert mgr.audit().clean
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns) == (1, 9)
    mgr.destroy_domain(a, budget=3)
    assert machine.nr_free_frames == machine.nr_frames
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns) == (0, 0)
    assert mgr.audit().clean


def test_huge_reverse_map_on_one_frame() -> None:
    n = 100_000
    m = SimMachine(n + 8)
    mgr = SharingManager(m, cross_domain_default=True)
    zero, guest = m.create_domain(1), m.create_domain(n)
    hz = mgr.nominate(zero, 0)
    for g in range(n):
        mgr.share(zero, 0, hz, guest, g, mgr.nominate(guest, g))
    mfn = m.lookup(zero, 0)[0]
    assert m.frame_info(mfn) == (DOMID_COW, n + 1)
    assert (mgr.nr_shared_mfns, mgr.nr_saved_mfns, mgr.shr_pages(guest)) == (1, n, n)
    m.write(guest, n // 2, b"x")  # O(1) removal from the middle of a 100k list
    assert m.read(guest, n // 2)[:1] == b"x"
    assert mgr.audit().clean
    while mgr.teardown_step(guest, budget=25_000):
        pass
    m.destroy_domain(guest)
    assert mgr.gfns_of(mfn) == [(zero, 0)]
    assert mgr.audit().clean


def test_counter_invariant_over_a_mix(machine: SimMachine, mgr: SharingManager) -> None:
    doms = [machine.create_domain(16) for _ in range(3)]
    handles = {(d, g): mgr.nominate(d, g) for d in doms for g in range(16)}
    for d in doms[1:]:
        for g in range(0, 16, 2):
            mgr.share(doms[0], g, handles[(doms[0], g)], d, g, handles[(d, g)])
    machine.write(doms[1], 2, b"w")
    total = sum(mgr.shr_pages(d) for d in doms)
    assert total == mgr.nr_saved_mfns + mgr.nr_shared_mfns
    report = mgr.audit()
    assert report.clean and report.nr_saved_mfns == mgr.nr_saved_mfns
