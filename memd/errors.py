"""The memd exception tree: one root, four families, errors that carry data.

Every error memd raises on purpose derives from :class:`MemdError`::

    MemdError
    ├── ProtocolError            a frame on the wire is malformed or not allowed
    │   ├── FrameError               bad magic, length, opcode or payload shape
    │   ├── VersionError             no protocol version in common
    │   ├── RemoteError              the peer answered a request with an error status
    │   └── NbdProtocolError         an NBD client broke the protocol: the connection closes
    ├── TmemError                a tmem operation failed (carries op, client, pool, oid, index)
    │   ├── InvalidArgument          an id, index, length or flag is out of range
    │   ├── NoSuchPool               the pool id is not one of this client's pools
    │   ├── NoSuchClient             unknown client
    │   ├── AccessDenied             shared pool not authorised for this client
    │   ├── NoSpace                  the store cannot take the page (budget, cap)
    │   ├── ClientFrozen             the host froze the client: puts refused
    │   └── DataLost                 a swap disk page's contents were lost (agent crash)
    ├── SharingError             a sharing operation failed (carries op, domain, gfn, mfn, handle)
    │   ├── StaleHandle              a handle no longer names the page's sharing record
    │   │   ├── StaleSourceHandle
    │   │   └── StaleClientHandle
    │   ├── NotShareable             the page cannot be nominated (type, state)
    │   │   └── MergeNotConsented        the pages' guests have not both consented to merging
    │   ├── SharingDenied            this guest may not use sharing (none registered, opted out)
    │   ├── SharingBusy              merging cannot be switched right now (QEMU's monitor)
    │   ├── ContentMismatch          share() found the two pages' bytes differ
    │   ├── OutOfFrames              unshare could not allocate a private frame
    │   └── NoSuchDomain             unknown domain or gfn out of range
    └── BackendError             host I/O failed (carries target: VM, socket, path)
        ├── NotFound                 no such VM / domain / guest
        ├── ChannelMissing           the VM has no memd virtio-serial channel
        ├── AgentNotRunning          nothing listens on the control socket
        ├── PermissionDenied         the OS refused (not root, socket mode)
        ├── Unavailable              a service (libvirtd, QMP, KSM) is not reachable
        ├── CommandFailed            QEMU's monitor refused a command (carries command, error class)
        └── MigrationFailed          a guest's tmem transfer to another agent did not complete

Errors are translated only at boundaries (``raise NoSuchPool(...) from err``);
``str(error)`` is one sentence fit for an operator.  This module is standard
library only: the guest agent imports it.
"""

from __future__ import annotations

from typing import Any


class MemdError(Exception):
    """Root of every error memd raises on purpose."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        #: Structured context (op, pool, mfn, ...): what logs and ``--json`` show.
        self.fields: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, **self.fields}


# --- protocol ---------------------------------------------------------------------------


class ProtocolError(MemdError):
    """A frame on the wire is malformed, too large, or not allowed in this state."""

    def __init__(
        self,
        message: str,
        *,
        op: int | str | None = None,
        request_id: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, op=op, request_id=request_id, **fields)
        self.op = op
        self.request_id = request_id


class FrameError(ProtocolError):
    """Bad magic, header, length, opcode or payload shape."""


class VersionError(ProtocolError):
    """The peers share no protocol version."""


class NbdProtocolError(ProtocolError):
    """An NBD client sent bytes the server cannot go on from (bad magic, a write longer
    than the request limit, a malformed option): that connection is closed."""


class RemoteError(ProtocolError):
    """The peer answered with a non-zero status."""

    def __init__(self, message: str, *, status: int, **fields: Any) -> None:
        super().__init__(message, status=status, **fields)
        self.status = status


# --- tmem -------------------------------------------------------------------------------


class TmemError(MemdError):
    """A tmem operation failed; carries the op and the handle parts that were known."""

    def __init__(
        self,
        message: str,
        *,
        op: str | None = None,
        client: str | None = None,
        pool: int | None = None,
        oid: tuple[int, int, int] | None = None,
        index: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, op=op, client=client, pool=pool, oid=oid, index=index, **fields)
        self.op = op
        self.client = client
        self.pool = pool
        self.oid = oid
        self.index = index


class InvalidArgument(TmemError):
    """An id, index, length or flag is out of range."""


class NoSuchPool(TmemError):
    """The pool id is not one of this client's pools."""


