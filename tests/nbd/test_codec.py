"""memd.nbd handshake and request parser, fed bytes: what a client sends, what comes back.

The client side is written out here with struct from the protocol's field layout (not
with the server's helpers), so both ends are not wrong the same way.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd.errors import NbdProtocolError
from memd.nbd.handshake import Closed, ExportInfo, Negotiated, ServerHandshake, State
from memd.nbd.proto import MAX_OPTIONS, MAX_PAYLOAD, Cmd, CmdFlag, Errno
from memd.nbd.transmission import (
    NEED_DATA,
    NeedData,
    Rejected,
    Request,
    RequestParser,
    simple_reply,
)

SIZE = 1 << 20
EXPORT = ExportInfo("vm1", SIZE, 0b1_0110_1101, "swap of vm1")
IHAVEOPT = b"IHAVEOPT"


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def info_req(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies as (option, type, data)."""
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == 0x3E889045565A9
        out.append((option, rtype, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def started(flags: int = 3) -> ServerHandshake:
    hs = ServerHandshake(EXPORT)
    greeting = hs.data_to_send()
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    assert struct.unpack(">H", greeting[16:]) == (3,)  # FIXED_NEWSTYLE | NO_ZEROES
    assert hs.receive_data(struct.pack(">I", flags)) == []
    return hs


def request(
    cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length) + data


# -- handshake ------------------------------------------------------------------------------


def test_go_with_info_requests_negotiates_and_keeps_trailing_bytes() -> None:
    hs = started()
    events = hs.receive_data(opt(7, info_req(b"", (3, 1, 2))) + b"tail")
    assert events == [Negotiated(EXPORT, b"tail")]
    assert hs.state is State.TRANSMISSION
    got = replies(hs.data_to_send())
    assert [r[1] for r in got] == [3, 3, 3, 3, 1]  # four INFO replies, then ACK
    assert got[0][2] == struct.pack(">HQH", 0, SIZE, EXPORT.flags)
    assert got[1][2] == struct.pack(">H", 1) + b"vm1"
    assert got[2][2] == struct.pack(">H", 2) + b"swap of vm1"
    assert got[3][2] == struct.pack(">HIII", 3, 1, 4096, 32 << 20)


def test_info_then_list_then_go_by_name() -> None:
    hs = started()
    assert hs.receive_data(opt(6, info_req(b"vm1"))) == []
    assert [r[1] for r in replies(hs.data_to_send())] == [3, 1]
    assert hs.receive_data(opt(3)) == []
    assert replies(hs.data_to_send()) == [(3, 2, b"\0\0\0\x03vm1"), (3, 1, b"")]
    assert isinstance(hs.receive_data(opt(7, info_req(b"vm1")))[0], Negotiated)


@pytest.mark.parametrize(
    ("option", "data", "rtype"),
    [
        (7, info_req(b"vm2"), 0x80000006),  # unknown export
        (6, b"\0\0\0\x09vm1", 0x80000003),  # name length beyond the data
        (7, info_req(b"vm1") + b"x", 0x80000003),  # trailing byte
        (3, b"x", 0x80000003),  # LIST with data
        (8, b"", 0x80000001),  # STRUCTURED_REPLY: memd sends simple replies
        (5, b"", 0x80000001),  # STARTTLS
        (10, b"abc", 0x80000001),
        (0xDEAD, b"abc", 0x80000001),
    ],
)
def test_bad_or_unsupported_options_get_error_replies(option: int, data: bytes, rtype: int) -> None:
    hs = started()
    assert hs.receive_data(opt(option, data)) == []
    (reply,) = replies(hs.data_to_send())
    assert reply[:2] == (option, rtype)
    assert hs.state is State.OPTIONS  # the client may go on


def test_export_name_option_for_old_clients() -> None:
    hs = started(flags=1)  # without NO_ZEROES: 124 zero bytes follow
    events = hs.receive_data(opt(1, b""))
    assert isinstance(events[0], Negotiated)
    assert hs.data_to_send() == struct.pack(">QH", SIZE, EXPORT.flags) + bytes(124)
    hs = started()
    assert hs.receive_data(opt(1, b"nope"))[0] == Closed(
        "NBD_OPT_EXPORT_NAME names an unknown export", clean=False
    )


def test_abort_is_acknowledged_and_closes() -> None:
    hs = started()
    assert hs.receive_data(opt(2)) == [Closed("client aborted the negotiation", clean=True)]
    assert replies(hs.data_to_send()) == [(2, 1, b"")]


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", 0),  # not fixed newstyle
        struct.pack(">I", 1 | 8),  # unknown client flag
        struct.pack(">I", 3) + b"IHAVEOPX" + bytes(8),  # bad option magic
        struct.pack(">I", 3) + IHAVEOPT + struct.pack(">II", 7, 1 << 20),  # huge option
    ],
)
def test_fatal_handshake_input_closes(raw: bytes) -> None:
    hs = ServerHandshake(EXPORT)
    hs.data_to_send()
    (event,) = hs.receive_data(raw)
    assert isinstance(event, Closed) and not event.clean
    assert hs.state is State.CLOSED


def test_endless_options_are_cut_off() -> None:
    hs = started()
    events = hs.receive_data(opt(3) * (MAX_OPTIONS + 1))
    assert isinstance(events[0], Closed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=30))
