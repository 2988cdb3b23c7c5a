"""tmem.migration: one client's persistent state out of one host and into another."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd.errors import InvalidArgument, NoSpace
from tests.tmem.conftest import text_page
from tests.tmem.fake_log import FakeLog
from tmem.host import TmemHost
from tmem.migration import (
    STAGING_PREFIX,
    ChangeFeed,
    ChunkKey,
    Exporter,
    Importer,
    drop_leftovers,
)
from tmem.types import PoolFlag

OIDS = [(1, 0, 0), (2, 0, 0), (0xFFFF_FFFF_FFFF_FFFF, 5, 7)]


def logged_host(budget: int = 64 << 20) -> tuple[TmemHost, ChangeFeed, FakeLog]:
    log, feed = FakeLog(), ChangeFeed()
    return TmemHost(budget_bytes=budget, log=log, listeners=[feed]), feed, log


def feed_of(host: TmemHost) -> ChangeFeed:
    """The ChangeFeed *host* was built with (logged_host)."""
    return next(s for s in host._state.journal._sinks if isinstance(s, ChangeFeed))


def contents(host: TmemHost, name: str) -> dict[tuple[int, tuple[int, int, int], int], bytes]:
    """Every persistent page of a client, by (local pool, oid, index)."""
    out = {}
    exp = Exporter(host, feed_of(host), name)
    _, keys = exp.start()
    for ch in exp.read(keys):
        for index, _, _ in ch.pages:
            page = host.get(name, ch.pool, ch.oid, index)
            assert page is not None
            out[(ch.pool, ch.oid, index)] = page
    exp.close()
    return out


def begin(
    src: TmemHost, dst: TmemHost, name: str = "vm1"
) -> tuple[Exporter, Importer, list[ChunkKey]]:
    """A transfer under way: the exporter watching *name*, the importer staging it with
    its pool table; → both, and every chunk the first round sends."""
    exp = Exporter(src, feed_of(src), name)
    settings_, keys = exp.start()
    imp = Importer(dst, name, settings_)
    imp.begin()
    imp.apply_pools(exp.pool_table())
    return exp, imp, keys


def next_round(exp: Exporter, imp: Importer) -> None:
    """One pre-copy round: what changed at the source since the last one."""
    imp.apply_pools(exp.pool_table())
    imp.apply_chunks(exp.read(exp.take_changed()))


def finish(exp: Exporter, imp: Importer) -> None:
    """The final delta, COMMIT and the exporter closed."""
    next_round(exp, imp)
    imp.commit(exp.persistent_pages())
    exp.close()


def move(
    src: TmemHost, dst: TmemHost, name: str, between_rounds: list[object] | None = None
) -> None:
    exp, imp, keys = begin(src, dst, name)
    imp.apply_chunks(exp.read(keys))
    for change in between_rounds or []:
        assert callable(change)
        change()
        next_round(exp, imp)
    finish(exp, imp)


def populate(host: TmemHost, name: str = "vm1") -> None:
    host.add_client(name)
    eph = host.new_pool(name, PoolFlag.EPHEMERAL)
    pers = host.new_pool(name, PoolFlag.PERSISTENT)
    host.new_pool_at(name, 15, PoolFlag.PERSISTENT)
    host.put(name, eph, OIDS[0], 1, text_page(1))
    for i in range(200):
        host.put(name, pers, OIDS[i % 3], i * 7, text_page(i % 150))
    host.put(name, pers, OIDS[0], 10_000, bytes(4096))
    host.put_batch(
        name, 15, [(OIDS[0], i) for i in range(100)], [text_page(1000 + i) for i in range(100)]
    )
    host.open_session(name, cap_pages=None, dedup=False, meta={"boot_id": "ab" * 16}, reset=False)


def test_a_client_moves_with_every_persistent_page_and_nothing_else() -> None:
    src, _, _ = logged_host()
    dst, _, dlog = logged_host()
    populate(src)
    before = contents(src, "vm1")
    move(src, dst, "vm1")
    assert contents(dst, "vm1") == before
    assert dst.client_names() == ["vm1"]
    assert dst.client_meta("vm1") == {"boot_id": "ab" * 16}
    assert [p for p, _ in dst.pool_ids("vm1")] == [0, 1, 15]  # the ephemeral pool, empty
    assert dst.get("vm1", 0, OIDS[0], 1) is None
    assert dst.audit() == [] and src.audit() == []
    # crash-safe: what the destination's store committed rebuilds the same guest
    again = TmemHost(budget_bytes=64 << 20, log=dlog.crashed(), listeners=[ChangeFeed()])
    again.restore(dlog.crashed().load())
    assert contents(again, "vm1") == before
    assert again.audit() == []


def test_payloads_travel_as_stored_without_recompression() -> None:
    src, _, _ = logged_host()
    populate(src)
    exp = Exporter(src, feed_of(src), "vm1")
    _, keys = exp.start()
    for ch in exp.read(keys):
        for _, _, payload in ch.pages:
            assert len(payload) < 4096 or payload.count(0) < 4096  # lz4 or raw, not a page
    exp.close()


def test_changes_during_precopy_arrive_and_flushes_are_not_resurrected() -> None:
    src, _, _ = logged_host()
    dst, _, _ = logged_host()
    populate(src)

    def churn() -> None:
        src.flush_page("vm1", 1, OIDS[0], 0)
        src.put("vm1", 1, OIDS[1], 7, text_page(9999))  # replaced
        src.flush_object("vm1", 1, OIDS[2])
        src.put("vm1", 15, OIDS[0], 5000, text_page(4242))
        src.destroy_pool("vm1", 0)
        src.new_pool("vm1", PoolFlag.PERSISTENT)  # local 0, persistent now
        src.put("vm1", 0, OIDS[0], 3, text_page(77))

    move(src, dst, "vm1", [churn])
    assert contents(dst, "vm1") == contents(src, "vm1")
    assert dst.get("vm1", 1, OIDS[0], 0) is None
    assert dst.audit() == []


def test_abort_leaves_the_destination_with_nothing_and_the_source_untouched() -> None:
    src, _, _ = logged_host()
    dst, _, dlog = logged_host()
    populate(src)
    before = contents(src, "vm1")
    exp, imp, keys = begin(src, dst)
    imp.apply_chunks(exp.read(keys[: len(keys) // 2]))
    assert dst.client_names() == [STAGING_PREFIX + "vm1"]  # staged, not the guest's name
    imp.abort()
    exp.close()
    assert dst.client_names() == []
    assert dst.store_stats().pages == 0 and not dlog.blobs and not dlog.chunks
    assert contents(src, "vm1") == before and src.audit() == [] and dst.audit() == []


def test_a_destination_that_died_mid_transfer_drops_the_staged_client_at_restart() -> None:
    src, _, _ = logged_host()
    dst, _, dlog = logged_host()
    populate(src)
    exp, imp, keys = begin(src, dst)
    imp.apply_chunks(exp.read(keys))
    crashed = dlog.crashed()
    again = TmemHost(budget_bytes=64 << 20, log=crashed)
    again.restore(crashed.load())
    assert drop_leftovers(again) == ["vm1"]
    assert again.client_names() == [] and again.audit() == [] and not crashed.blobs


def test_an_empty_destination_client_with_a_served_disk_is_folded_in() -> None:
    src, _, _ = logged_host()
    dst, _, _ = logged_host()
    populate(src)
    dst.add_client("vm1", cap_pages=5000)
    dst.new_pool_at("vm1", 15, PoolFlag.PERSISTENT)  # the disk, served before the guest
    dst.new_pool_at("vm1", 9, PoolFlag.PERSISTENT)  # a pool the source does not have
    move(src, dst, "vm1")
    assert contents(dst, "vm1") == contents(src, "vm1")
    assert [p for p, _ in dst.pool_ids("vm1")] == [0, 1, 9, 15]
    assert dst.client_stats("vm1")[0].cap_pages == 5000  # the destination's own cap
    assert dst.audit() == []


def test_a_destination_holding_pages_of_that_guest_refuses() -> None:
    src, _, _ = logged_host()
    dst, _, _ = logged_host()
    populate(src)
    populate(dst)
    exp = Exporter(src, feed_of(src), "vm1")
    s, _ = exp.start()
    with pytest.raises(InvalidArgument, match="already holds"):
        Importer(dst, "vm1", s).begin()


def test_a_destination_without_room_fails_the_import_and_abort_cleans_up() -> None:
    src, _, _ = logged_host()
    dst, _, dlog = logged_host(budget=200 << 10)
    populate(src)
    exp, imp, keys = begin(src, dst)
    with pytest.raises(NoSpace):
        imp.apply_chunks(exp.read(keys))
    imp.abort()
    assert dst.client_names() == [] and dst.audit() == [] and not dlog.blobs


def test_commit_refuses_when_pages_are_missing() -> None:
    src, _, _ = logged_host()
    dst, _, _ = logged_host()
    populate(src)
    exp, imp, keys = begin(src, dst)
    imp.apply_chunks(exp.read(keys[1:]))
    with pytest.raises(InvalidArgument, match="arrived"):
        imp.commit(exp.persistent_pages())
    assert dst.client_names() == [STAGING_PREFIX + "vm1"]


def test_exporting_needs_the_change_feed() -> None:
    host = TmemHost(log=FakeLog())
    with pytest.raises(InvalidArgument, match="ChangeFeed"):
        Exporter(host, ChangeFeed(), "vm1")
    other = TmemHost(log=FakeLog(), listeners=[ChangeFeed()])
    with pytest.raises(InvalidArgument, match="ChangeFeed"):
        Exporter(host, feed_of(other), "vm1")  # another host's feed hears nothing of this one


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "flush", "flush_obj", "round"]),
        st.integers(0, 2),
        st.integers(0, 300),
        st.integers(0, 40),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_any_interleaving_of_guest_changes_and_rounds_ends_equal(
    ops: list[tuple[str, int, int, int]],
) -> None:
    src, _, _ = logged_host()
    dst, _, _ = logged_host()
    src.add_client("vm1")
    src.new_pool("vm1", PoolFlag.PERSISTENT)
    rng = random.Random(0)
    for i in range(64):
        src.put("vm1", 0, OIDS[rng.randrange(3)], rng.randrange(300), text_page(i))
    exp, imp, keys = begin(src, dst)
    imp.apply_chunks(exp.read(keys))
    for op, o, index, seed in ops:
        if op == "put":
            src.put("vm1", 0, OIDS[o], index, text_page(seed))
        elif op == "flush":
            src.flush_page("vm1", 0, OIDS[o], index)
        elif op == "flush_obj":
            src.flush_object("vm1", 0, OIDS[o])
        else:
            next_round(exp, imp)
    finish(exp, imp)
    assert contents(dst, "vm1") == contents(src, "vm1")
    assert dst.audit() == []


def test_rounds_against_a_guest_writing_from_other_threads_end_equal() -> None:
    """Two guest threads put and flush while pre-copy rounds run; after they stop (the
    guest paused), one final round makes the destination equal to the source."""
    import threading

    src, _, _ = logged_host()
    dst, _, _ = logged_host()
    src.add_client("vm1")
    src.new_pool("vm1", PoolFlag.PERSISTENT)
    src.new_pool_at("vm1", 15, PoolFlag.PERSISTENT)
    stop = threading.Event()

    def guest(pool: int, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not stop.is_set():
            oid, index = OIDS[rng.randrange(3)], rng.randrange(500)
            if rng.random() < 0.25:
                src.flush_page("vm1", pool, oid, index)
            elif rng.random() < 0.02:
                src.flush_object("vm1", pool, oid)
            else:
                src.put_batch(
                    "vm1",
                    pool,
                    [(oid, index), (oid, index + 500)],
                    [text_page(seed * 100_000 + n), bytes(4096)],
                )
            n += 1

    threads = [
        threading.Thread(target=guest, args=(pool, seed))
        for pool, seed in ((0, 1), (15, 2), (0, 3))
    ]
    for t in threads:
        t.start()
    exp, imp, keys = begin(src, dst)
    imp.apply_chunks(exp.read(keys))
    for _ in range(20):
        next_round(exp, imp)
    stop.set()
    for t in threads:
        t.join()
    finish(exp, imp)
    assert contents(dst, "vm1") == contents(src, "vm1")
    assert src.audit() == [] and dst.audit() == []


@settings(max_examples=40, deadline=None)
@given(
    logged=st.booleans(),
    puts=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 300), st.integers(0, 12)), max_size=150
    ),
    flushes=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 300)), max_size=40),
    extra_keys=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 8)), max_size=5),
)
def test_read_is_every_chunk_page_by_page(
    logged: bool,
    puts: list[tuple[int, int, int]],
    flushes: list[tuple[int, int]],
    extra_keys: list[tuple[int, int]],
) -> None:
    """Exporter.read (one numpy pass over a batch) gives what each page says on its own:
    its index in order, its blob's hash (0 for the zero page), its stored payload, and
    the shared set of pages whose blob others hold too — for stored and in-memory blobs,
    duplicates, zero pages, holes, emptied chunks and chunks never held."""
    feed = ChangeFeed()
    host = TmemHost(budget_bytes=64 << 20, log=FakeLog() if logged else None, listeners=[feed])
    host.add_client("vm1")
    pool = host.new_pool("vm1", PoolFlag.PERSISTENT)
    for obj, index, kind in puts:  # kind 0: the zero page; a few contents: duplicates
        host.put("vm1", pool, OIDS[obj], index, bytes(4096) if kind == 0 else text_page(kind))
    for obj, index in flushes:
        host.flush_page("vm1", pool, OIDS[obj], index)
    exp = Exporter(host, feed, "vm1")
    _, keys = exp.start()
    gid = keys[0][0] if keys else host._state.client("vm1", "t").pools[pool]
    assert gid is not None
    keys += [(gid, OIDS[obj], chunk) for obj, chunk in extra_keys]
    state = host._state
    store, pages = state.store, state.pages
    want = []
    for key_gid, oid, chunk_no in keys:
        objno = state.pools[key_gid].objects.get(oid)
        radix = None if objno is None else pages.radix[objno]
        chunk = None if radix is None else radix.get(chunk_no)
        held = [(pages.index[s], pages.blob[s]) for s in (chunk or ()) if s >= 0]
        want.append(
            (
                pool,
                oid,
                chunk_no,
                tuple((i, store.blob_hash(b) if b else 0, store.payload(b)) for i, b in held),
                frozenset(i for i, b in held if b and store.refs(b) > 1),
            )
        )
    got = [(c.pool, c.oid, c.chunk, c.pages, c.shared) for c in exp.read(keys)]
    assert got == want
    exp.close()
