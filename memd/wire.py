"""The memd wire protocol: header, opcodes, statuses, payload shapes, limits, decoder.

This module owns the bytes that travel between the guest agent (``memd-guest``)
and the host agent over the virtio-serial port ``org.memd.0``.  It does no I/O
and uses only ``struct``, ``zlib``, ``enum`` and ``typing`` (a host with ``zlib-ng``
installed computes the same CRC-32 with it, faster): the guest imports it
inside a python3-minimal guest, which has no ``dataclasses``, ``json`` or
``uuid`` — hence NamedTuples everywhere and key=value text for stats.
``docs/protocol.md`` is the normative description; this is its executable form.

Overview
--------
A frame is a fixed 24-byte little-endian header followed by ``length`` payload
bytes.  The header carries two CRC-32s: one over the payload and one over the
header itself.  The header checksum lets :class:`FrameDecoder` find the next
real frame in a byte stream that was cut mid-frame (a guest reboot, an agent
restart); the payload checksum keeps a frame whose tail was lost in such a cut
from being completed with the bytes of the next connection and then obeyed.

Every request gets exactly one reply with the same opcode and request id (many
requests may be in flight; replies are matched by id, not order).  A reply with
status ``OK`` carries the op's reply shape; any other status carries an optional
UTF-8 message (:class:`ErrorReply`).  Shapes are in one table, :data:`OPS`.

Every decode validates lengths, counts, reserved fields and ranges, and raises
only :class:`~memd.errors.FrameError`; the decoder itself never raises on input
bytes: it reports corruption in-band (a ``FrameError`` instance in its output)
and resynchronises by itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

try:  # host side: zlib-ng's CRC-32 (same polynomial, same values) is ~5x faster
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # the guest (python3-minimal) and any host without it
    from zlib import crc32 as _crc32

from memd.errors import (
    AccessDenied,
    ClientFrozen,
    FrameError,
    InvalidArgument,
    MemdError,
    NoSpace,
    NoSuchPool,
    NotShareable,
    ProtocolError,
    RemoteError,
    SharingError,
    StaleHandle,
    TmemError,
    VersionError,
)

# The shared vocabulary, re-exported: the protocol's callers name it from here.
from memd.vocab import MAX_BATCH as MAX_BATCH
from memd.vocab import PAGE_SIZE as PAGE_SIZE
from memd.vocab import Oid as Oid
from memd.vocab import PoolFlag as PoolFlag

# --- constants and limits ------------------------------------------------------------

#: virtio-serial port name the guest looks for under /sys/class/virtio-ports/*/name.
PORT_NAME = "org.memd.0"
#: First two bytes of every frame.  Neither 0x00 (zero pages) nor 0xFF (resync marker)
#: nor printable ASCII, so that ordinary data rarely looks like the start of a header.
MAGIC = b"\x9dM"
#: Sent before a SYNC request after every (re)connect.  0xFF can never start a header,
#: so a decoder that is between frames skips these bytes silently.
RESYNC_MARKER = b"\xff" * 8
PROTOCOL_VERSION = 1
MIN_VERSION = 1
MAX_VERSION = 1

MAX_PAYLOAD = 1 << 20  #: payload bytes of one frame (header excluded)
MAX_GFNS = 4096  #: gfns in one NOMINATE / SHARE_QUERY
MAX_POOLS = 1024  #: entries in one LIST_POOLS reply
MAX_STATS = 64 * 1024  #: bytes of the STATS text
MAX_MESSAGE = 1024  #: bytes of the UTF-8 message of an error reply
MAX_REQUEST_ID = 0xFFFFFFFF

#: A reader that has held an incomplete frame this long without completing it calls
#: :meth:`FrameDecoder.abandon_partial` (the writer of that frame is gone).
PARTIAL_FRAME_TIMEOUT = 1.0
#: The guest resends RESYNC_MARKER + SYNC at this interval until the SYNC reply arrives.
SYNC_RETRY_INTERVAL = 0.5

#: magic, version u8, op u8, flags u16, status u16, request id u32, payload length u32,
#: payload crc32 u32, header crc32 u32 (over the 20 bytes before it).
HEADER = struct.Struct("<2sBBHHIIII")
HEADER_SIZE = HEADER.size  # 24
_HEADER_CRC_SPAN = HEADER_SIZE - 4


class Op(IntEnum):
    """Opcodes (header byte 3).  A reply carries the opcode of its request."""

    HELLO = 0x01
    SYNC = 0x02
    NEW_POOL = 0x10
    DESTROY_POOL = 0x11
    PUT = 0x12
    GET = 0x13
    FLUSH_PAGE = 0x14
    FLUSH_OBJECT = 0x15
    PUT_BATCH = 0x16
    GET_BATCH = 0x17
    LIST_POOLS = 0x18
    NOMINATE = 0x20
    SHARE_QUERY = 0x21
    ABOUT_TO_WRITE = 0x22
    STATS = 0x30
    MEM_REPORT = 0x31  #: the guest reports its memory state (needs Capability.MEM_REPORT)
    #: Local ops: only between a guest program and the guest daemon (memd.guest.daemon), never
    #: on the port; a host answers UNSUPPORTED_OP.  A virtual address range of a process.
    RANGE_NOMINATE = 0x40
    RANGE_QUERY = 0x41


class Status(IntEnum):
    """Reply status (header u16; always 0 in requests) and per-item batch status."""

    OK = 0
    NOT_FOUND = 1  #: get: no page under that handle
    NO_SPACE = 2  #: the store cannot take the page now
    INVALID = 3  #: an argument is out of range (pool flags, page size, gfn)
    NO_POOL = 4  #: the pool id is not one of this guest's pools
    DENIED = 5  #: not authorised (shared pool uuid, sharing disabled for this guest)
    FROZEN = 6  #: the host froze this guest: puts refused
    BAD_FRAME = 7  #: the request frame was malformed
    UNSUPPORTED_OP = 8  #: unknown opcode, or an op the negotiated version lacks
    VERSION = 9  #: hello: no protocol version in common
    BUSY = 10  #: try again later
    INTERNAL = 11  #: the host failed; the request had no effect
    STALE = 12  #: a sharing handle is stale
    NOT_SHAREABLE = 13  #: the page cannot be nominated in its current state
    NEED_HELLO = 14  #: an op other than HELLO/SYNC before a successful HELLO


class FrameFlag(IntFlag):
    REPLY = 0x0001  #: set in replies, clear in requests


KNOWN_FRAME_FLAGS = int(FrameFlag.REPLY)


class Capability(IntFlag):
    """Hello capability bits: the guest proposes, the host answers the subset it grants."""

    BATCH = 0x1
    SHARING = 0x2
    STATS = 0x4
    DEDUP_OPT_IN = 0x8  #: the guest consents to cross-guest de-duplication of its pages
    MEM_REPORT = 0x10  #: the host takes MEM_REPORT (a guest sends it only when granted)


ALL_CAPABILITIES = int(Capability.BATCH | Capability.SHARING | Capability.STATS)


class ShareState(IntEnum):
    UNKNOWN = 0  #: gfn out of range, or the host has no sharing record for it
    PRIVATE = 1
    NOMINATED = 2  #: nominated, not (yet) merged with another page
    SHARED = 3


Buffer = bytes | bytearray | memoryview
#: A page handle inside a pool: (object id, page index).
Handle = tuple[Oid, int]


_U64_MASK = (1 << 64) - 1


def oid_from_int(value: int) -> Oid:
    """A 192-bit object id as the three u64 words on the wire (least significant first)."""
    if not 0 <= value < 1 << 192:
        raise ValueError(f"object id {value} does not fit in 192 bits")
    return (value & _U64_MASK, (value >> 64) & _U64_MASK, value >> 128)


def oid_to_int(oid: Oid) -> int:
    return oid[0] | oid[1] << 64 | oid[2] << 128


class Frame(NamedTuple):
    """One decoded frame: header fields plus the raw (checksum-verified) payload."""

    op: int
    request_id: int
    status: int
    flags: int
    version: int
    payload: bytes

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FrameFlag.REPLY)


# --- typed requests ------------------------------------------------------------------


class HelloRequest(NamedTuple):
    min_version: int
    max_version: int
    capabilities: int
    boot_id: bytes  #: 16 bytes: /proc/sys/kernel/random/boot_id of the guest


class SyncRequest(NamedTuple):
    nonce: int  #: u64 the host echoes back


class NewPoolRequest(NamedTuple):
    flags: int  #: PoolFlag bits
    uuid: bytes = bytes(16)  #: shared pools: the 128-bit pool secret; else zeros
    page_size: int = PAGE_SIZE


class DestroyPoolRequest(NamedTuple):
    pool: int


class PutRequest(NamedTuple):
    pool: int
    oid: Oid
    index: int  # type: ignore[assignment]  # the tmem name; shadows tuple.index on purpose
    page: Buffer  #: exactly PAGE_SIZE bytes


class GetRequest(NamedTuple):
    pool: int
    oid: Oid
    index: int  # type: ignore[assignment]  # the tmem name; shadows tuple.index on purpose


class FlushPageRequest(NamedTuple):
    pool: int
    oid: Oid
    index: int  # type: ignore[assignment]  # the tmem name; shadows tuple.index on purpose


class FlushObjectRequest(NamedTuple):
    pool: int
    oid: Oid


class PutBatchRequest(NamedTuple):
    pool: int
    handles: Sequence[Handle]
    pages: Sequence[Buffer]  #: one per handle, same order


class GetBatchRequest(NamedTuple):
    pool: int
    handles: Sequence[Handle]


class ListPoolsRequest(NamedTuple):
    pass


class NominateRequest(NamedTuple):
    gfns: Sequence[int]


class ShareQueryRequest(NamedTuple):
    gfns: Sequence[int]


class AboutToWriteRequest(NamedTuple):
    gfn: int


class StatsRequest(NamedTuple):
    pass


class MemReportFlag(IntFlag):
    NO_PSI = 0x1  #: the guest has no /proc/pressure/memory: both PSI fields are 0


#: PSI averages are sent as hundredths of a percent: 0..MAX_PSI.
MAX_PSI = 10000


class MemReportRequest(NamedTuple):
    """The guest's memory state, from /proc/meminfo and /proc/pressure/memory."""

    mem_total_kib: int  #: MemTotal
    mem_available_kib: int  #: MemAvailable (<= mem_total_kib)
    swap_total_kib: int  #: SwapTotal
    swap_free_kib: int  #: SwapFree (<= swap_total_kib)
    psi_some_avg10: int  #: "some avg10" x 100 (0..MAX_PSI); 0 with NO_PSI
    psi_full_avg10: int  #: "full avg10" x 100 (0..MAX_PSI); 0 with NO_PSI
    flags: int = 0  #: MemReportFlag bits


