"""The protocol's numbers: opcodes, statuses, flag and capability bits, limits, header layout.

Owns every constant of docs/protocol.md that is not a payload shape.  Nothing here
depends on another part of :mod:`memd.wire`; everything else depends on this module.
The page size, batch limit, pool flags and object ids are the project's shared
vocabulary (:mod:`memd.vocab`) and are re-exported here, not redefined.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

# The shared vocabulary, re-exported: the protocol's callers name it from here.
from memd.vocab import MAX_BATCH as MAX_BATCH
from memd.vocab import PAGE_SIZE as PAGE_SIZE
from memd.vocab import Oid as Oid
from memd.vocab import PoolFlag as PoolFlag

#: virtio-serial port name the guest looks for under /sys/class/virtio-ports/*/name.
PORT_NAME = "org.memd.0"
#: First two bytes of every frame.  Neither 0x00 (zero pages) nor 0xFF (resync marker)
#: nor printable ASCII, so that ordinary data rarely looks like the start of a header.
MAGIC = b"\x9dM"
#: Sent before a SYNC request after every (re)connect.  0xFF can never start a header,
#: so a decoder that is between frames skips these bytes silently.
RESYNC_MARKER = b"\xff" * 8
PROTOCOL_VERSION = 1
MIN_VERSION = 1
MAX_VERSION = 1
SUPPORTED_VERSIONS = frozenset(range(MIN_VERSION, MAX_VERSION + 1))

MAX_PAYLOAD = 1 << 20  #: payload bytes of one frame (header excluded)
MAX_GFNS = 4096  #: gfns in one NOMINATE / SHARE_QUERY
MAX_POOLS = 1024  #: entries in one LIST_POOLS reply
MAX_STATS = 64 * 1024  #: bytes of the STATS text
MAX_MESSAGE = 1024  #: bytes of the UTF-8 message of an error reply
MAX_REQUEST_ID = 0xFFFFFFFF
#: PSI averages are sent as hundredths of a percent: 0..MAX_PSI.
MAX_PSI = 10000
#: gfn of a page of a range that has no frame (not present, swapped out).
NO_GFN = (1 << 64) - 1

#: A reader that has held an incomplete frame this long without completing it calls
#: :meth:`~memd.wire.FrameDecoder.abandon_partial` (the writer of that frame is gone).
PARTIAL_FRAME_TIMEOUT = 1.0
#: The guest resends RESYNC_MARKER + SYNC at this interval until the SYNC reply arrives.
SYNC_RETRY_INTERVAL = 0.5

#: magic, version u8, op u8, flags u16, status u16, request id u32, payload length u32,
#: payload crc32 u32, header crc32 u32 (over the 20 bytes before it).
HEADER = struct.Struct("<2sBBHHIIII")
HEADER_SIZE = HEADER.size  # 24

#: Anything that can be written to a stream or sliced: pages arrive as any of these.
Buffer = bytes | bytearray | memoryview
#: A page handle inside a pool: (object id, page index).
Handle = tuple[Oid, int]


class Op(IntEnum):
    """Opcodes (header byte 3).  A reply carries the opcode of its request."""

    HELLO = 0x01
    SYNC = 0x02
    NEW_POOL = 0x10
    DESTROY_POOL = 0x11
    PUT = 0x12
    GET = 0x13
    FLUSH_PAGE = 0x14
    FLUSH_OBJECT = 0x15
    PUT_BATCH = 0x16
    GET_BATCH = 0x17
    LIST_POOLS = 0x18
    NOMINATE = 0x20
    SHARE_QUERY = 0x21
    ABOUT_TO_WRITE = 0x22
    STATS = 0x30
    MEM_REPORT = 0x31  #: the guest reports its memory state (needs Capability.MEM_REPORT)
    #: Local ops: only between a guest program and the guest daemon (memd.guest.daemon), never
    #: on the port; a host answers UNSUPPORTED_OP.  A virtual address range of a process.
    RANGE_NOMINATE = 0x40
    RANGE_QUERY = 0x41


class Status(IntEnum):
    """Reply status (header u16; always 0 in requests) and per-item batch status."""

    OK = 0
    NOT_FOUND = 1  #: get: no page under that handle
    NO_SPACE = 2  #: the store cannot take the page now
    INVALID = 3  #: an argument is out of range (pool flags, page size, gfn)
    NO_POOL = 4  #: the pool id is not one of this guest's pools
    DENIED = 5  #: not authorised (shared pool uuid, sharing disabled for this guest)
    FROZEN = 6  #: the host froze this guest: puts refused
    BAD_FRAME = 7  #: the request frame was malformed
    UNSUPPORTED_OP = 8  #: unknown opcode, or an op the negotiated version lacks
    VERSION = 9  #: hello: no protocol version in common
    BUSY = 10  #: try again later
    INTERNAL = 11  #: the host failed; the request had no effect
    STALE = 12  #: a sharing handle is stale
    NOT_SHAREABLE = 13  #: the page cannot be nominated in its current state
    NEED_HELLO = 14  #: an op other than HELLO/SYNC before a successful HELLO


#: Status by value; the values are 0..len-1 with no gaps (checked at import), so a
#: batch of statuses decodes by indexing instead of one enum call per item.
STATUS_TABLE: tuple[Status, ...] = tuple(sorted(Status))
assert [int(s) for s in STATUS_TABLE] == list(range(len(STATUS_TABLE)))


class FrameFlag(IntFlag):
    REPLY = 0x0001  #: set in replies, clear in requests


KNOWN_FRAME_FLAGS = int(FrameFlag.REPLY)


class Capability(IntFlag):
    """Hello capability bits: the guest proposes, the host answers the subset it grants."""

    BATCH = 0x1
    SHARING = 0x2
    STATS = 0x4
    DEDUP_OPT_IN = 0x8  #: the guest consents to cross-guest de-duplication of its pages
    MEM_REPORT = 0x10  #: the host takes MEM_REPORT (a guest sends it only when granted)


ALL_CAPABILITIES = int(Capability.BATCH | Capability.SHARING | Capability.STATS)


class ShareState(IntEnum):
    UNKNOWN = 0  #: gfn out of range, or the host has no sharing record for it
    PRIVATE = 1
    NOMINATED = 2  #: nominated, not (yet) merged with another page
    SHARED = 3


SHARE_STATES = frozenset(int(s) for s in ShareState)


class MemReportFlag(IntFlag):
    NO_PSI = 0x1  #: the guest has no /proc/pressure/memory: both PSI fields are 0


#: NEW_POOL flag bits a guest may set; any other bit makes the request malformed.
KNOWN_POOL_FLAGS = int(PoolFlag.PERSISTENT | PoolFlag.SHARED)

_U64_MASK = (1 << 64) - 1


def oid_from_int(value: int) -> Oid:
    """A 192-bit object id as the three u64 words on the wire (least significant first)."""
    if not 0 <= value < 1 << 192:
        raise ValueError(f"object id {value} does not fit in 192 bits")
    return (value & _U64_MASK, (value >> 64) & _U64_MASK, value >> 128)


def oid_to_int(oid: Oid) -> int:
    return oid[0] | oid[1] << 64 | oid[2] << 128
