"""LmdbStore under a real TmemHost: reopen equals memory, the budget bounds the file,
freed space is reused, and random operations with reopens in between stay consistent."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from hypervisor.lmdb_store import LmdbStore, blob_cost, map_size_for
from memd.errors import BackendError, NoSpace
from tests.tmem.conftest import OID, random_page, text_page
from tests.tmem.test_durable import DurableMachine
from tmem.host import TmemHost
from tmem.types import PAGE_SIZE, PoolFlag

P = int(PoolFlag.PERSISTENT)


def open_host(path: Path, budget: int = 32 << 20) -> tuple[TmemHost, LmdbStore, list[str]]:
    store = LmdbStore(path, budget_bytes=budget)
    host = TmemHost(budget_bytes=budget, log=store)
    return host, store, host.restore(store.load())


def test_reopen_brings_back_exactly_what_was_committed(tmp_path: Path) -> None:
    host, store, _ = open_host(tmp_path)
    host.open_session("a", cap_pages=None, dedup=True, meta={"boot_id": "01"}, reset=False)
    host.open_session("b", cap_pages=100, dedup=False, meta={"boot_id": "02"}, reset=False)
    pa, pb = host.new_pool("a", P), host.new_pool("b", P)
    eph = host.new_pool("a", 0)
    pages = [text_page(i % 50) if i % 4 else random_page() for i in range(300)]
    pages[3] = bytes(PAGE_SIZE)
    host.put_batch("a", pa, [(OID, i) for i in range(64)], pages[:64])
    for i in range(64, 300):
        host.put("a", pa, OID, i, pages[i])
    host.put_batch("b", pb, [((5, 5, 5), i) for i in range(50)], pages[:50])
    host.put("a", eph, OID, 0, pages[1])
    host.flush_page("a", pa, OID, 10)
    host.flush_object("b", pb, (5, 5, 5))
    host.put("b", pb, (6, 6, 6), 0, pages[20])
    assert host.audit() == []
    store.close()

    new, store, findings = open_host(tmp_path)
    assert findings == []
    for i, page in enumerate(pages):
        assert new.get("a", pa, OID, i) == (None if i == 10 else page)
    assert new.get("b", pb, (5, 5, 5), 0) is None
    assert new.get("b", pb, (6, 6, 6), 0) == pages[20]
    assert new.pool_ids("a") == [(pa, P), (eph, 0)]
    assert new.client_meta("b") == {"boot_id": "02"}
    assert new.audit() == []
    store.close()


def test_the_file_stays_within_budget_plus_slack_and_reuses_freed_space(tmp_path: Path) -> None:
    budget = 8 << 20
    host, store, _ = open_host(tmp_path, budget)
    host.add_client("g")
    pool = host.new_pool("g", P)
    written = 0
    with pytest.raises(NoSpace):
        for i in range(100_000):
            host.put("g", pool, OID, i, random_page() if i % 2 else text_page(i))
            written = i + 1
    used = host.store_stats().used_bytes
    assert used <= budget + 16 * 4096 and store.bytes_used() > 0.7 * budget
    high = store.file_bytes()
    assert high <= budget + map_size_for(0)
    for cycle in range(5):  # churn: flush everything, fill again with other content
        host.flush_object("g", pool, OID)
        stored = 0
        for i in range(written):
            try:
                host.put("g", pool, OID, i, text_page(i + cycle) if i % 2 else random_page())
            except NoSpace:
                continue
            stored += 1
        # B+tree pages filled in another order hold a little less; never much.
        assert stored >= 0.8 * written
        # A put is admitted on an estimate; the commit may then split a B+tree page:
        # the store can end a few database pages above the budget (docs/tmem.md).
        assert host.store_stats().used_bytes <= budget + 16 * 4096
    assert store.file_bytes() <= max(high * 1.1, budget + map_size_for(0))
    assert host.audit() == []
    store.close()


def test_budget_change_resizes_the_map(tmp_path: Path) -> None:
    host, store, _ = open_host(tmp_path, 8 << 20)
    host.set_budget(256 << 20)
    assert store.env.info()["map_size"] == map_size_for(256 << 20)
    host.set_budget(1 << 20)  # never below what the file already spans
    assert store.env.info()["map_size"] >= store.file_bytes()
    store.close()


def test_blob_cost_counts_overflow_pages() -> None:
    assert blob_cost(100) < 200
    assert blob_cost(3000) == 4096
    assert blob_cost(PAGE_SIZE) == 2 * 4096  # a raw page plus its header overflows one page


def test_concurrent_writers_share_the_store_consistently(tmp_path: Path) -> None:
    host, store, _ = open_host(tmp_path)
    names = [f"g{i}" for i in range(4)]
    for n in names:
        host.add_client(n)
        host.new_pool(n, P)
    errors: list[BaseException] = []

    def work(n: str) -> None:
        try:
            for i in range(200):
                host.put(n, 0, OID, i % 50, text_page(i))
                assert host.get(n, 0, OID, i % 50) == text_page(i)
                if i % 7 == 0:
                    host.flush_page(n, 0, OID, (i * 3) % 50)
        except BaseException as err:  # report in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and host.audit() == []
    expected = {n: [host.get(n, 0, OID, i) for i in range(50)] for n in names}
    store.close()
    new, store, _ = open_host(tmp_path)
    assert {n: [new.get(n, 0, OID, i) for i in range(50)] for n in names} == expected
    store.close()


class LmdbMachine(DurableMachine):
    """The FakeLog state machine on LMDB; a "crash" closes and reopens the directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="memd-lmdb-sm-"))
        self.store = LmdbStore(self.dir, budget_bytes=2 << 20)
        super().__init__()
        self.restarts = 0
        self.host = TmemHost(budget_bytes=2 << 20, log=self.store)
        for vm in ("a", "b"):
            self.host.open_session(
                vm, cap_pages=300, dedup=vm == "a", meta={"boot": 0}, reset=False
            )
        self.pools = {
            "a": [self.host.new_pool("a", P), self.host.new_pool("a", 0)],
            "b": [self.host.new_pool("b", P)],
        }

    @rule()
    def crash_and_restart(self) -> None:
        self.store.close()
        self.host, self.store, findings = open_host(self.dir, 2 << 20)
        assert findings == []
        self.restarts += 1

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestLmdbMachine = LmdbMachine.TestCase
TestLmdbMachine.settings = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_store_directory_is_private(tmp_path: Path) -> None:
    _, store, _ = open_host(tmp_path / "s")
    assert os.stat(tmp_path / "s").st_mode & 0o777 == 0o700
    store.close()


