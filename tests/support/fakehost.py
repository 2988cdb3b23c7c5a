"""A host for guest-side tests, built from the real host pieces so it cannot drift.

``FakeHost`` is the agent's sans-I/O core for one channel: the real
:class:`~memd.wire.FrameDecoder`, the real :class:`~memd.agent.dispatch.Dispatcher` over
a real :class:`~tmem.host.TmemHost`, and a real :class:`~memd.agent.sharing_service.
SharingService` on a small :class:`~hypervisor.simmachine.SimMachine` domain — driven
the way :mod:`memd.agent.server` drives them (every decoded frame to
``Dispatcher.handle``, corrupt stretches counted as bad frames, no reply for them).
Only the I/O is the test's own: ``FakeHostServer`` serves a FakeHost on a unix socket
from a thread, with hooks to cut a reply mid-frame and to keep one decoder across
connections the way the host end of a virtio-serial port outlives guest reopenings.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter

from hypervisor.simmachine import SimMachine
from memd.agent.dispatch import Dispatcher, GuestState
from memd.agent.sharing_service import SharingService
from memd.errors import FrameError
from memd.wire import Frame, FrameDecoder, Op
from sharing.manager import SharingManager
from tmem.host import TmemHost

GUEST = "guest"
GUEST_PAGES = 64  #: RAM of the simulated domain behind the guest's sharing requests


class FakeStore:
    """What outlives one connection: the tmem store, the sharing machine, the guest's
    state (boot id, negotiated version) and the dispatcher over them."""

    def __init__(self, *, budget_bytes: int = 64 << 20) -> None:
        self.tmem = TmemHost(budget_bytes=budget_bytes)
        self.machine = SimMachine(4 * GUEST_PAGES)
        self.sharing = SharingService(SharingManager(self.machine))
        self.sharing.bind(GUEST, self.machine.create_domain(GUEST_PAGES), scan=False)
        self.dispatcher = Dispatcher(self.tmem, self.sharing)
        self.guest = GuestState(GUEST)
        #: The dispatcher is used by one session at a time, as on the agent's loop thread
        #: (reentrant: a read's frames are handled under it, each frame again).
        self.lock = threading.RLock()


class FakeHost:
    """One host-side session: feed request bytes, get reply bytes."""

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store or FakeStore()
        self.decoder = FrameDecoder()
        self.requests: Counter[str] = Counter()  #: frames seen, by op name
        self.corrupt = 0  #: corrupt stretches the decoder reported (no reply for them)

    @property
    def guest(self) -> GuestState:
        return self.store.guest

    def forget_session(self) -> None:
        """What an agent restart under an open port looks like: the next request before a
        new HELLO gets NEED_HELLO."""
        self.store.guest.on_disconnect()

    def feed(self, data: bytes) -> bytes:
        return self._handle_all(self.decoder.feed(data))

    def abandon_partial(self) -> bytes:
        return self._handle_all(self.decoder.abandon_partial())

    def _handle_all(self, items: list[Frame | FrameError]) -> bytes:
        """As ``Agent._dispatch``: the frames of one read under one store commit, which
        happens before any of their replies leaves."""
        out = []
        with self.store.lock:
            tmem = self.store.tmem
            tmem.hold_commits()
            try:
                for item in items:
                    if isinstance(item, FrameError):
                        self.corrupt += 1
                        self.store.guest.bad_frames += 1
                        continue
                    out.append(self.handle(item))
            finally:
                tmem.release_commits()
        return b"".join(out)

    def handle(self, frame: Frame) -> bytes:
        with contextlib.suppress(ValueError):
            self.requests[Op(frame.op).name] += 1
        with self.store.lock:
            return self.store.dispatcher.handle(self.store.guest, frame)


class FakeHostServer:
    """Serves FakeHost on a unix socket, one connection at a time, from a thread.

    ``cut_reply_of``: the next reply to that op is sent only in part, then the
    connection is closed (the host agent died mid-write).  ``persistent_stream``: one
    FakeHost (and decoder) for all connections, like the host end of a virtio-serial
    port; an incomplete frame that does not grow for ``partial_timeout`` is abandoned.
    Otherwise each connection starts a new session, as the agent does (HELLO again).
    """

    def __init__(
        self, path: str, *, persistent_stream: bool = False, partial_timeout: float = 0.3
    ) -> None:
        self.path = path
        self.store = FakeStore()
        self.persistent_stream = persistent_stream
        self.partial_timeout = partial_timeout
        self.session = FakeHost(self.store)
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
                self.session = FakeHost(self.store)
                self.store.guest.on_disconnect()  # a new connection must HELLO again
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
