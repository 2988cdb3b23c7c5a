"""The op table and the message codec: typed message in, frame out, and back.

Owns :data:`OPS`, the one table of what the protocol knows about each op (its request
and reply types, their payload codecs, whether it may be resent, whether it needs a
HELLO first), and the functions built on it.  A message's type names its op (every op
has its own request and reply type), so :func:`encode_request` and
:func:`encode_reply` take only the message: there is no separate op to disagree with
it.  Each row is an ``OpSpec[Req, Rep]`` whose codecs mypy checks against the row's
types, so a codec wired to the wrong message does not type-check.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from memd.errors import FrameError
from memd.wire import payload as p
from memd.wire import payload_info as pi
from memd.wire.constants import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Buffer,
    FrameFlag,
    Op,
    Status,
)
from memd.wire.framing import Frame, encode_frame_parts
from memd.wire.messages import (
    AboutToWriteReply,
    AboutToWriteRequest,
    DestroyPoolReply,
    DestroyPoolRequest,
    ErrorReply,
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
    MemReportReply,
    MemReportRequest,
    NewPoolReply,
    NewPoolRequest,
    NominateReply,
    NominateRequest,
    PutBatchReply,
    PutBatchRequest,
    PutReply,
    PutRequest,
    RangeNominateReply,
    RangeNominateRequest,
    RangeQueryReply,
    RangeQueryRequest,
    Reply,
    Request,
    ShareQueryReply,
    ShareQueryRequest,
    StatsReply,
    StatsRequest,
    SyncReply,
    SyncRequest,
)

Req = TypeVar("Req")
Rep = TypeVar("Rep")


class OpSpec(Generic[Req, Rep]):
    """One row of the op table: shapes and codecs of the request and its OK reply."""

    __slots__ = (
        "decode_reply",
        "decode_request",
        "encode_reply",
        "encode_request",
        "idempotent",
        "needs_hello",
        "op",
        "reply",
        "request",
    )

    def __init__(
        self,
        op: Op,
        request: type[Req],
        reply: type[Rep],
        *,
        encode_request: Callable[[Req], p.Parts],
        decode_request: Callable[[memoryview], Req],
        encode_reply: Callable[[Rep], p.Parts],
        decode_reply: Callable[[memoryview], Rep],
        idempotent: bool = True,
        needs_hello: bool = True,
    ) -> None:
        self.op = op
        self.request = request
        self.reply = reply
        self.encode_request = encode_request
        self.decode_request = decode_request
        self.encode_reply = encode_reply
        self.decode_reply = decode_reply
        #: Safe to resend after a reconnect (same effect when applied twice).
        self.idempotent = idempotent
        #: Refused with NEED_HELLO until a HELLO succeeded on this channel.
        self.needs_hello = needs_hello

    def __repr__(self) -> str:
        return f"OpSpec({self.op.name}: {self.request.__name__} -> {self.reply.__name__})"


_nothing = p.encode_nothing

#: THE op table.  Everything the codec knows about an op is in its row.
OPS: dict[Op, OpSpec[Any, Any]] = {
    spec.op: spec
    for spec in (
        OpSpec[HelloRequest, HelloReply](
            Op.HELLO,
            HelloRequest,
            HelloReply,
            encode_request=p.encode_hello_request,
            decode_request=p.decode_hello_request,
            encode_reply=p.encode_hello_reply,
            decode_reply=p.decode_hello_reply,
            needs_hello=False,
        ),
        OpSpec[SyncRequest, SyncReply](
            Op.SYNC,
            SyncRequest,
            SyncReply,
            encode_request=p.encode_sync_request,
            decode_request=p.decode_sync_request,
            encode_reply=p.encode_sync_reply,
            decode_reply=p.decode_sync_reply,
            needs_hello=False,
        ),
        OpSpec[NewPoolRequest, NewPoolReply](
            Op.NEW_POOL,
            NewPoolRequest,
            NewPoolReply,
            encode_request=p.encode_new_pool,
            decode_request=p.decode_new_pool,
            encode_reply=p.encode_new_pool_reply,
            decode_reply=p.decode_new_pool_reply,
            idempotent=False,
        ),
        OpSpec[DestroyPoolRequest, DestroyPoolReply](
            Op.DESTROY_POOL,
            DestroyPoolRequest,
            DestroyPoolReply,
            encode_request=p.encode_destroy_pool,
            decode_request=p.decode_destroy_pool,
            encode_reply=_nothing,
            decode_reply=p.empty_reply_decoder(DestroyPoolReply),
            idempotent=False,
        ),
        OpSpec[PutRequest, PutReply](
            Op.PUT,
            PutRequest,
            PutReply,
            encode_request=p.encode_put,
            decode_request=p.decode_put,
            encode_reply=_nothing,
            decode_reply=p.empty_reply_decoder(PutReply),
        ),
        OpSpec[GetRequest, GetReply](
            Op.GET,
            GetRequest,
            GetReply,
            encode_request=p.encode_get,
            decode_request=p.decode_get,
            encode_reply=p.encode_get_reply,
            decode_reply=p.decode_get_reply,
        ),
        OpSpec[FlushPageRequest, FlushPageReply](
            Op.FLUSH_PAGE,
            FlushPageRequest,
            FlushPageReply,
            encode_request=p.encode_flush_page,
            decode_request=p.decode_flush_page,
            encode_reply=_nothing,
            decode_reply=p.empty_reply_decoder(FlushPageReply),
        ),
        OpSpec[FlushObjectRequest, FlushObjectReply](
            Op.FLUSH_OBJECT,
            FlushObjectRequest,
            FlushObjectReply,
            encode_request=p.encode_flush_object,
            decode_request=p.decode_flush_object,
            encode_reply=_nothing,
            decode_reply=p.empty_reply_decoder(FlushObjectReply),
        ),
        OpSpec[PutBatchRequest, PutBatchReply](
            Op.PUT_BATCH,
            PutBatchRequest,
            PutBatchReply,
            encode_request=p.encode_put_batch,
            decode_request=p.decode_put_batch,
            encode_reply=p.encode_put_batch_reply,
            decode_reply=p.decode_put_batch_reply,
        ),
        OpSpec[GetBatchRequest, GetBatchReply](
            Op.GET_BATCH,
            GetBatchRequest,
            GetBatchReply,
            encode_request=p.encode_get_batch,
            decode_request=p.decode_get_batch,
            encode_reply=p.encode_get_batch_reply,
            decode_reply=p.decode_get_batch_reply,
        ),
        OpSpec[ListPoolsRequest, ListPoolsReply](
            Op.LIST_POOLS,
            ListPoolsRequest,
            ListPoolsReply,
            encode_request=_nothing,
            decode_request=p.empty_decoder(ListPoolsRequest),
            encode_reply=pi.encode_list_pools_reply,
            decode_reply=pi.decode_list_pools_reply,
        ),
        OpSpec[NominateRequest, NominateReply](
            Op.NOMINATE,
            NominateRequest,
            NominateReply,
            encode_request=pi.encode_nominate,
            decode_request=pi.decode_nominate,
            encode_reply=pi.encode_nominate_reply,
            decode_reply=pi.decode_nominate_reply,
        ),
        OpSpec[ShareQueryRequest, ShareQueryReply](
            Op.SHARE_QUERY,
            ShareQueryRequest,
            ShareQueryReply,
            encode_request=pi.encode_share_query,
            decode_request=pi.decode_share_query,
            encode_reply=pi.encode_share_query_reply,
            decode_reply=pi.decode_share_query_reply,
        ),
        OpSpec[AboutToWriteRequest, AboutToWriteReply](
            Op.ABOUT_TO_WRITE,
            AboutToWriteRequest,
            AboutToWriteReply,
            encode_request=pi.encode_about_to_write,
            decode_request=pi.decode_about_to_write,
            encode_reply=_nothing,
            decode_reply=p.empty_reply_decoder(AboutToWriteReply),
        ),
        OpSpec[StatsRequest, StatsReply](
            Op.STATS,
            StatsRequest,
            StatsReply,
            encode_request=_nothing,
            decode_request=p.empty_decoder(StatsRequest),
            encode_reply=pi.encode_stats_reply,
            decode_reply=pi.decode_stats_reply,
        ),
        OpSpec[MemReportRequest, MemReportReply](
            Op.MEM_REPORT,
            MemReportRequest,
            MemReportReply,
            encode_request=pi.encode_mem_report,
            decode_request=pi.decode_mem_report,
            encode_reply=_nothing,
            decode_reply=p.empty_reply_decoder(MemReportReply),
        ),
        OpSpec[RangeNominateRequest, RangeNominateReply](
            Op.RANGE_NOMINATE,
            RangeNominateRequest,
            RangeNominateReply,
            encode_request=pi.encode_range,
            decode_request=pi.decode_range_nominate,
            encode_reply=pi.encode_range_nominate_reply,
            decode_reply=pi.decode_range_nominate_reply,
        ),
        OpSpec[RangeQueryRequest, RangeQueryReply](
            Op.RANGE_QUERY,
            RangeQueryRequest,
            RangeQueryReply,
            encode_request=pi.encode_range,
            decode_request=pi.decode_range_query,
            encode_reply=pi.encode_range_query_reply,
            decode_reply=pi.decode_range_query_reply,
        ),
    )
}

#: Message type -> its row; exact types only (the EmptyReply and RangeRequest bases name
#: no op).  Built from OPS, so the two cannot disagree.
_BY_TYPE: dict[type, OpSpec[Any, Any]] = {
    **{spec.request: spec for spec in OPS.values()},
    **{spec.reply: spec for spec in OPS.values()},
}
assert len(_BY_TYPE) == 2 * len(OPS), "every op needs its own request and reply type"


def _spec_of(msg: object, request_id: int | None = None) -> OpSpec[Any, Any]:
    spec = _BY_TYPE.get(type(msg))
    if spec is None:
        raise FrameError(
            f"{type(msg).__name__} is not the message of any op (send the op's "
            "own request or reply type)",
            request_id=request_id,
        )
    return spec


def op_of(msg: Request | Reply) -> Op:
    """The op a request or OK reply belongs to (its type says)."""
    return _spec_of(msg).op


def spec_of(msg: Request | Reply) -> OpSpec[Any, Any]:
    """The table row of a request or OK reply."""
    return _spec_of(msg)


def _encode(
    spec: OpSpec[Any, Any],
    request_id: int,
    encoder: Callable[[Any], p.Parts],
    msg: object,
    *,
    flags: int,
    version: int,
) -> list[Buffer]:
    op = spec.op
    try:
        parts = encoder(msg)
    except FrameError as err:
        raise FrameError(f"{op.name}: {err.message}", op=op.name, request_id=request_id) from None
    except (struct.error, TypeError, ValueError, OverflowError) as err:
        raise FrameError(
            f"{op.name}: a field is out of range or of the wrong type ({err})",
            op=op.name,
            request_id=request_id,
        ) from None
    return encode_frame_parts(op, request_id, parts, flags=flags, version=version)


def encode_request_parts(
    request_id: int, msg: Request, *, version: int = PROTOCOL_VERSION
) -> list[Buffer]:
    """A request frame as header + payload parts (pages are not copied), for writev."""
    spec = _spec_of(msg, request_id)
    if type(msg) is not spec.request:
        raise FrameError(
            f"{type(msg).__name__} is a reply, not a request",
            op=spec.op.name,
            request_id=request_id,
        )
    return _encode(spec, request_id, spec.encode_request, msg, flags=0, version=version)


def encode_request(request_id: int, msg: Request, *, version: int = PROTOCOL_VERSION) -> bytes:
    """A complete request frame; the op is the one of ``msg``'s type."""
    return b"".join(encode_request_parts(request_id, msg, version=version))


