"""NBD protocol numbers and memd's limits (no logic, no I/O).

Values are those of the NBD protocol specification (``doc/proto.md`` of the NBD
project); names follow it without the ``NBD_`` prefix.  All integers on the wire are
big-endian.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

# --- handshake ---------------------------------------------------------------------------

#: "NBDMAGIC", the first 8 bytes the server sends.
NBDMAGIC = 0x4E42444D41474943
#: "IHAVEOPT": after NBDMAGIC (newstyle), and before every option the client sends.
IHAVEOPT = 0x49484156454F5054
#: Starts every option reply.
REPLY_MAGIC = 0x3E889045565A9


class HandshakeFlag(IntFlag):
    """Server flags (u16 after IHAVEOPT)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags (u32, its first bytes)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types; those with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR | 1
    ERR_POLICY = _ERR | 2
    ERR_INVALID = _ERR | 3
    ERR_PLATFORM = _ERR | 4
    ERR_TLS_REQD = _ERR | 5
    ERR_UNKNOWN = _ERR | 6
    ERR_SHUTDOWN = _ERR | 7
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    ERR_TOO_BIG = _ERR | 9


class Info(IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO requests and NBD_REP_INFO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    """Per-export flags (u16), sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


# --- transmission ------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

#: magic u32, command flags u16, type u16, cookie u64, offset u64, length u32
REQUEST = struct.Struct(">IHHQQI")
#: magic u32, error u32, cookie u64
SIMPLE_REPLY = struct.Struct(">IIQ")


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Errno(IntEnum):
    """Error values of replies (the protocol's own numbering, equal to Linux errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# --- memd's limits -----------------------------------------------------------------------

#: Largest READ/WRITE payload accepted (the protocol's customary maximum, and QEMU's).
MAX_PAYLOAD = 32 << 20
#: Block sizes advertised in NBD_INFO_BLOCK_SIZE: any alignment works (sub-page writes
#: are read-modify-write), 4 KiB is what costs least.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
#: The longest option (its data) the server reads; names are at most 4096 bytes.
MAX_OPTION_DATA = 16 * 1024
#: Options a client may send before it picks an export; then the server hangs up.
MAX_OPTIONS = 128
#: Export names are at most this many bytes (the protocol's own limit).
MAX_NAME = 4096
#: Information requests in one NBD_OPT_INFO / NBD_OPT_GO.
MAX_INFO_REQUESTS = 64
