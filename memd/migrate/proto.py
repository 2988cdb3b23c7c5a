"""The memd-to-memd migration stream: framed messages, bytes in and bytes out (no I/O).

Owns the wire format two agents speak while one guest's tmem state moves from the source
agent to the destination agent (``memd.migrate.transport`` moves the bytes, over mutual
TLS: authentication is the transport's, so there is no hello/auth message here).

Every frame is a 5-byte header — ``u32`` length of what follows the length field
(kind byte + body), ``u8`` kind — then the body.  Integers are big-endian.

=========  =========  ======================================================================
kind       direction  body
=========  =========  ======================================================================
BEGIN      src → dst  JSON: protocol version, guest name, the client's settings and the
                      agent's meta (the guest's boot id)
READY      dst → src  JSON: the staging name the destination holds the guest under
POOLS      src → dst  JSON: the client's whole pool table (local id, kind, uuid, generation)
CHUNK      src → dst  binary: one radix chunk (64 indexes) of one persistent pool, as the
                      source has it now — every page there: index, xxh3-64, the *stored*
                      (lz4 or raw) payload; no page: the chunk is empty
COMMIT     src → dst  JSON: the number of persistent pages the destination must now hold
CONFIRM    dst → src  JSON: pages installed under the guest's name
DONE       src → dst  JSON: QEMU completed (or no QEMU drives it): the source drops its copy
ABORT      either     JSON: one sentence; both sides forget the transfer (after CONFIRM:
                      QEMU failed at the very end, the guest stays on the source)
=========  =========  ======================================================================

A CHUNK replaces the destination's copy of that chunk entirely, so sending a chunk again
(because the guest changed it meanwhile) is always correct, whatever was sent before.

CHUNK body: ``u8`` local pool id, ``u32`` pool generation, ``3 × u64`` object id, ``u32``
chunk number, ``u8`` page count; then per page ``u8`` index within the chunk (strictly
increasing), ``u64`` hash, ``u16`` length field, and:

- length ≤ 4096: that many payload bytes (0: the zero page);
- ``KEEP`` (0x8000) + length: the payload, which the receiver also keeps as this
  stream's next *kept payload* (numbered 0, 1, … in stream order, at most
  :data:`MAX_KEPT`): the sender expects more pages with the same bytes;
- ``REF`` (0xFFFF): a ``u32`` kept-payload number instead of the bytes — the page's
  payload is that earlier payload of this same stream.

A reference can only name bytes this connection carried, so what it means never depends
on what the guest did since (a later flush, a resent chunk, the final delta): the
receiver resolves it to those bytes and stores them like any received payload (the
store's dedup still compares bytes).  The sender (:class:`Encoder`) keeps payloads the
source holds for more than one page and refers to them when the same bytes come again:
a guest's duplicates cross the wire once per transfer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from memd.errors import FrameError
from memd.vocab import PAGE_SIZE, Oid

#: Bumped on any incompatible change; BEGIN carries it and the destination refuses others.
VERSION = 2
#: Indexes per CHUNK: tmem's radix chunk (tmem.durable.CHUNK_PAGES), fixed by the format.
CHUNK_PAGES = 64
#: The largest frame either side accepts: a full chunk of raw pages fits with room.
MAX_FRAME = 1 << 20
#: Local pool ids a client has (tmem.types.MAX_POOLS_PER_CLIENT).
MAX_POOLS = 16
#: Payloads one stream may keep for references (the receiver holds them until the
#: connection ends: 64 MiB at worst).
MAX_KEPT = 16384
#: Length-field marks of a CHUNK page (see the module docstring).
KEEP = 0x8000
REF = 0xFFFF

_HEADER = struct.Struct(">IB")
_CHUNK = struct.Struct(">BIQQQIB")
_PAGE = struct.Struct(">BQH")
_REF = struct.Struct(">BQHI")
_U64 = (1 << 64) - 1


class Kind(IntEnum):
    BEGIN = 1
    READY = 2
    POOLS = 3
    CHUNK = 4
    COMMIT = 5
    CONFIRM = 6
    ABORT = 7
    DONE = 8


@dataclass(frozen=True, slots=True)
class Begin:
    guest: str
    #: The client's settings (weight, cap_pages, dedup, frozen, authorised as hex UUIDs)
    #: and ``meta`` (the agent's: the guest's boot id and reboot count).
    client: dict[str, Any]
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Ready:
    staged: str


@dataclass(frozen=True, slots=True)
class PoolEntry:
    local: int
    persistent: bool
    shared: bool
    uuid: bytes | None
    #: The source's identity of this pool (its gid): a pool destroyed and created again
    #: at the same local id gets another one, and the destination starts it afresh.
    generation: int


@dataclass(frozen=True, slots=True)
class Pools:
    pools: tuple[PoolEntry, ...]


#: One page of a CHUNK: (tmem index — chunk * 64 + position, xxh3-64 of the page (ignored
#: for the zero page), payload as stored: lz4 block, raw page, or b"" for the zero page).
#: A plain tuple: a migration moves hundreds of thousands of them a second.
ChunkPage = tuple[int, int, bytes]


@dataclass(frozen=True, slots=True)
class Chunk:
    pool: int
    generation: int
    oid: Oid
    chunk: int
    pages: tuple[ChunkPage, ...] = field(default=())
    #: Indexes whose payload the source holds for other pages too: a hint to
    #: :class:`Encoder` (keep it for references); not on the wire as such.
    shared: frozenset[int] = field(default=frozenset(), compare=False)


@dataclass(frozen=True, slots=True)
class Commit:
    pages: int


@dataclass(frozen=True, slots=True)
class Confirm:
    pages: int


@dataclass(frozen=True, slots=True)
class Done:
    pages: int


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str


Message = Begin | Ready | Pools | Chunk | Commit | Confirm | Done | Abort


# --- encoding ----------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One frame.  Raises ValueError for a message no decoder would accept."""
    return encode_many((msg,))


