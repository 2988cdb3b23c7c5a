"""TmemHost with a PersistentLog: memory and committed store stay equal, and a host
rebuilt from the store after a crash at any point has every committed persistent page."""

from __future__ import annotations

import threading
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memd.errors import NoSpace
from tests.tmem.conftest import OID, random_page, text_page
from tests.tmem.fake_log import FakeLog
from tmem.audit import audit_log
from tmem.durable import EXTERNAL_SCOPE
from tmem.host import TmemHost
from tmem.types import PAGE_SIZE, PoolFlag

P = int(PoolFlag.PERSISTENT)


def reopen(log: FakeLog, budget: int = 64 << 20) -> tuple[TmemHost, FakeLog, list[str]]:
    """What a restarted agent has: a new host rebuilt from what was committed."""
    crashed = log.crashed()
    host = TmemHost(budget_bytes=budget, log=crashed)
    findings = host.restore(crashed.load())
    return host, crashed, findings


def test_restart_brings_back_pools_pages_settings_and_meta() -> None:
    log = FakeLog()
    old = TmemHost(budget_bytes=64 << 20, log=log)
    key = uuid.uuid4().bytes
    old.open_session("vm1", cap_pages=5000, dedup=True, meta={"boot_id": "aa"}, reset=False)
    old.add_client("vm2", weight=300)
    for vm in ("vm1", "vm2"):
        old.authorize_shared(vm, key)
    eph = old.new_pool("vm1", 0)
    pers = old.new_pool("vm1", P)
    old.destroy_pool("vm1", eph)  # a hole: pool ids must come back as they were
    eph2 = old.new_pool("vm1", 0)
    shared = old.new_pool("vm1", int(PoolFlag.SHARED), key)
    old.new_pool("vm2", P)
    old.new_pool("vm2", int(PoolFlag.SHARED), key)
    pages = {i: (text_page(i % 40) if i % 3 else random_page()) for i in range(200)}
    pages[7] = bytes(PAGE_SIZE)
    old.put_batch("vm1", pers, [(OID, i) for i in range(100)], [pages[i] for i in range(100)])
    for i in range(100, 200):
        old.put("vm1", pers, OID, i, pages[i])
        old.put("vm1", eph2, OID, i, pages[i])
    old.put("vm1", pers, OID, 5, text_page(999))  # overwrite
    pages[5] = text_page(999)
    assert old.flush_page("vm1", pers, OID, 6)
    del pages[6]
    old.put("vm1", pers, (9, 9, 9), 1, text_page(1))
    assert old.flush_object("vm1", pers, (9, 9, 9)) == 1
    old.put("vm2", 0, (9, 9, 9), 1, text_page(1))  # dedup opt-out: its own blob
    old.freeze("vm2")
    assert old.audit() == []
    assert log.pending == []  # every operation committed before returning

    new, _, findings = reopen(log)
    assert findings == []
    assert new.pool_ids("vm1") == old.pool_ids("vm1")
    assert new.pool_ids("vm2") == old.pool_ids("vm2")
    for i, page in pages.items():
        assert new.get("vm1", pers, OID, i) == page
    assert new.get("vm1", pers, OID, 6) is None
    assert new.get("vm1", pers, (9, 9, 9), 1) is None
    assert new.get("vm2", 0, (9, 9, 9), 1) == text_page(1)
    assert new.get("vm1", eph2, OID, 150) is None  # ephemeral pages may vanish
    assert new.client_meta("vm1") == {"boot_id": "aa"}
    vm1, vm2 = new.client_stats()
    assert (vm1.cap_pages, vm1.dedup, vm2.weight, vm2.frozen) == (5000, True, 300, True)
    assert vm1.persistent_pages == len(pages)
    assert new.pool_stats("vm1")[shared].shared
    assert new.audit() == []
    # Counters recomputed from the records equal the live host's.
    assert [p.to_dict()["pages"] for p in new.pool_stats()] == [
        p.to_dict()["pages"] if p.kind == "persistent" else 0 for p in old.pool_stats()
    ]
    # The new host keeps working (fresh blob ids do not collide with restored ones).
    new.thaw("vm2")
    new.put("vm2", 0, (1, 1, 1), 0, text_page(5000))
    new.put("vm1", pers, OID, 500, random_page())
    assert new.audit() == []