class RangeRequest(NamedTuple):
    """RANGE_NOMINATE / RANGE_QUERY: the pages of ``[addr, addr + length)`` in process
    ``pid`` (0: the caller itself), page-aligned, at most MAX_GFNS pages."""

    pid: int
    addr: int
    length: int


# --- typed replies -------------------------------------------------------------------


class HelloReply(NamedTuple):
    version: int  #: the chosen version, used in every later header
    capabilities: int  #: granted Capability bits
    max_batch: int  #: pages per batch frame this host accepts (<= MAX_BATCH)
    max_payload: int  #: payload bytes per frame this host accepts (<= MAX_PAYLOAD)
    max_gfns: int  #: gfns per NOMINATE/SHARE_QUERY (<= MAX_GFNS)
    page_size: int = PAGE_SIZE


class SyncReply(NamedTuple):
    nonce: int


class NewPoolReply(NamedTuple):
    pool: int


class EmptyReply(NamedTuple):
    """OK reply of DESTROY_POOL, PUT, FLUSH_PAGE, FLUSH_OBJECT, ABOUT_TO_WRITE."""


class GetReply(NamedTuple):
    page: Buffer


class PutBatchReply(NamedTuple):
    statuses: Sequence[int]  #: one Status per page, request order


class GetBatchReply(NamedTuple):
    statuses: Sequence[int]  #: one Status per handle
    pages: Sequence[Buffer | None]  #: aligned with statuses: a page where OK, else None


class PoolInfo(NamedTuple):
    pool: int
    flags: int
    uuid: bytes
    pages: int


class ListPoolsReply(NamedTuple):
    pools: Sequence[PoolInfo]


class NominateResult(NamedTuple):
    status: int
    handle: int  #: 0 unless status is OK


class NominateReply(NamedTuple):
    results: Sequence[NominateResult]


class ShareInfo(NamedTuple):
    state: int  #: ShareState
    share_count: int  #: gfns mapping the same frame (1 when private)


class ShareQueryReply(NamedTuple):
    results: Sequence[ShareInfo]


class StatsReply(NamedTuple):
    stats: Mapping[str, int | str]


#: gfn of a page of a range that has no frame (not present, swapped out).
NO_GFN = (1 << 64) - 1


class RangeNominateItem(NamedTuple):
    gfn: int  #: NO_GFN when the page has no frame (status NOT_SHAREABLE)
    status: int
    handle: int


class RangeNominateReply(NamedTuple):
    results: Sequence[RangeNominateItem]  #: one per page of the range, in address order


class RangeQueryItem(NamedTuple):
    gfn: int  #: NO_GFN when the page has no frame (state UNKNOWN)
    state: int
    share_count: int


class RangeQueryReply(NamedTuple):
    results: Sequence[RangeQueryItem]


class ErrorReply(NamedTuple):
    """Any reply whose status is not OK."""

    status: Status
    message: str


