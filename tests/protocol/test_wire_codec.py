"""memd.wire payload codec: every op round-trips, every malformed payload is a FrameError,
limits hold on both encode and decode, and errors map to statuses and back."""

from __future__ import annotations

import contextlib
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import REPLIES, REQUESTS, normalise

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
    ErrorReply,
    Frame,
    FrameDecoder,
    FrameFlag,
    GetBatchReply,
    GetBatchRequest,
    HelloRequest,
    Op,
    PutBatchRequest,
    PutRequest,
    Status,
    SyncRequest,
    decode_reply,
    decode_request,
    decode_stats,
    encode_error,
    encode_reply,
    encode_request,
    encode_stats,
    error_for_status,
    negotiate_version,
    oid_from_int,
    oid_to_int,
    status_for_exception,
)

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
    frame = only_frame(encode_request(op, request_id, msg))
    assert (frame.op, frame.request_id, frame.status, frame.is_reply) == (op, request_id, 0,
                                                                          False)
    assert normalise(decode_request(frame)) == normalise(msg)


@settings(max_examples=300, deadline=None)
@given(st.data(), ANY_OP, st.integers(0, 0xFFFFFFFF))
def test_reply_round_trip(data: st.DataObject, op: Op, request_id: int) -> None:
    msg = data.draw(REPLIES[op])
    frame = only_frame(encode_reply(op, request_id, msg))
    assert frame.is_reply and frame.status == Status.OK and frame.request_id == request_id
    assert normalise(decode_reply(frame)) == normalise(msg)


@given(st.integers(0, 255), st.sampled_from([s for s in Status if s != Status.OK]),
       st.text(max_size=2000))
def test_error_reply_round_trip(op: int, status: Status, message: str) -> None:
    reply = decode_reply(only_frame(encode_error(op, 5, status, message))) if op in set(
        Op) else None
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
    frame = encode_request(Op.SYNC, 0x01020304, SyncRequest(0x1122334455667788))
    payload = struct.pack("<Q", 0x1122334455667788)
    head = MAGIC + bytes([1, 0x02]) + struct.pack("<HHII", 0, 0, 0x01020304, 8)
    head += struct.pack("<I", zlib.crc32(payload))
    head += struct.pack("<I", zlib.crc32(head))
    assert HEADER_SIZE == 24
    assert frame == head + payload


def _payload(op: Op, msg: Any, reply: bool = False) -> bytes:
    raw = encode_reply(op, 1, msg) if reply else encode_request(op, 1, msg)
    return raw[HEADER_SIZE:]


def _frame(op: int, payload: bytes, reply: bool = False, status: int = 0) -> Frame:
    return Frame(op, 1, status, int(FrameFlag.REPLY) if reply else 0, 1, payload)


@settings(max_examples=200, deadline=None)
@given(st.data(), ANY_OP, st.booleans())
def test_wrong_length_payloads_are_frame_errors(data: st.DataObject, op: Op, reply: bool
                                                ) -> None:
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
        op: int, status: int, flags: int, payload: bytes) -> None:
    frame = Frame(op, 9, status, flags, 1, payload)
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(errors.FrameError):
            decode(frame)


def test_unknown_opcode_says_unsupported() -> None:
    with pytest.raises(errors.FrameError) as info:
        decode_request(_frame(0x7F, b""))
    assert status_for_exception(info.value) == Status.UNSUPPORTED_OP


@pytest.mark.parametrize("payload", [
    struct.pack("<II", 1, 0),  # count 0
    struct.pack("<II", 1, MAX_BATCH + 1) + bytes((MAX_BATCH + 1) * 32),  # count over limit
    struct.pack("<II", 1, 0xFFFFFFFF),  # absurd count: no allocation, just an error
])
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
        encode_request(Op.PUT, 1, PutRequest(1, (0, 0, 0), 0, page[:-1]))
    too_many = [((0, 0, 0), i) for i in range(MAX_BATCH + 1)]
    with pytest.raises(errors.FrameError):
        encode_request(Op.PUT_BATCH, 1, PutBatchRequest(1, too_many, [page] * len(too_many)))
    with pytest.raises(errors.FrameError):
        encode_request(Op.PUT_BATCH, 1, PutBatchRequest(1, too_many[:2], [page]))
    with pytest.raises(errors.FrameError):
        encode_request(Op.GET, 1, PutRequest(1, (0, 0, 0), 0, page))  # wrong type for GET
    with pytest.raises(errors.FrameError):
        encode_request(Op.PUT, 1, PutRequest(1, (1 << 64, 0, 0), 0, page))
    with pytest.raises(errors.FrameError):
        encode_request(Op.SYNC, 1 << 32, SyncRequest(0))
    with pytest.raises(errors.FrameError):
        encode_reply(Op.GET_BATCH, 1, GetBatchReply([Status.OK], [None]))
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
    for name in EXCEPTION_STATUS:
        assert hasattr(errors, name), name
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
