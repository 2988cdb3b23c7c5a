"""Hypothesis strategies for every request and reply of memd.wire (keyed by op), and a
normaliser that makes decoded messages comparable with the ones that were encoded."""

from __future__ import annotations

from typing import Any, Literal

from hypothesis import strategies as st

from memd.wire import (
    MAX_BATCH,
    MAX_GFNS,
    MAX_PSI,
    PAGE_SIZE,
    AboutToWriteReply,
    AboutToWriteRequest,
    DestroyPoolReply,
    DestroyPoolRequest,
    FlushObjectReply,
    FlushObjectRequest,
    FlushPageReply,
    FlushPageRequest,
    GetBatchReply,
    GetBatchRequest,
    GetReply,
    GetRequest,
    HelloReply,
    HelloRequest,
    ListPoolsReply,
    ListPoolsRequest,
    MemReportFlag,
    MemReportReply,
    MemReportRequest,
    NewPoolReply,
    NewPoolRequest,
    NominateReply,
    NominateRequest,
    NominateResult,
    Op,
    PoolFlag,
    PoolInfo,
    PutBatchReply,
    PutBatchRequest,
    PutReply,
    PutRequest,
    RangeNominateItem,
    RangeNominateReply,
    RangeNominateRequest,
    RangeQueryItem,
    RangeQueryReply,
    RangeQueryRequest,
    ShareInfo,
    ShareQueryReply,
    ShareQueryRequest,
    ShareState,
    StatsReply,
    StatsRequest,
    Status,
    SyncReply,
    SyncRequest,
)

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
oids = st.tuples(u64, u64, u64)
handles = st.tuples(oids, u32)
uuids = st.binary(min_size=16, max_size=16)
statuses = st.sampled_from(list(Status))
# Pages are mostly zero in real guests; a few patterned ones keep the examples cheap.
pages = st.builds(lambda b, n: bytes([b]) * n + bytes(PAGE_SIZE - n), u8, st.integers(0, 64))
small_batch = st.integers(1, 4)


def _gfns(max_size: int = 16) -> st.SearchStrategy[list[int]]:
    return st.lists(u64, min_size=1, max_size=max_size)


def _put_batch() -> st.SearchStrategy[PutBatchRequest]:
    return small_batch.flatmap(
        lambda n: st.builds(
            PutBatchRequest,
            u32,
            st.lists(handles, min_size=n, max_size=n),
            st.lists(pages, min_size=n, max_size=n),
        )
    )


def _get_batch_reply() -> st.SearchStrategy[GetBatchReply]:
    def build(ss: list[Status], page: bytes) -> GetBatchReply:
        return GetBatchReply(ss, [page if s == Status.OK else None for s in ss])

    return st.builds(build, st.lists(statuses, min_size=1, max_size=6), pages)


_Category = Literal["Cs", "Nd"]
NO_SURROGATES: tuple[_Category, ...] = ("Cs",)
NO_DIGITS: tuple[_Category, ...] = ("Cs", "Nd")
stat_keys = st.text(
    st.characters(blacklist_characters="=\n\r", blacklist_categories=NO_SURROGATES),
    min_size=1,
    max_size=12,
)
stat_values = st.one_of(
    st.integers(0, 1 << 62),
    st.text(
        st.characters(blacklist_characters="\n\r", blacklist_categories=NO_DIGITS), max_size=16
    ),
)

_page_addrs = st.integers(0, (1 << 52) - 1).map(lambda p: p * PAGE_SIZE)
_range_lengths = st.integers(1, MAX_GFNS).map(lambda n: n * PAGE_SIZE)