Request = (
    HelloRequest | SyncRequest | NewPoolRequest | DestroyPoolRequest | PutRequest | GetRequest
    | FlushPageRequest | FlushObjectRequest | PutBatchRequest | GetBatchRequest | ListPoolsRequest
    |     NominateRequest | ShareQueryRequest | AboutToWriteRequest | StatsRequest
    | MemReportRequest | RangeRequest
)
Reply = (
    HelloReply | SyncReply | NewPoolReply | EmptyReply | GetReply | PutBatchReply | GetBatchReply
    | ListPoolsReply | NominateReply | ShareQueryReply | StatsReply | RangeNominateReply
    | RangeQueryReply
)

# --- payload shapes --------------------------------------------------------------------

_HELLO_REQ = struct.Struct("<BBHI16s")  # min, max, reserved, capabilities, boot_id
_HELLO_REP = struct.Struct("<BBHIIIII")  # version, 2 reserved, caps, batch, payload, gfns, page
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NEW_POOL = struct.Struct("<II16s")  # flags, page_size, uuid
_HANDLE = struct.Struct("<IIQQQ")  # pool, index, oid[0..2]
_POOL_OID = struct.Struct("<IIQQQ")  # pool, reserved, oid[0..2]
_BATCH_HEAD = struct.Struct("<II")  # pool, count
_BATCH_ITEM = struct.Struct("<QQQII")  # oid[0..2], index, reserved
_POOL_INFO = struct.Struct("<II16sQ")  # pool, flags, uuid, pages
_NOMINATE_ITEM = struct.Struct("<HHIQ")  # status, reserved, reserved, handle
_QUERY_ITEM = struct.Struct("<BBHI")  # state, reserved, reserved, share_count
# mem total, mem available, swap total, swap free (KiB), psi some, psi full (avg10 x 100),
# flags, reserved
_MEM_REPORT = struct.Struct("<QQQQIIII")
_RANGE = struct.Struct("<IIQQ")  # pid, reserved, addr, length
_RANGE_NOMINATE_ITEM = struct.Struct("<QHHIQ")  # gfn, status, reserved, reserved, handle
_RANGE_QUERY_ITEM = struct.Struct("<QBBHI")  # gfn, state, reserved, reserved, share_count

_Parts = list[Buffer]


def _bad(message: str) -> FrameError:
    return FrameError(message)


def _exact(mv: memoryview, size: int, what: str) -> None:
    if len(mv) != size:
        raise _bad(f"{what} payload must be {size} bytes, got {len(mv)}")


def _count(mv: memoryview, limit: int, what: str) -> int:
    if len(mv) < 4:
        raise _bad(f"{what} payload too short for its count")
    (n,) = _U32.unpack_from(mv, 0)
    if not 1 <= n <= limit:
        raise _bad(f"{what} count {n} is outside 1..{limit}")
    return int(n)


def _page(page: Buffer) -> Buffer:
    if len(page) != PAGE_SIZE:
        raise _bad(f"a page must be {PAGE_SIZE} bytes, got {len(page)}")
    return page


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise _bad(f"unknown status {value}") from None


def _statuses(values: Sequence[int]) -> list[Status]:
    """Batch form of :func:`_status`: a table lookup per item instead of an enum call."""
    table = _STATUS_TABLE
    try:
        return [table[v] for v in values]
    except IndexError:
        bad = next(v for v in values if v >= len(table))
        raise _bad(f"unknown status {bad}") from None


def _check_count(n: int, limit: int, what: str) -> None:
    if not 1 <= n <= limit:
        raise _bad(f"{what} count {n} is outside 1..{limit}")


def _enc_empty(_msg: Any) -> _Parts:
    return []


def _dec_empty(factory: Callable[[], Any]) -> Callable[[memoryview], Any]:
    def decode(mv: memoryview) -> Any:
        _exact(mv, 0, "empty")
        return factory()
    return decode


def _enc_hello_req(m: HelloRequest) -> _Parts:
    return [_HELLO_REQ.pack(m.min_version, m.max_version, 0, m.capabilities, m.boot_id)]


def _dec_hello_req(mv: memoryview) -> HelloRequest:
    _exact(mv, _HELLO_REQ.size, "HELLO")
    lo, hi, reserved, caps, boot_id = _HELLO_REQ.unpack(mv)
    if reserved or not 1 <= lo <= hi:
        raise _bad(f"HELLO proposes an invalid version range {lo}..{hi}")
    return HelloRequest(lo, hi, caps, boot_id)


def _enc_hello_rep(m: HelloReply) -> _Parts:
    return [_HELLO_REP.pack(m.version, 0, 0, m.capabilities, m.max_batch, m.max_payload,
                            m.max_gfns, m.page_size)]


def _dec_hello_rep(mv: memoryview) -> HelloReply:
    _exact(mv, _HELLO_REP.size, "HELLO reply")
    version, r1, r2, caps, batch, payload, gfns, page = _HELLO_REP.unpack(mv)
    if r1 or r2 or version < 1 or page != PAGE_SIZE:
        raise _bad("HELLO reply has reserved bits, version 0 or a page size other than 4096")
    if not (1 <= batch <= MAX_BATCH and 1 <= gfns <= MAX_GFNS and
            HEADER_SIZE <= payload <= MAX_PAYLOAD):
        raise _bad("HELLO reply announces limits outside the protocol's limits")
    return HelloReply(version, caps, batch, payload, gfns, page)


def _enc_u64(value: int) -> _Parts:
    return [_U64.pack(value)]


def _dec_u64(mv: memoryview, what: str) -> int:
    _exact(mv, 8, what)
    return int(_U64.unpack(mv)[0])


def _enc_new_pool(m: NewPoolRequest) -> _Parts:
    return [_NEW_POOL.pack(m.flags, m.page_size, m.uuid)]


def _dec_new_pool(mv: memoryview) -> NewPoolRequest:
    _exact(mv, _NEW_POOL.size, "NEW_POOL")
    flags, page_size, uuid = _NEW_POOL.unpack(mv)
    if flags & ~int(PoolFlag.PERSISTENT | PoolFlag.SHARED):
        raise _bad(f"NEW_POOL has unknown flag bits {flags:#x}")
    return NewPoolRequest(flags, uuid, page_size)


def _enc_handle(pool: int, oid: Oid, index: int) -> bytes:
    return _HANDLE.pack(pool, index, *oid)


def _dec_handle(mv: memoryview) -> tuple[int, Oid, int]:
    pool, index, o0, o1, o2 = _HANDLE.unpack_from(mv, 0)
    return pool, (o0, o1, o2), index


def _enc_put(m: PutRequest) -> _Parts:
    return [_enc_handle(m.pool, m.oid, m.index), _page(m.page)]


def _dec_put(mv: memoryview) -> PutRequest:
    _exact(mv, _HANDLE.size + PAGE_SIZE, "PUT")
    pool, oid, index = _dec_handle(mv)
    return PutRequest(pool, oid, index, mv[_HANDLE.size:])


