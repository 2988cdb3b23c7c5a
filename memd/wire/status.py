"""Errors and statuses: which reply status a host sends for an exception, and which
exception a guest raises for a status.

Owns the two translations of docs/architecture.md ("Errors are translated only at
boundaries").  Both tables are keyed by the real classes of :mod:`memd.errors`, never
by names: an unrelated exception that happens to share a name maps to INTERNAL.
"""

from __future__ import annotations

from memd.errors import (
    AccessDenied,
    ClientFrozen,
    ContentMismatch,
    FrameError,
    InvalidArgument,
    MemdError,
    NoSpace,
    NoSuchClient,
    NoSuchDomain,
    NoSuchPool,
    NotShareable,
    OutOfFrames,
    ProtocolError,
    RemoteError,
    SharingBusy,
    SharingDenied,
    SharingError,
    StaleHandle,
    TmemError,
    VersionError,
)
from memd.wire.constants import STATUS_TABLE, Status
from memd.wire.ops import op_name

#: Host side: exception class -> reply status.  Looked up along the exception's MRO, so
#: the most specific listed class wins and a subclass maps like its nearest listed
#: ancestor; anything else is INTERNAL.
EXCEPTION_STATUS: dict[type[BaseException], Status] = {
    InvalidArgument: Status.INVALID,
    NoSuchPool: Status.NO_POOL,
    NoSuchClient: Status.DENIED,
    AccessDenied: Status.DENIED,
    NoSpace: Status.NO_SPACE,
    ClientFrozen: Status.FROZEN,
    StaleHandle: Status.STALE,
    NotShareable: Status.NOT_SHAREABLE,
    SharingDenied: Status.DENIED,
    SharingBusy: Status.BUSY,
    OutOfFrames: Status.NO_SPACE,
    NoSuchDomain: Status.INVALID,
    ContentMismatch: Status.INTERNAL,
    VersionError: Status.VERSION,
    FrameError: Status.BAD_FRAME,
    ProtocolError: Status.BAD_FRAME,
    RemoteError: Status.INTERNAL,
}

#: Guest side: reply status -> the memd.errors class the client raises.  Statuses not
#: listed (BAD_FRAME, UNSUPPORTED_OP, BUSY, INTERNAL, NEED_HELLO, NOT_FOUND) raise
#: RemoteError.  Every raised error has ``fields["status"]``.
STATUS_EXCEPTION: dict[Status, type[MemdError]] = {
    Status.NO_SPACE: NoSpace,
    Status.INVALID: InvalidArgument,
    Status.NO_POOL: NoSuchPool,
    Status.DENIED: AccessDenied,
    Status.FROZEN: ClientFrozen,
    Status.STALE: StaleHandle,
    Status.NOT_SHAREABLE: NotShareable,
    Status.VERSION: VersionError,
}

#: One sentence per status, for operators when the host sent no message.
STATUS_TEXT: dict[Status, str] = {
    Status.OK: "success",
    Status.NOT_FOUND: "no page is stored under that handle",
    Status.NO_SPACE: "the host store has no space for the page right now",
    Status.INVALID: "an argument is out of range",
    Status.NO_POOL: "no such pool for this guest",
    Status.DENIED: "the host does not allow this guest to do that",
    Status.FROZEN: "the host has frozen this guest's pools",
    Status.BAD_FRAME: "the host could not parse the request frame",
    Status.UNSUPPORTED_OP: "the host does not support this operation",
    Status.VERSION: "the host and guest share no protocol version",
    Status.BUSY: "the host is busy; try again",
    Status.INTERNAL: "the host failed internally; nothing was changed",
    Status.STALE: "the sharing handle is stale",
    Status.NOT_SHAREABLE: "the page cannot be shared in its current state",
    Status.NEED_HELLO: "the request came before a successful HELLO",
}


def status_for_exception(exc: BaseException) -> Status:
    """The status a host replies with when handling a request raised ``exc``: the
    status the error names in its fields, else that of its most specific listed class."""
    if isinstance(exc, MemdError) and "status" in exc.fields:
        value = exc.fields["status"]
        if isinstance(value, int) and 0 <= value < len(STATUS_TABLE):
            return STATUS_TABLE[value]
    for cls in type(exc).__mro__:
        status = EXCEPTION_STATUS.get(cls)
        if status is not None:
            return status
    return Status.INTERNAL


def error_for_status(
    status: int, message: str = "", *, op: int | None = None, request_id: int | None = None
) -> MemdError:
    """The exception a client raises for a non-OK reply (see :data:`STATUS_EXCEPTION`)."""
    known = STATUS_TABLE[status] if 0 <= status < len(STATUS_TABLE) else None
    name = op_name(op) if op is not None else None
    text = message or (STATUS_TEXT[known] if known is not None else f"status {status}")
    if name:
        text = f"{name}: {text}"
    cls = STATUS_EXCEPTION.get(known) if known is not None else None
    if cls is None or issubclass(cls, RemoteError):
        return RemoteError(text, status=int(status), op=name, request_id=request_id)
    if issubclass(cls, ProtocolError):
        return cls(text, op=name, request_id=request_id, status=int(status))
    if issubclass(cls, TmemError | SharingError):
        return cls(text, op=name, status=int(status), request_id=request_id)
    return cls(text, status=int(status))
