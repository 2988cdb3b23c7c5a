"""SimMachine: domains, guest reads/writes, the CoW fault hook, dirty tracking."""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.simmachine import SimMachine
from memd.errors import NoSuchDomain, OutOfFrames, SharingError
from sharing.machine import DOMID_COW, DOMID_FREE, Machine, PageType
from tests.sharing.sharing_helpers import page


def test_is_a_machine() -> None:
    assert isinstance(SimMachine(4), Machine)


def test_fresh_domain_is_zero_private_and_owned() -> None:
    m = SimMachine(16)
    d = m.create_domain(4)
    assert m.read(d, 3) == bytes(4096)
    mfn, ptype = m.lookup(d, 3)
    assert ptype == PageType.RAM
    assert m.frame_info(mfn) == (d, 1)
    assert m.nr_free_frames == 12


def test_write_read_roundtrip_and_offsets() -> None:
    m = SimMachine(8)
    d = m.create_domain(2)
    m.write(d, 1, b"abc", offset=10)
    assert m.read(d, 1)[8:14] == b"\0\0abc\0"
    with pytest.raises(ValueError):
        m.write(d, 1, b"x" * 4097)


def test_unknown_domain_and_gfn() -> None:
    m = SimMachine(8)
    d = m.create_domain(2)
    for call in (
        lambda: m.lookup(d, 2),
        lambda: m.lookup(d, -1),
        lambda: m.lookup(99, 0),
        lambda: m.write(d, 5, b"x"),
        lambda: m.read(42, 0),
    ):
        with pytest.raises(NoSuchDomain):
            call()


def test_create_domain_out_of_frames() -> None:
    m = SimMachine(4)
    with pytest.raises(OutOfFrames):
        m.create_domain(5)


def test_reused_frames_are_scrubbed() -> None:
    m = SimMachine(2)
    d = m.create_domain(2)
    m.write(d, 0, page(b"secret"))
    m.write(d, 1, page(b"secret"))
    m.destroy_domain(d)
    e = m.create_domain(2)
    assert m.read(e, 0) == bytes(4096) and m.read(e, 1) == bytes(4096)


def test_write_to_shared_page_calls_fault_handler_first() -> None:
    m = SimMachine(8)
    d = m.create_domain(2)
    mfn, _ = m.lookup(d, 0)
    with m.lock:
        m.set_frame_owner(mfn, DOMID_COW)
        m.set_entry(d, 0, mfn, PageType.SHARED)
    with pytest.raises(SharingError):
        m.write(d, 0, b"x")  # no handler: refused, never written
    faults: list[tuple[int, int]] = []

    def handler(domid: int, gfn: int) -> None:
        faults.append((domid, gfn))
        with m.lock:
            m.set_frame_owner(mfn, domid)
            m.set_entry(domid, gfn, mfn, PageType.RAM)

    m.set_write_fault_handler(handler)
    m.write(d, 0, b"x")
    assert faults == [(d, 0)]
    assert m.read(d, 0)[:1] == b"x"


def test_dirty_tracking() -> None:
    m = SimMachine(8)
    d = m.create_domain(4)
    assert m.collect_dirty(d).tolist() == [0, 1, 2, 3]
    assert m.collect_dirty(d).tolist() == []
    m.write(d, 2, b"x")
    m.fill(d, 0, np.ones((1, 4096), dtype=np.uint8))
    assert m.collect_dirty(d).tolist() == [0, 2]


def test_balloon_out_and_destroy_refuses_shared() -> None:
    m = SimMachine(8)
    d = m.create_domain(3)
    m.balloon_out(d, 1)
    assert m.lookup(d, 1)[1] == PageType.INVALID
    assert m.nr_free_frames == 6
    mfn, _ = m.lookup(d, 0)
    with m.lock:
        m.set_entry(d, 0, mfn, PageType.SHARED)
    with pytest.raises(SharingError):
        m.destroy_domain(d)
    with m.lock:
        m.set_entry(d, 0, mfn, PageType.RAM)
    m.destroy_domain(d)
    assert m.nr_free_frames == 8
    assert m.frame_info(mfn) == (DOMID_FREE, 0)


def test_batch_reads() -> None:
    m = SimMachine(8)
    d = m.create_domain(3)
    m.write(d, 1, page(b"q"))
    mfns, types = m.lookup_range(d, 0, 3)
    assert types.tolist() == [PageType.RAM] * 3
    frames = m.read_frames(mfns)
    assert frames.shape == (3, 4096)
    assert frames[1].tobytes() == page(b"q")
    assert m.frames_equal(int(mfns[0]), int(mfns[2]))
    assert not m.frames_equal(int(mfns[0]), int(mfns[1]))
