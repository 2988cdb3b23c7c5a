"""Concurrency: sharers, a scanner and guest writers on one machine at once.

Writers own disjoint pages and check every read-back; sharers and the scanner
merge whatever looks equal.  At the end the audit must be clean and every page
must hold its owner's last write.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from hypervisor.simmachine import SimMachine
from memd.errors import OutOfFrames, SharingError
from sharing.manager import SharingManager
from sharing.scanner import Scanner
from tests.sharing.sharing_helpers import page

CONTENTS = [page(bytes([v])) for v in range(4)]
PAGES = 64
RUN_SECONDS = 1.5


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many more thread interleavings per second
    yield
    sys.setswitchinterval(old)


def test_concurrent_sharers_and_writers() -> None:
    m = SimMachine(2 * PAGES + 8)
    mgr = SharingManager(m, cross_domain_default=True)
    doms = [m.create_domain(PAGES), m.create_domain(PAGES)]
    pages = [(d, g) for d in doms for g in range(PAGES)]
    model = {p: CONTENTS[0] for p in pages}
    failures: list[BaseException] = []
    stop = threading.Event()
    counts = {"shares": 0, "writes": 0}

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
            data = CONTENTS[rng.randrange(4)]
            try:
                m.write(d, g, data)
            except OutOfFrames:
                pass
            else:
                model[(d, g)] = data
                counts["writes"] += 1
            assert m.read(d, g) == model[(d, g)]

        return body

    def sharer(rng: random.Random) -> None:
        (sd, sg), (cd, cg) = rng.sample(pages, 2)
        try:
            sh, ch = mgr.nominate(sd, sg), mgr.nominate(cd, cg)
            mgr.share(sd, sg, sh, cd, cg, ch)
            counts["shares"] += 1
        except (SharingError, OutOfFrames):
            pass  # stale (a writer got there first) or different bytes
        if rng.random() < 0.1:
            d, g = rng.choice(pages)
            with contextlib.suppress(OutOfFrames):
                mgr.unshare(d, g)

    scanner = Scanner(mgr, batch_pages=16)
    for d in doms:
        scanner.enable(d)

    def scan(rng: random.Random) -> None:
        scanner.scan()
        time.sleep(0.005)

    half = len(pages) // 2
    threads = [
        threading.Thread(target=run(writer(pages[:half]), 1)),
        threading.Thread(target=run(writer(pages[half:]), 2)),
        threading.Thread(target=run(sharer, 3)),
        threading.Thread(target=run(sharer, 4)),
        threading.Thread(target=run(scan, 5)),
    ]
    for t in threads:
        t.start()
    time.sleep(RUN_SECONDS)
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert not failures, failures[0]
    assert counts["shares"] > 0 and counts["writes"] > 0
    report = mgr.audit()
    assert report.clean, report.to_dict()
    for (d, g), data in model.items():
        assert m.read(d, g) == data
