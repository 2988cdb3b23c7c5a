"""The guest's synchronous client of the host agent: tmem, sharing and stats calls over
one transport, with pipelining, automatic reconnect and resync.

Connection life cycle (docs/protocol.md, "Resync" and "Hello")::

    DISCONNECTED --open transport--> SYNCING --SYNC reply with our nonce--> HELLO
        ^                                                                     |
        +---- EOF / I/O error / reply timeout / corrupt stream ---- READY <---+

In SYNCING the client sends RESYNC_MARKER + SYNC(nonce) every SYNC_RETRY_INTERVAL and
throws away every frame until the SYNC reply carrying its nonce: whatever the stream
held from before the cut is gone.  A call that loses the connection reconnects and is
resent once if its op is idempotent (every op but NEW_POOL and DESTROY_POOL); otherwise
the caller gets :class:`~memd.errors.Unavailable` and decides.

A non-OK reply raises the class in :data:`memd.wire.STATUS_EXCEPTION` (NoSpace,
NoSuchPool, ...) or RemoteError; ``get`` returns None instead of raising NOT_FOUND.
One lock serialises calls, so a client may be shared between threads.
Standard library only: this runs inside a python3-minimal guest.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from memd.errors import InvalidArgument, MemdError, Unavailable
from memd.guest.transport import CharDeviceTransport, SocketTransport, Transport, find_port
from memd.wire import (
    ALL_CAPABILITIES,
    MAX_GFNS,
    MAX_REQUEST_ID,
    MAX_VERSION,
    MIN_VERSION,
    PAGE_SIZE,
    PORT_NAME,
    RESYNC_MARKER,
    SYNC_RETRY_INTERVAL,
    AboutToWriteReply,
    AboutToWriteRequest,
    Buffer,
    DestroyPoolReply,
    DestroyPoolRequest,
    ErrorReply,
    FlushObjectReply,
    FlushObjectRequest,
    FlushPageReply,
    FlushPageRequest,
    Frame,
    FrameDecoder,
    GetBatchReply,
    GetBatchRequest,
    GetReply,
    GetRequest,
    Handle,
    HelloReply,
    HelloRequest,
    ListPoolsReply,
    ListPoolsRequest,
    NewPoolReply,
    NewPoolRequest,
    NominateReply,
    NominateRequest,
    NominateResult,
    Oid,
    Op,
    PoolFlag,
    PoolInfo,
    PutBatchReply,
    PutBatchRequest,
    PutReply,
    PutRequest,
    RangeNominateItem,
    RangeNominateReply,
    RangeNominateRequest,
    RangeQueryItem,
    RangeQueryReply,
    RangeQueryRequest,
    Reply,
    Request,
    ShareInfo,
    ShareQueryReply,
    ShareQueryRequest,
    StatsReply,
    StatsRequest,
    Status,
    SyncReply,
    SyncRequest,
    decode_reply,
    encode_request,
    encode_request_parts,
    error_for_status,
    oid_from_int,
    op_of,
    spec_of,
)

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_RECV_SIZE = 1 << 20
_BATCH_ITEM_BYTES = 32 + PAGE_SIZE

R = TypeVar("R")


class _ConnectionLost(Exception):
    """Internal: the stream is gone or cannot be trusted; reconnect and resync."""


class _SessionLost(_ConnectionLost):
    """Internal: the host answered NEED_HELLO — it forgot this session (the host agent
    restarted while the port stayed open).  The requests it refused were not executed, so
    they are resent after a new SYNC + HELLO whatever their op."""


#: Session resets (NEED_HELLO) one call survives before giving up.
_MAX_SESSION_RESETS = 3


def read_boot_id(path: str = BOOT_ID_PATH) -> bytes:
    """The guest kernel's boot id as 16 bytes (zeros if unreadable: the host then cannot
    tell a reboot from an agent restart, and keeps the pools)."""
    try:
        with open(path, encoding="ascii") as f:
            raw = bytes.fromhex(f.read().strip().replace("-", ""))
    except (OSError, ValueError):
        return bytes(16)
    return raw if len(raw) == 16 else bytes(16)


def as_oid(oid: int | Oid) -> Oid:
    """Accept a 192-bit int or the three u64 words."""
    if isinstance(oid, int):
        return oid_from_int(oid)
    if len(oid) != 3:
        raise ValueError("an object id is three 64-bit words")
    return (int(oid[0]), int(oid[1]), int(oid[2]))


class GuestClient:
    """Talks to the host agent.  ``connect`` is a factory returning a fresh
    :class:`Transport`; it is called again after every lost connection."""

    def __init__(
        self,
        connect: Callable[[], Transport],
        *,
        timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
        boot_id: bytes | None = None,
        capabilities: int = ALL_CAPABILITIES,
        max_in_flight: int = 32,
        sync_interval: float = SYNC_RETRY_INTERVAL,
        retries: int = 1,
    ) -> None:
        self._factory = connect
        self.timeout = timeout  #: seconds to wait for any reply before reconnecting
        self.reconnect_timeout = reconnect_timeout
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.capabilities = capabilities
        self.max_in_flight = max(1, max_in_flight)
        self.sync_interval = sync_interval
        self.retries = retries
        self._lock = threading.Lock()
        # Valid only while connected (READY); reset by _drop().
        self._transport: Transport | None = None
        self._decoder = FrameDecoder()
        self._ready: list[Frame] = []  # decoded, not yet consumed, in arrival order
        self._version = MIN_VERSION
        self.server: HelloReply | None = None  #: the host's HELLO reply (limits)
        self._next_id = 0
        # Counters, for stats and tests.
        self.connects = 0
        self.stray_replies = 0  #: replies whose request id we were not waiting for

    # --- construction helpers ---------------------------------------------------------

    @classmethod
    def for_port(cls, name: str = PORT_NAME, **kwargs: Any) -> GuestClient:
        """Find the virtio-serial port ``name`` under /sys/class/virtio-ports and use it."""
        return cls(lambda: CharDeviceTransport(find_port(name)), **kwargs)

    @classmethod
    def for_device(cls, path: str, **kwargs: Any) -> GuestClient:
        return cls(lambda: CharDeviceTransport(path), **kwargs)

    @classmethod
    def for_unix_socket(cls, path: str, **kwargs: Any) -> GuestClient:
        return cls(lambda: SocketTransport.connect_unix(path), **kwargs)

    def __enter__(self) -> GuestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection ---------------------------------------------------------------------

    def connect(self) -> HelloReply:
        """Connect (resync + hello) now rather than on the first call."""
        with self._lock:
            if self._transport is None:
                self._connect()
            assert self.server is not None
            return self.server

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = None
        self.server = None
        self._ready.clear()
        self._decoder = FrameDecoder()

    def _new_id(self) -> int:
        self._next_id = self._next_id % MAX_REQUEST_ID + 1  # 1..2**32-1, wraps
        return self._next_id

    def _connect(self) -> None:
        started = time.monotonic()
        deadline = started + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                self._transport = self._factory()
                self._resync(deadline)
                self._hello()
                self.connects += 1
                return
            except (_ConnectionLost, OSError, Unavailable) as err:
                self._drop()
                if time.monotonic() + delay > deadline:
                    # Say how long was really spent: each try has its own shorter
                    # timeout, and quoting only that misleads (10 s said after 30 s).
                    waited = time.monotonic() - started
                    raise Unavailable(
                        f"cannot reach the memd host agent: gave up after "
                        f"{waited:.0f} s (last try: {err})",
                        target=str(err),
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _resync(self, deadline: float) -> None:
        transport = self._transport
        assert transport is not None
        nonce = int.from_bytes(os.urandom(8), "little")
        sync = RESYNC_MARKER + encode_request(
            self._new_id(), SyncRequest(nonce), version=MIN_VERSION
        )
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _ConnectionLost("the host never answered SYNC")
            if now >= next_send:
                transport.send(sync)
                next_send = now + self.sync_interval
            try:
                data = transport.recv(_RECV_SIZE, max(0.0, min(next_send, deadline) - now))
            except TimeoutError:
                # An incomplete frame that did not grow for a whole interval is a
                # leftover of the old stream: drop it so the SYNC reply can be found.
                items = self._decoder.abandon_partial()
            else:
                if not data:
                    raise _ConnectionLost("end of stream while resynchronising")
                items = self._decoder.feed(data)
            frames = [f for f in items if isinstance(f, Frame)]
            for i, frame in enumerate(frames):
                if frame.is_reply and frame.op == Op.SYNC and frame.status == Status.OK:
                    try:
                        reply = decode_reply(frame)
                    except MemdError:
                        continue
                    if isinstance(reply, SyncReply) and reply.nonce == nonce:
                        self._ready = frames[i + 1 :]
                        return

    def _hello(self) -> None:
        self._version = MIN_VERSION
        hello = HelloRequest(MIN_VERSION, MAX_VERSION, self.capabilities, self.boot_id)
        results: list[Reply | ErrorReply | None] = [None]
        self._run([hello], results)
        reply = results[0]
        if isinstance(reply, ErrorReply):
            # Not retried: VersionError, or the host refusing this guest outright.
            raise error_for_status(reply.status, reply.message, op=Op.HELLO)
        if not isinstance(reply, HelloReply) or not MIN_VERSION <= reply.version <= MAX_VERSION:
            raise _ConnectionLost("the host answered HELLO with a version we did not offer")
        self.server = reply
        self._version = reply.version

    # --- request/reply engine --------------------------------------------------------

    def pipeline(self, requests: Sequence[Request]) -> list[Reply | ErrorReply]:
        """Send all requests (at most ``max_in_flight`` outstanding), return the replies in
        request order.  ErrorReply items are returned, not raised."""
        with self._lock:
            return self._exchange(requests)

    def _exchange(self, requests: Sequence[Request]) -> list[Reply | ErrorReply]:
        results: list[Reply | ErrorReply | None] = [None] * len(requests)
        attempt = 0
        resets = 0
        while True:
            try:
                if self._transport is None:
                    self._connect()
                self._run(requests, results)
                return [r for r in results if r is not None]
            except _SessionLost as err:
                self._drop()
                resets += 1
                if resets > _MAX_SESSION_RESETS:
                    raise Unavailable(
                        f"the host agent keeps forgetting the session ({err})", target="host agent"
                    ) from None
            except (_ConnectionLost, OSError) as err:
                self._drop()
                left = [spec_of(m) for m, r in zip(requests, results, strict=True) if r is None]
                if attempt >= self.retries or not all(spec.idempotent for spec in left):
                    names = ", ".join(sorted({spec.op.name for spec in left}))
                    raise Unavailable(
                        f"lost the connection to the host agent during {names}"
                        f" ({err}); not retried",
                        target="host agent",
                    ) from None
                attempt += 1

    def _run(self, requests: Sequence[Request], results: list[Reply | ErrorReply | None]) -> None:
        transport = self._transport
        assert transport is not None
        todo = [i for i, r in enumerate(results) if r is None]
        in_flight: dict[int, int] = {}  # request id -> index into requests
        sent = 0
        need_hello = False  # the host forgot the session: send no more, collect, then reset
        while (sent < len(todo) and not need_hello) or in_flight:
            # Header and payload parts of every frame sent now, written with one vectored
            # write: the caller's pages go to the kernel without a join.
            parts: list[Buffer] = []
            while sent < len(todo) and len(in_flight) < self.max_in_flight and not need_hello:
                index = todo[sent]
                request_id = self._new_id()
                parts += encode_request_parts(request_id, requests[index], version=self._version)
                in_flight[request_id] = index
                sent += 1
            if parts:
                transport.send_parts(parts)
            frame = self._next_frame(transport)
            index_or_none = in_flight.pop(frame.request_id, None)
            if not frame.is_reply or index_or_none is None:
                self.stray_replies += 1
                continue
            if frame.op != op_of(requests[index_or_none]):
                raise _ConnectionLost(f"reply {frame.request_id} has the wrong opcode")
            try:
                reply = decode_reply(frame)
            except MemdError as err:
                raise _ConnectionLost(f"malformed reply: {err}") from None
            if (
                isinstance(reply, ErrorReply)
                and reply.status == Status.NEED_HELLO
                and frame.op not in (Op.HELLO, Op.SYNC)
            ):
                need_hello = True  # not executed: stays None, resent after a new HELLO
                continue
            results[index_or_none] = reply
        if need_hello:
            raise _SessionLost("the host answered NEED_HELLO: it forgot this session")

    def _next_frame(self, transport: Transport) -> Frame:
        deadline = time.monotonic() + self.timeout
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ConnectionLost(f"no reply within {self.timeout} s")
            try:
                data = transport.recv(_RECV_SIZE, remaining)
            except TimeoutError:
                raise _ConnectionLost(f"no reply within {self.timeout} s") from None
            if not data:
                raise _ConnectionLost("the host closed the stream")
            for item in self._decoder.feed(data):
                if not isinstance(item, Frame):
                    raise _ConnectionLost(str(item))
                self._ready.append(item)
        return self._ready.pop(0)

    def _call(self, msg: Request, want: type[R]) -> R | ErrorReply:
        reply = self.pipeline([msg])[0]
        if isinstance(reply, ErrorReply | want):
            return reply
        raise Unavailable(
            f"{op_of(msg).name}: unexpected reply {type(reply).__name__}", target="host agent"
        )

    def _ok(self, msg: Request, want: type[R]) -> R:
        reply = self._call(msg, want)
        if isinstance(reply, ErrorReply):
            raise error_for_status(reply.status, reply.message, op=op_of(msg))
        return reply

    # --- tmem ---------------------------------------------------------------------------

    def new_pool(self, *, persistent: bool = False, shared_uuid: bytes | None = None) -> int:
        """Create a pool; returns its id.  Shared pools need the 16-byte uuid the host
        authorised; shared + persistent is refused by the host."""
        flags = (PoolFlag.PERSISTENT if persistent else 0) | (
            PoolFlag.SHARED if shared_uuid is not None else 0
        )
        uuid = bytes(16) if shared_uuid is None else bytes(shared_uuid)
        return self._ok(NewPoolRequest(int(flags), uuid), NewPoolReply).pool

    def destroy_pool(self, pool: int) -> None:
        self._ok(DestroyPoolRequest(pool), DestroyPoolReply)

    def put(self, pool: int, oid: int | Oid, index: int, page: Buffer) -> None:
        """Store one 4096-byte page.  Any put may fail (NoSpace, ClientFrozen): cope."""
        self._ok(PutRequest(pool, as_oid(oid), index, page), PutReply)

    def get(self, pool: int, oid: int | Oid, index: int) -> bytes | None:
        """The page, or None if the host has none under that handle."""
        reply = self._call(GetRequest(pool, as_oid(oid), index), GetReply)
        if isinstance(reply, ErrorReply):
            if reply.status == Status.NOT_FOUND:
                return None
            raise error_for_status(reply.status, reply.message, op=Op.GET)
        return bytes(reply.page)

    def flush_page(self, pool: int, oid: int | Oid, index: int) -> None:
        self._ok(FlushPageRequest(pool, as_oid(oid), index), FlushPageReply)

    def flush_object(self, pool: int, oid: int | Oid) -> None:
        self._ok(FlushObjectRequest(pool, as_oid(oid)), FlushObjectReply)

    def _batch_size(self) -> int:
        server = self.server
        if server is None:
            self.connect()
            server = self.server
        assert server is not None
        return max(1, min(server.max_batch, (server.max_payload - 8) // _BATCH_ITEM_BYTES))

    def put_batch(self, pool: int, items: Sequence[tuple[int | Oid, int, Buffer]]) -> list[Status]:
        """Put many pages (split into pipelined frames); one Status per item, in order."""
        size = self._batch_size()
        requests: list[Request] = []
        for at in range(0, len(items), size):
            part = items[at : at + size]
            handles = [(as_oid(oid), index) for oid, index, _ in part]
            requests.append(PutBatchRequest(pool, handles, [p for _, _, p in part]))
        statuses: list[Status] = []
        for reply, msg in zip(self.pipeline(requests), requests, strict=True):
            replied = self._batch_reply(Op.PUT_BATCH, reply, PutBatchReply, msg)
            statuses.extend(Status(s) for s in replied.statuses)
        return statuses

    def get_batch(self, pool: int, handles: Sequence[tuple[int | Oid, int]]) -> list[bytes | None]:
        """Get many pages; a page or None (not found / failed) per handle, in order."""
        size = self._batch_size()
        norm: list[Handle] = [(as_oid(oid), index) for oid, index in handles]
        requests: list[Request] = [
            GetBatchRequest(pool, norm[at : at + size]) for at in range(0, len(norm), size)
        ]
        pages: list[bytes | None] = []
        for reply, msg in zip(self.pipeline(requests), requests, strict=True):
            replied = self._batch_reply(Op.GET_BATCH, reply, GetBatchReply, msg)
            pages.extend(None if p is None else bytes(p) for p in replied.pages)
        return pages

    def _batch_reply(self, op: Op, reply: Reply | ErrorReply, want: type[R], msg: Request) -> R:
        if isinstance(reply, ErrorReply):
            raise error_for_status(reply.status, reply.message, op=op)
        if isinstance(msg, PutBatchRequest | GetBatchRequest):
            expected = len(msg.handles)
        elif isinstance(msg, NominateRequest | ShareQueryRequest):
            expected = len(msg.gfns)
        else:
            expected = -1
        if isinstance(reply, PutBatchReply | GetBatchReply):
            got = len(reply.statuses)
        elif isinstance(reply, NominateReply | ShareQueryReply):
            got = len(reply.results)
        else:
            got = -2
        if not isinstance(reply, want) or got != expected:
            raise Unavailable(
                f"{op.name}: the host answered {got} items for {expected}", target="host agent"
            )
        return reply

    def list_pools(self) -> list[PoolInfo]:
        return list(self._ok(ListPoolsRequest(), ListPoolsReply).pools)

    # --- sharing -------------------------------------------------------------------------

    def _gfn_chunks(self, gfns: Sequence[int]) -> list[Sequence[int]]:
        if self.server is None:
            self.connect()
        assert self.server is not None
        size = self.server.max_gfns
        return [gfns[at : at + size] for at in range(0, len(gfns), size)]

    def nominate(self, gfns: Sequence[int]) -> list[NominateResult]:
        """Offer these gfns for sharing; per gfn a status and (if OK) a handle."""
        requests: list[Request] = [NominateRequest(c) for c in self._gfn_chunks(gfns)]
        out: list[NominateResult] = []
        for reply, msg in zip(self.pipeline(requests), requests, strict=True):
            out.extend(self._batch_reply(Op.NOMINATE, reply, NominateReply, msg).results)
        return out

    def share_query(self, gfns: Sequence[int]) -> list[ShareInfo]:
        """Sharing state and share count of each gfn."""
        requests: list[Request] = [ShareQueryRequest(c) for c in self._gfn_chunks(gfns)]
        out: list[ShareInfo] = []
        for reply, msg in zip(self.pipeline(requests), requests, strict=True):
            out.extend(self._batch_reply(Op.SHARE_QUERY, reply, ShareQueryReply, msg).results)
        return out

    def _range(
        self,
        request: type[RangeNominateRequest] | type[RangeQueryRequest],
        pid: int,
        addr: int,
        length: int,
    ) -> list[Reply | ErrorReply]:
        """Split ``[addr, addr + length)`` into MAX_GFNS-page requests; their replies."""
        name = request.__name__
        if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise InvalidArgument(
                f"a range must be page-aligned and not empty (addr {addr:#x}, length {length:#x})",
                op=name,
            )
        step = MAX_GFNS * PAGE_SIZE
        return self.pipeline(
            [
                request(pid, at, min(step, addr + length - at))
                for at in range(addr, addr + length, step)
            ]
        )

    def _range_results(self, op: Op, reply: Reply | ErrorReply, want: type[R]) -> R:
        if isinstance(reply, ErrorReply):
            raise error_for_status(reply.status, reply.message, op=op)
        if not isinstance(reply, want):
            raise Unavailable(
                f"{op.name}: unexpected reply {type(reply).__name__}", target="memd-guest daemon"
            )
        return reply

    def nominate_range(self, addr: int, length: int, pid: int = 0) -> list[RangeNominateItem]:
        """Through the guest daemon only: nominate the pages of a virtual address range of
        this process (``pid`` 0) or, for root or the same user, of process ``pid``; the
        daemon resolves them to gfns (pagemap).  Per page: gfn (NO_GFN if it has no frame),
        status, handle."""
        out: list[RangeNominateItem] = []
        for reply in self._range(RangeNominateRequest, pid, addr, length):
            out += self._range_results(Op.RANGE_NOMINATE, reply, RangeNominateReply).results
        return out

    def query_range(self, addr: int, length: int, pid: int = 0) -> list[RangeQueryItem]:
        """Through the guest daemon only: sharing state of each page of a range."""
        out: list[RangeQueryItem] = []
        for reply in self._range(RangeQueryRequest, pid, addr, length):
            out += self._range_results(Op.RANGE_QUERY, reply, RangeQueryReply).results
        return out

    def about_to_write(self, gfn: int) -> None:
        """Tell the host this gfn is about to be written: it unshares it first."""
        self._ok(AboutToWriteRequest(gfn), AboutToWriteReply)

    def stats(self) -> dict[str, int | str]:
        return dict(self._ok(StatsRequest(), StatsReply).stats)
