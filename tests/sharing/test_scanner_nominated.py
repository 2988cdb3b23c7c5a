"""Regression: pages a guest nominated itself before any scan are still merged."""

from __future__ import annotations

from hypervisor.simmachine import SimMachine
from sharing.manager import SharingManager
from sharing.scanner import Scanner


def test_scanner_merges_pages_nominated_before_the_first_pass() -> None:
    machine = SimMachine(64)
    mgr = SharingManager(machine, cross_domain_default=True)
    scanner = Scanner(mgr)
    a, b = machine.create_domain(8), machine.create_domain(8)
    for dom in (a, b):
        machine.write(dom, 3, b"same" * 1000)
        scanner.enable(dom)
        mgr.nominate(dom, 3)  # SHARED with a single gfn each
    scanner.scan()
    mfn_a, mfn_b = machine.lookup(a, 3)[0], machine.lookup(b, 3)[0]
    assert mfn_a == mfn_b
    assert sorted(mgr.gfns_of(mfn_a)) == sorted([(a, 3), (b, 3)])
    assert mgr.audit().clean


def test_records_lists_every_reverse_map() -> None:
    machine = SimMachine(64)
    mgr = SharingManager(machine, cross_domain_default=True)
    a, b = machine.create_domain(8), machine.create_domain(8)
    for dom in (a, b):
        machine.write(dom, 2, b"twin" * 1000)
    ha, hb = mgr.nominate(a, 2), mgr.nominate(b, 2)
    mgr.share(a, 2, ha, b, 2, hb)
    mfn = machine.lookup(a, 2)[0]
    assert {m: sorted(g) for m, g in mgr.records().items()} == {mfn: sorted([(a, 2), (b, 2)])}
