"""Payload codecs of the session and tmem ops: one typed encoder and decoder per shape.

Owns the bytes of HELLO, SYNC, NEW_POOL, DESTROY_POOL, PUT, GET, FLUSH_* and the batches
(the shapes that report — LIST_POOLS, the sharing and range ops, STATS, MEM_REPORT — are
in :mod:`memd.wire.payload_info`).  An encoder takes its message and returns the payload
as a list of parts — pages stay the caller's buffers, never joined here; a decoder
takes the payload as a memoryview, validates every length, count, reserved field and
range, and raises only :class:`~memd.errors.FrameError` (with ``status`` in its fields
where a status other than BAD_FRAME applies).  Decoded pages are views of the payload.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

from memd.errors import FrameError
from memd.wire.constants import (
    HEADER_SIZE,
    KNOWN_POOL_FLAGS,
    MAX_BATCH,
    MAX_GFNS,
    MAX_PAYLOAD,
    PAGE_SIZE,
    STATUS_TABLE,
    Buffer,
    Handle,
    Oid,
    Status,
)
from memd.wire.messages import (
    DestroyPoolRequest,
    EmptyReply,
    FlushObjectRequest,
    FlushPageRequest,
    GetBatchReply,
    GetBatchRequest,
    GetReply,
    GetRequest,
    HelloReply,
    HelloRequest,
    ListPoolsRequest,
    NewPoolReply,
    NewPoolRequest,
    PutBatchReply,
    PutBatchRequest,
    PutRequest,
    StatsRequest,
    SyncReply,
    SyncRequest,
)

#: A payload as parts, written in order (a page is one part, never copied into another).
Parts = list[Buffer]

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
_HELLO_REQ = struct.Struct("<BBHI16s")  # min, max, reserved, capabilities, boot_id
_HELLO_REP = struct.Struct("<BBHIIIII")  # version, 2 reserved, caps, batch, payload, gfns, page
_NEW_POOL = struct.Struct("<II16s")  # flags, page_size, uuid
_HANDLE = struct.Struct("<IIQQQ")  # pool, index, oid[0..2]
_POOL_OID = struct.Struct("<IIQQQ")  # pool, reserved, oid[0..2]
_BATCH_HEAD = struct.Struct("<II")  # pool, count
_BATCH_ITEM = struct.Struct("<QQQII")  # oid[0..2], index, reserved

E = TypeVar("E", bound=EmptyReply)
N = TypeVar("N", ListPoolsRequest, StatsRequest)

# --- checks shared by every shape -------------------------------------------------------


def exact(mv: memoryview, size: int, what: str) -> None:
    if len(mv) != size:
        raise FrameError(f"{what} payload must be {size} bytes, got {len(mv)}")


def count(mv: memoryview, limit: int, what: str) -> int:
    """The leading u32 count of a payload, checked to be 1..limit."""
    if len(mv) < 4:
        raise FrameError(f"{what} payload too short for its count")
    (n,) = U32.unpack_from(mv, 0)
    check_count(n, limit, what)
    return int(n)


def check_count(n: int, limit: int, what: str) -> None:
    if not 1 <= n <= limit:
        raise FrameError(f"{what} count {n} is outside 1..{limit}")


def page(data: Buffer) -> Buffer:
    if len(data) != PAGE_SIZE:
        raise FrameError(f"a page must be {PAGE_SIZE} bytes, got {len(data)}")
    return data


def status(value: int) -> Status:
    if not 0 <= value < len(STATUS_TABLE):
        raise FrameError(f"unknown status {value}")
    return STATUS_TABLE[value]


def statuses(values: Sequence[int]) -> list[Status]:
    """Batch form of :func:`status`: a table lookup per item instead of an enum call."""
    table = STATUS_TABLE
    try:
        return [table[v] for v in values]
    except IndexError:
        bad = next(v for v in values if v >= len(table))
        raise FrameError(f"unknown status {bad}") from None


def encode_statuses(values: Sequence[int]) -> bytes:
    check_count(len(values), MAX_BATCH, "status vector")
    return U32.pack(len(values)) + struct.pack(f"<{len(values)}H", *values)


def decode_statuses(mv: memoryview, what: str) -> tuple[list[Status], int]:
    n = count(mv, MAX_BATCH, what)
    end = 4 + 2 * n
    if len(mv) < end:
        raise FrameError(f"{what} payload too short for {n} statuses")
    return statuses(struct.unpack_from(f"<{n}H", mv, 4)), end


# --- empty payloads ---------------------------------------------------------------------


def encode_nothing(_msg: object) -> Parts:
    return []


def empty_decoder(cls: type[N]) -> Callable[[memoryview], N]:
    """Decoder of a request without payload (LIST_POOLS, STATS)."""

    def decode(mv: memoryview) -> N:
        exact(mv, 0, cls.__name__)
        return cls()

    return decode


def empty_reply_decoder(cls: type[E]) -> Callable[[memoryview], E]:
    """Decoder of an op's empty OK reply (the op's own EmptyReply subclass)."""

    def decode(mv: memoryview) -> E:
        exact(mv, 0, cls.__name__)
        return cls()

    return decode


# --- HELLO, SYNC ------------------------------------------------------------------------


def encode_hello_request(m: HelloRequest) -> Parts:
    return [_HELLO_REQ.pack(m.min_version, m.max_version, 0, m.capabilities, m.boot_id)]


def decode_hello_request(mv: memoryview) -> HelloRequest:
    exact(mv, _HELLO_REQ.size, "HELLO")
    lo, hi, reserved, caps, boot_id = _HELLO_REQ.unpack(mv)
    if reserved or not 1 <= lo <= hi:
        raise FrameError(f"HELLO proposes an invalid version range {lo}..{hi}")
    return HelloRequest(lo, hi, caps, boot_id)


def encode_hello_reply(m: HelloReply) -> Parts:
    return [
        _HELLO_REP.pack(
            m.version, 0, 0, m.capabilities, m.max_batch, m.max_payload, m.max_gfns, m.page_size
        )
    ]


def decode_hello_reply(mv: memoryview) -> HelloReply:
    exact(mv, _HELLO_REP.size, "HELLO reply")
    version, r1, r2, caps, batch, payload, gfns, page_size = _HELLO_REP.unpack(mv)
    if r1 or r2 or version < 1 or page_size != PAGE_SIZE:
        raise FrameError("HELLO reply has reserved bits, version 0 or a page size other than 4096")
    if not (
        1 <= batch <= MAX_BATCH and 1 <= gfns <= MAX_GFNS and HEADER_SIZE <= payload <= MAX_PAYLOAD
    ):
        raise FrameError("HELLO reply announces limits outside the protocol's limits")
    return HelloReply(version, caps, batch, payload, gfns, page_size)


def decode_u64(mv: memoryview, what: str) -> int:
    exact(mv, 8, what)
    return int(U64.unpack(mv)[0])


def encode_sync_request(m: SyncRequest) -> Parts:
    return [U64.pack(m.nonce)]


def decode_sync_request(mv: memoryview) -> SyncRequest:
    return SyncRequest(decode_u64(mv, "SYNC"))


def encode_sync_reply(m: SyncReply) -> Parts:
    return [U64.pack(m.nonce)]


def decode_sync_reply(mv: memoryview) -> SyncReply:
    return SyncReply(decode_u64(mv, "SYNC reply"))


# --- pools ------------------------------------------------------------------------------


def encode_new_pool(m: NewPoolRequest) -> Parts:
    return [_NEW_POOL.pack(m.flags, m.page_size, m.uuid)]


def decode_new_pool(mv: memoryview) -> NewPoolRequest:
    exact(mv, _NEW_POOL.size, "NEW_POOL")
    flags, page_size, uuid = _NEW_POOL.unpack(mv)
    if flags & ~KNOWN_POOL_FLAGS:
        # docs/protocol.md, Limits: an unknown flag bit makes the frame malformed
        # (BAD_FRAME); INVALID is for known bits in a refused combination.
        raise FrameError(f"NEW_POOL has unknown flag bits {flags:#x}")
    return NewPoolRequest(flags, uuid, page_size)


def encode_new_pool_reply(m: NewPoolReply) -> Parts:
    return [U32.pack(m.pool)]


def decode_new_pool_reply(mv: memoryview) -> NewPoolReply:
    exact(mv, 4, "NEW_POOL reply")
    return NewPoolReply(U32.unpack(mv)[0])


def encode_destroy_pool(m: DestroyPoolRequest) -> Parts:
    return [U32.pack(m.pool)]


def decode_destroy_pool(mv: memoryview) -> DestroyPoolRequest:
    exact(mv, 4, "DESTROY_POOL")
    return DestroyPoolRequest(U32.unpack(mv)[0])


# --- single pages -----------------------------------------------------------------------


def _handle(mv: memoryview, what: str) -> tuple[int, Oid, int]:
    exact(mv, _HANDLE.size, what)
    pool, index, o0, o1, o2 = _HANDLE.unpack(mv)
    return pool, (o0, o1, o2), index


def encode_put(m: PutRequest) -> Parts:
    return [_HANDLE.pack(m.pool, m.index, *m.oid), page(m.page)]


def decode_put(mv: memoryview) -> PutRequest:
    exact(mv, _HANDLE.size + PAGE_SIZE, "PUT")
    pool, oid, index = _handle(mv[: _HANDLE.size], "PUT")
    return PutRequest(pool, oid, index, mv[_HANDLE.size :])


def encode_get(m: GetRequest) -> Parts:
    return [_HANDLE.pack(m.pool, m.index, *m.oid)]


def decode_get(mv: memoryview) -> GetRequest:
    return GetRequest(*_handle(mv, "GET"))


def encode_get_reply(m: GetReply) -> Parts:
    return [page(m.page)]


def decode_get_reply(mv: memoryview) -> GetReply:
    exact(mv, PAGE_SIZE, "GET reply")
    return GetReply(mv)


def encode_flush_page(m: FlushPageRequest) -> Parts:
    return [_HANDLE.pack(m.pool, m.index, *m.oid)]


def decode_flush_page(mv: memoryview) -> FlushPageRequest:
    return FlushPageRequest(*_handle(mv, "FLUSH_PAGE"))


def encode_flush_object(m: FlushObjectRequest) -> Parts:
    return [_POOL_OID.pack(m.pool, 0, *m.oid)]


def decode_flush_object(mv: memoryview) -> FlushObjectRequest:
    exact(mv, _POOL_OID.size, "FLUSH_OBJECT")
    pool, reserved, o0, o1, o2 = _POOL_OID.unpack(mv)
    if reserved:
        raise FrameError("FLUSH_OBJECT reserved field is not zero")
    return FlushObjectRequest(pool, (o0, o1, o2))


# --- batches ----------------------------------------------------------------------------

_BATCH_ITEMS: dict[int, struct.Struct] = {}


def _batch_items(n: int) -> struct.Struct:
    """The layout of ``n`` consecutive batch items (cached: n <= MAX_BATCH)."""
    layout = _BATCH_ITEMS.get(n)
    if layout is None:
        layout = _BATCH_ITEMS[n] = struct.Struct("<" + "QQQII" * n)
    return layout


def _encode_batch_head(pool: int, handles: Sequence[Handle]) -> bytes:
    check_count(len(handles), MAX_BATCH, "batch")
    fields = [v for oid, index in handles for v in (*oid, index, 0)]
    return _BATCH_HEAD.pack(pool, len(handles)) + _batch_items(len(handles)).pack(*fields)


def _decode_batch_head(mv: memoryview, what: str, pages: bool) -> tuple[int, list[Handle], int]:
    if len(mv) < _BATCH_HEAD.size:
        raise FrameError(f"{what} payload too short")
    pool, n = _BATCH_HEAD.unpack_from(mv, 0)
    check_count(n, MAX_BATCH, what)
    end = _BATCH_HEAD.size + n * _BATCH_ITEM.size
    exact(mv, end + (n * PAGE_SIZE if pages else 0), what)
    # One unpack for all items; columns by slicing (no per-item Python loop).
    fields = _batch_items(n).unpack_from(mv, _BATCH_HEAD.size)
    if any(fields[4::5]):
        raise FrameError(f"{what} item reserved field is not zero")
    oids = zip(fields[0::5], fields[1::5], fields[2::5], strict=True)
    handles: list[Handle] = list(zip(oids, fields[3::5], strict=True))
    return pool, handles, end


def encode_put_batch(m: PutBatchRequest) -> Parts:
    if len(m.pages) != len(m.handles):
        raise FrameError(f"PUT_BATCH has {len(m.handles)} handles but {len(m.pages)} pages")
    return [_encode_batch_head(m.pool, m.handles), *[page(p) for p in m.pages]]


def decode_put_batch(mv: memoryview) -> PutBatchRequest:
    pool, handles, base = _decode_batch_head(mv, "PUT_BATCH", pages=True)
    pages = [mv[at : at + PAGE_SIZE] for at in range(base, len(mv), PAGE_SIZE)]
    return PutBatchRequest(pool, handles, pages)


def encode_put_batch_reply(m: PutBatchReply) -> Parts:
    return [encode_statuses(m.statuses)]


def decode_put_batch_reply(mv: memoryview) -> PutBatchReply:
    values, end = decode_statuses(mv, "PUT_BATCH reply")
    exact(mv, end, "PUT_BATCH reply")
    return PutBatchReply(values)


def encode_get_batch(m: GetBatchRequest) -> Parts:
    return [_encode_batch_head(m.pool, m.handles)]


def decode_get_batch(mv: memoryview) -> GetBatchRequest:
    pool, handles, _ = _decode_batch_head(mv, "GET_BATCH", pages=False)
    return GetBatchRequest(pool, handles)


def encode_get_batch_reply(m: GetBatchReply) -> Parts:
    if len(m.pages) != len(m.statuses):
        raise FrameError("GET_BATCH reply needs one page slot (page or None) per status")
    parts: Parts = [encode_statuses(m.statuses)]
    for value, data in zip(m.statuses, m.pages, strict=True):
        if (value == Status.OK) != (data is not None):
            raise FrameError("GET_BATCH reply: a page exactly where the status is OK")
        if data is not None:
            parts.append(page(data))
    return parts


def decode_get_batch_reply(mv: memoryview) -> GetBatchReply:
    values, end = decode_statuses(mv, "GET_BATCH reply")
    found = sum(1 for s in values if s == Status.OK)
    exact(mv, end + found * PAGE_SIZE, "GET_BATCH reply")
    pages: list[Buffer | None] = []
    at = end
    for s in values:
        if s == Status.OK:
            pages.append(mv[at : at + PAGE_SIZE])
            at += PAGE_SIZE
        else:
            pages.append(None)
    return GetBatchReply(values, pages)
