"""One test per tmem rule (design notes, "tmem semantics")."""

from __future__ import annotations

import uuid

import pytest

from memd.errors import (
    AccessDenied,
    ClientFrozen,
    InvalidArgument,
    NoSpace,
    NoSuchClient,
    NoSuchPool,
)
from tests.tmem.conftest import OID, random_page, text_page
from tmem.host import TmemHost
from tmem.types import MAX_POOLS_PER_CLIENT, PAGE_SIZE, PoolFlag

EPH, PERS, SHARED = PoolFlag.EPHEMERAL, PoolFlag.PERSISTENT, PoolFlag.SHARED


@pytest.mark.parametrize(
    "page",
    [bytes(PAGE_SIZE), text_page(1), random_page()],
    ids=["zero", "compressible", "incompressible"],
)
def test_put_get_round_trip_every_page_kind(host: TmemHost, page: bytes) -> None:
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 7, page)
    assert host.get("vm1", pool, OID, 7) == page
    assert host.audit() == []


def test_private_ephemeral_get_is_exclusive(host: TmemHost) -> None:
    pool = host.new_pool("vm1", EPH)
    host.put("vm1", pool, OID, 0, text_page(2))
    assert host.get("vm1", pool, OID, 0) == text_page(2)
    assert host.get("vm1", pool, OID, 0) is None
    assert host.store_stats().pages == 0


def test_persistent_get_leaves_the_page(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 0, text_page(3))
    for _ in range(3):
        assert host.get("vm1", pool, OID, 0) == text_page(3)


def test_duplicate_put_replaces_old_data(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 0, text_page(4))
    host.put("vm1", pool, OID, 0, text_page(5))
    assert host.get("vm1", pool, OID, 0) == text_page(5)
    stats = host.pool_stats("vm1")[0]
    assert (stats.pages, stats.dup_puts if hasattr(stats, "dup_puts") else stats.ops.dup_puts) == (
        1,
        1,
    )


def test_failed_duplicate_put_flushes_the_old_page() -> None:
    host = TmemHost(budget_bytes=1 << 20)
    host.add_client("vm1")
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 0, text_page(6))
    host.set_budget(0)  # persistent pages stay, but nothing new fits
    with pytest.raises(NoSpace):
        host.put("vm1", pool, OID, 0, random_page())
    assert host.get("vm1", pool, OID, 0) is None  # never the stale text_page(6)
    assert host.audit() == []


def test_failed_duplicate_put_on_frozen_client_flushes_too(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 0, text_page(7))
    host.freeze("vm1")
    with pytest.raises(ClientFrozen):
        host.put("vm1", pool, OID, 0, text_page(8))
    assert host.get("vm1", pool, OID, 0) is None


def test_a_miss_keeps_missing_until_the_next_put(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 1, text_page(9))
    assert host.flush_page("vm1", pool, OID, 1) is True
    for _ in range(3):
        assert host.get("vm1", pool, OID, 1) is None
    host.put("vm1", pool, OID, 1, text_page(10))
    assert host.get("vm1", pool, OID, 1) == text_page(10)


