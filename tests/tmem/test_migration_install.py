"""The destination's whole-chunk install (tmem.put.install_chunks, PageStore.intern_payloads):
the same outcome as installing the chunks one at a time through the page-by-page path."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd.errors import InvalidArgument, NoSpace
from tests.tmem.conftest import random_page, text_page
from tests.tmem.fake_log import FakeLog
from tmem.host import TmemHost
from tmem.migration import ChangeFeed, ChunkPages, ClientSettings, Importer, PoolInfo
from tmem.store import ZERO_BLOB, PageStore, compress_page, hash_pages
from tmem.types import PAGE_SIZE

OIDS = [(1, 0, 0), (2, 0, 0), (7, 7, 7)]
SETTINGS = ClientSettings(weight=100, cap_pages=None, dedup=False, frozen=False)
TABLE = [PoolInfo(0, True, False, None, 11), PoolInfo(3, True, False, None, 12)]


def encoded(page: bytes) -> tuple[int, bytes]:
    h = hash_pages([page])[0]
    return (0, b"") if h < 0 else (h, compress_page(page))


def a_page(kind: int, seed: int) -> bytes:
    """0: zero, 1: one of a few shared pages, 2: text (lz4), 3: random (stored raw)."""
    if kind == 0:
        return bytes(PAGE_SIZE)
    if kind == 1:
        return text_page(seed % 3)
    if kind == 2:
        return text_page(100 + seed)
    return random.Random(seed).randbytes(PAGE_SIZE)


def chunk(local: int, o: int, chunk_no: int, spec: list[tuple[int, int, int]]) -> ChunkPages:
    """A CHUNK as it arrives: *spec* is (position, kind, seed) per page."""
    positions = sorted({pos: (kind, seed) for pos, kind, seed in spec}.items())
    pages = tuple(
        (chunk_no * 64 + pos, *encoded(a_page(kind, seed))) for pos, (kind, seed) in positions
    )
    return ChunkPages(local, 11 if local == 0 else 12, OIDS[o], chunk_no, pages)


def destination(budget: int = 64 << 20) -> tuple[TmemHost, Importer, FakeLog]:
    log = FakeLog()
    host = TmemHost(budget_bytes=budget, log=log, listeners=[ChangeFeed()])
    imp = Importer(host, "vm1", SETTINGS)
    imp.begin()
    imp.apply_pools(TABLE)
    return host, imp, log


def staged(host: TmemHost, imp: Importer) -> dict[tuple[int, tuple[int, int, int], int], bytes]:
    out = {}
    for local in (0, 3):
        for oid in OIDS:
            for index in range(64 * 8):
                page = host.get(imp.staged, local, oid, index)
                if page is not None:
                    out[(local, oid, index)] = page
    return out


CHUNKS = st.lists(
    st.tuples(
        st.sampled_from([0, 3]),
        st.integers(0, 2),
        st.integers(0, 7),
        st.lists(st.tuples(st.integers(0, 63), st.integers(0, 3), st.integers(0, 5)), max_size=12),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(CHUNKS, min_size=1, max_size=4))
def test_batches_install_as_chunk_by_chunk_would(
    batches: list[list[tuple[int, int, int, list[tuple[int, int, int]]]]],
) -> None:
    """Batches of chunks — fresh ones, ones held already, the same chunk twice in one
    batch, empty ones — end where applying every chunk on its own ends, store included."""
    whole, imp_whole, log_whole = destination()
    single, imp_single, _ = destination()
    for batch in batches:
        chunks = [chunk(local, o, c, spec) for local, o, c, spec in batch]
        imp_whole.apply_chunks(chunks)
        for ch in chunks:
            imp_single.apply_chunks([ch])
    assert staged(whole, imp_whole) == staged(single, imp_single)
    assert whole.audit() == [] and single.audit() == []
    assert whole.store_stats() == single.store_stats()
    again = TmemHost(budget_bytes=64 << 20, log=log_whole.crashed(), listeners=[ChangeFeed()])
    again.restore(log_whole.crashed().load())
    assert staged(again, imp_whole) == staged(whole, imp_whole) and again.audit() == []


def test_the_later_copy_of_a_chunk_in_one_batch_wins() -> None:
    host, imp, _ = destination()
    first = chunk(0, 0, 2, [(1, 2, 1), (5, 2, 2)])
    later = chunk(0, 0, 2, [(5, 2, 3), (9, 0, 0)])
    imp.apply_chunks([first, chunk(0, 1, 0, [(0, 1, 0)]), later])
    assert staged(host, imp) == {
        (0, OIDS[0], 2 * 64 + 5): a_page(2, 3),
        (0, OIDS[0], 2 * 64 + 9): bytes(PAGE_SIZE),
        (0, OIDS[1], 0): a_page(1, 0),
    }
    assert host.audit() == []


def test_a_page_outside_its_chunk_is_refused_and_nothing_of_it_is_stored() -> None:
    host, imp, _ = destination()
    bad = ChunkPages(0, 11, OIDS[0], 1, ((64, *encoded(text_page(1))), (3, *encoded(text_page(2)))))
    with pytest.raises(InvalidArgument, match="outside its chunk"):
        imp.apply_chunks([bad])
    assert staged(host, imp) == {} and host.audit() == []


def test_without_room_for_a_batch_it_goes_page_by_page_and_fails_with_no_space() -> None:
    host, imp, log = destination(budget=160 << 10)
    chunks = [chunk(0, 0, c, [(p, 3, c * 64 + p) for p in range(40)]) for c in range(3)]
    with pytest.raises(NoSpace, match="cannot take vm1's pages"):
        imp.apply_chunks(chunks)
    assert host.audit() == []
    imp.abort()
    assert host.client_names() == [] and host.audit() == [] and not log.blobs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=80), st.booleans())
def test_intern_payloads_equals_intern_one_by_one(
    pages: list[tuple[int, int]], external: bool
) -> None:
    from tmem.durable import EXTERNAL_SCOPE

    scope = 5 | (EXTERNAL_SCOPE if external else 0)
    batch = [encoded(a_page(kind, seed)) for kind, seed in pages]
    stores = [PageStore(FakeLog() if external else None) for _ in range(2)]
    for store in stores:  # something stored before, to de-duplicate against
        store.intern(*encoded(text_page(0)), scope)
        store.intern(*encoded(random_page()), scope)
    one_by_one = [stores[0].intern(h, payload, scope) for h, payload in batch]
    at_once = stores[1].intern_payloads([h for h, _ in batch], [p for _, p in batch], scope)
    assert at_once == one_by_one
    a, b = stores
    assert a.zero_refs() == b.zero_refs() and a.live_blobs == b.live_blobs
    assert a.data_bytes == b.data_bytes and a.dedup_hits == b.dedup_hits
    for blob in {*at_once} - {ZERO_BLOB}:
        assert a.refs(blob) == b.refs(blob) and a.payload(blob) == b.payload(blob)
        assert a.blob_hash(blob) == b.blob_hash(blob)
    assert a.dedup_members() == b.dedup_members()


def test_a_held_chunk_with_a_page_outside_it_is_refused_before_anything_changes() -> None:
    host, imp, _ = destination()
    imp.apply_chunks([chunk(0, 0, 1, [(2, 2, 1), (7, 2, 2)])])
    before = staged(host, imp)
    bad = ChunkPages(0, 11, OIDS[0], 1, ((64 + 2, *encoded(text_page(5))), (3, 0, b"")))
    with pytest.raises(InvalidArgument, match="outside its chunk"):
        imp.apply_chunks([bad])
    assert staged(host, imp) == before and host.audit() == []


class CountingLog(FakeLog):
    """A FakeLog that counts payload reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def payload(self, blob: int) -> bytes:
        self.reads += 1
        return super().payload(blob)


def test_duplicates_of_an_external_blob_read_the_log_once_and_a_freed_blob_is_forgotten() -> None:
    from tmem.durable import EXTERNAL_SCOPE

    scope = 5 | EXTERNAL_SCOPE
    log = CountingLog()
    store = PageStore(log)
    h, payload = encoded(text_page(1))
    first = store.intern(h, payload, scope)
    again = store.intern_payloads([h] * 50, [payload] * 50, scope)
    assert again == [first] * 50 and store.refs(first) == 51
    assert log.reads == 1  # compared 50 times, read once
    for _ in range(51):
        store.release(first)
    # Another payload with the same hash and length takes the freed blob id: a compare
    # must see its bytes, not the old ones.
    other = bytes(len(payload) - 1) + b"x"
    reused = store.intern(h, other, scope)
    assert reused == first
    assert store.find(h, payload, scope) == -1
    assert store.find(h, other, scope) == reused
    assert store.intern_payloads([h], [payload], scope) != [reused]
