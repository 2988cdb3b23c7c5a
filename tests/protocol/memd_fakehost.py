"""A tiny host agent for protocol tests: speaks memd.wire over a dict store.

``FakeHost`` is sans-I/O (bytes in, bytes out) so it can sit behind a MockTransport;
``FakeHostServer`` serves it on a real unix socket from a thread, with hooks to cut a
reply mid-frame and to keep one decoder across connections the way the host end of a
virtio-serial port outlives guest-side reopenings.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter

from memd.errors import FrameError, InvalidArgument, NoSuchPool
from memd.wire import (
    MAX_BATCH,
    MAX_GFNS,
    MAX_PAYLOAD,
    OPS,
    PAGE_SIZE,
    AboutToWriteRequest,
    Capability,
    DestroyPoolRequest,
    EmptyReply,
    FlushObjectRequest,
    FlushPageRequest,
    Frame,
    FrameDecoder,
    GetBatchReply,
    GetBatchRequest,
    GetReply,
    GetRequest,
    HelloReply,
    HelloRequest,
    ListPoolsReply,
    ListPoolsRequest,
    NewPoolReply,
    NewPoolRequest,
    NominateReply,
    NominateRequest,
    NominateResult,
    Op,
    PoolInfo,
    PutBatchReply,
    PutBatchRequest,
    PutRequest,
    Reply,
    Request,
    ShareInfo,
    ShareQueryReply,
    ShareQueryRequest,
    ShareState,
    StatsReply,
    StatsRequest,
    Status,
    SyncReply,
    SyncRequest,
    decode_request,
    encode_error,
    encode_reply,
    negotiate_version,
    status_for_exception,
)


class FakeStore:
    """Pools of one guest: pool id -> {(oid, index): page}."""

    def __init__(self) -> None:
        self.pools: dict[int, dict[tuple[tuple[int, int, int], int], bytes]] = {}
        self.flags: dict[int, int] = {}
        self.next_pool = 0
        self.boot_id: bytes | None = None
        self.shared: set[int] = set()
        self.lock = threading.Lock()

    def pool(self, pool: int) -> dict[tuple[tuple[int, int, int], int], bytes]:
        if pool not in self.pools:
            raise NoSuchPool(f"no pool {pool}", pool=pool)
        return self.pools[pool]


class FakeHost:
    """One host-side session: feed request bytes, get reply bytes."""

    def __init__(self, store: FakeStore | None = None, *, max_batch: int = MAX_BATCH,
                 versions: tuple[int, int] | None = None) -> None:
        self.store = store or FakeStore()
        self.decoder = FrameDecoder()
        self.max_batch = max_batch
        self.versions = versions
        self.hello_done = False
        self.requests: Counter[str] = Counter()
        self.corrupt = 0

    def feed(self, data: bytes) -> bytes:
        return self._handle_all(self.decoder.feed(data))

    def abandon_partial(self) -> bytes:
        return self._handle_all(self.decoder.abandon_partial())

    def _handle_all(self, items: list[Frame | FrameError]) -> bytes:
        out = []
        for item in items:
            if isinstance(item, FrameError):
                self.corrupt += 1
                continue
            out.append(self.handle(item))
        return b"".join(out)

    def handle(self, frame: Frame) -> bytes:
        try:
            req = decode_request(frame)
        except FrameError as err:
            return encode_error(frame.op, frame.request_id, status_for_exception(err), str(err))
        op = Op(frame.op)
        self.requests[op.name] += 1
        if OPS[op].needs_hello and not self.hello_done:
            return encode_error(op, frame.request_id, Status.NEED_HELLO)
        try:
            with self.store.lock:
                reply = self.execute(op, req)
        except Exception as err:  # the host maps every failure to a status
            return encode_error(op, frame.request_id, status_for_exception(err), str(err))
        if isinstance(reply, Status):
            return encode_error(op, frame.request_id, reply)
        return encode_reply(op, frame.request_id, reply)

    def execute(self, op: Op, req: Request) -> Reply | Status:
        s = self.store
        if isinstance(req, SyncRequest):
            self.hello_done = False
            return SyncReply(req.nonce)
        if isinstance(req, HelloRequest):
            version = negotiate_version(req)
            if self.versions is not None:
                lo, hi = self.versions
                version = hi if req.min_version <= hi and lo <= req.max_version else None
            if version is None:
                return Status.VERSION
            if s.boot_id is not None and s.boot_id != req.boot_id:
                s.pools.clear()  # the guest rebooted: its old pools are stale
            s.boot_id = req.boot_id
            self.hello_done = True
            return HelloReply(version, req.capabilities & ~Capability.DEDUP_OPT_IN,
                              self.max_batch, MAX_PAYLOAD, MAX_GFNS, PAGE_SIZE)
        if isinstance(req, NewPoolRequest):
            if req.page_size != PAGE_SIZE:
                raise InvalidArgument("page size must be 4096")
            s.next_pool += 1
            s.pools[s.next_pool] = {}
            s.flags[s.next_pool] = req.flags
            return NewPoolReply(s.next_pool)
        if isinstance(req, DestroyPoolRequest):
            s.pool(req.pool)
            del s.pools[req.pool]
            return EmptyReply()
        if isinstance(req, PutRequest):
            s.pool(req.pool)[(req.oid, req.index)] = bytes(req.page)
            return EmptyReply()
        if isinstance(req, GetRequest):
            stored = s.pool(req.pool).get((req.oid, req.index))
            return Status.NOT_FOUND if stored is None else GetReply(stored)
        if isinstance(req, FlushPageRequest):
            s.pool(req.pool).pop((req.oid, req.index), None)
            return EmptyReply()
        if isinstance(req, FlushObjectRequest):
            pool = s.pool(req.pool)
            for key in [k for k in pool if k[0] == req.oid]:
                del pool[key]
            return EmptyReply()
        if isinstance(req, PutBatchRequest):
            pool = s.pool(req.pool)
            for handle, page in zip(req.handles, req.pages, strict=True):
                pool[handle] = bytes(page)
            return PutBatchReply([Status.OK] * len(req.handles))
        if isinstance(req, GetBatchRequest):
            pool = s.pool(req.pool)
            found = [pool.get(h) for h in req.handles]
            return GetBatchReply([Status.OK if p is not None else Status.NOT_FOUND
                                  for p in found], found)
        if isinstance(req, ListPoolsRequest):
            return ListPoolsReply([PoolInfo(p, s.flags[p], bytes(16), len(s.pools[p]))
                                   for p in sorted(s.pools)])
        if isinstance(req, NominateRequest):
            s.shared.update(req.gfns)
            return NominateReply([NominateResult(Status.OK, 1000 + g) for g in req.gfns])
        if isinstance(req, ShareQueryRequest):
            return ShareQueryReply([ShareInfo(ShareState.NOMINATED, 1) if g in s.shared
                                    else ShareInfo(ShareState.PRIVATE, 1) for g in req.gfns])
        if isinstance(req, AboutToWriteRequest):
            s.shared.discard(req.gfn)
            return EmptyReply()
        if isinstance(req, StatsRequest):
            return StatsReply({"pools": len(s.pools),
                               "pages": sum(len(p) for p in s.pools.values()),
                               "host": "fake host"})
        return Status.UNSUPPORTED_OP


class FakeHostServer:
    """Serves FakeHost on a unix socket, one connection at a time, from a thread.

    ``cut_reply_of``: the next reply to that op is sent only in part, then the
    connection is closed (the host agent died mid-write).  ``persistent_stream``: one
    FakeHost (and decoder) for all connections, like the host end of a virtio-serial
    port; an incomplete frame that does not grow for ``partial_timeout`` is abandoned.
    """

    def __init__(self, path: str, *, persistent_stream: bool = False,
                 partial_timeout: float = 0.3, **host_options: object) -> None:
        self.path = path
        self.store = FakeStore()
        self.persistent_stream = persistent_stream
        self.partial_timeout = partial_timeout
        self.host_options = host_options
        self.session = FakeHost(self.store, **host_options)  # type: ignore[arg-type]
        self.cut_reply_of: Op | None = None
        self.connections = 0
        self.abandoned = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeHostServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if not self.persistent_stream:
                self.session = FakeHost(self.store, **self.host_options)  # type: ignore[arg-type]
            with conn:
                self._serve_one(conn)

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        last_progress = time.monotonic()
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                data = None
            except OSError:
                return
            if data == b"":
                return
            if data is None:
                reply = b""
                stalled = time.monotonic() - last_progress > self.partial_timeout
                if self.session.decoder.buffered and stalled:
                    self.abandoned += 1
                    reply = self.session.abandon_partial()
                    last_progress = time.monotonic()
            else:
                before = self.session.decoder.frames
                reply = self.session.feed(data)
                if self.session.decoder.frames != before or not self.session.decoder.buffered:
                    last_progress = time.monotonic()
            if reply and self._send(conn, reply):
                return

    def _send(self, conn: socket.socket, reply: bytes) -> bool:
        """Send; return True if the connection was cut on purpose."""
        cut = self.cut_reply_of
        if cut is not None and len(reply) > 3 and reply[3] == cut:
            self.cut_reply_of = None
            conn.sendall(reply[: len(reply) // 2])
            return True
        conn.sendall(reply)
        return False