def test_reboot_drops_pools_and_records_the_boot_id_in_one_commit() -> None:
    log = FakeLog()
    host = TmemHost(log=log)
    host.open_session("g", cap_pages=None, dedup=False, meta={"boot_id": "A"}, reset=False)
    pool = host.new_pool("g", P)
    host.put("g", pool, OID, 0, text_page(1))
    before = log.commits
    assert (
        host.open_session("g", cap_pages=None, dedup=False, meta={"boot_id": "B"}, reset=True) == 1
    )
    assert log.commits == before + 1
    new, _, _ = reopen(log)
    assert new.client_meta("g") == {"boot_id": "B"} and new.pool_ids("g") == []
    assert new.audit() == []


def test_deferred_commits_once_at_the_end_and_other_threads_still_commit() -> None:
    log = FakeLog()
    host = TmemHost(log=log)
    host.add_client("g")
    pool = host.new_pool("g", P)
    before = log.commits
    with host.deferred():
        for i in range(10):
            host.put("g", pool, OID, i, text_page(i))
        assert log.commits == before and log.pending
        assert host.get("g", pool, OID, 3) == text_page(3)  # read from the pending write
        crashed, _, _ = reopen(log)
        assert crashed.get("g", pool, OID, 3) is None  # not committed: not promised
        other = threading.Thread(target=host.put, args=("g", pool, OID, 99, text_page(99)))
        other.start()
        other.join()
        assert log.commits == before + 1 and not log.pending  # its put committed ours too
        host.put("g", pool, OID, 100, text_page(100))
    assert log.commits == before + 2 and not log.pending
    assert host.audit() == []


def test_persistent_blobs_live_only_in_the_log_and_count_toward_the_budget() -> None:
    log = FakeLog()
    host = TmemHost(budget_bytes=1 << 20, log=log)
    host.add_client("g")
    pool = host.new_pool("g", P)
    eph = host.new_pool("g", 0)
    page = text_page(3)
    host.put("g", pool, OID, 0, page)
    host.put("g", eph, OID, 0, page)  # same bytes, but never the same blob
    assert host.store_stats().unique_blobs == 2
    assert host._state.store.arena.used_bytes < PAGE_SIZE  # only the ephemeral copy is in RAM
    assert all(scope & EXTERNAL_SCOPE for _, _, scope, _ in log.load().blobs.tolist())
    with pytest.raises(NoSpace):
        for i in range(1, 1000):
            host.put("g", pool, OID, i, random_page())
    assert host.store_stats().used_bytes <= 1 << 20
    assert host.audit() == []


def test_restore_drops_records_it_cannot_use() -> None:
    log = FakeLog()
    host = TmemHost(log=log)
    host.add_client("g")
    pool = host.new_pool("g", P)
    host.put("g", pool, OID, 0, text_page(1))
    host.put("g", pool, OID, 1, text_page(2))
    (blob, *_), _ = log.load().blobs.tolist()
    del log.blobs[blob]  # a page now points at a blob that is gone
    log.blobs[12345] = (1, EXTERNAL_SCOPE | 1, b"orphan")  # a blob nobody references
    new, newlog, findings = reopen(log)
    assert len(findings) == 1 and "blob" in findings[0]  # the orphan goes silently
    newlog.commit()
    assert 12345 not in newlog.blobs
    assert sorted(p is None for p in (new.get("g", pool, OID, 0), new.get("g", pool, OID, 1))) == [
        False,
        True,
    ]
    newlog.commit()
    assert new.audit() == []


def test_audit_reports_a_store_that_differs_from_memory() -> None:
    log = FakeLog()
    host = TmemHost(log=log)
    host.add_client("g")
    pool = host.new_pool("g", P)
    host.put("g", pool, OID, 0, text_page(1))
    key = next(iter(log.chunks))
    del log.chunks[key]
    with host._lock:
        issues = audit_log(host._state, log.load())
    assert any("is missing" in i for i in issues)


