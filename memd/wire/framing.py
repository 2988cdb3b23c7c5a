"""Frames: the 24-byte header, frame encoding, and the incremental decoder.

Owns the stream layer of docs/protocol.md ("Frame", "Resync"): header packing with its
two CRC-32s and :class:`FrameDecoder`, the sans-I/O reader that turns any chunking of
a byte stream into frames and finds the next real frame after garbage or a cut.

Copies.  Pages are the bulk of the traffic, so neither direction copies them in
Python more than it must.  Encoding returns the header and the payload *parts* (a
page stays the caller's buffer) for a vectored write; :func:`encode_frame` joins them
for callers that want one ``bytes``.  Decoding copies each payload byte at most once:
a frame that arrives whole in one ``feed`` is sliced out of it (a view when the input
is immutable ``bytes``, one copy when it is a buffer the caller will reuse); a frame
that spans feeds is collected in a buffer that is then handed over as the payload,
not copied out again.

The decoder is used by one thread at a time (its owner: a connection's session).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

try:  # host side: zlib-ng's CRC-32 (same polynomial, same values) is ~5x faster
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # the guest (python3-minimal) and any host without it
    from zlib import crc32 as _crc32

from memd.errors import FrameError
from memd.wire.constants import (
    HEADER,
    HEADER_SIZE,
    KNOWN_FRAME_FLAGS,
    MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Buffer,
    FrameFlag,
)

_HEADER_CRC_SPAN = HEADER_SIZE - 4
_HEAD = struct.Struct(HEADER.format[:-1])  # the header without its own checksum
_U32 = struct.Struct("<I")
_FF_RUN = 4096


class Frame(NamedTuple):
    """One decoded frame: header fields plus the raw (checksum-verified) payload.

    ``payload`` is ``bytes`` or a read-only ``memoryview`` that no one else writes to
    (see the module docstring); both compare equal to the same bytes."""

    op: int
    request_id: int
    status: int
    flags: int
    version: int
    payload: bytes | memoryview

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FrameFlag.REPLY)


def encode_frame_parts(
    op: int,
    request_id: int,
    payload: Buffer | Sequence[Buffer] = b"",
    *,
    status: int = 0,
    flags: int = 0,
    version: int = PROTOCOL_VERSION,
) -> list[Buffer]:
    """Header followed by the payload parts, for a vectored write (nothing is joined)."""
    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    crc = 0
    length = 0
    for part in parts:
        crc = _crc32(part, crc)
        length += len(part)
    if length > MAX_PAYLOAD:
        raise FrameError(
            f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit",
            op=op,
            request_id=request_id,
        )
    try:
        head = _HEAD.pack(MAGIC, version, op, flags, status, request_id, length, crc)
    except struct.error as err:
        raise FrameError(
            f"header field out of range: {err}", op=op, request_id=request_id
        ) from None
    return [head + _U32.pack(_crc32(head)), *parts]


def encode_frame(
    op: int,
    request_id: int,
    payload: Buffer | Sequence[Buffer] = b"",
    *,
    status: int = 0,
    flags: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """Header + payload as one bytes object (payload may be given in parts: one join)."""
    return b"".join(
        encode_frame_parts(op, request_id, payload, status=status, flags=flags, version=version)
    )


class FrameDecoder:
    """Sans-I/O, incremental: feed it bytes as they arrive, get whole frames back.

    State: ``_buf`` holds the bytes of an incomplete frame (or partial garbage) that a
    later ``feed`` must complete; it starts at a frame boundary while ``in_sync``,
    otherwise it is being scanned for the next header (magic + header crc).
    ``_frame_len`` is the full length of the frame in ``_buf`` once its header checked
    out (None before that).  It never allocates by a length it read: a payload is
    collected only as bytes arrive, and a length above ``max_payload`` is garbage.
    Memory is bounded by one frame plus the size of one ``feed``.  Corruption does not
    raise: it appears in the output as one :class:`FrameError` per resync episode, and
    decoding continues.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._frame_len: int | None = None
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
        the stream was corrupt.  ``data`` is not kept: only views of immutable ``bytes``
        outlive the call (in the returned payloads)."""
        src = memoryview(data)
        if src.ndim != 1 or src.itemsize != 1:
            src = src.cast("B")
        if not src:
            return []
        out: list[Frame | FrameError] = []
        if self._buf:
            src = self._top_up(src, out)
        if src:
            pos = self._scan(src, isinstance(src.obj, bytes), out)
            if pos < len(src):
                # An incomplete frame, or something the in-place scan does not judge
                # (garbage, a bad checksum): the buffered path takes it from here.
                self._buf += src[pos:]
                out += self._drain(0)
        return out

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
        self._buf = bytearray()
        self._frame_len = None
        self.in_sync = True

    # -- the in-place path: whole frames straight out of the input ------------------------

    def _scan(self, src: memoryview, owned: bool, out: list[Frame | FrameError]) -> int:
        """Frames that lie whole in ``src`` (the buffer is empty), until the first thing
        that is not one; returns where that starts.  A payload is a view of ``src`` when
        ``owned`` (immutable input), else one copy."""
        pos, n = 0, len(src)
        while pos < n and self.in_sync:
            if src[pos] == 0xFF:
                run = bytes(src[pos : pos + _FF_RUN])
                pos += len(run) - len(run.lstrip(b"\xff"))
                continue
            if n - pos < HEADER_SIZE:
                break
            magic, version, op, flags, status, rid, length, pcrc, hcrc = HEADER.unpack_from(
                src, pos
            )
            if (
                magic != MAGIC
                or version == 0
                or flags & ~KNOWN_FRAME_FLAGS
                or length > self._max_payload
                or _crc32(src[pos : pos + _HEADER_CRC_SPAN]) != hcrc
            ):
                break
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            payload = src[pos + HEADER_SIZE : end]
            if _crc32(payload) != pcrc:
                break
            out.append(Frame(op, rid, status, flags, version, payload if owned else bytes(payload)))
            self.frames += 1
            pos = end
        return pos

    # -- the buffered path: a frame that spans feeds, and resynchronisation ---------------

    def _top_up(self, src: memoryview, out: list[Frame | FrameError]) -> memoryview:
        """Give the held bytes what they need from ``src``; return the rest of ``src``
        (empty when everything went into the buffer)."""
        while self._buf and src:
            need = self._frame_len
            if need is None:
                if self.in_sync and len(self._buf) < HEADER_SIZE:
                    # A header cut in two: complete just the header, then judge it.
                    take = HEADER_SIZE - len(self._buf)
                    self._buf += src[:take]
                    src = src[take:]
                    out += self._drain(0)
                    continue
                self._buf += src  # scanning garbage: all of it goes through the buffer
                out += self._drain(0)
                return src[:0]
            missing = need - len(self._buf)
            self._buf += src[:missing]
            if len(src) < missing:
                return src[:0]
            src = src[missing:]
            buf = self._buf
            _, version, op, flags, status, rid, _, pcrc, _ = HEADER.unpack_from(buf, 0)
            payload = memoryview(buf).toreadonly()[HEADER_SIZE:]
            if _crc32(payload) != pcrc:
                payload.release()
                self._buf += src  # the buffered path reports it and rescans
                out += self._drain(0)
                return src[:0]
            # Hand the buffer over as the payload instead of copying the payload out.
            self._buf = bytearray()
            self._frame_len = None
            out.append(Frame(op, rid, status, flags, version, payload))
            self.frames += 1
            self.in_sync = True
        return src

    def _skip(
        self,
        pos: int,
        out: list[Frame | FrameError],
        reason: str,
        op: int | None,
        request_id: int | None,
    ) -> int:
        """Leave the bad header at ``pos``: jump to the next magic (or keep a lone
        trailing first magic byte) and report the episode once."""
        if self.in_sync:
            out.append(
                FrameError(
                    f"stream corrupt: {reason}; resynchronising", op=op, request_id=request_id
                )
            )
            self.resyncs += 1
            self.in_sync = False
        buf = self._buf
        nxt = buf.find(MAGIC, pos + 1)
        if nxt < 0:
            nxt = len(buf) - 1 if buf[-1] == MAGIC[0] and len(buf) - 1 > pos else len(buf)
        self.discarded += nxt - pos
        return nxt

    def _drain(self, pos: int) -> list[Frame | FrameError]:
        """Decode what ``_buf`` holds from ``pos`` on, resynchronising past garbage; keep
        the incomplete rest at the start of ``_buf``."""
        out: list[Frame | FrameError] = []
        buf = self._buf
        n = len(buf)
        self._frame_len = None
        while pos < n:
            if self.in_sync and buf[pos] == 0xFF:
                run = buf[pos : pos + _FF_RUN]
                pos += len(run) - len(run.lstrip(b"\xff"))
                continue
            if n - pos < HEADER_SIZE:
                if buf[pos] != MAGIC[0] or (n - pos >= 2 and buf[pos + 1] != MAGIC[1]):
                    pos = self._skip(pos, out, "bad magic", None, None)
                    continue
                break
            magic, version, op, flags, status, rid, length, pcrc, hcrc = HEADER.unpack_from(
                buf, pos
            )
            reason = None
            if magic != MAGIC:
                reason = "bad magic"
            elif _crc32(buf[pos : pos + _HEADER_CRC_SPAN]) != hcrc:
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
                self._frame_len = end - pos
                break
            with memoryview(buf) as view:  # one copy; released before buf is resized
                payload = view[pos + HEADER_SIZE : end].tobytes()
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
