"""NBD transmission phase, server side: request parsing with validation, simple replies.

Sans-I/O: :meth:`RequestParser.receive_data` takes bytes, :meth:`RequestParser.next_event`
hands out one parsed request at a time, :func:`simple_reply` makes reply bytes.

Every request is checked here, before anything acts on it, against what the export
advertised and against the export's size:

* bad request magic, or a WRITE longer than ``MAX_PAYLOAD`` — :class:`NbdProtocolError`
  (the byte stream cannot be trusted any more, or would have to be buffered without
  bound): the connection closes;
* everything else that is wrong — a :class:`Rejected` event carrying the errno to
  answer with (the payload of a rejected WRITE is consumed, so the next request is
  found): unknown commands and commands memd did not advertise (``EINVAL``), flags the
  command does not take (``EINVAL``), READ longer than ``MAX_PAYLOAD`` (``EINVAL``),
  ranges past the end of the export (``EINVAL`` for READ/TRIM, ``ENOSPC`` for
  WRITE/WRITE_ZEROES, as the protocol asks).

Memory: the parser buffers at most one incomplete request (28 bytes + a payload of at
most ``MAX_PAYLOAD``) beyond what the caller fed it; the caller bounds how much it feeds
before draining events (``buffered`` tells it).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from memd.errors import NbdProtocolError
from memd.nbd.proto import (
    MAX_PAYLOAD,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
)

_REQUEST_SIZE: Final = REQUEST.size  # 28

#: Flags each command may carry (memd negotiates neither structured replies nor
#: extended headers, so DF, REQ_ONE and PAYLOAD_LEN are never valid).
#: (plain ints: IntFlag arithmetic costs a microsecond per request on the hot path)
_ALLOWED_FLAGS: Final[dict[int, int]] = {
    Cmd.READ.value: 0,
    Cmd.WRITE.value: int(CmdFlag.FUA),
    Cmd.DISC.value: 0,
    Cmd.FLUSH.value: 0,
    Cmd.TRIM.value: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES.value: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
}
_CMDS: Final[dict[int, Cmd]] = {c.value: c for c in Cmd}
_WRITE: Final = Cmd.WRITE.value


class Request(NamedTuple):
    """A valid request.  ``data`` is the payload of a WRITE (``length`` bytes), else b""."""

    cmd: Cmd
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes = b""


class Rejected(NamedTuple):
    """A well-framed request that must be answered with ``error`` and nothing else."""

    cookie: int
    error: Errno
    reason: str
    cmd: int


class NeedData(NamedTuple):
    """No complete request is buffered."""


NEED_DATA: Final = NeedData()

Event = Request | Rejected | NeedData


class RequestParser:
    """Parses one connection's requests for an export of ``export_size`` bytes."""

    def __init__(self, export_size: int) -> None:
        self.export_size = export_size
        self._buf = bytearray()
        self._pos = 0
        #: set once NBD_CMD_DISC arrived: later bytes are ignored
        self.disconnected = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.disconnected:
            return
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]  # compact: amortised O(1) per byte
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event:
        """The next request (or rejection), or NEED_DATA.  A Request with cmd DISC is
        the last event ever returned.  Raises NbdProtocolError when the stream is
        beyond repair."""
        if self.disconnected:
            return NEED_DATA
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _REQUEST_SIZE:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad request magic {magic:#010x}")
        payload = length if cmd == _WRITE else 0
        if payload > MAX_PAYLOAD:
            raise NbdProtocolError(f"write of {length} bytes: the limit is {MAX_PAYLOAD}")
        end = pos + _REQUEST_SIZE + payload
        if len(buf) < end:
            return NEED_DATA
        data = bytes(buf[pos + _REQUEST_SIZE : end]) if payload else b""
        self._pos = end
        if end == len(buf):
            buf.clear()
            self._pos = 0
        if (
            cmd <= _WRITE
            and not flags
            and length <= MAX_PAYLOAD
            and offset + length <= self.export_size
        ):  # READ is 0, WRITE 1
            # the common case, with the checks of _check that apply to it
            return Request(_CMDS[cmd], 0, cookie, offset, length, data)
        error = self._check(cmd, flags, offset, length)
        if error is not None:
            return Rejected(cookie, error[0], error[1], cmd)
        if cmd == Cmd.DISC:
            self.disconnected = True
            self._buf.clear()
            self._pos = 0
        return Request(_CMDS[cmd], flags, cookie, offset, length, data)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return Errno.EINVAL, f"command {cmd} is not supported"
        if flags & ~allowed:
            return Errno.EINVAL, f"flags {flags:#x} are not valid for command {cmd}"
        if cmd in (Cmd.DISC, Cmd.FLUSH):
            if offset or length:
                return Errno.EINVAL, "DISC and FLUSH take neither offset nor length"
            return None
        if cmd == Cmd.READ and length > MAX_PAYLOAD:
            return Errno.EINVAL, f"read of {length} bytes: the limit is {MAX_PAYLOAD}"
        if offset > self.export_size or length > self.export_size - offset:
            beyond = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            return beyond, "range beyond the end of the export"
        return None


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    """A simple reply; ``data`` only for a successful READ."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def reply_header(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