class DurableMachine(RuleBasedStateMachine):
    """Random operations; at any point the committed store rebuilds an equal host."""

    def __init__(self) -> None:
        super().__init__()
        self.log = FakeLog()
        self.host = TmemHost(budget_bytes=2 << 20, log=self.log)
        for vm in ("a", "b"):
            self.host.open_session(
                vm, cap_pages=300, dedup=vm == "a", meta={"boot": 0}, reset=False
            )
        self.pools = {
            "a": [self.host.new_pool("a", P), self.host.new_pool("a", 0)],
            "b": [self.host.new_pool("b", P)],
        }
        self.model: dict[tuple[str, int, int, int], bytes] = {}  # acknowledged pages

    vms = st.sampled_from(["a", "b"])
    idx = st.integers(0, 40)
    content = st.integers(0, 30)

    def _persistent(self, vm: str) -> int | None:
        for pool in self.pools[vm]:
            if any(p == pool and f & P for p, f in self.host.pool_ids(vm)):
                return pool
        return None

    @rule(vm=vms, obj=st.integers(0, 3), index=idx, c=content)
    def put(self, vm: str, obj: int, index: int, c: int) -> None:
        pool = self._persistent(vm)
        if pool is None:
            return
        page = bytes(PAGE_SIZE) if c == 0 else text_page(c)
        key = (vm, pool, obj, index)
        try:
            self.host.put(vm, pool, (obj, 0, 0), index, page)
            self.model[key] = page
        except NoSpace:
            self.model.pop(key, None)  # a failed put flushes the old page

    @rule(vm=vms, obj=st.integers(0, 3), start=idx, c=content)
    def put_batch(self, vm: str, obj: int, start: int, c: int) -> None:
        pool = self._persistent(vm)
        if pool is None:
            return
        handles = [((obj, 0, 0), i) for i in range(start, start + 8)]
        pages = [text_page(c + i) for i in range(8)]
        for (o, i), page, err in zip(
            handles, pages, self.host.put_batch(vm, pool, handles, pages), strict=True
        ):
            key = (vm, pool, o[0], i)
            if err is None:
                self.model[key] = page
            else:
                self.model.pop(key, None)

    @rule(vm=vms, obj=st.integers(0, 3), index=idx)
    def flush_page(self, vm: str, obj: int, index: int) -> None:
        pool = self._persistent(vm)
        if pool is not None:
            self.host.flush_page(vm, pool, (obj, 0, 0), index)
            self.model.pop((vm, pool, obj, index), None)

    @rule(vm=vms, obj=st.integers(0, 3))
    def flush_object(self, vm: str, obj: int) -> None:
        pool = self._persistent(vm)
        if pool is not None:
            self.host.flush_object(vm, pool, (obj, 0, 0))
            self.model = {k: v for k, v in self.model.items() if k[:3] != (vm, pool, obj)}

    @precondition(lambda self: self._persistent("b") is not None)
    @rule()
    def destroy_pool(self) -> None:
        pool = self._persistent("b")
        assert pool is not None
        self.host.destroy_pool("b", pool)
        self.model = {k: v for k, v in self.model.items() if k[0] != "b"}

    @rule(vm=vms)
    def reboot(self, vm: str) -> None:
        self.host.open_session(vm, cap_pages=300, dedup=vm == "a", meta={"boot": 1}, reset=True)
        self.model = {k: v for k, v in self.model.items() if k[0] != vm}
        self.pools[vm] = [self.host.new_pool(vm, P)]

    @rule()
    def crash_and_restart(self) -> None:
        self.host, self.log, findings = reopen(self.log, budget=2 << 20)
        assert findings == []

    @invariant()
    def store_equals_memory_and_model(self) -> None:
        assert self.host.audit() == []
        for (vm, pool, obj, index), page in self.model.items():
            assert self.host.get(vm, pool, (obj, 0, 0), index) == page
        persistent = sum(c.persistent_pages for c in self.host.client_stats())
        assert persistent == len(self.model)


TestDurableMachine = DurableMachine.TestCase
TestDurableMachine.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