def encode_many(msgs: Sequence[Message]) -> bytes:
    """The frames of *msgs*, back to back, every payload in full (no kept payloads, no
    references: these frames can go anywhere in a stream).  Raises ValueError as
    :func:`encode`."""
    return _encode(msgs, None)


class Encoder:
    """One stream's sender side of kept payloads: :meth:`encode_many` keeps the payloads
    a CHUNK marks as shared and sends a reference when the same bytes come again.  Its
    frames must go out in the order encoded, all of them (the receiver numbers kept
    payloads as they arrive).  Owned by whoever frames the stream (one at a time)."""

    def __init__(self) -> None:
        #: hash → (kept number, payload): one payload per hash (a colliding other
        #: payload is simply sent in full).
        self._kept: dict[int, tuple[int, bytes]] = {}

    def encode_many(self, msgs: Sequence[Message]) -> bytes:
        return _encode(msgs, self._kept)

    @property
    def kept(self) -> int:
        return len(self._kept)


def _encode(msgs: Sequence[Message], kept: dict[int, tuple[int, bytes]] | None) -> bytes:
    parts: list[bytes] = []
    for msg in msgs:
        if isinstance(msg, Chunk):
            _chunk_parts(msg, parts, kept)
            continue
        kind, obj = _json_of(msg)
        body = json.dumps(obj, separators=(",", ":")).encode()
        if len(body) + 1 > MAX_FRAME:
            raise ValueError(f"a {kind.name} frame of {len(body)} bytes is over the limit")
        parts.append(_HEADER.pack(len(body) + 1, kind))
        parts.append(body)
    return b"".join(parts)


def _json_of(msg: Message) -> tuple[Kind, dict[str, Any]]:
    if isinstance(msg, Begin):
        return Kind.BEGIN, {"version": msg.version, "guest": msg.guest, "client": msg.client}
    if isinstance(msg, Ready):
        return Kind.READY, {"staged": msg.staged}
    if isinstance(msg, Pools):
        return Kind.POOLS, {
            "pools": [
                {
                    "local": p.local,
                    "persistent": p.persistent,
                    "shared": p.shared,
                    "uuid": None if p.uuid is None else p.uuid.hex(),
                    "generation": p.generation,
                }
                for p in msg.pools
            ]
        }
    if isinstance(msg, Commit):
        return Kind.COMMIT, {"pages": msg.pages}
    if isinstance(msg, Confirm):
        return Kind.CONFIRM, {"pages": msg.pages}
    if isinstance(msg, Done):
        return Kind.DONE, {"pages": msg.pages}
    if isinstance(msg, Abort):
        return Kind.ABORT, {"reason": msg.reason}
    raise TypeError(f"not a migration message: {msg!r}")