def encode_reply_parts(
    request_id: int, msg: Reply, *, version: int = PROTOCOL_VERSION
) -> list[Buffer]:
    """An OK reply frame as header + payload parts."""
    spec = _spec_of(msg, request_id)
    if type(msg) is not spec.reply:
        raise FrameError(
            f"{type(msg).__name__} is a request, not a reply",
            op=spec.op.name,
            request_id=request_id,
        )
    return _encode(
        spec, request_id, spec.encode_reply, msg, flags=int(FrameFlag.REPLY), version=version
    )


def encode_reply(request_id: int, msg: Reply, *, version: int = PROTOCOL_VERSION) -> bytes:
    """A complete OK reply frame; the op is the one of ``msg``'s type."""
    return b"".join(encode_reply_parts(request_id, msg, version=version))


def encode_error(
    op: int, request_id: int, status: Status, message: str = "", *, version: int = PROTOCOL_VERSION
) -> bytes:
    """A reply with a non-OK status.  An error reply has no message type, so it takes the
    op of the frame it answers — which may be an opcode this codec does not know."""
    if status == Status.OK:
        raise FrameError(
            "an error reply needs a status other than OK", op=op, request_id=request_id
        )
    text = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    return b"".join(
        encode_frame_parts(
            op, request_id, text, status=int(status), flags=int(FrameFlag.REPLY), version=version
        )
    )


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"{op:#04x}"


