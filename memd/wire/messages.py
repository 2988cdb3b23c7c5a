"""Typed requests and replies: one NamedTuple per op and direction.

Owns the shapes callers build and get back; the bytes are :mod:`memd.wire.payload`'s.
Every op has its own request type and its own reply type, so the type of a message
names its op (:func:`memd.wire.op_of`) and nothing else has to: the six ops whose OK
reply is empty each have an :class:`EmptyReply` subclass, and the two local range ops
each a :class:`RangeRequest` subclass.  NamedTuples, not dataclasses: the guest runs
python3-minimal, which has no ``dataclasses`` module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from memd.wire.constants import PAGE_SIZE, Buffer, Handle, Oid, Status

# --- requests -------------------------------------------------------------------------


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
    """The pages of ``[addr, addr + length)`` in process ``pid`` (0: the caller itself),
    page-aligned, at most MAX_GFNS pages.  The shape of RANGE_NOMINATE and RANGE_QUERY;
    send one of the two subclasses (this base names no op)."""

    pid: int
    addr: int
    length: int


class RangeNominateRequest(RangeRequest):
    """RANGE_NOMINATE (daemon only): nominate the pages of a range."""

    __slots__ = ()


class RangeQueryRequest(RangeRequest):
    """RANGE_QUERY (daemon only): the sharing state of the pages of a range."""

    __slots__ = ()


# --- OK replies -----------------------------------------------------------------------


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
    """The shape of an OK reply without payload; send the subclass of the op (this base
    names no op).  ``isinstance(reply, EmptyReply)`` holds for all six."""


class DestroyPoolReply(EmptyReply):
    __slots__ = ()


class PutReply(EmptyReply):
    __slots__ = ()


class FlushPageReply(EmptyReply):
    __slots__ = ()


class FlushObjectReply(EmptyReply):
    __slots__ = ()


class AboutToWriteReply(EmptyReply):
    __slots__ = ()


class MemReportReply(EmptyReply):
    __slots__ = ()


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
    HelloRequest
    | SyncRequest
    | NewPoolRequest
    | DestroyPoolRequest
    | PutRequest
    | GetRequest
    | FlushPageRequest
    | FlushObjectRequest
    | PutBatchRequest
    | GetBatchRequest
    | ListPoolsRequest
    | NominateRequest
    | ShareQueryRequest
    | AboutToWriteRequest
    | StatsRequest
    | MemReportRequest
    | RangeNominateRequest
    | RangeQueryRequest
)
Reply = (
    HelloReply
    | SyncReply
    | NewPoolReply
    | DestroyPoolReply
    | PutReply
    | FlushPageReply
    | FlushObjectReply
    | AboutToWriteReply
    | MemReportReply
    | GetReply
    | PutBatchReply
    | GetBatchReply
    | ListPoolsReply
    | NominateReply
    | ShareQueryReply
    | StatsReply
    | RangeNominateReply
    | RangeQueryReply
)
