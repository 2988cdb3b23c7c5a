"""docs/protocol.md and the agent say the same thing: the tables match the code, and the
three places where they once disagreed are pinned against the real host core (decoder +
dispatcher + TmemHost: tests/support/fakehost.py)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from memd.wire import (
    HEADER_SIZE,
    OPS,
    PAGE_SIZE,
    ErrorReply,
    FlushObjectReply,
    FlushObjectRequest,
    FlushPageReply,
    FlushPageRequest,
    Frame,
    FrameDecoder,
    HelloRequest,
    NewPoolReply,
    NewPoolRequest,
    Op,
    PutRequest,
    Status,
    decode_reply,
    encode_frame,
    encode_request,
)
from tests.support.fakehost import FakeHost

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _table_rows(heading: str) -> list[list[str]]:
    """The rows of the first markdown table after ``heading``."""
    section = DOC[DOC.index(heading) :]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and the rule


def test_the_status_table_is_the_status_enum() -> None:
    rows = _table_rows("### Status codes")
    assert {(int(r[0]), r[1]) for r in rows} == {(int(s), s.name) for s in Status}


def test_the_op_tables_are_the_op_table() -> None:
    rows = _table_rows("## Payloads") + _table_rows("### Local ops")
    assert {(int(r[1], 16), r[0]) for r in rows} == {(int(op), op.name) for op in OPS}


def _replies(host: FakeHost, data: bytes) -> list[Frame]:
    items = FrameDecoder().feed(host.feed(data))
    assert all(isinstance(i, Frame) for i in items)
    return [i for i in items if isinstance(i, Frame)]


def _session() -> FakeHost:
    host = FakeHost()
    assert len(_replies(host, encode_request(1, HelloRequest(1, 1, 0, bytes(16))))) == 1
    return host


def test_a_payload_checksum_failure_gets_no_reply() -> None:
    """Resync / Misbehaving peers: such a frame is garbage (its tail may be another
    writer's bytes), not a request to answer with BAD_FRAME."""
    host = _session()
    put = bytearray(encode_request(2, PutRequest(0, (1, 0, 0), 0, bytes(PAGE_SIZE))))
    put[HEADER_SIZE + 40] ^= 0x01
    after = encode_request(3, NewPoolRequest(0))
    replies = _replies(host, bytes(put) + after)
    assert [(f.op, f.request_id) for f in replies] == [(Op.NEW_POOL, 3)]
    assert host.corrupt == 1 and host.guest.bad_frames == 1
    peers = DOC[DOC.index("## Misbehaving peers") : DOC.index("## Codec API")].replace("\n", " ")
    assert re.search(r"no\s+reply[^.]*neither does a frame whose payload checksum fails", peers)


def test_unknown_new_pool_flag_bits_are_bad_frame() -> None:
    """Limits: an unknown flag bit makes the frame malformed (the status table's INVALID
    is for known bits the host refuses, e.g. shared + persistent)."""
    host = _session()
    bad = encode_frame(Op.NEW_POOL, 4, struct.pack("<II16s", 0x4, PAGE_SIZE, bytes(16)))
    reply = decode_reply(_replies(host, bad)[0])
    assert isinstance(reply, ErrorReply) and reply.status == Status.BAD_FRAME
    both = encode_request(5, NewPoolRequest(0x3, bytes(16)))
    refused = decode_reply(_replies(host, both)[0])
    assert isinstance(refused, ErrorReply) and refused.status in (Status.INVALID, Status.DENIED)
    notes = DOC[DOC.index("- **NEW_POOL**") : DOC.index("- **PUT / GET / FLUSH**")]
    assert re.search(r"unknown flag bit[^.]*\(`BAD_FRAME`", notes.replace("\n", " ")), notes


def test_flushing_what_is_not_there_is_ok() -> None:
    host = _session()
    pool = decode_reply(_replies(host, encode_request(6, NewPoolRequest(0)))[0])
    assert isinstance(pool, NewPoolReply)
    page = decode_reply(
        _replies(host, encode_request(7, FlushPageRequest(pool.pool, (9, 0, 0), 3)))[0]
    )
    obj = decode_reply(
        _replies(host, encode_request(8, FlushObjectRequest(pool.pool, (9, 0, 0))))[0]
    )
    assert type(page) is FlushPageReply and type(obj) is FlushObjectReply
    notes = DOC[DOC.index("- **PUT / GET / FLUSH**") : DOC.index("- **PUT_BATCH / GET_BATCH**")]
    assert "not there" in notes and "`OK`" in notes