REQUESTS: dict[Op, st.SearchStrategy[Any]] = {
    Op.HELLO: st.builds(
        lambda lo, d, c, b: HelloRequest(lo, min(255, lo + d), c, b),
        st.integers(1, 255),
        st.integers(0, 3),
        u32,
        uuids,
    ),
    Op.SYNC: st.builds(SyncRequest, u64),
    Op.NEW_POOL: st.builds(NewPoolRequest, st.integers(0, 3), uuids, u32),
    Op.DESTROY_POOL: st.builds(DestroyPoolRequest, u32),
    Op.PUT: st.builds(PutRequest, u32, oids, u32, pages),
    Op.GET: st.builds(GetRequest, u32, oids, u32),
    Op.FLUSH_PAGE: st.builds(FlushPageRequest, u32, oids, u32),
    Op.FLUSH_OBJECT: st.builds(FlushObjectRequest, u32, oids),
    Op.PUT_BATCH: _put_batch(),
    Op.GET_BATCH: st.builds(
        GetBatchRequest, u32, st.lists(handles, min_size=1, max_size=MAX_BATCH)
    ),
    Op.LIST_POOLS: st.just(ListPoolsRequest()),
    Op.NOMINATE: st.builds(NominateRequest, _gfns(MAX_GFNS // 64)),
    Op.SHARE_QUERY: st.builds(ShareQueryRequest, _gfns()),
    Op.ABOUT_TO_WRITE: st.builds(AboutToWriteRequest, u64),
    Op.STATS: st.just(StatsRequest()),
    Op.MEM_REPORT: st.one_of(
        st.builds(
            lambda total, avail, swap, free, some, full: MemReportRequest(
                total, min(avail, total), swap, min(free, swap), some, min(full, some), 0
            ),
            u64,
            u64,
            u64,
            u64,
            st.integers(0, MAX_PSI),
            st.integers(0, MAX_PSI),
        ),
        st.builds(
            lambda total, avail: MemReportRequest(
                total, min(avail, total), 0, 0, 0, 0, int(MemReportFlag.NO_PSI)
            ),
            u64,
            u64,
        ),
    ),
    Op.RANGE_NOMINATE: st.builds(RangeNominateRequest, u32, _page_addrs, _range_lengths),
    Op.RANGE_QUERY: st.builds(RangeQueryRequest, u32, _page_addrs, _range_lengths),
}

REPLIES: dict[Op, st.SearchStrategy[Any]] = {
    Op.HELLO: st.builds(
        HelloReply,
        st.integers(1, 255),
        u32,
        st.integers(1, MAX_BATCH),
        st.integers(24, 1 << 20),
        st.integers(1, MAX_GFNS),
        page_size=st.just(PAGE_SIZE),
    ),
    Op.SYNC: st.builds(SyncReply, u64),
    Op.NEW_POOL: st.builds(NewPoolReply, u32),
    Op.DESTROY_POOL: st.just(DestroyPoolReply()),
    Op.PUT: st.just(PutReply()),
    Op.GET: st.builds(GetReply, pages),
    Op.FLUSH_PAGE: st.just(FlushPageReply()),
    Op.FLUSH_OBJECT: st.just(FlushObjectReply()),
    Op.PUT_BATCH: st.builds(PutBatchReply, st.lists(statuses, min_size=1, max_size=MAX_BATCH)),
    Op.GET_BATCH: _get_batch_reply(),
    Op.LIST_POOLS: st.builds(
        ListPoolsReply,
        st.lists(st.builds(PoolInfo, u32, st.sampled_from([0, *PoolFlag]), uuids, u64), max_size=8),
    ),
    Op.NOMINATE: st.builds(
        NominateReply, st.lists(st.builds(NominateResult, statuses, u64), min_size=1, max_size=16)
    ),
    Op.SHARE_QUERY: st.builds(
        ShareQueryReply,
        st.lists(
            st.builds(ShareInfo, st.sampled_from(list(ShareState)), u32), min_size=1, max_size=16
        ),
    ),
    Op.ABOUT_TO_WRITE: st.just(AboutToWriteReply()),
    Op.STATS: st.builds(StatsReply, st.dictionaries(stat_keys, stat_values, max_size=8)),
    Op.MEM_REPORT: st.just(MemReportReply()),
    Op.RANGE_NOMINATE: st.builds(
        RangeNominateReply,
        st.lists(st.builds(RangeNominateItem, u64, statuses, u64), min_size=1, max_size=16),
    ),
    Op.RANGE_QUERY: st.builds(
        RangeQueryReply,
        st.lists(
            st.builds(RangeQueryItem, u64, st.sampled_from(list(ShareState)), u32),
            min_size=1,
            max_size=16,
        ),
    ),
}


def normalise(value: Any) -> Any:
    """memoryview -> bytes, sequences -> lists, NamedTuples -> (type name, fields)."""
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return (type(value).__name__, [normalise(v) for v in value])
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, int):
        return int(value)
    return value