def _dec_get_rep(mv: memoryview) -> GetReply:
    _exact(mv, PAGE_SIZE, "GET reply")
    return GetReply(mv)


def _dec_handle_only(factory: Callable[[int, Oid, int], Any], what: str
                     ) -> Callable[[memoryview], Any]:
    def decode(mv: memoryview) -> Any:
        _exact(mv, _HANDLE.size, what)
        return factory(*_dec_handle(mv))
    return decode


def _enc_flush_object(m: FlushObjectRequest) -> _Parts:
    return [_POOL_OID.pack(m.pool, 0, *m.oid)]


def _dec_flush_object(mv: memoryview) -> FlushObjectRequest:
    _exact(mv, _POOL_OID.size, "FLUSH_OBJECT")
    pool, reserved, o0, o1, o2 = _POOL_OID.unpack(mv)
    if reserved:
        raise _bad("FLUSH_OBJECT reserved field is not zero")
    return FlushObjectRequest(pool, (o0, o1, o2))


def _enc_batch_head(pool: int, handles: Sequence[Handle]) -> bytes:
    _check_count(len(handles), MAX_BATCH, "batch")
    items = b"".join([_BATCH_ITEM.pack(*oid, index, 0) for oid, index in handles])
    return _BATCH_HEAD.pack(pool, len(handles)) + items


def _dec_batch_head(mv: memoryview, what: str, pages: bool) -> tuple[int, list[Handle], int]:
    if len(mv) < _BATCH_HEAD.size:
        raise _bad(f"{what} payload too short")
    pool, n = _BATCH_HEAD.unpack_from(mv, 0)
    _check_count(n, MAX_BATCH, what)
    end = _BATCH_HEAD.size + n * _BATCH_ITEM.size
    _exact(mv, end + (n * PAGE_SIZE if pages else 0), what)
    # One unpack for all items; columns by slicing (no per-item Python loop).
    fields = _batch_items(n).unpack_from(mv, _BATCH_HEAD.size)
    if any(fields[4::5]):
        raise _bad(f"{what} item reserved field is not zero")
    oids = zip(fields[0::5], fields[1::5], fields[2::5], strict=True)
    handles: list[Handle] = list(zip(oids, fields[3::5], strict=True))
    return pool, handles, end


_BATCH_ITEMS: dict[int, struct.Struct] = {}


def _batch_items(n: int) -> struct.Struct:
    """The layout of ``n`` consecutive _BATCH_ITEMs (cached: n <= MAX_BATCH)."""
    layout = _BATCH_ITEMS.get(n)
    if layout is None:
        layout = _BATCH_ITEMS[n] = struct.Struct("<" + "QQQII" * n)
    return layout


def _enc_put_batch(m: PutBatchRequest) -> _Parts:
    if len(m.pages) != len(m.handles):
        raise _bad(f"PUT_BATCH has {len(m.handles)} handles but {len(m.pages)} pages")
    return [_enc_batch_head(m.pool, m.handles), *[_page(p) for p in m.pages]]


def _dec_put_batch(mv: memoryview) -> PutBatchRequest:
    pool, handles, base = _dec_batch_head(mv, "PUT_BATCH", pages=True)
    pages = [mv[base + i * PAGE_SIZE: base + (i + 1) * PAGE_SIZE] for i in range(len(handles))]
    return PutBatchRequest(pool, handles, pages)


def _enc_get_batch(m: GetBatchRequest) -> _Parts:
    return [_enc_batch_head(m.pool, m.handles)]


def _dec_get_batch(mv: memoryview) -> GetBatchRequest:
    pool, handles, _ = _dec_batch_head(mv, "GET_BATCH", pages=False)
    return GetBatchRequest(pool, handles)


def _enc_statuses(statuses: Sequence[int]) -> bytes:
    _check_count(len(statuses), MAX_BATCH, "status vector")
    return _U32.pack(len(statuses)) + struct.pack(f"<{len(statuses)}H", *statuses)


def _dec_statuses(mv: memoryview, what: str) -> tuple[list[Status], int]:
    n = _count(mv, MAX_BATCH, what)
    end = 4 + 2 * n
    if len(mv) < end:
        raise _bad(f"{what} payload too short for {n} statuses")
    return _statuses(struct.unpack_from(f"<{n}H", mv, 4)), end


def _enc_put_batch_rep(m: PutBatchReply) -> _Parts:
    return [_enc_statuses(m.statuses)]


def _dec_put_batch_rep(mv: memoryview) -> PutBatchReply:
    statuses, end = _dec_statuses(mv, "PUT_BATCH reply")
    _exact(mv, end, "PUT_BATCH reply")
    return PutBatchReply(statuses)


def _enc_get_batch_rep(m: GetBatchReply) -> _Parts:
    if len(m.pages) != len(m.statuses):
        raise _bad("GET_BATCH reply needs one page slot (page or None) per status")
    parts: _Parts = [_enc_statuses(m.statuses)]
    for status, page in zip(m.statuses, m.pages, strict=True):
        if (status == Status.OK) != (page is not None):
            raise _bad("GET_BATCH reply: a page exactly where the status is OK")
        if page is not None:
            parts.append(_page(page))
    return parts


def _dec_get_batch_rep(mv: memoryview) -> GetBatchReply:
    statuses, end = _dec_statuses(mv, "GET_BATCH reply")
    found = sum(1 for s in statuses if s == Status.OK)
    _exact(mv, end + found * PAGE_SIZE, "GET_BATCH reply")
    pages: list[Buffer | None] = []
    at = end
    for s in statuses:
        if s == Status.OK:
            pages.append(mv[at:at + PAGE_SIZE])
            at += PAGE_SIZE
        else:
            pages.append(None)
    return GetBatchReply(statuses, pages)


def _enc_list_pools_rep(m: ListPoolsReply) -> _Parts:
    if len(m.pools) > MAX_POOLS:
        raise _bad(f"LIST_POOLS reply has more than {MAX_POOLS} pools")
    items = [_POOL_INFO.pack(p.pool, p.flags, p.uuid, p.pages) for p in m.pools]
    return [_U32.pack(len(m.pools)), *items]


def _dec_list_pools_rep(mv: memoryview) -> ListPoolsReply:
    if len(mv) < 4:
        raise _bad("LIST_POOLS reply too short")
    (n,) = _U32.unpack_from(mv, 0)
    if n > MAX_POOLS:
        raise _bad(f"LIST_POOLS reply count {n} exceeds {MAX_POOLS}")
    _exact(mv, 4 + n * _POOL_INFO.size, "LIST_POOLS reply")
    return ListPoolsReply([PoolInfo(*t) for t in _POOL_INFO.iter_unpack(mv[4:])])


def _enc_gfns(gfns: Sequence[int]) -> _Parts:
    _check_count(len(gfns), MAX_GFNS, "gfn")
    return [_U32.pack(len(gfns)), struct.pack(f"<{len(gfns)}Q", *gfns)]


