"""The migration stream codec: bytes in, messages out, in any chunking."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd.errors import FrameError
from memd.migrate import proto
from memd.migrate.proto import (
    Abort,
    Begin,
    Chunk,
    Commit,
    Confirm,
    Decoder,
    Done,
    Message,
    PoolEntry,
    Pools,
    Ready,
)

u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    chunk = draw(st.integers(0, (1 << 26) - 1))
    positions = sorted(draw(st.sets(st.integers(0, 63), max_size=64)))
    pages = tuple(
        (
            chunk * 64 + p,
            draw(u64),
            draw(st.binary(max_size=64))
            if draw(st.booleans())
            else draw(st.sampled_from([b"", bytes(4096)])),
        )
        for p in positions
    )
    return Chunk(
        draw(st.integers(0, 15)),
        draw(st.integers(0, (1 << 32) - 1)),
        (draw(u64), draw(u64), draw(u64)),
        chunk,
        pages,
    )


names = st.text(min_size=1, max_size=40)
messages: st.SearchStrategy[Message] = st.one_of(
    chunks(),
    st.builds(Begin, names, st.dictionaries(st.text(max_size=8), st.integers(), max_size=4)),
    st.builds(Ready, st.text(max_size=40)),
    st.builds(
        Pools,
        st.lists(
            st.builds(
                PoolEntry,
                st.integers(0, 15),
                st.booleans(),
                st.booleans(),
                st.none() | st.binary(min_size=16, max_size=16),
                st.integers(0, 1 << 40),
            ),
            max_size=16,
            unique_by=lambda p: p.local,
        ).map(tuple),
    ),
    st.builds(Commit, st.integers(0, 1 << 40)),
    st.builds(Confirm, st.integers(0, 1 << 40)),
    st.builds(Done, st.integers(0, 1 << 40)),
    st.builds(Abort, st.text(max_size=200)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=8), st.data())
def test_any_stream_in_any_chunking_decodes_to_the_messages_sent(
    msgs: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(proto.encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = Decoder()
    out: list[Message] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[a:b])
    assert out == msgs
    assert decoder.pending == 0
    # Payloads are bytes of their own, never views of the decoder's buffers.
    assert all(
        type(payload) is bytes for m in out if isinstance(m, Chunk) for _, _, payload in m.pages
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, max_size=8))
def test_encode_many_is_the_frames_back_to_back(msgs: list[Message]) -> None:
    assert proto.encode_many(msgs) == b"".join(proto.encode(m) for m in msgs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_frame_error_or_waits_never_anything_else(junk: bytes) -> None:
    with contextlib.suppress(FrameError):
        Decoder().feed(junk)


@settings(max_examples=200, deadline=None)
@given(chunks(), st.integers(0, 10_000), st.integers(0, 255))
def test_a_corrupted_chunk_is_refused_or_decodes_to_a_well_formed_chunk(
    msg: Chunk, where: int, byte: int
) -> None:
    frame = bytearray(proto.encode(msg))
    frame[where % len(frame)] = byte
    try:
        out = Decoder().feed(bytes(frame))
    except FrameError:
        return
    for m in out:
        if isinstance(m, Chunk):  # whatever got through still obeys the format's rules
            assert len(m.pages) <= 64 and m.pool < 16
            indexes = [index for index, _, _ in m.pages]
            assert indexes == sorted(set(indexes))
            assert all(len(payload) <= 4096 for _, _, payload in m.pages)


def test_a_full_chunk_of_raw_pages_fits_in_a_frame() -> None:
    msg = Chunk(3, 9, (1, 2, 3), 5, tuple((5 * 64 + i, i, bytes([i]) * 4096) for i in range(64)))
    frame = proto.encode(msg)
    assert len(frame) < proto.MAX_FRAME
    assert Decoder().feed(frame) == [msg]


def test_frame_length_over_the_limit_is_refused_before_buffering_it() -> None:
    with pytest.raises(FrameError, match="out of range"):
        Decoder().feed(b"\x7f\xff\xff\xff\x04")


@pytest.mark.parametrize(
    "bad",
    [
        Chunk(16, 0, (0, 0, 0), 0, ()),
        Chunk(0, 0, (0, 0, 0), 1, ((3, 0, b""),)),  # not in chunk 1
        Chunk(0, 0, (0, 0, 0), 0, ((2, 0, b""), (1, 0, b""))),  # order
        Chunk(0, 0, (0, 0, 0), 0, ((0, 0, bytes(4097)),)),
    ],
)
def test_the_encoder_refuses_what_no_decoder_accepts(bad: Chunk) -> None:
    with pytest.raises(ValueError):
        proto.encode(bad)


def test_json_frames_with_wrong_shapes_are_frame_errors() -> None:
    body = b'{"guest": 5, "client": {}, "version": 1}'
    frame = (len(body) + 1).to_bytes(4, "big") + b"\x01" + body
    with pytest.raises(FrameError):
        Decoder().feed(frame)
    body = (
        b'{"pools": [{"local": 1, "persistent": true, "shared": false, "uuid": null, '
        b'"generation": 1}, {"local": 1, "persistent": true, "shared": false, '
        b'"uuid": null, "generation": 2}]}'
    )
    with pytest.raises(FrameError):
        Decoder().feed((len(body) + 1).to_bytes(4, "big") + b"\x03" + body)


# --- kept payloads and references (the stateful Encoder) -----------------------------------

#: A few payloads, so that a stream of chunks repeats them.
_COMMON = [bytes([n]) * (100 + n) for n in range(4)] + [bytes(4096)]


@st.composite
def chunks_with_duplicates(draw: st.DrawFn) -> Chunk:
    chunk = draw(st.integers(0, 1000))
    positions = sorted(draw(st.sets(st.integers(0, 63), max_size=12)))
    pages = []
    for p in positions:
        payload = draw(st.sampled_from([b"", *_COMMON]) | st.binary(min_size=1, max_size=32))
        # The stored hash is the page's: equal payloads have equal hashes, and a few
        # unequal ones collide (the encoder must then send the bytes).
        h = draw(st.integers(0, 3)) if draw(st.booleans()) else hash(payload) & ((1 << 64) - 1)
        pages.append((chunk * 64 + p, h, payload))
    shared = draw(st.sets(st.sampled_from(positions))) if positions else set()
    return Chunk(1, 2, (3, 4, 5), chunk, tuple(pages), frozenset(chunk * 64 + p for p in shared))


@settings(max_examples=200, deadline=None)
@given(st.lists(chunks_with_duplicates(), max_size=12), st.lists(st.integers(1, 300), max_size=30))
def test_an_encoders_stream_decodes_to_the_pages_sent_in_any_chunking(
    msgs: list[Chunk], cuts: list[int]
) -> None:
    encoder = proto.Encoder()
    stream = b"".join(encoder.encode_many([m]) for m in msgs)
    decoder = Decoder()
    got: list[Message] = []
    pos = 0
    for cut in cuts:
        got += decoder.feed(stream[pos : pos + cut])
        pos += cut
    got += decoder.feed(stream[pos:])
    assert got == msgs
    assert len(stream) <= len(proto.encode_many(msgs))


def test_a_shared_payload_crosses_once_and_is_referred_to_after() -> None:
    payload = b"duplicate page " * 100
    first = Chunk(0, 1, (1, 0, 0), 0, ((0, 7, payload), (1, 7, payload)), frozenset({0}))
    again = Chunk(0, 1, (1, 0, 0), 5, ((320, 7, payload),), frozenset({320}))
    encoder = proto.Encoder()
    stream = encoder.encode_many([first, again])
    assert stream.count(payload) == 1
    assert encoder.kept == 1
    assert Decoder().feed(stream) == [first, again]
    # Not marked shared: never kept, always in full.
    unmarked = Chunk(0, 1, (1, 0, 0), 0, ((0, 7, payload), (1, 7, payload)))
    plain = proto.Encoder().encode_many([unmarked])
    assert plain.count(payload) == 2


def test_a_reference_to_a_payload_not_kept_is_a_frame_error() -> None:
    payload = b"x" * 50
    msg = Chunk(0, 1, (1, 0, 0), 0, ((0, 7, payload), (1, 7, payload)), frozenset({0}))
    stream = proto.Encoder().encode_many([msg])
    assert Decoder().feed(stream) == [msg]
    with pytest.raises(FrameError):  # the second frame alone: its reference names nothing
        second = proto.Encoder().encode_many([msg, msg])[len(stream) :]
        Decoder().feed(second)


def test_kept_payloads_stop_at_the_limit_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proto, "MAX_KEPT", 2)
    payloads = [bytes([n]) * 40 for n in range(1, 4)]
    pages = tuple((i, i + 1, p) for i, p in enumerate(payloads))
    msg = Chunk(0, 1, (1, 0, 0), 0, pages, frozenset({0, 1, 2}))
    encoder = proto.Encoder()
    stream = encoder.encode_many([msg, msg])
    assert encoder.kept == 2
    assert stream.count(payloads[2]) == 2 and stream.count(payloads[0]) == 1
    assert Decoder().feed(stream) == [msg, msg]
    # A sender that keeps more than the limit is refused.
    body = proto._CHUNK.pack(0, 1, 1, 0, 0, 0, 3) + b"".join(
        proto._PAGE.pack(i, 1, proto.KEEP | 1) + b"a" for i in range(3)
    )
    with pytest.raises(FrameError):
        Decoder().feed((len(body) + 1).to_bytes(4, "big") + bytes([proto.Kind.CHUNK]) + body)


@pytest.mark.parametrize("length", [proto.KEEP, proto.KEEP | 4097, 4097, 0x7FFF])
def test_bad_length_fields_are_frame_errors(length: int) -> None:
    body = proto._CHUNK.pack(0, 1, 1, 0, 0, 0, 1) + proto._PAGE.pack(0, 1, length) + bytes(4200)
    with pytest.raises(FrameError):
        Decoder().feed((len(body) + 1).to_bytes(4, "big") + bytes([proto.Kind.CHUNK]) + body)