def _frame_spec(frame: Frame) -> OpSpec[Any, Any]:
    try:
        return OPS[Op(frame.op)]
    except ValueError:
        raise FrameError(
            f"unknown opcode {frame.op:#04x}",
            op=frame.op,
            request_id=frame.request_id,
            status=int(Status.UNSUPPORTED_OP),
        ) from None


def _decode(frame: Frame, decoder: Callable[[memoryview], Any]) -> Any:
    try:
        return decoder(memoryview(frame.payload))
    except FrameError as err:
        raise FrameError(
            err.message,
            op=op_name(frame.op),
            request_id=frame.request_id,
            **{k: v for k, v in err.fields.items() if k not in ("op", "request_id")},
        ) from None
    except (struct.error, ValueError, TypeError, IndexError, OverflowError) as err:
        # Defence in depth: every shape checks lengths first, so this is a codec bug;
        # still, a peer's bytes must never turn into anything but a protocol error.
        raise FrameError(
            f"malformed payload ({type(err).__name__})",
            op=op_name(frame.op),
            request_id=frame.request_id,
        ) from None


def decode_request(frame: Frame) -> Request:
    """The typed request in ``frame``; raises FrameError (with fields op, request_id and,
    for an unknown opcode, status=UNSUPPORTED_OP) for anything malformed."""
    if frame.is_reply or frame.status:
        raise FrameError(
            "a reply (or a non-zero status) where a request was expected",
            op=op_name(frame.op),
            request_id=frame.request_id,
        )
    spec = _frame_spec(frame)
    if frame.version not in SUPPORTED_VERSIONS and frame.op not in (Op.HELLO, Op.SYNC):
        raise FrameError(
            f"frame version {frame.version} is not supported",
            op=op_name(frame.op),
            request_id=frame.request_id,
            status=int(Status.VERSION),
        )
    result: Request = _decode(frame, spec.decode_request)
    return result


def decode_reply(frame: Frame) -> Reply | ErrorReply:
    """The typed OK reply in ``frame``, or an :class:`ErrorReply` for any other status."""
    if not frame.is_reply:
        raise FrameError(
            "a request where a reply was expected",
            op=op_name(frame.op),
            request_id=frame.request_id,
        )
    spec = _frame_spec(frame)
    if frame.status != Status.OK:
        status = _decode(frame, lambda _mv: p.status(frame.status))
        if len(frame.payload) > MAX_MESSAGE:
            raise FrameError(
                "error reply message is too long", op=op_name(frame.op), request_id=frame.request_id
            )
        return ErrorReply(status, bytes(frame.payload).decode("utf-8", "replace"))
    result: Reply = _decode(frame, spec.decode_reply)
    return result


def negotiate_version(hello: HelloRequest) -> int | None:
    """Highest version both sides speak, or None (the host then replies VERSION)."""
    common = [v for v in SUPPORTED_VERSIONS if hello.min_version <= v <= hello.max_version]
    return max(common) if common else None
