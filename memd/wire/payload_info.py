"""Payload codecs of the ops that report: LIST_POOLS, the sharing and range ops, STATS and
MEM_REPORT.

Same contract as :mod:`memd.wire.payload` (typed encoder and decoder per shape, parts
out, memoryview in, only :class:`~memd.errors.FrameError` raised).  Stats travel as
``key=value`` text because python3-minimal has no ``json``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from memd.errors import FrameError
from memd.wire.constants import (
    MAX_GFNS,
    MAX_POOLS,
    MAX_PSI,
    MAX_STATS,
    PAGE_SIZE,
    SHARE_STATES,
    Buffer,
    MemReportFlag,
    ShareState,
    Status,
)
from memd.wire.messages import (
    AboutToWriteRequest,
    ListPoolsReply,
    MemReportRequest,
    NominateReply,
    NominateRequest,
    NominateResult,
    PoolInfo,
    RangeNominateItem,
    RangeNominateReply,
    RangeNominateRequest,
    RangeQueryItem,
    RangeQueryReply,
    RangeQueryRequest,
    RangeRequest,
    ShareInfo,
    ShareQueryReply,
    ShareQueryRequest,
    StatsReply,
)
from memd.wire.payload import U32, U64, Parts, check_count, count, decode_u64, exact, status

_POOL_INFO = struct.Struct("<II16sQ")  # pool, flags, uuid, pages
_NOMINATE_ITEM = struct.Struct("<HHIQ")  # status, reserved, reserved, handle
_QUERY_ITEM = struct.Struct("<BBHI")  # state, reserved, reserved, share_count
# mem total, mem available, swap total, swap free (KiB), psi some, psi full (avg10 x 100),
# flags, reserved
_MEM_REPORT = struct.Struct("<QQQQIIII")
_RANGE = struct.Struct("<IIQQ")  # pid, reserved, addr, length
_RANGE_NOMINATE_ITEM = struct.Struct("<QHHIQ")  # gfn, status, reserved, reserved, handle
_RANGE_QUERY_ITEM = struct.Struct("<QBBHI")  # gfn, state, reserved, reserved, share_count

# --- LIST_POOLS ---------------------------------------------------------------------------


def encode_list_pools_reply(m: ListPoolsReply) -> Parts:
    if len(m.pools) > MAX_POOLS:
        raise FrameError(f"LIST_POOLS reply has more than {MAX_POOLS} pools")
    items = [_POOL_INFO.pack(p.pool, p.flags, p.uuid, p.pages) for p in m.pools]
    return [U32.pack(len(m.pools)), *items]


def decode_list_pools_reply(mv: memoryview) -> ListPoolsReply:
    if len(mv) < 4:
        raise FrameError("LIST_POOLS reply too short")
    (n,) = U32.unpack_from(mv, 0)
    if n > MAX_POOLS:
        raise FrameError(f"LIST_POOLS reply count {n} exceeds {MAX_POOLS}")
    exact(mv, 4 + n * _POOL_INFO.size, "LIST_POOLS reply")
    return ListPoolsReply([PoolInfo(*t) for t in _POOL_INFO.iter_unpack(mv[4:])])


# --- NOMINATE, SHARE_QUERY, ABOUT_TO_WRITE ------------------------------------------------


def _encode_gfns(gfns: Sequence[int]) -> Parts:
    check_count(len(gfns), MAX_GFNS, "gfn")
    return [U32.pack(len(gfns)), struct.pack(f"<{len(gfns)}Q", *gfns)]


def _decode_gfns(mv: memoryview, what: str) -> list[int]:
    n = count(mv, MAX_GFNS, what)
    exact(mv, 4 + 8 * n, what)
    return list(struct.unpack_from(f"<{n}Q", mv, 4))


def encode_nominate(m: NominateRequest) -> Parts:
    return _encode_gfns(m.gfns)


def decode_nominate(mv: memoryview) -> NominateRequest:
    return NominateRequest(_decode_gfns(mv, "NOMINATE"))


def encode_share_query(m: ShareQueryRequest) -> Parts:
    return _encode_gfns(m.gfns)


def decode_share_query(mv: memoryview) -> ShareQueryRequest:
    return ShareQueryRequest(_decode_gfns(mv, "SHARE_QUERY"))


def encode_nominate_reply(m: NominateReply) -> Parts:
    check_count(len(m.results), MAX_GFNS, "NOMINATE reply")
    items = [_NOMINATE_ITEM.pack(r.status, 0, 0, r.handle) for r in m.results]
    return [U32.pack(len(m.results)), *items]


def decode_nominate_reply(mv: memoryview) -> NominateReply:
    n = count(mv, MAX_GFNS, "NOMINATE reply")
    exact(mv, 4 + n * _NOMINATE_ITEM.size, "NOMINATE reply")
    results = []
    for value, r1, r2, handle in _NOMINATE_ITEM.iter_unpack(mv[4:]):
        if r1 or r2:
            raise FrameError("NOMINATE reply item reserved field is not zero")
        results.append(NominateResult(status(value), handle))
    return NominateReply(results)


def encode_share_query_reply(m: ShareQueryReply) -> Parts:
    check_count(len(m.results), MAX_GFNS, "SHARE_QUERY reply")
    items = [_QUERY_ITEM.pack(r.state, 0, 0, r.share_count) for r in m.results]
    return [U32.pack(len(m.results)), *items]


def decode_share_query_reply(mv: memoryview) -> ShareQueryReply:
    n = count(mv, MAX_GFNS, "SHARE_QUERY reply")
    exact(mv, 4 + n * _QUERY_ITEM.size, "SHARE_QUERY reply")
    results = []
    for state, r1, r2, share_count in _QUERY_ITEM.iter_unpack(mv[4:]):
        if r1 or r2 or state not in SHARE_STATES:
            raise FrameError(f"SHARE_QUERY reply item has state {state} or reserved bits set")
        results.append(ShareInfo(ShareState(state), share_count))
    return ShareQueryReply(results)


def encode_about_to_write(m: AboutToWriteRequest) -> Parts:
    return [U64.pack(m.gfn)]


def decode_about_to_write(mv: memoryview) -> AboutToWriteRequest:
    return AboutToWriteRequest(decode_u64(mv, "ABOUT_TO_WRITE"))


# --- STATS --------------------------------------------------------------------------------


def encode_stats(stats: Mapping[str, int | str]) -> bytes:
    """Stats as UTF-8 ``key=value`` lines (python3-minimal has no json)."""
    lines = []
    for key, value in stats.items():
        text = str(value)
        if not key or "=" in key or any(c in key or c in text for c in "\n\r"):
            raise FrameError(f"stats key {key!r} or its value cannot be encoded as key=value")
        lines.append(f"{key}={text}\n")
    blob = "".join(lines).encode()
    if len(blob) > MAX_STATS:
        raise FrameError(f"stats text exceeds {MAX_STATS} bytes")
    return blob


def decode_stats(blob: Buffer) -> dict[str, int | str]:
    """Inverse of :func:`encode_stats`; decimal integer values come back as ints."""
    if len(blob) > MAX_STATS:
        raise FrameError(f"stats text exceeds {MAX_STATS} bytes")
    try:
        text = bytes(blob).decode()
    except UnicodeDecodeError:
        raise FrameError("stats text is not UTF-8") from None
    stats: dict[str, int | str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise FrameError(f"stats line {line[:40]!r} is not key=value")
        is_int = value.lstrip("-").isdigit() and value.isascii() and len(value) <= 40
        stats[key] = int(value) if is_int else value
    return stats


def encode_stats_reply(m: StatsReply) -> Parts:
    return [encode_stats(m.stats)]


def decode_stats_reply(mv: memoryview) -> StatsReply:
    return StatsReply(decode_stats(mv))


# --- MEM_REPORT ---------------------------------------------------------------------------


def encode_mem_report(m: MemReportRequest) -> Parts:
    return [
        _MEM_REPORT.pack(
            m.mem_total_kib,
            m.mem_available_kib,
            m.swap_total_kib,
            m.swap_free_kib,
            m.psi_some_avg10,
            m.psi_full_avg10,
            m.flags,
            0,
        )
    ]


def decode_mem_report(mv: memoryview) -> MemReportRequest:
    exact(mv, _MEM_REPORT.size, "MEM_REPORT")
    total, avail, swap_total, swap_free, some, full, flags, reserved = _MEM_REPORT.unpack(mv)
    if reserved or flags & ~int(MemReportFlag.NO_PSI):
        raise FrameError(f"MEM_REPORT has unknown flag bits {flags:#x} or a reserved field set")
    if avail > total or swap_free > swap_total:
        raise FrameError(
            "MEM_REPORT: available memory above the total, or free swap above the total",
            status=int(Status.INVALID),
        )
    if some > MAX_PSI or full > MAX_PSI or (flags & MemReportFlag.NO_PSI and (some or full)):
        raise FrameError(
            f"MEM_REPORT: PSI values {some}, {full} out of range 0..{MAX_PSI} "
            "(or given with NO_PSI)",
            status=int(Status.INVALID),
        )
    return MemReportRequest(total, avail, swap_total, swap_free, some, full, flags)


# --- RANGE_NOMINATE, RANGE_QUERY (guest daemon only) --------------------------------------


def check_range(addr: int, length: int) -> None:
    if addr % PAGE_SIZE or length % PAGE_SIZE or not 0 < length <= MAX_GFNS * PAGE_SIZE:
        raise FrameError(
            f"a range must be page-aligned and 1..{MAX_GFNS} pages long "
            f"(addr {addr:#x}, length {length:#x})"
        )


def encode_range(m: RangeRequest) -> Parts:
    check_range(m.addr, m.length)
    return [_RANGE.pack(m.pid, 0, m.addr, m.length)]


def _decode_range(mv: memoryview) -> tuple[int, int, int]:
    exact(mv, _RANGE.size, "RANGE request")
    pid, reserved, addr, length = _RANGE.unpack(mv)
    if reserved:
        raise FrameError("RANGE request reserved field is not zero")
    try:
        check_range(addr, length)
    except FrameError as err:
        raise FrameError(err.message, status=int(Status.INVALID)) from None
    return pid, addr, length


def decode_range_nominate(mv: memoryview) -> RangeNominateRequest:
    return RangeNominateRequest(*_decode_range(mv))


def decode_range_query(mv: memoryview) -> RangeQueryRequest:
    return RangeQueryRequest(*_decode_range(mv))


def encode_range_nominate_reply(m: RangeNominateReply) -> Parts:
    check_count(len(m.results), MAX_GFNS, "RANGE_NOMINATE reply")
    items = [_RANGE_NOMINATE_ITEM.pack(r.gfn, r.status, 0, 0, r.handle) for r in m.results]
    return [U32.pack(len(m.results)), *items]


def decode_range_nominate_reply(mv: memoryview) -> RangeNominateReply:
    n = count(mv, MAX_GFNS, "RANGE_NOMINATE reply")
    exact(mv, 4 + n * _RANGE_NOMINATE_ITEM.size, "RANGE_NOMINATE reply")
    results = []
    for gfn, value, r1, r2, handle in _RANGE_NOMINATE_ITEM.iter_unpack(mv[4:]):
        if r1 or r2:
            raise FrameError("RANGE_NOMINATE reply item reserved field is not zero")
        results.append(RangeNominateItem(gfn, status(value), handle))
    return RangeNominateReply(results)


def encode_range_query_reply(m: RangeQueryReply) -> Parts:
    check_count(len(m.results), MAX_GFNS, "RANGE_QUERY reply")
    items = [_RANGE_QUERY_ITEM.pack(r.gfn, r.state, 0, 0, r.share_count) for r in m.results]
    return [U32.pack(len(m.results)), *items]


def decode_range_query_reply(mv: memoryview) -> RangeQueryReply:
    n = count(mv, MAX_GFNS, "RANGE_QUERY reply")
    exact(mv, 4 + n * _RANGE_QUERY_ITEM.size, "RANGE_QUERY reply")
    results = []
    for gfn, state, r1, r2, share_count in _RANGE_QUERY_ITEM.iter_unpack(mv[4:]):
        if r1 or r2 or state not in SHARE_STATES:
            raise FrameError(f"RANGE_QUERY reply item has state {state} or reserved bits set")
        results.append(RangeQueryItem(gfn, ShareState(state), share_count))
    return RangeQueryReply(results)