def test_a_key_below_one_stored_out_of_order_is_never_lost(tmp_path: Path) -> None:
    """Regression (found by the kill test): a blob id put after a higher one in the same
    commit, then freed and reused, was appended — and LMDB silently refuses an append
    below the last key."""
    store = LmdbStore(tmp_path, budget_bytes=8 << 20)
    store.put_blob(250, 1, 1 << 31, b"a" * 100)
    store.put_blob(197, 2, 1 << 31, b"b" * 100)
    store.commit()
    store.drop_blob(197)
    store.commit()
    store.put_blob(197, 3, 1 << 31, b"c" * 100)
    store.commit()
    assert sorted(b for b, *_ in store.load().blobs.tolist()) == [197, 250]
    assert store.payload(197) == b"c" * 100
    store.close()


def test_payloads_reads_committed_and_buffered_blobs_like_payload(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, budget_bytes=8 << 20)
    committed = {b: os.urandom(b * 37 % 4096 + 1) for b in range(1, 40)}
    for blob, data in committed.items():
        store.put_blob(blob, blob, 1 << 31, data)
    store.commit()
    store.put_blob(40, 40, 1 << 31, b"pending" * 10)  # not committed yet
    store.drop_blob(3)  # dropped but not committed: still readable until then
    wanted = [5, 40, 5, 1, 39, 3]
    got = store.payloads(wanted)
    assert got == [store.payload(b) for b in wanted]
    assert got[:2] == [committed[5], b"pending" * 10]
    assert all(type(p) is bytes for p in got)  # copies, not views into the map
    store.commit()
    assert got[0] == committed[5]  # and they outlive the read transaction
    with pytest.raises(BackendError):
        store.payloads([1, 3])
    store.close()