def _chunk_parts(msg: Chunk, parts: list[bytes], kept: dict[int, tuple[int, bytes]] | None) -> None:
    """Append a CHUNK frame's pieces (header, chunk head, per page its head and payload
    or reference); with *kept*, keep and refer to payloads (see :class:`Encoder`)."""
    if not 0 <= msg.pool < MAX_POOLS or len(msg.pages) > CHUNK_PAGES:
        raise ValueError("chunk pool id or page count out of range")
    header_at = len(parts)
    parts.append(b"")  # the frame header, once the body's length is known
    parts.append(_CHUNK.pack(msg.pool, msg.generation, *msg.oid, msg.chunk, len(msg.pages)))
    size = _CHUNK.size + len(msg.pages) * _PAGE.size
    base = msg.chunk * CHUNK_PAGES
    last = -1
    pack, pack_ref = _PAGE.pack, _REF.pack
    shared = msg.shared if kept is not None else frozenset()
    for index, h, payload in msg.pages:
        pos = index - base
        n = len(payload)
        if not last < pos < CHUNK_PAGES or n > PAGE_SIZE:
            raise ValueError(
                f"page {index} does not belong in chunk {msg.chunk} "
                "in this order, or its payload is too long"
            )
        last = pos
        h &= _U64
        if kept is not None and n > _REF.size - _PAGE.size:  # a reference is shorter
            hit = kept.get(h)
            if hit is not None and hit[1] == payload:
                parts.append(pack_ref(pos, h, REF, hit[0]))
                size += _REF.size - _PAGE.size
                continue
            if hit is None and index in shared and len(kept) < MAX_KEPT:
                kept[h] = (len(kept), payload)
                parts.append(pack(pos, h, KEEP | n))
                parts.append(payload)
                size += n
                continue
        size += n
        parts.append(pack(pos, h, n))
        parts.append(payload)
    if size + 1 > MAX_FRAME:  # never: a full chunk of raw pages fits
        raise ValueError(f"a CHUNK frame of {size} bytes is over the limit")
    parts[header_at] = _HEADER.pack(size + 1, Kind.CHUNK)


# --- decoding ----------------------------------------------------------------------------


