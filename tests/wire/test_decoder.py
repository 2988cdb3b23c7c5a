"""memd.wire.FrameDecoder: any chunking decodes the same frames, arbitrary bytes never
raise, and after garbage or a cut mid-frame the next real frame is found."""

from __future__ import annotations

import contextlib
import itertools
import struct
import tracemalloc
import zlib
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from memd.errors import FrameError
from memd.wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    PAGE_SIZE,
    RESYNC_MARKER,
    Frame,
    FrameDecoder,
    GetRequest,
    Op,
    PutBatchRequest,
    PutRequest,
    StatsReply,
    SyncRequest,
    decode_request,
    encode_reply,
    encode_request,
)

PAGE = bytes((i * 7 + 3) % 251 for i in range(PAGE_SIZE))  # no 0xFF: unlike the marker
FRAMES = [
    encode_request(1, SyncRequest(42)),
    encode_request(2, PutRequest(3, (1, 2, 3), 4, PAGE)),
    encode_request(3, GetRequest(3, (1, 2, 3), 4)),
    encode_reply(4, StatsReply({"a": 1})),
    encode_request(
        5, PutBatchRequest(3, [((0, 0, 1), 0), ((0, 0, 1), 1)], [PAGE, bytes(PAGE_SIZE)])
    ),
]
STREAM = b"".join(FRAMES)
EXPECTED = [(f[3], struct.unpack_from("<I", f, 8)[0], f[HEADER_SIZE:]) for f in FRAMES]


def summary(items: list[Frame | FrameError]) -> list[tuple[int, int, bytes | memoryview]]:
    assert all(isinstance(i, Frame) for i in items), items
    return [(f.op, f.request_id, f.payload) for f in items if isinstance(f, Frame)]


def feed_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame | FrameError]:
    out: list[Frame | FrameError] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(data[a:b])
    return out


def test_split_at_every_byte_boundary_decodes_identically() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        assert summary(feed_chunks(decoder, STREAM, [cut])) == EXPECTED
        assert decoder.buffered == 0 and decoder.discarded == 0


def test_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    out: list[Frame | FrameError] = []
    for i in range(len(FRAMES[0]) + len(FRAMES[2])):
        out += decoder.feed((FRAMES[0] + FRAMES[2])[i : i + 1])
    assert summary(out) == [EXPECTED[0], EXPECTED[2]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=30))
