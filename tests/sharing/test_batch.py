"""Batched operations: share_many / nominate_many equal the one-by-one calls.

Two identical worlds are built from the same drawn steps; one runs the batch,
the other the single calls in order.  Results (exception type, message, fields)
and the complete state afterwards (p2m, frame owners and mapcounts, free-frame
order, versions, reverse maps in list order, counters) must be identical, and
both audits clean.  Also run over a machine without the batch methods (the
fallback path), and against guest writers in threads.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.simmachine import SimMachine
from memd.errors import ContentMismatch, OutOfFrames, SharingError
from sharing.batch import SharePair
from sharing.machine import BatchMachine, Int64Array, LockLike, Machine, PageType, Uint8Array
from sharing.manager import SharingManager
from tests.sharing.sharing_helpers import page

PAGES = 6
DOMAINS = 3
CONTENTS = [page(bytes([v])) for v in (0, 1, 2)]


class PlainMachine:
    """A SimMachine seen through the Machine protocol only (no batch methods)."""

    def __init__(self, inner: SimMachine) -> None:
        self.inner = inner

    page_size = property(lambda self: self.inner.page_size)
    nr_frames = property(lambda self: self.inner.nr_frames)

    @property
    def lock(self) -> LockLike:
        return self.inner.lock

    def domains(self) -> list[int]:
        return self.inner.domains()

    def nr_gfns(self, domid: int) -> int:
        return self.inner.nr_gfns(domid)

    def lookup(self, domid: int, gfn: int) -> tuple[int, int]:
        return self.inner.lookup(domid, gfn)

    def lookup_range(self, domid: int, start: int, count: int) -> tuple[Int64Array, Uint8Array]:
        return self.inner.lookup_range(domid, start, count)

    def set_entry(self, domid: int, gfn: int, mfn: int, ptype: int) -> None:
        self.inner.set_entry(domid, gfn, mfn, ptype)

    def frame_info(self, mfn: int) -> tuple[int, int]:
        return self.inner.frame_info(mfn)

    def frame_info_many(self, mfns: Int64Array) -> Any:
        return self.inner.frame_info_many(mfns)

    def frames_owned_by(self, owner: int) -> Int64Array:
        return self.inner.frames_owned_by(owner)

    def set_frame_owner(self, mfn: int, owner: int) -> None:
        self.inner.set_frame_owner(mfn, owner)

    def read_frame(self, mfn: int) -> bytes:
        return self.inner.read_frame(mfn)

    def read_frames(self, mfns: Int64Array) -> Uint8Array:
        return self.inner.read_frames(mfns)

    def frames_equal(self, mfn_a: int, mfn_b: int) -> bool:
        return self.inner.frames_equal(mfn_a, mfn_b)

    def alloc_frame(self, owner: int) -> int:
        return self.inner.alloc_frame(owner)

    def free_frame(self, mfn: int) -> None:
        self.inner.free_frame(mfn)

    def copy_frame(self, src: int, dst: int) -> None:
        self.inner.copy_frame(src, dst)

    def set_write_fault_handler(self, handler: Any) -> None:
        self.inner.set_write_fault_handler(handler)

    def collect_dirty(self, domid: int) -> Int64Array:
        return self.inner.collect_dirty(domid)

    def destroy_domain(self, domid: int) -> None:
        self.inner.destroy_domain(domid)


def test_plain_machine_is_a_machine_without_batches() -> None:
    plain = PlainMachine(SimMachine(4))
    assert isinstance(plain, Machine) and not isinstance(plain, BatchMachine)
    assert isinstance(SimMachine(4), BatchMachine)


# --- building two identical worlds -------------------------------------------------------

# A world step: ("write", d, g, v) | ("nominate", d, g) | ("share", i, j) over handles
# seen so far | ("balloon", d, g) | ("unshare", d, g).
step = st.one_of(
    st.tuples(
        st.just("write"), st.integers(0, DOMAINS - 1), st.integers(0, PAGES - 1), st.integers(0, 2)
    ),
    st.tuples(st.just("nominate"), st.integers(0, DOMAINS - 1), st.integers(0, PAGES - 1)),
    st.tuples(st.just("share"), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.just("balloon"), st.integers(0, DOMAINS - 1), st.integers(0, PAGES - 1)),
    st.tuples(st.just("unshare"), st.integers(0, DOMAINS - 1), st.integers(0, PAGES - 1)),
)


class World:
    def __init__(
        self,
        steps: list[tuple[Any, ...]],
        plain: bool,
        nominate_all: bool = False,
        closed: int | None = None,
    ) -> None:
        self.sim = SimMachine(DOMAINS * PAGES + 4)
        self.m: Machine = PlainMachine(self.sim) if plain else self.sim
        self.mgr = SharingManager(self.m, cross_domain_default=True)
        self.doms = [self.sim.create_domain(PAGES) for _ in range(DOMAINS)]
        self.seen: list[tuple[int, int, int]] = []  # (domain, gfn, handle) ever handed out
        if nominate_all:  # most pages shared: many pairs reach compare and merge
            for d in self.doms:
                for g in range(PAGES):
                    self.seen.append((d, g, self.mgr.nominate(d, g)))
        for s in steps:
            self._run(s)
        if closed is not None:  # that domain's guest does not merge across guests
            try:
                self.mgr.set_cross_domain(self.doms[closed], False)
            except OutOfFrames:  # no frames for its private copies: leave it open
                self.mgr.set_cross_domain(self.doms[closed], True)

    def _run(self, s: tuple[Any, ...]) -> None:
        kind = s[0]
        try:
            if kind == "write":
                self.sim.write(self.doms[s[1]], s[2], CONTENTS[s[3]])
            elif kind == "nominate":
                d = self.doms[s[1]]
                self.seen.append((d, s[2], self.mgr.nominate(d, s[2])))
            elif kind == "share" and self.seen:
                a = self.seen[s[1] % len(self.seen)]
                b = self.seen[s[2] % len(self.seen)]
                self.mgr.share(*a, *b)
            elif kind == "balloon":
                self.sim.balloon_out(self.doms[s[1]], s[2])
            elif kind == "unshare":
                self.mgr.unshare(self.doms[s[1]], s[2])
        except (SharingError, OutOfFrames):
            pass

    def state(self) -> dict[str, Any]:
        sim, mgr = self.sim, self.mgr
        frames = np.arange(sim.nr_frames, dtype=np.int64)
        owners, counts = sim.frame_info_many(frames)
        return {
            "p2m": {d: [a.tolist() for a in sim.lookup_range(d, 0, PAGES)] for d in self.doms},
            "owners": owners.tolist(),
            "mapcounts": counts.tolist(),
            "free": sim._free.tobytes(),
            "versions": mgr._version.tobytes(),
            "homes": mgr._home.tobytes(),
            "rmaps": [mgr.gfns_of(f) for f in range(sim.nr_frames)],
            "stats": mgr.stats(),
            "next_version": mgr._next_version,
        }


def same_outcome(a: object, b: object) -> bool:
    if a is None or b is None or isinstance(a, int) or isinstance(b, int):
        return a == b and type(a) is type(b)
    assert isinstance(a, SharingError) and isinstance(b, SharingError)
    return type(a) is type(b) and str(a) == str(b) and a.fields == b.fields


# A batch item refers to a page by number (the last three are a missing domain
# and gfns outside the domain) and to a handle by (kind, index): kind 0-6 the
# page's handle now, 7-8 some handle ever handed out (often stale), 9 a raw
# integer (0, negative, beyond 64 bits).
BAD_PAGES = [(DOMAINS, 0), (0, PAGES), (0, -1)]
page_ref = st.integers(0, DOMAINS * PAGES + len(BAD_PAGES) - 1)
handle_ref = st.tuples(st.integers(0, 9), st.integers(0, 50))
RAW_HANDLES = [0, -1, 1, 2**64 + 3]


def resolve(w: World, p: int, h: tuple[int, int]) -> tuple[int, int, int]:
    if p < DOMAINS * PAGES:
        d, g = w.doms[p // PAGES], p % PAGES
    else:
        di, g = BAD_PAGES[p - DOMAINS * PAGES]
        d = w.doms[di] if di < DOMAINS else 999
    kind, i = h
    if kind <= 6:
        try:
            handle = w.mgr.handle_of(d, g)
        except SharingError:
            handle = None
        return d, g, handle if handle is not None else 7
    if kind <= 8 and w.seen:
        return d, g, w.seen[i % len(w.seen)][2]
    return d, g, RAW_HANDLES[i % len(RAW_HANDLES)]


def build_pairs(w: World, items: list[Any]) -> list[SharePair]:
    return [(*resolve(w, sp, sh), *resolve(w, cp, ch)) for sp, sh, cp, ch in items]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step, max_size=30),
    items=st.lists(st.tuples(page_ref, handle_ref, page_ref, handle_ref), min_size=3, max_size=30),
    chunk=st.integers(1, 9),
    plain=st.booleans(),
    nominate_all=st.booleans(),
    closed=st.none() | st.integers(0, DOMAINS - 1),
)
def test_share_many_equals_sequential_share(
    steps: list[Any],
    items: list[Any],
    chunk: int,
    plain: bool,
    nominate_all: bool,
    closed: int | None,
) -> None:
    batch = World(steps, plain, nominate_all, closed)
    single = World(steps, plain, nominate_all, closed)
    assert batch.state() == single.state()
    pairs = build_pairs(batch, items)
    assert pairs == build_pairs(single, items)
    got = batch.mgr.share_many(pairs, chunk=chunk)
    want: list[SharingError | None] = []
    for p in pairs:
        try:
            single.mgr.share(*p)
        except SharingError as err:
            want.append(err)
        else:
            want.append(None)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert same_outcome(g, w), (g, w)
    assert batch.state() == single.state()
    for world in (batch, single):
        report = world.mgr.audit()
        assert report.clean, report.to_dict()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step, max_size=30),
    di=st.integers(0, DOMAINS),
    gfns=st.lists(st.integers(-1, PAGES), max_size=12),
    chunk=st.integers(1, 9),
    plain=st.booleans(),
    dying=st.booleans(),
)
def test_nominate_many_equals_sequential_nominate(
    steps: list[Any], di: int, gfns: list[int], chunk: int, plain: bool, dying: bool
) -> None:
    batch, single = World(steps, plain), World(steps, plain)
    d = batch.doms[di] if di < DOMAINS else 999
    if dying and di < DOMAINS:
        for w in (batch, single):
            w.mgr.teardown_step(d, budget=1)
    got = batch.mgr.nominate_many(d, gfns, chunk=chunk)
    want: list[int | SharingError] = []
    for g in gfns:
        try:
            want.append(single.mgr.nominate(d, g))
        except SharingError as err:
            want.append(err)
    for g_, w_ in zip(got, want, strict=True):
        assert same_outcome(g_, w_), (g_, w_)
    assert batch.state() == single.state()
    assert batch.mgr.audit().clean


def test_batch_dependencies_by_example(machine: SimMachine, mgr: SharingManager) -> None:
    """The cases the fast path must hand to the single-pair code, spelled out."""
    a, b = machine.create_domain(4), machine.create_domain(4)
    for d in (a, b):
        for g in range(3):
            machine.write(d, g, CONTENTS[1])
    machine.write(b, 3, CONTENTS[2])
    ha = mgr.nominate_many(a, [0, 1, 2, 0])
    hb = mgr.nominate_many(b, [0, 1, 3])
    assert ha[0] == ha[3]  # the same gfn twice: the record made by the first
    assert all(isinstance(h, int) for h in ha + hb)
    h: list[int] = [int(x) for x in ha + hb]  # type: ignore[arg-type]
    results = mgr.share_many(
        [
            (a, 0, h[0], b, 0, h[4]),  # merge b0 into a0
            (a, 0, h[0], b, 0, h[4]),  # b0 was merged: its old handle is stale now
            (a, 0, h[0], b, 0, h[0]),  # ... and the source's handle is current: no-op
            (b, 0, h[0], a, 1, h[1]),  # b0 as source, moved by the first pair: merge a1
            (a, 1, h[0], a, 2, h[2]),  # a1 was merged too
            (a, 2, h[2], b, 3, h[6]),  # a2 was merged by the previous pair: h[2] is gone
            (a, 2, h[0], b, 3, h[6]),  # different bytes
            (a, 2, h[0], a, 0, h[0]),  # both on one frame already
            (a, 9, h[0], a, 2, h[0]),  # no such gfn
            (a, 2, h[0], b, 1, 0),  # handle 0 is never current
        ]
    )
    kinds = [None if r is None else type(r).__name__ for r in results]
    assert kinds == [
        None,
        "StaleClientHandle",
        None,
        None,
        None,
        "StaleSourceHandle",
        "ContentMismatch",
        None,
        "NoSuchDomain",
        "StaleClientHandle",
    ]
    f = machine.lookup(a, 0)[0]
    assert {machine.lookup(d, g)[0] for d, g in [(a, 0), (b, 0), (a, 1), (a, 2)]} == {f}
    assert sorted(mgr.gfns_of(f)) == sorted([(a, 0), (b, 0), (a, 1), (a, 2)])
    assert isinstance(results[6], ContentMismatch)
    assert mgr.audit().clean


# --- threads -------------------------------------------------------------------------------


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_switching")
def test_share_many_against_guest_writers() -> None:
    """Batch sharers and guest writers at once: no write ever lands in a shared
    frame (every page reads back its last write), and the audit stays clean."""
    n = 48
    m = SimMachine(2 * n + 8)
    mgr = SharingManager(m, cross_domain_default=True)
    doms = [m.create_domain(n), m.create_domain(n)]
    pages = [(d, g) for d in doms for g in range(n)]
    model = {p: CONTENTS[0] for p in pages}
    failures: list[BaseException] = []
    stop = threading.Event()
    counts = {"merged": 0, "refused": 0, "writes": 0}

    def run(body: Callable[[random.Random], None], seed: int) -> Callable[[], None]:
        def loop() -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    body(rng)
            except BaseException as err:  # reported by the main thread
                failures.append(err)

        return loop

    def writer(mine: list[tuple[int, int]]) -> Callable[[random.Random], None]:
        def body(rng: random.Random) -> None:
            d, g = rng.choice(mine)
            data = CONTENTS[rng.randrange(3)]
            try:
                m.write(d, g, data)
            except OutOfFrames:
                return
            model[(d, g)] = data
            counts["writes"] += 1
            assert m.read(d, g) == model[(d, g)]

        return body

    def sharer(rng: random.Random) -> None:
        handles: dict[tuple[int, int], int] = {}
        for d in doms:
            gfns = rng.sample(range(n), n // 2)
            for g, h in zip(gfns, mgr.nominate_many(d, gfns), strict=True):
                if isinstance(h, int):
                    handles[(d, g)] = h
        keys = list(handles)
        pairs = [
            (*s, handles[s], *c, handles[c])
            for s, c in (rng.sample(keys, 2) for _ in range(64))
            if len(keys) >= 2
        ]
        for r in mgr.share_many(pairs, chunk=rng.choice([1, 7, 64])):
            if r is None:
                counts["merged"] += 1
            else:
                assert isinstance(r, SharingError)
                counts["refused"] += 1
        if rng.random() < 0.2:
            d, g = rng.choice(pages)
            with contextlib.suppress(OutOfFrames):
                mgr.unshare(d, g)

    half = len(pages) // 2
    threads = [
        threading.Thread(target=run(writer(pages[:half]), 1)),
        threading.Thread(target=run(writer(pages[half:]), 2)),
        threading.Thread(target=run(sharer, 3)),
        threading.Thread(target=run(sharer, 4)),
    ]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert not failures, failures[0]
    assert counts["merged"] > 0 and counts["refused"] > 0 and counts["writes"] > 0
    report = mgr.audit()
    assert report.clean, report.to_dict()
    for (d, g), data in model.items():
        assert m.read(d, g) == data
        assert m.lookup(d, g)[1] in (PageType.RAM, PageType.SHARED)