def _dec_gfns(mv: memoryview, what: str) -> list[int]:
    n = _count(mv, MAX_GFNS, what)
    _exact(mv, 4 + 8 * n, what)
    return list(struct.unpack_from(f"<{n}Q", mv, 4))


def _enc_nominate_rep(m: NominateReply) -> _Parts:
    _check_count(len(m.results), MAX_GFNS, "NOMINATE reply")
    items = [_NOMINATE_ITEM.pack(r.status, 0, 0, r.handle) for r in m.results]
    return [_U32.pack(len(m.results)), *items]


def _dec_nominate_rep(mv: memoryview) -> NominateReply:
    n = _count(mv, MAX_GFNS, "NOMINATE reply")
    _exact(mv, 4 + n * _NOMINATE_ITEM.size, "NOMINATE reply")
    results = []
    for status, r1, r2, handle in _NOMINATE_ITEM.iter_unpack(mv[4:]):
        if r1 or r2:
            raise _bad("NOMINATE reply item reserved field is not zero")
        results.append(NominateResult(_status(status), handle))
    return NominateReply(results)


def _enc_query_rep(m: ShareQueryReply) -> _Parts:
    _check_count(len(m.results), MAX_GFNS, "SHARE_QUERY reply")
    items = [_QUERY_ITEM.pack(r.state, 0, 0, r.share_count) for r in m.results]
    return [_U32.pack(len(m.results)), *items]


def _dec_query_rep(mv: memoryview) -> ShareQueryReply:
    n = _count(mv, MAX_GFNS, "SHARE_QUERY reply")
    _exact(mv, 4 + n * _QUERY_ITEM.size, "SHARE_QUERY reply")
    results = []
    for state, r1, r2, count in _QUERY_ITEM.iter_unpack(mv[4:]):
        if r1 or r2 or state not in _SHARE_STATES:
            raise _bad(f"SHARE_QUERY reply item has state {state} or reserved bits set")
        results.append(ShareInfo(ShareState(state), count))
    return ShareQueryReply(results)


_SHARE_STATES = frozenset(int(s) for s in ShareState)


def encode_stats(stats: Mapping[str, int | str]) -> bytes:
    """Stats as UTF-8 ``key=value`` lines (python3-minimal has no json)."""
    lines = []
    for key, value in stats.items():
        text = str(value)
        if not key or "=" in key or any(c in key or c in text for c in "\n\r"):
            raise _bad(f"stats key {key!r} or its value cannot be encoded as key=value")
        lines.append(f"{key}={text}\n")
    blob = "".join(lines).encode()
    if len(blob) > MAX_STATS:
        raise _bad(f"stats text exceeds {MAX_STATS} bytes")
    return blob