def test_arbitrary_chunkings(cuts: list[int]) -> None:
    assert summary(feed_chunks(FrameDecoder(), STREAM, cuts)) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000),
    st.lists(st.integers(0, 3000), max_size=10),
    st.sampled_from([b"", MAGIC, MAGIC[:1], RESYNC_MARKER]),
)
def test_arbitrary_bytes_never_raise_and_the_next_frame_is_found(
    garbage: bytes, cuts: list[int], joint: bytes
) -> None:
    decoder = FrameDecoder()
    data = garbage + joint + FRAMES[2]
    items = feed_chunks(decoder, data, cuts)
    assert all(isinstance(i, Frame | FrameError) for i in items)
    errors = [i for i in items if isinstance(i, FrameError)]
    assert len(errors) <= 1 + garbage.count(MAGIC)  # one report per corruption episode
    frames = [i for i in items if isinstance(i, Frame)]
    assert frames and frames[-1].payload == FRAMES[2][HEADER_SIZE:]
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_random_bytes_only_frames_or_frame_errors(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    items = feed_chunks(decoder, data, cuts) + decoder.abandon_partial()
    for item in items:
        assert isinstance(item, Frame | FrameError)
        if isinstance(item, Frame):
            with contextlib.suppress(FrameError):
                decode_request(item)
    assert decoder.buffered <= HEADER_SIZE + MAX_PAYLOAD


def test_markers_between_frames_are_skipped_silently() -> None:
    decoder = FrameDecoder()
    data = RESYNC_MARKER + FRAMES[0] + RESYNC_MARKER * 3 + FRAMES[2] + RESYNC_MARKER
    assert summary(decoder.feed(data)) == [EXPECTED[0], EXPECTED[2]]
    assert decoder.discarded == 0 and decoder.resyncs == 0


def _cut_then_resync(put: bytes, cut: int) -> tuple[list[Frame | FrameError], FrameDecoder]:
    """A writer died ``cut`` bytes into a PUT; its successor sends marker + SYNC + GET."""
    decoder = FrameDecoder()
    after = RESYNC_MARKER + FRAMES[0] + FRAMES[2]
    items = decoder.feed(put[:cut]) + decoder.feed(after)
    if not any(isinstance(i, Frame) and i.request_id == 1 for i in items):
        # The cut frame claims more bytes than arrived: the reader gives up on it after
        # PARTIAL_FRAME_TIMEOUT (the test skips the waiting).
        assert decoder.buffered
        items += decoder.abandon_partial()
    return items, decoder


def test_resync_after_a_cut_at_every_header_byte_and_through_the_payload() -> None:
    put = FRAMES[1]
    cuts = [*range(1, HEADER_SIZE + 2), *range(HEADER_SIZE + 2, len(put), 97), len(put) - 1]
    for cut in cuts:
        items, decoder = _cut_then_resync(put, cut)
        frames = [i for i in items if isinstance(i, Frame)]
        assert [(f.op, f.request_id) for f in frames] == [(Op.SYNC, 1), (Op.GET, 3)], cut
        assert sum(isinstance(i, FrameError) for i in items) == 1, cut
        assert decoder.buffered == 0


def test_cut_frame_completed_by_new_bytes_fails_its_payload_checksum() -> None:
    # Only 10 payload bytes were missing: the marker would complete the PUT; the payload
    # crc refuses it, so a page made of two connections' bytes is never stored.
    items = FrameDecoder().feed(FRAMES[1][:-10] + RESYNC_MARKER + FRAMES[0])
    assert isinstance(items[0], FrameError) and items[0].request_id == 2
    assert summary(items[1:]) == [EXPECTED[0]]


def _header(length: int, op: int = Op.GET, rid: int = 7) -> bytes:
    head = HEADER.pack(MAGIC, 1, op, 0, 0, rid, length, 0, 0)[: HEADER_SIZE - 4]
    return head + struct.pack("<I", zlib.crc32(head))


def test_oversize_length_is_garbage_not_an_allocation() -> None:
    for length in (MAX_PAYLOAD + 1, 0xFFFFFFFF):
        decoder = FrameDecoder()
        items = decoder.feed(_header(length) + FRAMES[0])
        assert isinstance(items[0], FrameError) and "exceeds" in str(items[0])
        assert summary(items[1:]) == [EXPECTED[0]]
        assert decoder.buffered == 0


def test_smaller_limit_is_honoured() -> None:
    decoder = FrameDecoder(max_payload=100)
    items = decoder.feed(FRAMES[1] + FRAMES[0])
    assert isinstance(items[0], FrameError)
    assert summary(items[-1:]) == [EXPECTED[0]]


def test_flipped_payload_bit_is_reported_with_its_request_id() -> None:
    bad = bytearray(FRAMES[1])
    bad[HEADER_SIZE + 100] ^= 0x10
    items = FrameDecoder().feed(bytes(bad) + FRAMES[2])
    assert isinstance(items[0], FrameError)
    assert items[0].request_id == 2 and items[0].op == Op.PUT
    assert summary(items[1:]) == [EXPECTED[2]]


def test_flipped_header_bit_is_found_by_the_header_checksum() -> None:
    for byte in range(2, HEADER_SIZE):
        bad = bytearray(FRAMES[2])
        bad[byte] ^= 0x01
        items = FrameDecoder().feed(bytes(bad) + FRAMES[0])
        assert isinstance(items[0], FrameError), byte
        assert summary(items[1:]) == [EXPECTED[0]], byte


def test_a_fake_header_stalls_until_abandoned() -> None:
    # A header-shaped run inside garbage claiming a long payload holds the decoder
    # until the reader abandons it; nothing real is lost.
    decoder = FrameDecoder()
    first = decoder.feed(b"junk" + _header(5000))
    assert len(first) == 1 and isinstance(first[0], FrameError)
    items = decoder.feed(RESYNC_MARKER + FRAMES[0])
    assert items == [] and decoder.buffered
    assert summary(decoder.abandon_partial()) == [EXPECTED[0]]  # same episode: no 2nd error
    assert decoder.resyncs == 1


def test_reset_forgets_a_partial_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(FRAMES[1][:100])
    decoder.reset()
    assert summary(decoder.feed(FRAMES[0])) == [EXPECTED[0]]


# --- copies: each payload byte is copied at most once, and never aliased to reused input ---

BATCH = encode_request(
    9,
    PutBatchRequest(
        3, [((0, 0, 1), i) for i in range(128)], [bytes([i]) * PAGE_SIZE for i in range(128)]
    ),
)


def _peak_while(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_a_whole_frame_in_immutable_bytes_is_not_copied() -> None:
    decoder = FrameDecoder()
    items: list[Frame | FrameError] = []
    peak = _peak_while(lambda: items.extend(decoder.feed(BATCH)))
    assert summary(items) == [(Op.PUT_BATCH, 9, BATCH[HEADER_SIZE:])]
    assert peak < len(BATCH) // 8, peak  # the old decoder copied it twice (buffer, payload)


def test_a_frame_spanning_reads_of_a_reused_buffer_is_copied_once() -> None:
    # The agent receives into one reusable buffer: the decoder must copy, but once.
    buffer = bytearray(300_000)
    decoder = FrameDecoder()
    items: list[Frame | FrameError] = []

    def feed_through_the_buffer() -> None:
        for at in range(0, len(BATCH), len(buffer)):
            chunk = memoryview(BATCH)[at : at + len(buffer)]
            buffer[: len(chunk)] = chunk
            items.extend(decoder.feed(memoryview(buffer)[: len(chunk)]))

    peak = _peak_while(feed_through_the_buffer)
    buffer[:] = bytes(len(buffer))  # the next read overwrites the buffer
    assert summary(items) == [(Op.PUT_BATCH, 9, BATCH[HEADER_SIZE:])]
    assert peak < 1.3 * len(BATCH), peak  # the old decoder held two copies at once


def test_a_payload_never_aliases_a_buffer_the_caller_reuses() -> None:
    buffer = bytearray(FRAMES[1] + FRAMES[2][:30])
    decoder = FrameDecoder()
    first = decoder.feed(memoryview(buffer))
    buffer[:] = bytes(len(buffer))
    second = decoder.feed(bytearray(FRAMES[2][30:]))
    assert summary(first + second) == [EXPECTED[1], EXPECTED[2]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, len(STREAM)), max_size=30),
    st.sampled_from([bytes, bytearray, memoryview]),
)
def test_arbitrary_chunkings_of_any_buffer_type(cuts: list[int], kind: type) -> None:
    decoder = FrameDecoder()
    out: list[Frame | FrameError] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(STREAM)), len(STREAM)]
    for a, b in itertools.pairwise(bounds):
        chunk = kind(bytearray(STREAM[a:b])) if kind is memoryview else kind(STREAM[a:b])
        out += decoder.feed(chunk)
    assert summary(out) == EXPECTED and decoder.buffered == 0


def test_a_cut_frame_completed_in_a_later_read_fails_its_payload_checksum() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(FRAMES[1][:-10]) == []
    items = decoder.feed(RESYNC_MARKER + FRAMES[0])
    assert isinstance(items[0], FrameError) and items[0].request_id == 2
    assert summary(items[1:]) == [EXPECTED[0]]
    assert summary(decoder.feed(FRAMES[2])) == [EXPECTED[2]] and decoder.buffered == 0


def test_a_header_cut_in_two_then_garbage_resyncs() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(FRAMES[2][:10]) == []
    items = decoder.feed(b"\x00" * 40 + FRAMES[0])
    assert isinstance(items[0], FrameError)
    assert summary(items[1:]) == [EXPECTED[0]] and decoder.buffered == 0
