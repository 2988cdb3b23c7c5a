"""NBD fixed-newstyle negotiation, server side, as a sans-I/O state machine.

Bytes in (:meth:`ServerHandshake.receive_data`), events out, bytes out
(:meth:`ServerHandshake.data_to_send`); nothing here awaits or touches a socket.

The server greets with NBDMAGIC, IHAVEOPT and its flags; the client answers with its
flags, then sends options until one of them picks the export (``NBD_OPT_GO``, or the
old ``NBD_OPT_EXPORT_NAME``) or ends the session (``NBD_OPT_ABORT``).  Supported:

* ``GO`` / ``INFO`` — ``NBD_INFO_EXPORT`` always, ``NAME``, ``DESCRIPTION`` and
  ``BLOCK_SIZE`` when asked for; an unknown export gets ``NBD_REP_ERR_UNKNOWN``;
* ``LIST`` — the one export this socket serves;
* ``EXPORT_NAME`` — for old clients; an unknown name closes the connection (the
  protocol leaves no other way to refuse it);
* ``ABORT`` — acknowledged, then the connection closes.

Everything else (``STARTTLS``, ``STRUCTURED_REPLY``, meta contexts, extended headers,
unknown options) is refused with ``NBD_REP_ERR_UNSUP``: memd sends simple replies only,
which every client must accept.  A client that skips the fixed-newstyle flag, sets
unknown flags, sends an option without IHAVEOPT, an option longer than
``MAX_OPTION_DATA`` or more than ``MAX_OPTIONS`` options is hung up on: none of that
comes from a real client, and the untrusted side must not make the server buffer or
loop without bound.

One socket serves one export (one guest's swap disk), so the export is known when the
handshake starts; it answers to its own name and to the empty (default) name.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from memd.errors import NbdProtocolError
from memd.nbd.proto import (
    IHAVEOPT,
    KNOWN_CLIENT_FLAGS,
    MAX_INFO_REQUESTS,
    MAX_NAME,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_PAYLOAD,
    MIN_BLOCK,
    NBDMAGIC,
    PREFERRED_BLOCK,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
_REPLY_HEADER = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, data length
_EXPORT_INFO = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_BLOCK_INFO = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes)


class ExportInfo(NamedTuple):
    """What the handshake tells clients about the export this socket serves."""

    name: str
    size: int
    flags: int  #: TransmissionFlag bits
    description: str = ""


class Negotiated(NamedTuple):
    """The client picked the export: transmission starts with the bytes in ``trailing``."""

    export: ExportInfo
    trailing: bytes


class Closed(NamedTuple):
    """The session ends here: send what is queued, then close.  ``clean``: the client
    asked for it (NBD_OPT_ABORT)."""

    reason: str
    clean: bool


Event = Negotiated | Closed


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ServerHandshake:
    """One connection's negotiation.  Feed it bytes; collect events and replies."""

    def __init__(self, export: ExportInfo) -> None:
        if not 0 <= export.size < 1 << 63:
            raise ValueError("export size out of range")
        self.export = export
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.options_seen = 0
        self._buf = bytearray()
        self._out = bytearray(
            _GREETING.pack(
                NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
            )
        )

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Consume bytes; return the events they complete (at most one, which ends the
        handshake: after it, further bytes belong to the transmission phase)."""
        if self.state in (State.TRANSMISSION, State.CLOSED):
            raise NbdProtocolError(f"handshake already {self.state.value}")
        self._buf += data
        try:
            event = self._advance()
        except NbdProtocolError as err:
            self.state = State.CLOSED
            return [Closed(err.message, clean=False)]
        return [] if event is None else [event]

    # -- the machine -----------------------------------------------------------------------

    def _advance(self) -> Event | None:
        if self.state is State.CLIENT_FLAGS:
            if len(self._buf) < 4:
                return None
            (flags,) = struct.unpack_from(">I", self._buf)
            del self._buf[:4]
            if flags & ~KNOWN_CLIENT_FLAGS:
                raise NbdProtocolError(f"client flags {flags:#x} include unknown bits")
            if not flags & ClientFlag.FIXED_NEWSTYLE:
                raise NbdProtocolError("client does not speak fixed newstyle")
            self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self.state = State.OPTIONS
        while self.state is State.OPTIONS and len(self._buf) >= _OPTION_HEADER.size:
            magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
            if magic != IHAVEOPT:
                raise NbdProtocolError("option without IHAVEOPT magic")
            if length > MAX_OPTION_DATA:
                raise NbdProtocolError(
                    f"option {option} carries {length} bytes (the most is {MAX_OPTION_DATA})"
                )
            end = _OPTION_HEADER.size + length
            if len(self._buf) < end:
                return None
            data = bytes(self._buf[_OPTION_HEADER.size : end])
            del self._buf[:end]
            self.options_seen += 1
            if self.options_seen > MAX_OPTIONS:
                raise NbdProtocolError(f"more than {MAX_OPTIONS} options")
            event = self._option(option, data)
            if event is not None:
                return event
        return None

    def _option(self, option: int, data: bytes) -> Event | None:
        if option == Opt.EXPORT_NAME:
            if not self._known(data):
                raise NbdProtocolError("NBD_OPT_EXPORT_NAME names an unknown export")
            self._out += _EXPORT_NAME_REPLY.pack(self.export.size, self.export.flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._negotiated()
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            self.state = State.CLOSED
            return Closed("client aborted the negotiation", clean=True)
        if option == Opt.LIST:
            if data:
                self._error(option, Rep.ERR_INVALID, "NBD_OPT_LIST carries no data")
                return None
            name = self.export.name.encode()
            self._reply(option, Rep.SERVER, struct.pack(">I", len(name)) + name)
            self._reply(option, Rep.ACK)
            return None
        if option in (Opt.INFO, Opt.GO):
            return self._info_or_go(option, data)
        self._error(option, Rep.ERR_UNSUP, "option not supported by memd")
        return None

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
            return None
        name, requests = parsed
        if len(name) > MAX_NAME:
            self._error(option, Rep.ERR_INVALID, "export name longer than 4096 bytes")
            return None
        if not self._known(name):
            self._error(option, Rep.ERR_UNKNOWN, "no such export on this socket")
            return None
        export = self.export
        self._reply(option, Rep.INFO, _EXPORT_INFO.pack(Info.EXPORT, export.size, export.flags))
        for info in sorted(set(requests)):
            if info == Info.NAME:
                self._reply(option, Rep.INFO, struct.pack(">H", Info.NAME) + export.name.encode())
            elif info == Info.DESCRIPTION:
                self._reply(
                    option,
                    Rep.INFO,
                    struct.pack(">H", Info.DESCRIPTION) + export.description.encode(),
                )
            elif info == Info.BLOCK_SIZE:
                self._reply(
                    option,
                    Rep.INFO,
                    _BLOCK_INFO.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD),
                )
            # other information types: the server may ignore what it does not know
        self._reply(option, Rep.ACK)
        return self._negotiated() if option == Opt.GO else None

    def _negotiated(self) -> Negotiated:
        self.state = State.TRANSMISSION
        trailing = bytes(self._buf)
        self._buf.clear()
        return Negotiated(self.export, trailing)

    def _known(self, name: bytes) -> bool:
        return name in (b"", self.export.name.encode())

    def _reply(self, option: int, rep: Rep, data: bytes = b"") -> None:
        self._out += _REPLY_HEADER.pack(REPLY_MAGIC, option, rep, len(data)) + data

    def _error(self, option: int, rep: Rep, message: str) -> None:
        self._reply(option, rep, message.encode())


def _parse_info_request(data: bytes) -> tuple[bytes, list[int]] | None:
    """(export name, info types) of an NBD_OPT_INFO/GO, or None when the lengths inside
    disagree with the option's length."""
    if len(data) < 4:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if len(data) < 4 + name_len + 2:
        return None
    name = data[4 : 4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if count > MAX_INFO_REQUESTS or len(rest) != 2 * count:
        return None
    return name, list(struct.unpack(f">{count}H", rest))