def test_a_full_map_grows_up_to_its_ceiling_then_says_no_space(tmp_path: Path) -> None:
    """The host's budget check keeps the store inside its map; should an estimate be
    wrong, a commit grows the map (replaying the transaction) up to 2 × budget + slack,
    and past that fails with NoSpace, the writes still pending."""
    budget = 4 << 20
    store = LmdbStore(tmp_path, budget_bytes=budget)
    start = store.env.info()["map_size"]
    payload = os.urandom(3000)  # one overflow page each
    blob = 0
    for _ in range(40):  # 40 × 512 pages × 4 KiB = 80 MiB > map_size_for(4 MiB)
        for _ in range(512):
            blob += 1
            store.put_blob(blob, blob, 1 << 31, payload)
        try:
            store.commit()
        except NoSpace:
            break
    else:
        raise AssertionError("the map never filled")
    grown = store.env.info()["map_size"]
    assert start < grown <= 2 * budget + map_size_for(0)
    assert store.file_bytes() <= grown
    kept = len(store.load().blobs)
    assert 0 < kept < blob  # everything committed before the failure is there
    store.close()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, (1 << 32) - 1),
            st.integers(0, (1 << 64) - 1),
            st.integers(0, (1 << 26) - 1),
            st.sets(st.integers(0, 63), min_size=1, max_size=64),
        ),
        max_size=12,
        unique_by=lambda r: (r[0], r[1], r[2]),
    )
)
def test_chunk_records_round_trip(chunks: list[tuple[int, int, int, set[int]]]) -> None:
    """Any chunk (extreme gids, oids and indexes too) reads back as exactly its pages."""
    with tempfile.TemporaryDirectory(prefix="memd-chunks-") as where:
        store = LmdbStore(where, budget_bytes=8 << 20)
        want = set()
        for gid, oid0, chunk, bits in chunks:
            entries = [(chunk * 64 + b, (gid + b) % 1000 + 1) for b in sorted(bits)]
            store.put_chunk(gid, (oid0, 7, (1 << 64) - 1), chunk, entries)
            want |= {(gid, oid0, 7, (1 << 64) - 1, i, blob) for i, blob in entries}
        store.commit()
        pages = store.load().pages.tolist()
        assert pages == sorted(pages) and set(pages) == want and len(pages) == len(want)
        store.close()


def test_agent_meta_writes_and_host_commits_interleave_safely(tmp_path: Path) -> None:
    """The agent writes its own records (put_meta, store lock only) while guests' puts
    commit (host lock, then store lock): both end up stored."""
    host, store, _ = open_host(tmp_path)
    host.add_client("g")
    pool = host.new_pool("g", P)
    errors: list[BaseException] = []

    def puts() -> None:
        try:
            for i in range(300):
                host.put("g", pool, OID, i, text_page(i))
        except BaseException as err:
            errors.append(err)

    def metas() -> None:
        try:
            for i in range(300):
                store.put_meta("opted_out", [f"vm{i}"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=puts), threading.Thread(target=metas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.close()
    new, store, _ = open_host(tmp_path)
    assert store.meta()["opted_out"] == ["vm299"]
    assert all(new.get("g", pool, OID, i) == text_page(i) for i in range(300))
    assert new.audit() == []
    store.close()