def decode_stats(blob: Buffer) -> dict[str, int | str]:
    """Inverse of :func:`encode_stats`; decimal integer values come back as ints."""
    if len(blob) > MAX_STATS:
        raise _bad(f"stats text exceeds {MAX_STATS} bytes")
    try:
        text = bytes(blob).decode()
    except UnicodeDecodeError:
        raise _bad("stats text is not UTF-8") from None
    stats: dict[str, int | str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise _bad(f"stats line {line[:40]!r} is not key=value")
        is_int = value.lstrip("-").isdigit() and value.isascii() and len(value) <= 40
        stats[key] = int(value) if is_int else value
    return stats


def _enc_mem_report(m: MemReportRequest) -> _Parts:
    return [_MEM_REPORT.pack(m.mem_total_kib, m.mem_available_kib, m.swap_total_kib,
                             m.swap_free_kib, m.psi_some_avg10, m.psi_full_avg10, m.flags, 0)]


def _dec_mem_report(mv: memoryview) -> MemReportRequest:
    _exact(mv, _MEM_REPORT.size, "MEM_REPORT")
    total, avail, swap_total, swap_free, some, full, flags, reserved = _MEM_REPORT.unpack(mv)
    if reserved or flags & ~int(MemReportFlag.NO_PSI):
        raise _bad(f"MEM_REPORT has unknown flag bits {flags:#x} or a reserved field set")
    if avail > total or swap_free > swap_total:
        raise FrameError("MEM_REPORT: available memory above the total, or free swap above "
                         "the total", status=int(Status.INVALID))
    if some > MAX_PSI or full > MAX_PSI or (flags & MemReportFlag.NO_PSI and (some or full)):
        raise FrameError(f"MEM_REPORT: PSI values {some}, {full} out of range 0..{MAX_PSI} "
                         "(or given with NO_PSI)", status=int(Status.INVALID))
    return MemReportRequest(total, avail, swap_total, swap_free, some, full, flags)


def _enc_range(m: RangeRequest) -> _Parts:
    _check_range(m.addr, m.length)
    return [_RANGE.pack(m.pid, 0, m.addr, m.length)]


def _check_range(addr: int, length: int) -> None:
    if addr % PAGE_SIZE or length % PAGE_SIZE or not 0 < length <= MAX_GFNS * PAGE_SIZE:
        raise _bad(f"a range must be page-aligned and 1..{MAX_GFNS} pages long "
                   f"(addr {addr:#x}, length {length:#x})")


def _dec_range(mv: memoryview) -> RangeRequest:
    _exact(mv, _RANGE.size, "RANGE request")
    pid, reserved, addr, length = _RANGE.unpack(mv)
    if reserved:
        raise _bad("RANGE request reserved field is not zero")
    try:
        _check_range(addr, length)
    except FrameError as err:
        raise FrameError(err.message, status=int(Status.INVALID)) from None
    return RangeRequest(pid, addr, length)


def _enc_range_nominate_rep(m: RangeNominateReply) -> _Parts:
    _check_count(len(m.results), MAX_GFNS, "RANGE_NOMINATE reply")
    items = [_RANGE_NOMINATE_ITEM.pack(r.gfn, r.status, 0, 0, r.handle) for r in m.results]
    return [_U32.pack(len(m.results)), *items]


def _dec_range_nominate_rep(mv: memoryview) -> RangeNominateReply:
    n = _count(mv, MAX_GFNS, "RANGE_NOMINATE reply")
    _exact(mv, 4 + n * _RANGE_NOMINATE_ITEM.size, "RANGE_NOMINATE reply")
    results = []
    for gfn, status, r1, r2, handle in _RANGE_NOMINATE_ITEM.iter_unpack(mv[4:]):
        if r1 or r2:
            raise _bad("RANGE_NOMINATE reply item reserved field is not zero")
        results.append(RangeNominateItem(gfn, _status(status), handle))
    return RangeNominateReply(results)


def _enc_range_query_rep(m: RangeQueryReply) -> _Parts:
    _check_count(len(m.results), MAX_GFNS, "RANGE_QUERY reply")
    items = [_RANGE_QUERY_ITEM.pack(r.gfn, r.state, 0, 0, r.share_count) for r in m.results]
    return [_U32.pack(len(m.results)), *items]


def _dec_range_query_rep(mv: memoryview) -> RangeQueryReply:
    n = _count(mv, MAX_GFNS, "RANGE_QUERY reply")
    _exact(mv, 4 + n * _RANGE_QUERY_ITEM.size, "RANGE_QUERY reply")
    results = []
    for gfn, state, r1, r2, count in _RANGE_QUERY_ITEM.iter_unpack(mv[4:]):
        if r1 or r2 or state not in _SHARE_STATES:
            raise _bad(f"RANGE_QUERY reply item has state {state} or reserved bits set")
        results.append(RangeQueryItem(gfn, ShareState(state), count))
    return RangeQueryReply(results)


class OpSpec(NamedTuple):
    """One row of the op table: shapes and codecs of the request and its OK reply."""

    request: type
    reply: type
    encode_request: Callable[[Any], _Parts]
    decode_request: Callable[[memoryview], Any]
    encode_reply: Callable[[Any], _Parts]
    decode_reply: Callable[[memoryview], Any]
    #: Safe to resend after a reconnect (same effect when applied twice).
    idempotent: bool
    #: Refused with NEED_HELLO until a HELLO succeeded on this channel.
    needs_hello: bool = True


def _u32_codec(factory: Callable[[int], Any], what: str
               ) -> tuple[Callable[[Any], _Parts], Callable[[memoryview], Any]]:
    def enc(m: Any) -> _Parts:
        return [_U32.pack(m[0])]

    def dec(mv: memoryview) -> Any:
        _exact(mv, 4, what)
        return factory(_U32.unpack(mv)[0])
    return enc, dec


_new_pool_rep = _u32_codec(NewPoolReply, "NEW_POOL reply")
_destroy_req = _u32_codec(DestroyPoolRequest, "DESTROY_POOL")


def _enc_handle_msg(m: Any) -> _Parts:
    return [_enc_handle(m.pool, m.oid, m.index)]


_EMPTY_REPLY = (_enc_empty, _dec_empty(EmptyReply))

#: THE op table.  Everything the codec knows about an op is in its row.
OPS: dict[Op, OpSpec] = {
    Op.HELLO: OpSpec(HelloRequest, HelloReply, _enc_hello_req, _dec_hello_req,
                     _enc_hello_rep, _dec_hello_rep, True, needs_hello=False),
    Op.SYNC: OpSpec(SyncRequest, SyncReply, lambda m: _enc_u64(m.nonce),
                    lambda mv: SyncRequest(_dec_u64(mv, "SYNC")),
                    lambda m: _enc_u64(m.nonce),
                    lambda mv: SyncReply(_dec_u64(mv, "SYNC reply")), True, needs_hello=False),
    Op.NEW_POOL: OpSpec(NewPoolRequest, NewPoolReply, _enc_new_pool, _dec_new_pool,
                        *_new_pool_rep, False),
    Op.DESTROY_POOL: OpSpec(DestroyPoolRequest, EmptyReply, *_destroy_req, *_EMPTY_REPLY, False),
    Op.PUT: OpSpec(PutRequest, EmptyReply, _enc_put, _dec_put, *_EMPTY_REPLY, True),
    Op.GET: OpSpec(GetRequest, GetReply, _enc_handle_msg, _dec_handle_only(GetRequest, "GET"),
                   lambda m: [_page(m.page)], _dec_get_rep, True),
    Op.FLUSH_PAGE: OpSpec(FlushPageRequest, EmptyReply, _enc_handle_msg,
                          _dec_handle_only(FlushPageRequest, "FLUSH_PAGE"), *_EMPTY_REPLY, True),
    Op.FLUSH_OBJECT: OpSpec(FlushObjectRequest, EmptyReply, _enc_flush_object,
                            _dec_flush_object, *_EMPTY_REPLY, True),
    Op.PUT_BATCH: OpSpec(PutBatchRequest, PutBatchReply, _enc_put_batch, _dec_put_batch,
                         _enc_put_batch_rep, _dec_put_batch_rep, True),
    Op.GET_BATCH: OpSpec(GetBatchRequest, GetBatchReply, _enc_get_batch, _dec_get_batch,
                         _enc_get_batch_rep, _dec_get_batch_rep, True),
    Op.LIST_POOLS: OpSpec(ListPoolsRequest, ListPoolsReply, _enc_empty,
                          _dec_empty(ListPoolsRequest), _enc_list_pools_rep,
                          _dec_list_pools_rep, True),
    Op.NOMINATE: OpSpec(NominateRequest, NominateReply, lambda m: _enc_gfns(m.gfns),
                        lambda mv: NominateRequest(_dec_gfns(mv, "NOMINATE")),
                        _enc_nominate_rep, _dec_nominate_rep, True),
    Op.SHARE_QUERY: OpSpec(ShareQueryRequest, ShareQueryReply, lambda m: _enc_gfns(m.gfns),
                           lambda mv: ShareQueryRequest(_dec_gfns(mv, "SHARE_QUERY")),
                           _enc_query_rep, _dec_query_rep, True),
    Op.ABOUT_TO_WRITE: OpSpec(AboutToWriteRequest, EmptyReply, lambda m: _enc_u64(m.gfn),
                              lambda mv: AboutToWriteRequest(_dec_u64(mv, "ABOUT_TO_WRITE")),
                              *_EMPTY_REPLY, True),
    Op.STATS: OpSpec(StatsRequest, StatsReply, _enc_empty, _dec_empty(StatsRequest),
                     lambda m: [encode_stats(m.stats)],
                     lambda mv: StatsReply(decode_stats(mv)), True),
    Op.MEM_REPORT: OpSpec(MemReportRequest, EmptyReply, _enc_mem_report, _dec_mem_report,
                          *_EMPTY_REPLY, True),
    Op.RANGE_NOMINATE: OpSpec(RangeRequest, RangeNominateReply, _enc_range, _dec_range,
                              _enc_range_nominate_rep, _dec_range_nominate_rep, True),
    Op.RANGE_QUERY: OpSpec(RangeRequest, RangeQueryReply, _enc_range, _dec_range,
                           _enc_range_query_rep, _dec_range_query_rep, True),
}

# --- frames --------------------------------------------------------------------------


def encode_frame(op: int, request_id: int, payload: Buffer | Sequence[Buffer] = b"", *,
                 status: int = 0, flags: int = 0, version: int = PROTOCOL_VERSION) -> bytes:
    """Header + payload as one bytes object (payload may be given in parts: one join)."""
    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    crc = 0
    length = 0
    for part in parts:
        crc = _crc32(part, crc)
        length += len(part)
    if length > MAX_PAYLOAD:
        raise FrameError(f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                         op=op, request_id=request_id)
    try:
        head = HEADER.pack(MAGIC, version, op, flags, status, request_id, length, crc, 0)
    except struct.error as err:
        raise FrameError(f"header field out of range: {err}", op=op,
                         request_id=request_id) from None
    head = head[:_HEADER_CRC_SPAN] + _U32.pack(_crc32(head[:_HEADER_CRC_SPAN]))
    return b"".join([head, *parts])


def _spec(op: int, request_id: int) -> OpSpec:
    try:
        return OPS[Op(op)]
    except ValueError:
        raise FrameError(f"unknown opcode {op:#04x}", op=op, request_id=request_id,
                         status=int(Status.UNSUPPORTED_OP)) from None


def _encode(op: Op, request_id: int, msg: Any, want: type, encoder: Callable[[Any], _Parts],
            **header: int) -> bytes:
    if not isinstance(msg, want):
        raise FrameError(f"{op.name} takes a {want.__name__}, not {type(msg).__name__}",
                         op=op.name, request_id=request_id)
    try:
        parts = encoder(msg)
    except FrameError as err:
        raise FrameError(f"{op.name}: {err.message}", op=op.name, request_id=request_id) from None
    except (struct.error, TypeError, ValueError, OverflowError) as err:
        raise FrameError(f"{op.name}: a field is out of range or of the wrong type ({err})",
                         op=op.name, request_id=request_id) from None
    return encode_frame(op, request_id, parts, **header)


def encode_request(op: Op, request_id: int, msg: Request, *,
                   version: int = PROTOCOL_VERSION) -> bytes:
    """A complete request frame.  ``msg`` must be the op's request type (see :data:`OPS`)."""
    spec = _spec(op, request_id)
    return _encode(Op(op), request_id, msg, spec.request, spec.encode_request, version=version)


def encode_reply(op: Op, request_id: int, msg: Reply, *,
                 version: int = PROTOCOL_VERSION) -> bytes:
    """A complete OK reply frame.  ``msg`` must be the op's reply type."""
    spec = _spec(op, request_id)
    return _encode(Op(op), request_id, msg, spec.reply, spec.encode_reply,
                   flags=int(FrameFlag.REPLY), version=version)


def encode_error(op: int, request_id: int, status: Status, message: str = "", *,
                 version: int = PROTOCOL_VERSION) -> bytes:
    """A reply with a non-OK status; ``op`` may be an opcode this codec does not know."""
    if status == Status.OK:
        raise FrameError("an error reply needs a status other than OK", op=op,
                         request_id=request_id)
    text = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    return encode_frame(op, request_id, text, status=int(status), flags=int(FrameFlag.REPLY),
                        version=version)


def _decode(frame: Frame, decoder: Callable[[memoryview], Any]) -> Any:
    try:
        return decoder(memoryview(frame.payload))
    except FrameError as err:
        raise FrameError(err.message, op=_op_name(frame.op), request_id=frame.request_id,
                         **{k: v for k, v in err.fields.items()
                            if k not in ("op", "request_id")}) from None
    except (struct.error, ValueError, TypeError, IndexError, OverflowError) as err:
        # Defence in depth: every shape checks lengths first, so this is a codec bug;
        # still, a peer's bytes must never turn into anything but a protocol error.
        raise FrameError(f"malformed payload ({type(err).__name__})", op=_op_name(frame.op),
                         request_id=frame.request_id) from None


def decode_request(frame: Frame) -> Request:
    """The typed request in ``frame``; raises FrameError (with fields op, request_id and,
    for an unknown opcode, status=UNSUPPORTED_OP) for anything malformed."""
    if frame.is_reply or frame.status:
        raise FrameError("a reply (or a non-zero status) where a request was expected",
                         op=_op_name(frame.op), request_id=frame.request_id)
    spec = _spec(frame.op, frame.request_id)
    if frame.version not in SUPPORTED_VERSIONS and frame.op not in (Op.HELLO, Op.SYNC):
        raise FrameError(f"frame version {frame.version} is not supported",
                         op=_op_name(frame.op), request_id=frame.request_id,
                         status=int(Status.VERSION))
    result: Request = _decode(frame, spec.decode_request)
    return result


def decode_reply(frame: Frame) -> Reply | ErrorReply:
    """The typed OK reply in ``frame``, or an :class:`ErrorReply` for any other status."""
    if not frame.is_reply:
        raise FrameError("a request where a reply was expected", op=_op_name(frame.op),
                         request_id=frame.request_id)
    spec = _spec(frame.op, frame.request_id)
    if frame.status != Status.OK:
        status = _status(frame.status)
        if len(frame.payload) > MAX_MESSAGE:
            raise FrameError("error reply message is too long", op=_op_name(frame.op),
                             request_id=frame.request_id)
        return ErrorReply(status, frame.payload.decode("utf-8", "replace"))
    result: Reply = _decode(frame, spec.decode_reply)
    return result


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"{op:#04x}"


SUPPORTED_VERSIONS = frozenset(range(MIN_VERSION, MAX_VERSION + 1))


def negotiate_version(hello: HelloRequest) -> int | None:
    """Highest version both sides speak, or None (the host then replies VERSION)."""
    common = [v for v in SUPPORTED_VERSIONS if hello.min_version <= v <= hello.max_version]
    return max(common) if common else None


# --- the incremental decoder -----------------------------------------------------------

_FF_RUN = 4096


class FrameDecoder:
    """Sans-I/O, incremental: feed it bytes as they arrive, get whole frames back.

    State: ``_buf`` holds bytes not yet returned, starting at a frame boundary while
    ``in_sync``; otherwise it is scanning for the next header (magic + header crc).
    It never allocates by a length it read: a payload is collected only as bytes
    arrive, and a length above ``max_payload`` is garbage.  Memory is bounded by one
    frame plus the size of one ``feed``.  Corruption does not raise: it appears in the
    output as one :class:`FrameError` per resync episode, and decoding continues.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self.in_sync = True
        self.frames = 0  #: frames returned
        self.resyncs = 0  #: corruption episodes (FrameErrors returned)
        self.discarded = 0  #: bytes thrown away while resynchronising (markers excluded)

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame (or partial garbage) awaiting more input."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Frame | FrameError]:
        """Add bytes; return every frame they complete, in order, with FrameErrors where
        the stream was corrupt."""
        if data:
            self._buf += data
        return self._drain(0)

    def abandon_partial(self) -> list[Frame | FrameError]:
        """Give up on the incomplete frame at the head of the buffer (its writer is gone)
        and rescan the bytes after its first byte, returning what that yields.  Call it
        when :attr:`buffered` stayed non-zero for PARTIAL_FRAME_TIMEOUT without a frame."""
        if not self._buf:
            return []
        out: list[Frame | FrameError] = []
        pos = self._skip(0, out, "incomplete frame abandoned (writer gone?)", None, None)
        return out + self._drain(pos)

    def reset(self) -> None:
        """Forget everything buffered (a fresh connection)."""
        self._buf.clear()
        self.in_sync = True

    def _skip(self, pos: int, out: list[Frame | FrameError], reason: str,
              op: int | None, request_id: int | None) -> int:
        """Leave the bad header at ``pos``: jump to the next magic (or keep a lone
        trailing first magic byte) and report the episode once."""
        if self.in_sync:
            out.append(FrameError(f"stream corrupt: {reason}; resynchronising", op=op,
                                  request_id=request_id))
            self.resyncs += 1
            self.in_sync = False
        buf = self._buf
        nxt = buf.find(MAGIC, pos + 1)
        if nxt < 0:
            nxt = len(buf) - 1 if buf[-1] == MAGIC[0] and len(buf) - 1 > pos else len(buf)
        self.discarded += nxt - pos
        return nxt

    def _drain(self, pos: int) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        buf = self._buf
        n = len(buf)
        while pos < n:
            if self.in_sync and buf[pos] == 0xFF:
                run = buf[pos:pos + _FF_RUN]
                pos += len(run) - len(run.lstrip(b"\xff"))
                continue
            if n - pos < HEADER_SIZE:
                if buf[pos] != MAGIC[0] or (n - pos >= 2 and buf[pos + 1] != MAGIC[1]):
                    pos = self._skip(pos, out, "bad magic", None, None)
                    continue
                break
            magic, version, op, flags, status, rid, length, pcrc, hcrc = HEADER.unpack_from(
                buf, pos)
            reason = None
            if magic != MAGIC:
                reason = "bad magic"
            elif _crc32(buf[pos:pos + _HEADER_CRC_SPAN]) != hcrc:
                reason = "header checksum mismatch"
            elif version == 0 or flags & ~KNOWN_FRAME_FLAGS:
                reason = f"header has version {version} or unknown flags {flags:#x}"
            elif length > self._max_payload:
                reason = f"payload length {length} exceeds the {self._max_payload}-byte limit"
            if reason is not None:
                pos = self._skip(pos, out, reason, None, None)
                continue
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            with memoryview(buf) as view:  # one copy; released before buf is resized
                payload = view[pos + HEADER_SIZE:end].tobytes()
            if _crc32(payload) != pcrc:
                pos = self._skip(pos, out, "payload checksum mismatch", op, rid)
                continue
            out.append(Frame(op, rid, status, flags, version, payload))
            self.frames += 1
            self.in_sync = True
            pos = end
        if pos:
            del buf[:pos]
        return out


# --- errors <-> statuses ---------------------------------------------------------------

#: Host side: memd.errors class name -> reply status.  Looked up along the exception's
#: MRO, so a subclass maps like its nearest listed ancestor; anything else is INTERNAL.
EXCEPTION_STATUS: dict[str, Status] = {
    "InvalidArgument": Status.INVALID,
    "NoSuchPool": Status.NO_POOL,
    "NoSuchClient": Status.DENIED,
    "AccessDenied": Status.DENIED,
    "NoSpace": Status.NO_SPACE,
    "ClientFrozen": Status.FROZEN,
    "StaleHandle": Status.STALE,
    "NotShareable": Status.NOT_SHAREABLE,
    "SharingDenied": Status.DENIED,
    "SharingBusy": Status.BUSY,
    "OutOfFrames": Status.NO_SPACE,
    "NoSuchDomain": Status.INVALID,
    "ContentMismatch": Status.INTERNAL,
    "VersionError": Status.VERSION,
    "FrameError": Status.BAD_FRAME,
    "ProtocolError": Status.BAD_FRAME,
    "RemoteError": Status.INTERNAL,
}

#: Guest side: reply status -> the memd.errors class the client raises.  Statuses not
#: listed (BAD_FRAME, UNSUPPORTED_OP, BUSY, INTERNAL, NEED_HELLO, NOT_FOUND) raise
#: RemoteError.  Every raised error has ``fields["status"]``.
STATUS_EXCEPTION: dict[Status, type[MemdError]] = {
    Status.NO_SPACE: NoSpace,
    Status.INVALID: InvalidArgument,
    Status.NO_POOL: NoSuchPool,
    Status.DENIED: AccessDenied,
    Status.FROZEN: ClientFrozen,
    Status.STALE: StaleHandle,
    Status.NOT_SHAREABLE: NotShareable,
    Status.VERSION: VersionError,
}

#: One sentence per status, for operators when the host sent no message.
STATUS_TEXT: dict[Status, str] = {
    Status.OK: "success",
    Status.NOT_FOUND: "no page is stored under that handle",
    Status.NO_SPACE: "the host store has no space for the page right now",
    Status.INVALID: "an argument is out of range",
    Status.NO_POOL: "no such pool for this guest",
    Status.DENIED: "the host does not allow this guest to do that",
    Status.FROZEN: "the host has frozen this guest's pools",
    Status.BAD_FRAME: "the host could not parse the request frame",
    Status.UNSUPPORTED_OP: "the host does not support this operation",
    Status.VERSION: "the host and guest share no protocol version",
    Status.BUSY: "the host is busy; try again",
    Status.INTERNAL: "the host failed internally; nothing was changed",
    Status.STALE: "the sharing handle is stale",
    Status.NOT_SHAREABLE: "the page cannot be shared in its current state",
    Status.NEED_HELLO: "the request came before a successful HELLO",
}


def status_for_exception(exc: BaseException) -> Status:
    """The status a host replies with when handling a request raised ``exc``."""
    if isinstance(exc, MemdError) and "status" in exc.fields:
        try:
            return Status(exc.fields["status"])
        except ValueError:
            pass
    for cls in type(exc).__mro__:
        status = EXCEPTION_STATUS.get(cls.__name__)
        if status is not None:
            return status
    return Status.INTERNAL


def error_for_status(status: int, message: str = "", *, op: int | None = None,
                     request_id: int | None = None) -> MemdError:
    """The exception a client raises for a non-OK reply (see :data:`STATUS_EXCEPTION`)."""
    known = Status(status) if status in _STATUS_VALUES else None
    op_name = _op_name(op) if op is not None else None
    text = message or (STATUS_TEXT[known] if known is not None else f"status {status}")
    if op_name:
        text = f"{op_name}: {text}"
    cls = STATUS_EXCEPTION.get(known) if known is not None else None
    if cls is None or issubclass(cls, RemoteError):
        return RemoteError(text, status=int(status), op=op_name, request_id=request_id)
    if issubclass(cls, ProtocolError):
        return cls(text, op=op_name, request_id=request_id, status=int(status))
    if issubclass(cls, TmemError | SharingError):
        return cls(text, op=op_name, status=int(status), request_id=request_id)
    return cls(text, status=int(status))


_STATUS_VALUES = frozenset(int(s) for s in Status)
#: Status by value; the values are 0..len-1 with no gaps (checked at import).
_STATUS_TABLE: tuple[Status, ...] = tuple(sorted(Status))
assert [int(s) for s in _STATUS_TABLE] == list(range(len(_STATUS_TABLE)))
