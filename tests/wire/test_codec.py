"""memd.wire payload codec: every op round-trips, the op is the message type's, every
malformed payload is a FrameError, limits hold on both encode and decode, and errors map
to statuses (by class) and back."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd import errors
from memd.wire import (
    EXCEPTION_STATUS,
    HEADER_SIZE,
    MAGIC,
    MAX_BATCH,
    MAX_MESSAGE,
    OPS,
    PAGE_SIZE,
    STATUS_EXCEPTION,
    STATUS_TEXT,
    AboutToWriteReply,
    AboutToWriteRequest,
    DestroyPoolRequest,
    EmptyReply,
    ErrorReply,
    FlushObjectRequest,
    FlushPageReply,
    FlushPageRequest,
    Frame,
    FrameDecoder,
    FrameFlag,
    GetBatchReply,
    GetBatchRequest,
    GetRequest,
    HelloRequest,
    ListPoolsRequest,
    MemReportRequest,
    NewPoolRequest,
    NominateRequest,
    Op,
    PutBatchRequest,
    PutReply,
    PutRequest,
    RangeNominateRequest,
    RangeQueryRequest,
    RangeRequest,
    Request,
    ShareQueryRequest,
    StatsRequest,
    Status,
    SyncReply,
    SyncRequest,
    decode_reply,
    decode_request,
    decode_stats,
    encode_error,
    encode_reply,
    encode_request,
    encode_request_parts,
    encode_stats,
    error_for_status,
    negotiate_version,
    oid_from_int,
    oid_to_int,
    op_of,
    status_for_exception,
)
from tests.wire.strategies import REPLIES, REQUESTS, normalise

ANY_OP = st.sampled_from(list(Op))


def only_frame(data: bytes) -> Frame:
    items = FrameDecoder().feed(data)
    assert len(items) == 1 and isinstance(items[0], Frame), items
    return items[0]


def test_every_op_has_a_table_row_and_strategies() -> None:
    assert set(OPS) == set(Op) == set(REQUESTS) == set(REPLIES)


@settings(max_examples=300, deadline=None)
@given(st.data(), ANY_OP, st.integers(0, 0xFFFFFFFF))
def test_request_round_trip(data: st.DataObject, op: Op, request_id: int) -> None:
    msg = data.draw(REQUESTS[op])
    frame = only_frame(encode_request(request_id, msg))
    assert (frame.op, frame.request_id, frame.status, frame.is_reply) == (op, request_id, 0, False)
    assert normalise(decode_request(frame)) == normalise(msg)


@settings(max_examples=300, deadline=None)
@given(st.data(), ANY_OP, st.integers(0, 0xFFFFFFFF))
def test_reply_round_trip(data: st.DataObject, op: Op, request_id: int) -> None:
    msg = data.draw(REPLIES[op])
    frame = only_frame(encode_reply(request_id, msg))
    assert frame.is_reply and frame.status == Status.OK and frame.request_id == request_id
    assert frame.op == op
    assert normalise(decode_reply(frame)) == normalise(msg)


@given(
    st.integers(0, 255),
    st.sampled_from([s for s in Status if s != Status.OK]),
    st.text(max_size=2000),
)
def test_error_reply_round_trip(op: int, status: Status, message: str) -> None:
    reply = (
        decode_reply(only_frame(encode_error(op, 5, status, message))) if op in set(Op) else None
    )
    if reply is None:  # unknown opcode: the frame still decodes, decode_reply refuses it
        frame = only_frame(encode_error(op, 5, status, message))
        with pytest.raises(errors.FrameError):
            decode_reply(frame)
        return
    assert isinstance(reply, ErrorReply) and reply.status == status
    assert len(reply.message.encode()) <= MAX_MESSAGE + 3  # truncation may leave U+FFFD
    if len(message.encode()) <= MAX_MESSAGE:
        assert reply.message == message


def test_header_layout_is_what_protocol_md_says() -> None:
    frame = encode_request(0x01020304, SyncRequest(0x1122334455667788))
    payload = struct.pack("<Q", 0x1122334455667788)
    head = MAGIC + bytes([1, 0x02]) + struct.pack("<HHII", 0, 0, 0x01020304, 8)
    head += struct.pack("<I", zlib.crc32(payload))
    head += struct.pack("<I", zlib.crc32(head))
    assert HEADER_SIZE == 24
    assert frame == head + payload


def _payload(op: Op, msg: Any, reply: bool = False) -> bytes:
    raw = encode_reply(1, msg) if reply else encode_request(1, msg)
    return raw[HEADER_SIZE:]


def _frame(op: int, payload: bytes, reply: bool = False, status: int = 0) -> Frame:
    return Frame(op, 1, status, int(FrameFlag.REPLY) if reply else 0, 1, payload)


@settings(max_examples=200, deadline=None)
@given(st.data(), ANY_OP, st.booleans())
def test_wrong_length_payloads_are_frame_errors(data: st.DataObject, op: Op, reply: bool) -> None:
    msg = data.draw((REPLIES if reply else REQUESTS)[op])
    good = _payload(op, msg, reply)
    cut = data.draw(st.integers(0, len(good) + 8))
    bad = good[:cut] if cut < len(good) else good + bytes(cut - len(good) + 1)
    decode = decode_reply if reply else decode_request
    try:
        result = decode(_frame(op, bad, reply))
    except errors.FrameError as err:
        assert err.fields["op"] == op.name and err.request_id == 1
    else:
        # A few shapes have variable length (stats text, list of pools, error message)
        assert op in (Op.STATS, Op.LIST_POOLS) and reply, (op, len(good), len(bad), result)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 3), st.binary(max_size=600))
def test_arbitrary_payloads_give_a_message_or_a_frame_error(
    op: int, status: int, flags: int, payload: bytes
) -> None:
    frame = Frame(op, 9, status, flags, 1, payload)
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(errors.FrameError):
            decode(frame)


def test_unknown_opcode_says_unsupported() -> None:
    with pytest.raises(errors.FrameError) as info:
        decode_request(_frame(0x7F, b""))
    assert status_for_exception(info.value) == Status.UNSUPPORTED_OP


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<II", 1, 0),  # count 0
        struct.pack("<II", 1, MAX_BATCH + 1) + bytes((MAX_BATCH + 1) * 32),  # count over limit
        struct.pack("<II", 1, 0xFFFFFFFF),  # absurd count: no allocation, just an error
    ],
)
def test_batch_counts_are_limited(payload: bytes) -> None:
    for op in (Op.GET_BATCH, Op.PUT_BATCH):
        with pytest.raises(errors.FrameError):
            decode_request(_frame(op, payload))


def test_reserved_fields_must_be_zero() -> None:
    good = bytearray(_payload(Op.GET_BATCH, GetBatchRequest(1, [((1, 2, 3), 4)])))
    decode_request(_frame(Op.GET_BATCH, bytes(good)))
    good[-1] = 1  # the item's reserved u32
    with pytest.raises(errors.FrameError):
        decode_request(_frame(Op.GET_BATCH, bytes(good)))
    with pytest.raises(errors.FrameError):
        decode_request(_frame(Op.NEW_POOL, struct.pack("<II16s", 4, PAGE_SIZE, bytes(16))))


def test_direction_is_checked() -> None:
    with pytest.raises(errors.FrameError):
        decode_request(_frame(Op.STATS, b"", reply=True))
    with pytest.raises(errors.FrameError):
        decode_reply(_frame(Op.STATS, b""))
    with pytest.raises(errors.FrameError):
        decode_request(_frame(Op.STATS, b"", status=3))


def test_encoder_enforces_limits_and_types() -> None:
    page = bytes(PAGE_SIZE)
    with pytest.raises(errors.FrameError):
        encode_request(1, PutRequest(1, (0, 0, 0), 0, page[:-1]))
    too_many = [((0, 0, 0), i) for i in range(MAX_BATCH + 1)]
    with pytest.raises(errors.FrameError):
        encode_request(1, PutBatchRequest(1, too_many, [page] * len(too_many)))
    with pytest.raises(errors.FrameError):
        encode_request(1, PutBatchRequest(1, too_many[:2], [page]))
    with pytest.raises(errors.FrameError):
        encode_reply(1, PutRequest(1, (0, 0, 0), 0, page))  # type: ignore[arg-type]
    with pytest.raises(errors.FrameError):
        encode_request(1, PutRequest(1, (1 << 64, 0, 0), 0, page))
    with pytest.raises(errors.FrameError):
        encode_request(1 << 32, SyncRequest(0))
    with pytest.raises(errors.FrameError):
        encode_reply(1, GetBatchReply([Status.OK], [None]))
    with pytest.raises(errors.FrameError):
        encode_error(Op.GET, 1, Status.OK)
    with pytest.raises(errors.FrameError):
        encode_stats({"a=b": 1})


def test_stats_text() -> None:
    blob = encode_stats({"pages": 12, "name": "guest 1", "neg": -3})
    assert blob == b"pages=12\nname=guest 1\nneg=-3\n"
    assert decode_stats(blob) == {"pages": 12, "name": "guest 1", "neg": -3}
    for bad in (b"novalue\n", b"\xff=1\n", b"=1\n"):
        with pytest.raises(errors.FrameError):
            decode_stats(bad)


@given(st.integers(0, (1 << 192) - 1))
def test_oid_words(value: int) -> None:
    assert oid_to_int(oid_from_int(value)) == value


def test_version_negotiation() -> None:
    assert negotiate_version(HelloRequest(1, 7, 0, bytes(16))) == 1
    assert negotiate_version(HelloRequest(2, 7, 0, bytes(16))) is None


def test_exceptions_map_to_statuses_and_back() -> None:
    assert set(STATUS_TEXT) == set(Status)
    for cls in EXCEPTION_STATUS:
        assert getattr(errors, cls.__name__) is cls, cls
    assert status_for_exception(errors.NoSpace("full")) == Status.NO_SPACE
    assert status_for_exception(errors.StaleSourceHandle("stale")) == Status.STALE
    assert status_for_exception(errors.NoSuchDomain("gfn")) == Status.INVALID
    assert status_for_exception(KeyError("x")) == Status.INTERNAL
    assert status_for_exception(errors.FrameError("bad")) == Status.BAD_FRAME
    for status, cls in STATUS_EXCEPTION.items():
        err = error_for_status(status, "", op=Op.PUT)
        assert type(err) is cls and err.fields["status"] == status
        assert str(err) == f"PUT: {STATUS_TEXT[status]}"
    busy = error_for_status(Status.BUSY, "later", op=Op.GET, request_id=4)
    assert isinstance(busy, errors.RemoteError) and busy.status == Status.BUSY
    assert str(busy) == "GET: later"
    assert isinstance(error_for_status(999), errors.RemoteError)


# --- the op is the message's -------------------------------------------------------------


def test_every_op_has_its_own_request_and_reply_type() -> None:
    types = [t for spec in OPS.values() for t in (spec.request, spec.reply)]
    assert len(set(types)) == len(types) == 2 * len(Op)
    for op, spec in OPS.items():
        assert spec.op == op
        assert op_of(REQUEST_EXAMPLES[op]) == op


REQUEST_EXAMPLES: dict[Op, Request] = {
    Op.HELLO: HelloRequest(1, 1, 0, bytes(16)),
    Op.SYNC: SyncRequest(1),
    Op.NEW_POOL: NewPoolRequest(0),
    Op.DESTROY_POOL: DestroyPoolRequest(1),
    Op.PUT: PutRequest(1, (1, 0, 0), 0, bytes(PAGE_SIZE)),
    Op.GET: GetRequest(1, (1, 0, 0), 0),
    Op.FLUSH_PAGE: FlushPageRequest(1, (1, 0, 0), 0),
    Op.FLUSH_OBJECT: FlushObjectRequest(1, (1, 0, 0)),
    Op.PUT_BATCH: PutBatchRequest(1, [((1, 0, 0), 0)], [bytes(PAGE_SIZE)]),
    Op.GET_BATCH: GetBatchRequest(1, [((1, 0, 0), 0)]),
    Op.LIST_POOLS: ListPoolsRequest(),
    Op.NOMINATE: NominateRequest([1]),
    Op.SHARE_QUERY: ShareQueryRequest([1]),
    Op.ABOUT_TO_WRITE: AboutToWriteRequest(1),
    Op.STATS: StatsRequest(),
    Op.MEM_REPORT: MemReportRequest(2, 1, 0, 0, 0, 0),
    Op.RANGE_NOMINATE: RangeNominateRequest(0, 0, PAGE_SIZE),
    Op.RANGE_QUERY: RangeQueryRequest(0, 0, PAGE_SIZE),
}


def test_the_frame_op_comes_from_the_message_type() -> None:
    assert only_frame(encode_request(3, GetRequest(1, (2, 0, 0), 3))).op == Op.GET
    assert only_frame(encode_reply(3, FlushPageReply())).op == Op.FLUSH_PAGE
    assert only_frame(encode_reply(3, PutReply())).op == Op.PUT
    # Replies of different ops are told apart by type, yet all are EmptyReply shapes.
    reply = decode_reply(only_frame(encode_reply(4, AboutToWriteReply())))
    assert type(reply) is AboutToWriteReply and isinstance(reply, EmptyReply)
    request = decode_request(only_frame(encode_request(5, RangeQueryRequest(0, 0, PAGE_SIZE))))
    assert type(request) is RangeQueryRequest and isinstance(request, RangeRequest)


@pytest.mark.parametrize("msg", [EmptyReply(), RangeRequest(0, 0, PAGE_SIZE), ("not", "one")])
def test_a_shape_that_names_no_op_is_refused(msg: Any) -> None:
    with pytest.raises(errors.FrameError, match="not the message of any op"):
        encode_request(1, msg)
    with pytest.raises(errors.FrameError, match="not the message of any op"):
        encode_reply(1, msg)


def test_requests_and_replies_are_not_interchangeable() -> None:
    with pytest.raises(errors.FrameError, match="is a reply"):
        encode_request(1, SyncReply(1))  # type: ignore[arg-type]
    with pytest.raises(errors.FrameError, match="is a request"):
        encode_reply(1, SyncRequest(1))  # type: ignore[arg-type]


def test_parts_are_the_frame_without_a_join() -> None:
    page = bytearray(b"\x42" * PAGE_SIZE)
    msg = PutBatchRequest(1, [((1, 0, 0), 0), ((1, 0, 0), 1)], [page, memoryview(page)])
    parts = encode_request_parts(7, msg)
    last = parts[-1]
    assert parts[-2] is page and isinstance(last, memoryview) and last.obj is page
    assert b"".join(parts) == encode_request(7, msg)


_WRONG_CODEC = """
from memd.wire import payload as p
from memd.wire.constants import Op
from memd.wire.messages import GetReply, GetRequest
from memd.wire.ops import OpSpec