def test_handshake_never_raises_on_garbage(data: bytes, cuts: list[int]) -> None:
    hs = ServerHandshake(EXPORT)
    pos = 0
    for n in [*cuts, len(data)]:
        if hs.state in (State.TRANSMISSION, State.CLOSED):
            break
        hs.receive_data(data[pos : pos + n])
        pos += n
        hs.data_to_send()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_handshake_any_chunking_same_outcome(cuts: list[int]) -> None:
    stream = struct.pack(">I", 3) + opt(3) + opt(6, info_req(b"", (3,))) + opt(7, info_req(b""))
    whole = ServerHandshake(EXPORT)
    expected = whole.receive_data(stream)
    expected_out = whole.data_to_send()
    hs = ServerHandshake(EXPORT)
    out, events, pos = b"", [], 0
    for n in [*cuts, len(stream)]:
        if hs.state is State.TRANSMISSION:
            break
        events += hs.receive_data(stream[pos : pos + n])
        out += hs.data_to_send()
        pos += n
    assert events == expected and out == expected_out


# -- transmission -----------------------------------------------------------------------------


def drain(parser: RequestParser) -> list[Request | Rejected]:
    out: list[Request | Rejected] = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert not isinstance(event, NeedData)
        out.append(event)
    return out


def test_requests_parse_with_payload_and_cookie() -> None:
    p = RequestParser(SIZE)
    p.receive_data(
        request(1, 4096, 5, CmdFlag.FUA, 1, b"hello")
        + request(0, 0, 4096, cookie=2)
        + request(3, cookie=3)
        + request(4, 8192, 4096, cookie=4)
        + request(6, 0, SIZE, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, cookie=5)
    )
    assert drain(p) == [
        Request(Cmd.WRITE, 1, 1, 4096, 5, b"hello"),
        Request(Cmd.READ, 0, 2, 0, 4096),
        Request(Cmd.FLUSH, 0, 3, 0, 0),
        Request(Cmd.TRIM, 0, 4, 8192, 4096),
        Request(Cmd.WRITE_ZEROES, 18, 5, 0, SIZE),
    ]
    assert p.buffered == 0


@pytest.mark.parametrize(
    ("raw", "errno"),
    [
        (request(0, SIZE - 4096, 8192), Errno.EINVAL),  # read past the end
        (request(0, SIZE + 1, 0), Errno.EINVAL),
        (request(0, 0, MAX_PAYLOAD + 1), Errno.EINVAL),  # oversize read
        (request(1, SIZE - 1, 2, data=b"ab"), Errno.ENOSPC),  # write past the end
        (request(6, 0, SIZE + 4096), Errno.ENOSPC),
        (request(4, 2**64 - 1, 1), Errno.EINVAL),  # offset overflow
        (request(5, 0, 4096), Errno.EINVAL),  # CACHE: not advertised
        (request(7, 0, 4096), Errno.EINVAL),  # BLOCK_STATUS: needs structured replies
        (request(77, 0, 4096), Errno.EINVAL),  # unknown command
        (request(0, 0, 4096, CmdFlag.FUA), Errno.EINVAL),  # FUA on a read
        (request(1, 0, 1, CmdFlag.DF, data=b"x"), Errno.EINVAL),
        (request(3, 4096, 0), Errno.EINVAL),  # FLUSH with an offset
    ],
)
def test_bad_requests_are_rejected_and_the_stream_goes_on(raw: bytes, errno: Errno) -> None:
    p = RequestParser(SIZE)
    p.receive_data(raw + request(3, cookie=99))
    rejected, after = drain(p)
    assert isinstance(rejected, Rejected) and rejected.error == errno and rejected.cookie == 7
    assert after == Request(Cmd.FLUSH, 0, 99, 0, 0)


def test_bad_magic_and_oversize_write_are_fatal() -> None:
    p = RequestParser(SIZE)
    p.receive_data(b"\x25\x60\x95\x14" + bytes(24))
    with pytest.raises(NbdProtocolError, match="magic"):
        p.next_event()
    p = RequestParser(1 << 40)
    p.receive_data(request(1, 0, MAX_PAYLOAD + 4096))  # never buffers 32 MiB + 4 KiB
    with pytest.raises(NbdProtocolError, match="limit"):
        p.next_event()


def test_disc_is_the_last_event() -> None:
    p = RequestParser(SIZE)
    p.receive_data(request(2, cookie=1) + request(0, 0, 512))
    assert drain(p) == [Request(Cmd.DISC, 0, 1, 0, 0)]
    p.receive_data(b"garbage after disc")
    assert p.next_event() is NEED_DATA


def test_simple_reply_layout() -> None:
    assert simple_reply(0x1122334455667788, 28) == (
        b"\x67\x44\x66\x98" + b"\0\0\0\x1c" + bytes.fromhex("1122334455667788")
    )
    assert simple_reply(1, 0, b"data").endswith(b"data")


_REQUESTS = st.one_of(
    st.builds(
        lambda off, n, c: request(0, off, n, cookie=c),
        st.integers(0, SIZE),
        st.integers(0, 9000),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(
        lambda off, d, c: request(1, off, len(d), cookie=c, data=d),
        st.integers(0, SIZE + 10),
        st.binary(max_size=600),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(
        lambda t, f, off, n: request(t, off, n, f),
        st.sampled_from([3, 4, 5, 6, 9]),
        st.integers(0, 63),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_REQUESTS, max_size=12), st.lists(st.integers(1, 700), max_size=40))
def test_any_chunking_parses_the_same_events(reqs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(reqs)
    whole = RequestParser(SIZE)
    whole.receive_data(stream)
    expected = drain(whole)
    assert len(expected) == len(reqs)
    p = RequestParser(SIZE)
    events: list[Request | Rejected] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        p.receive_data(stream[pos : pos + n])
        pos += n
        events += drain(p)
    assert events == expected
    for event in events:  # nothing accepted lies outside the export
        if isinstance(event, Request):
            assert event.offset + event.length <= SIZE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_raises_only_the_protocol_error(data: bytes) -> None:
    p = RequestParser(SIZE)
    p.receive_data(data)
    with contextlib.suppress(NbdProtocolError):
        drain(p)