def test_flush_object_and_flush_pool(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    other = (9, 9, 9)
    for i in range(100):
        host.put("vm1", pool, OID, i * 1000, text_page(i))
        host.put("vm1", pool, other, i, text_page(i))
    assert host.flush_object("vm1", pool, OID) == 100
    assert host.get("vm1", pool, OID, 5000) is None
    assert host.get("vm1", pool, other, 5) == text_page(5)
    assert host.flush_pool("vm1", pool) == 100
    assert host.pool_ids("vm1") == [(pool, int(PERS))]  # the pool itself stays
    assert host.store_stats().pages == 0 and host.audit() == []


def test_destroy_pool_frees_everything(host: TmemHost) -> None:
    pool = host.new_pool("vm1", EPH)
    for i in range(50):
        host.put("vm1", pool, OID, i, text_page(i))
    host.destroy_pool("vm1", pool)
    with pytest.raises(NoSuchPool):
        host.get("vm1", pool, OID, 0)
    stats = host.store_stats()
    assert (stats.pages, stats.unique_blobs, stats.data_bytes) == (0, 0, 0)


def test_pool_ids_are_per_client_and_isolated(host: TmemHost) -> None:
    a = host.new_pool("vm1", PERS)
    b = host.new_pool("vm2", PERS)
    assert a == b == 0  # same local id, different pools
    host.put("vm1", a, OID, 0, text_page(11))
    assert host.get("vm2", b, OID, 0) is None
    assert host.flush_object("vm2", b, OID) == 0
    assert host.get("vm1", a, OID, 0) == text_page(11)
    with pytest.raises(NoSuchPool):
        host.get("vm2", 1, OID, 0)


def test_shared_pool_requires_host_authorisation(host: TmemHost) -> None:
    key = uuid.uuid4()
    with pytest.raises(AccessDenied):
        host.new_pool("vm1", SHARED, key)
    assert host.pool_ids("vm1") == []  # refused, not silently made private
    host.authorize_shared("vm1", key)
    host.authorize_shared("vm2", key)
    p1 = host.new_pool("vm1", SHARED, key)
    p2 = host.new_pool("vm2", SHARED, key)
    host.put("vm1", p1, OID, 3, text_page(12))
    assert host.get("vm2", p2, OID, 3) == text_page(12)  # shared get is not exclusive
    assert host.get("vm1", p1, OID, 3) == text_page(12)


def test_shared_persistent_is_refused(host: TmemHost) -> None:
    key = uuid.uuid4()
    host.authorize_shared("vm1", key)
    with pytest.raises(InvalidArgument):
        host.new_pool("vm1", SHARED | PERS, key)


def test_shared_pool_survives_owner_leaving(host: TmemHost) -> None:
    key = uuid.uuid4().bytes
    for vm in ("vm1", "vm2"):
        host.authorize_shared(vm, key)
    p1 = host.new_pool("vm1", SHARED, key)
    p2 = host.new_pool("vm2", SHARED, key)
    host.put("vm1", p1, OID, 0, text_page(13))
    host.destroy_pool("vm1", p1)
    assert host.get("vm2", p2, OID, 0) == text_page(13)
    assert host.client_stats("vm2")[0].ephemeral_pages == 1  # charge moved to vm2
    assert host.audit() == []
    host.destroy_pool("vm2", p2)
    assert host.store_stats().pages == 0


@pytest.mark.parametrize(
    ("oid", "index", "page"),
    [
        ((1, 2), 0, None),
        ((1, 2, -1), 0, None),
        ((1, 2, 1 << 64), 0, None),
        ((1, 2, "3"), 0, None),
        (OID, -1, None),
        (OID, 1 << 32, None),
        (OID, 0, b"short"),
    ],
)
def test_every_field_is_validated(
    host: TmemHost, oid: object, index: object, page: bytes | None
) -> None:
    pool = host.new_pool("vm1", PERS)
    with pytest.raises(InvalidArgument):
        host.put("vm1", pool, oid, index, page or bytes(PAGE_SIZE))  # type: ignore[arg-type]
    assert host.store_stats().pages == 0


def test_bad_pool_ids_flags_and_clients(host: TmemHost) -> None:
    for bad in (-1, MAX_POOLS_PER_CLIENT, 3, "0", None):
        with pytest.raises(NoSuchPool):
            host.get("vm1", bad, OID, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        host.new_pool("vm1", 0x80)
    with pytest.raises(NoSuchClient):
        host.new_pool("nobody", EPH)
    for _ in range(MAX_POOLS_PER_CLIENT):
        host.new_pool("vm1", EPH)
    with pytest.raises(NoSpace):
        host.new_pool("vm1", EPH)


def test_dedup_is_per_client_opt_in(host: TmemHost) -> None:
    page = text_page(14)
    a, b = host.new_pool("vm1", PERS), host.new_pool("vm2", PERS)
    host.put("vm1", a, OID, 0, page)
    host.put("vm2", b, OID, 0, page)
    assert host.store_stats().unique_blobs == 2  # neither opted in: no cross-guest sharing
    host.put("vm1", a, OID, 1, page)
    assert host.store_stats().unique_blobs == 2  # within one client dedup is no side channel
    host.set_dedup("vm1", True)
    host.set_dedup("vm2", True)
    host.put("vm1", a, OID, 2, page)
    host.put("vm2", b, OID, 2, page)
    assert host.store_stats().unique_blobs == 3  # the opted-in copies share one blob
    assert host.get("vm2", b, OID, 2) == page and host.audit() == []


def test_zero_pages_store_no_data(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    for i in range(100):
        host.put("vm1", pool, OID, i, bytes(PAGE_SIZE))
    stats = host.store_stats()
    assert (stats.zero_pages, stats.unique_blobs, stats.data_bytes) == (100, 0, 0)


def test_lowering_the_budget_evicts_lru_ephemeral_first() -> None:
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("vm1")
    eph, pers = host.new_pool("vm1", EPH), host.new_pool("vm1", PERS)
    for i in range(200):
        host.put("vm1", eph, OID, i, text_page(i))
        host.put("vm1", pers, OID, i, text_page(1000 + i))
    before = host.store_stats().used_bytes
    evicted = host.set_budget(before - 50 * 1024)
    assert evicted > 0 and host.store_stats().used_bytes <= before - 50 * 1024
    present = [
        i
        for i in range(200)
        if host.pool_stats("vm1")[0].pages and host.get("vm1", pers, OID, i) == text_page(1000 + i)
    ]
    assert len(present) == 200  # every persistent page survives
    # The oldest ephemeral pages went first: the survivors are a suffix.
    survivors = [i for i in range(200) if host.flush_page("vm1", eph, OID, i)]
    assert survivors == list(range(200 - len(survivors), 200))
    assert host.audit() == []


def test_persistent_put_fails_cleanly_when_full() -> None:
    host = TmemHost(budget_bytes=200 * 1024)
    host.add_client("vm1")
    pool = host.new_pool("vm1", PERS)
    stored = []
    with pytest.raises(NoSpace):
        for i in range(1000):
            host.put("vm1", pool, OID, i, random_page() if i % 2 else text_page(i))
            stored.append(i)
    assert 0 < len(stored) < 1000
    for i in stored:  # every acknowledged persistent page is still readable
        assert host.get("vm1", pool, OID, i) is not None
    assert host.store_stats().used_bytes <= 200 * 1024 and host.audit() == []


def test_eviction_respects_weights() -> None:
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("heavy", weight=300)
    host.add_client("light", weight=100)
    pools = {vm: host.new_pool(vm, EPH) for vm in ("heavy", "light")}
    for i in range(400):
        for vm, pool in pools.items():
            host.put(vm, pool, OID, i, text_page(i * 2 + (vm == "light")))
    host.set_budget(host.store_stats().used_bytes // 2)
    heavy, light = (host.client_stats(vm)[0].ephemeral_pages for vm in ("heavy", "light"))
    assert heavy > 2 * light  # 3:1 weights → ~3:1 share of what is kept
    assert host.audit() == []


def test_shared_pool_get_refreshes_lru(host: TmemHost) -> None:
    key = uuid.uuid4()
    host.authorize_shared("vm1", key)
    pool = host.new_pool("vm1", SHARED, key)
    for i in range(10):
        host.put("vm1", pool, OID, i, text_page(i))
    assert host.get("vm1", pool, OID, 0) is not None  # 0 becomes most recently used
    host.set_budget(host.store_stats().used_bytes - 1)  # evict exactly the LRU page
    assert host.get("vm1", pool, OID, 1) is None
    assert host.get("vm1", pool, OID, 0) == text_page(0)


def test_frozen_client_cannot_put_but_can_get(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 0, text_page(15))
    host.freeze("vm1")
    with pytest.raises(ClientFrozen):
        host.put("vm1", pool, OID, 1, text_page(16))
    assert host.get("vm1", pool, OID, 0) == text_page(15)
    host.thaw("vm1")
    host.put("vm1", pool, OID, 1, text_page(16))


def test_client_cap(host: TmemHost) -> None:
    eph, pers = host.new_pool("vm1", EPH), host.new_pool("vm1", PERS)
    host.set_cap("vm1", 10)
    for i in range(30):
        host.put("vm1", eph, OID, i, text_page(i))  # displaces its own oldest page
    assert host.client_stats("vm1")[0].ephemeral_pages == 10
    assert host.get("vm1", eph, OID, 29) is not None
    host.set_cap("vm1", 0)
    with pytest.raises(NoSpace):
        host.put("vm1", pers, OID, 0, text_page(1))
    assert host.store_stats().pages == 0  # set_cap(0) evicted the ephemeral pages


def test_flush_kib(host: TmemHost) -> None:
    pool = host.new_pool("vm1", EPH)
    for i in range(100):
        host.put("vm1", pool, OID, i, random_page())
    freed = host.flush_kib(40)
    assert freed >= 40 * 1024
    assert 0 < host.client_stats("vm1")[0].ephemeral_pages < 100
    assert host.flush_kib(10_000, client="vm1") > 0
    assert host.client_stats("vm1")[0].ephemeral_pages == 0


def test_statistics_count_every_operation(host: TmemHost) -> None:
    pool = host.new_pool("vm1", EPH)
    page = text_page(17)
    host.put("vm1", pool, OID, 0, page)
    host.put("vm1", pool, OID, 0, page)  # duplicate
    host.put("vm1", pool, OID, 1, bytes(PAGE_SIZE))
    host.get("vm1", pool, OID, 0)  # found, exclusive
    host.get("vm1", pool, OID, 0)  # miss
    host.flush_page("vm1", pool, OID, 1)
    ops = host.pool_stats("vm1")[0].ops
    assert (ops.puts, ops.good_puts, ops.dup_puts) == (3, 3, 1)
    assert (ops.gets, ops.found_gets, ops.flushes) == (2, 1, 1)
    host.put("vm1", pool, OID, 2, page)
    pool_stats = host.pool_stats("vm1")[0]
    assert pool_stats.bytes_raw == PAGE_SIZE and 0 < pool_stats.bytes_stored < PAGE_SIZE
    client = host.client_stats("vm1")[0]
    assert client.ops.puts == 4 and client.ephemeral_pages == 1


def test_batches(host: TmemHost) -> None:
    pool = host.new_pool("vm1", PERS)
    handles = [((5, 5, 5), i) for i in range(64)]
    pages = [text_page(i) for i in range(64)]
    assert host.put_batch("vm1", pool, handles, pages) == [None] * 64
    got = host.get_batch("vm1", pool, [*handles, ((6, 6, 6), 0)])
    assert got == [*pages, None]
    with pytest.raises(InvalidArgument):
        host.put_batch("vm1", pool, handles, pages[:-1])


def test_reset_client_drops_pools_but_keeps_settings(host: TmemHost) -> None:
    host.set_weight("vm1", 250)
    pool = host.new_pool("vm1", PERS)
    host.put("vm1", pool, OID, 0, text_page(18))
    assert host.reset_client("vm1") == 1
    assert host.pool_ids("vm1") == [] and host.store_stats().pages == 0
    assert host.client_stats("vm1")[0].weight == 250
    host.remove_client("vm1")
    assert host.client_names() == ["vm2"]