class NoSuchClient(TmemError):
    """No client of that name."""


class AccessDenied(TmemError):
    """The client may not join that shared pool (the host has not authorised it)."""


class NoSpace(TmemError):
    """The store cannot take the page now (memory budget or client cap)."""


class ClientFrozen(TmemError):
    """The host froze this client: puts are refused until thawed."""


class DataLost(TmemError):
    """A swap disk page held by an agent that died is gone: reading it must fail, never
    return other bytes (memd.nbd.export answers EIO)."""


# --- sharing ----------------------------------------------------------------------------


class SharingError(MemdError):
    """A sharing operation failed; carries op, domain, gfn, mfn and handle where known."""

    def __init__(
        self,
        message: str,
        *,
        op: str | None = None,
        domain: int | str | None = None,
        gfn: int | None = None,
        mfn: int | None = None,
        handle: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, op=op, domain=domain, gfn=gfn, mfn=mfn, handle=handle, **fields)
        self.op = op
        self.domain = domain
        self.gfn = gfn
        self.mfn = mfn
        self.handle = handle


class StaleHandle(SharingError):
    """The handle's version no longer matches the frame's sharing record."""


class StaleSourceHandle(StaleHandle):
    """share(): the source handle is stale (or its gfn moved)."""


class StaleClientHandle(StaleHandle):
    """share(): the client handle is stale (or its gfn moved)."""


class NotShareable(SharingError):
    """The page cannot be nominated in its current state."""


class MergeNotConsented(NotShareable):
    """share(): the merge would put a guest's page on a frame with another guest's, and
    they have not both consented to cross-guest merging (sharing.consent)."""


class SharingDenied(SharingError):
    """This guest may not use page sharing: no memory registered for it, or the operator
    or the guest itself ruled merging out."""


class SharingBusy(SharingError):
    """Merging could not be switched for the guest right now (QEMU's monitor refused or
    did not answer); the request may be retried."""


class ContentMismatch(SharingError):
    """share(): the two pages do not hold the same bytes."""


class OutOfFrames(SharingError):
    """unshare(): no frame could be allocated for the private copy."""


class NoSuchDomain(SharingError):
    """Unknown domain, or gfn outside its memory."""


# --- backend (host I/O) -----------------------------------------------------------------


class BackendError(MemdError):
    """Host I/O failed: libvirt, QMP, a socket, /proc or sysfs."""

    def __init__(self, message: str, *, target: str | None = None, **fields: Any) -> None:
        super().__init__(message, target=target, **fields)
        self.target = target


class NotFound(BackendError):
    """No such VM, domain or guest."""


class ChannelMissing(BackendError):
    """The VM has no memd virtio-serial channel."""


class AgentNotRunning(BackendError):
    """Nothing is listening on the agent's control socket."""


class PermissionDenied(BackendError):
    """The OS refused: not root, or the socket/file mode forbids it."""


class Unavailable(BackendError):
    """A service (libvirtd, a QMP monitor, KSM sysfs) cannot be reached."""


class CommandFailed(BackendError):
    """QEMU's monitor answered a command with an error (bad path, property, argument)."""

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        error_class: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, command=command, error_class=error_class, **fields)
        self.command = command
        self.error_class = error_class


class MigrationFailed(BackendError):
    """A guest's tmem transfer to another agent was aborted (by either side, a cancelled
    QEMU migration, a lost connection); the source still holds everything."""
