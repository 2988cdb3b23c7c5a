"""put_batch/get_batch must behave exactly like the same puts/gets one by one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tmem.host import TmemHost
from tmem.types import PAGE_SIZE, PoolFlag

handles = st.tuples(st.sampled_from([(0, 0, 1), (0, 0, 2), (5, 5, 5)]), st.integers(0, 130))
contents = st.sampled_from(
    [bytes(PAGE_SIZE), b"a" * PAGE_SIZE, b"ab" * 2048, bytes(range(256)) * 16]
)
batches = st.lists(st.lists(st.tuples(handles, contents), min_size=1, max_size=40), max_size=8)


def _host() -> tuple[TmemHost, int]:
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("vm", dedup=True)
    return host, host.new_pool("vm", PoolFlag.PERSISTENT)


@settings(max_examples=150, deadline=None)
@given(batches, st.lists(handles, max_size=20))
def test_batched_equals_one_by_one(
    batch_list: list[list[tuple[tuple[tuple[int, int, int], int], bytes]]],
    flushes: list[tuple[tuple[int, int, int], int]],
) -> None:
    batched, pool_b = _host()
    single, pool_s = _host()
    for i, batch in enumerate(batch_list):
        hs = [h for h, _ in batch]
        ps = [p for _, p in batch]
        assert batched.put_batch("vm", pool_b, hs, ps) == [None] * len(batch)
        for (oid, index), page in batch:
            single.put("vm", pool_s, oid, index, page)
        if i < len(flushes):  # interleave flushes so objects empty and get recycled
            oid, index = flushes[i]
            assert batched.flush_page("vm", pool_b, oid, index) == single.flush_page(
                "vm", pool_s, oid, index
            )
        assert batched.audit() == []
    probe = (
        [((o, 0, 1), i) for o in (0,) for i in range(131)]
        + [((0, 0, 2), i) for i in range(131)]
        + [((5, 5, 5), i) for i in range(131)]
    )
    for start in range(0, len(probe), 128):
        part = probe[start : start + 128]
        assert batched.get_batch("vm", pool_b, part) == single.get_batch("vm", pool_s, part)
    b, s = batched.pool_stats("vm")[0], single.pool_stats("vm")[0]
    assert (b.pages, b.bytes_stored, b.ops.dup_puts, b.ops.good_puts) == (
        s.pages,
        s.bytes_stored,
        s.ops.dup_puts,
        s.ops.good_puts,
    )