OpSpec(Op.GET, GetRequest, GetReply, encode_request=p.encode_put, decode_request=p.decode_get,
       encode_reply=p.encode_get_reply, decode_reply=p.decode_get_reply)
"""


def test_mypy_refuses_a_codec_wired_to_the_wrong_message(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "wrong_codec.py"
    snippet.write_text(_WRONG_CODEC)
    out, _, code = api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "c"),
            "--python-version",
            "3.11",
            str(snippet),
        ]
    )
    assert code == 1 and '"encode_request"' in out and "PutRequest" in out, out


# --- statuses by class --------------------------------------------------------------------


def test_status_map_is_keyed_by_class_not_by_name() -> None:
    class NoSpace(Exception):  # same name as memd.errors.NoSpace, unrelated
        pass

    class FrameError(KeyError):  # ditto
        pass

    assert status_for_exception(NoSpace("x")) == Status.INTERNAL
    assert status_for_exception(FrameError("x")) == Status.INTERNAL
    assert all(isinstance(cls, type) for cls in EXCEPTION_STATUS)


def test_the_most_specific_listed_class_wins() -> None:
    class PoolGone(errors.NoSuchPool):  # not listed: maps like its nearest listed ancestor
        pass

    class Both(errors.NotShareable, errors.OutOfFrames):
        pass

    assert status_for_exception(PoolGone("gone")) == Status.NO_POOL
    assert status_for_exception(errors.StaleClientHandle("old")) == Status.STALE
    assert status_for_exception(Both("x")) == Status.NOT_SHAREABLE  # first in the MRO
    assert status_for_exception(errors.FrameError("bad")) == Status.BAD_FRAME
    assert status_for_exception(errors.VersionError("v")) == Status.VERSION  # not its base's
    assert status_for_exception(errors.NbdProtocolError("n")) == Status.BAD_FRAME
    assert status_for_exception(errors.TmemError("t")) == Status.INTERNAL


def test_new_pool_unknown_flag_bits_are_bad_frame_known_bits_are_not() -> None:
    """docs/protocol.md, Limits: an unknown flag bit makes the frame malformed."""
    frame = _frame(Op.NEW_POOL, struct.pack("<II16s", 0x4, PAGE_SIZE, bytes(16)))
    with pytest.raises(errors.FrameError) as info:
        decode_request(frame)
    assert status_for_exception(info.value) == Status.BAD_FRAME
    both = _frame(Op.NEW_POOL, struct.pack("<II16s", 0x3, PAGE_SIZE, bytes(16)))
    assert decode_request(both) == NewPoolRequest(0x3, bytes(16), PAGE_SIZE)