class Decoder:
    """Feed bytes as they arrive, get whole messages out.  Any malformed frame raises
    :class:`memd.errors.FrameError`; the stream cannot be resynchronised after that, so
    the caller closes the connection.  Owned by the one task reading the connection."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()  # the start of a frame whose end has not arrived
        self._max = max_frame
        self._kept: list[bytes] = []  # this stream's kept payloads, by number

    def feed(self, data: bytes) -> list[Message]:
        # Frames are parsed where they lie: a held partial frame (most reads end inside
        # one, as a CHUNK frame is ~100 KiB) takes only the bytes it lacks and is then
        # parsed on its own; the rest is parsed in the bytes given.  Each payload is one
        # slice (one copy); the unparsed tail is kept for the next read.  A migration
        # moves ~100 MB of frames: copies and per-page objects are most of the decoding.
        source = data if type(data) is bytes else bytes(data)
        out: list[Message] = []
        pos = 0
        held = self._buf
        if held:
            if len(held) < _HEADER.size:
                pos = _HEADER.size - len(held)
                held += memoryview(source)[:pos]
                if len(held) < _HEADER.size:
                    return out
            length = self._length(held, 0)
            take = 4 + length - len(held)
            held += memoryview(source)[pos : pos + take]
            pos += take
            if len(held) < 4 + length:
                return out
            frame = bytes(held)
            held.clear()
            out.append(_decode(frame[4], frame, _HEADER.size, len(frame), self._kept))
        end = len(source)
        while end - pos >= _HEADER.size:
            length = self._length(source, pos)
            if end - pos < 4 + length:
                break
            out.append(
                _decode(source[pos + 4], source, pos + _HEADER.size, pos + 4 + length, self._kept)
            )
            pos += 4 + length
        if pos < end:
            held += memoryview(source)[pos:]
        return out

    def _length(self, buf: bytes | bytearray, pos: int) -> int:
        """The length field of the frame at *pos* (checked: FrameError)."""
        length: int = _HEADER.unpack_from(buf, pos)[0]
        if not 1 <= length <= self._max:
            raise FrameError(f"migration frame length {length} out of range")
        return length

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)


def _decode(kind: int, source: bytes, start: int, end: int, kept: list[bytes]) -> Message:
    """The message of the frame body ``source[start:end]``."""
    if kind == Kind.CHUNK:
        return _decode_chunk(source, start, end, kept)
    try:
        obj = json.loads(source[start:end])
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        return _from_json(kind, obj)
    except (ValueError, TypeError, KeyError) as err:
        raise FrameError(f"malformed migration frame of kind {kind}: {err}") from None


def _from_json(kind: int, obj: dict[str, Any]) -> Message:
    if kind == Kind.BEGIN:
        guest, client, version = obj["guest"], obj["client"], obj["version"]
        if not isinstance(guest, str) or not guest or not isinstance(client, dict):
            raise TypeError("BEGIN needs a guest name and a client object")
        return Begin(guest, client, _int(version))
    if kind == Kind.READY:
        return Ready(_str(obj["staged"]))
    if kind == Kind.POOLS:
        entries = []
        for p in obj["pools"]:
            local = _int(p["local"])
            uuid = p["uuid"]
            if (
                not 0 <= local < MAX_POOLS
                or not isinstance(p["persistent"], bool)
                or not isinstance(p["shared"], bool)
            ):
                raise ValueError("bad pool entry")
            entries.append(
                PoolEntry(
                    local,
                    p["persistent"],
                    p["shared"],
                    None if uuid is None else bytes.fromhex(_str(uuid)),
                    _int(p["generation"]),
                )
            )
        if len({e.local for e in entries}) != len(entries):
            raise ValueError("a local pool id appears twice")
        return Pools(tuple(entries))
    if kind == Kind.COMMIT:
        return Commit(_int(obj["pages"]))
    if kind == Kind.CONFIRM:
        return Confirm(_int(obj["pages"]))
    if kind == Kind.DONE:
        return Done(_int(obj["pages"]))
    if kind == Kind.ABORT:
        return Abort(_str(obj["reason"]))
    raise ValueError(f"unknown kind {kind}")


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _decode_chunk(source: bytes, start: int, end: int, kept: list[bytes]) -> Chunk:
    if end - start < _CHUNK.size:
        raise FrameError("short CHUNK frame")
    pool, generation, o0, o1, o2, chunk, count = _CHUNK.unpack_from(source, start)
    if pool >= MAX_POOLS or count > CHUNK_PAGES:
        raise FrameError(f"CHUNK pool {pool} or page count {count} out of range")
    pos = start + _CHUNK.size
    pages: list[ChunkPage] = []
    append = pages.append
    last = -1
    base = chunk * CHUNK_PAGES
    unpack, header = _PAGE.unpack_from, _PAGE.size
    for _ in range(count):
        if end - pos < header:
            raise FrameError("CHUNK frame ends inside a page header")
        offset, h, length = unpack(source, pos)
        pos += header
        if not last < offset < CHUNK_PAGES:
            raise FrameError("CHUNK page index out of order")
        last = offset
        if length > PAGE_SIZE:
            if length == REF:
                if end - pos < 4:
                    raise FrameError("CHUNK frame ends inside a reference")
                number = int.from_bytes(source[pos : pos + 4], "big")
                pos += 4
                if number >= len(kept):
                    raise FrameError(f"CHUNK page refers to kept payload {number}, not sent")
                append((base + offset, h, kept[number]))
                continue
            length ^= KEEP
            if not 0 < length <= PAGE_SIZE or end - pos < length or len(kept) >= MAX_KEPT:
                raise FrameError("CHUNK page payload length bad, or too many kept payloads")
            payload = source[pos : pos + length]
            kept.append(payload)
            append((base + offset, h, payload))
            pos += length
            continue
        if end - pos < length:
            raise FrameError("CHUNK page payload length bad")
        append((base + offset, h, source[pos : pos + length]))
        pos += length
    if pos != end:
        raise FrameError("CHUNK frame has trailing bytes")
    return Chunk(pool, generation, (o0, o1, o2), chunk, tuple(pages))
