"""Scanner: opt-in, incremental re-hashing, grouping, collision safety."""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.simmachine import SimMachine
from sharing.manager import SharingManager
from sharing.scanner import Scanner
from tests.sharing.sharing_helpers import page


def setup(n: int = 64) -> tuple[SimMachine, SharingManager, Scanner, list[int]]:
    m = SimMachine(4 * n + 16)
    mgr = SharingManager(m, cross_domain_default=True)
    doms = [m.create_domain(n) for _ in range(3)]
    rng = np.random.default_rng(7)
    common = rng.integers(0, 256, (8, 4096), dtype=np.uint8)
    for d in doms:
        m.fill(d, 0, common)  # gfns 0-7 identical everywhere, the rest zero pages
        m.fill(d, 8, rng.integers(0, 256, (8, 4096), dtype=np.uint8))  # unique pages
    return m, mgr, Scanner(mgr, batch_pages=16), doms


def test_shares_identical_pages_of_opted_in_domains_only() -> None:
    m, mgr, sc, (a, b, c) = setup()
    sc.enable(a)
    sc.enable(b)
    report = sc.scan()
    # a+b: 2*48 zero pages -> 1 frame, 8 common pages -> 8 frames
    assert report.pages_scanned == 128
    assert report.shared == report.saved == 95 + 8
    assert mgr.shr_pages(c) == 0 and m.lookup(c, 0)[1] == 1  # c untouched
    assert m.lookup(a, 3)[0] == m.lookup(b, 3)[0]
    assert m.lookup(a, 9)[0] != m.lookup(b, 9)[0]
    assert mgr.audit().clean
    assert sc.enabled == [a, b]


def test_second_pass_rehashes_only_what_changed() -> None:
    m, mgr, sc, (a, b, _) = setup()
    sc.enable(a)
    sc.enable(b)
    sc.scan()
    assert sc.scan().pages_scanned == 0
    m.write(a, 9, page(b"fresh"))
    m.write(b, 10, page(b"fresh"))
    m.write(b, 3, b"!")  # a shared page: CoW, then re-hashed
    report = sc.scan()
    assert report.pages_scanned == 3
    assert report.shared == 1
    assert m.lookup(a, 9)[0] == m.lookup(b, 10)[0]
    assert m.read(b, 3)[:1] == b"!" and m.read(a, 3)[:1] != b"!"
    assert mgr.audit().clean


def test_late_opt_in_joins_existing_shares() -> None:
    m, mgr, sc, (a, b, c) = setup()
    sc.enable(a)
    sc.enable(b)
    sc.scan()
    zero_frame = m.lookup(a, 20)[0]
    sc.enable(c)
    report = sc.scan()
    assert report.pages_scanned == 64
    assert m.lookup(c, 30)[0] == zero_frame  # joined the existing zero frame
    assert mgr.audit().clean
    sc.disable(c)
    assert sc.enabled == [a, b]


def test_hash_collisions_never_merge_different_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    import xxhash

    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", lambda data: 42)
    m, mgr, sc, (a, b, _) = setup(16)
    before = {(d, g): m.read(d, g) for d in (a, b) for g in range(16)}
    sc.enable(a)
    sc.enable(b)
    report = sc.scan()
    assert report.mismatches > 0
    assert all(m.read(d, g) == data for (d, g), data in before.items())
    assert mgr.audit().clean


def test_destroyed_domain_is_forgotten() -> None:
    _m, mgr, sc, (a, b, _) = setup(16)
    sc.enable(a)
    sc.enable(b)
    sc.scan()
    mgr.destroy_domain(b)
    assert sc.scan().pages_scanned == 0
    assert sc.enabled == [a]
    assert mgr.audit().clean
