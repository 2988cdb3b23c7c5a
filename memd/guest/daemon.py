"""``memd-guest daemon``: owns the virtio-serial port, serves local programs, reports memory.

A virtio-serial port admits one opener at a time, so a guest that wants several programs to
use memd at once runs this daemon (as qemu-guest-agent owns its port):

* **the session** — one :class:`~memd.guest.client.GuestClient` on ``org.memd.0``; it
  reconnects, resyncs and says HELLO (with the guest's boot id) by itself whenever the
  stream is lost.  Its lock serialises the calls of every local program and of the reporter:
  the client is the one owner of the port and of the session state.
* **local programs** — a unix socket (:data:`DEFAULT_SOCKET`, mode 0660 by default) speaking
  the wire protocol itself (docs/protocol.md, "Guest daemon"): a local client resyncs and
  says HELLO exactly as it would on the port; the daemon answers SYNC and HELLO itself (with
  the host's limits and the capabilities of its own session) and forwards every other
  request, pipelined, under the local request ids.  ``memd-guest`` uses it when it runs and
  opens the port itself when it does not.  Each connection's peer is known by
  ``SO_PEERCRED`` (pid, uid, gid).
* **memory reports** — every :data:`REPORT_INTERVAL` seconds, MEM_REPORT with MemTotal,
  MemAvailable, SwapTotal, SwapFree (``/proc/meminfo``) and the "some"/"full" avg10 of
  ``/proc/pressure/memory`` when the kernel has PSI — only to a host that granted
  ``Capability.MEM_REPORT`` in HELLO (an older host never sees the op).

Standard library only (python3-minimal: no json, logging, queue, asyncio).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from memd.errors import AccessDenied, FrameError, InvalidArgument, MemdError, Unavailable
from memd.guest.client import GuestClient
from memd.wire import (
    MAX_VERSION,
    MIN_VERSION,
    NO_GFN,
    PAGE_SIZE,
    PARTIAL_FRAME_TIMEOUT,
    Capability,
    ErrorReply,
    Frame,
    FrameDecoder,
    HelloReply,
    HelloRequest,
    MemReportFlag,
    MemReportRequest,
    Op,
    RangeNominateItem,
    RangeNominateReply,
    RangeNominateRequest,
    RangeQueryItem,
    RangeQueryReply,
    RangeRequest,
    Request,
    ShareState,
    Status,
    SyncReply,
    SyncRequest,
    decode_request,
    encode_error,
    encode_reply,
    status_for_exception,
)

DEFAULT_SOCKET = "/run/memd-guest.sock"
#: Environment variable naming the daemon's socket (for ``memd-guest`` and the library).
SOCKET_ENV = "MEMD_GUEST_SOCKET"
REPORT_INTERVAL = 5.0
MEMINFO = "/proc/meminfo"
PSI_MEMORY = "/proc/pressure/memory"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PFN_MASK = (1 << 55) - 1  # pagemap: bits 0-54 the frame number, bit 63 "present"
_PRESENT = 1 << 63
_RECV = 256 * 1024


def socket_path() -> str:
    """Where the daemon listens: ``$MEMD_GUEST_SOCKET`` or :data:`DEFAULT_SOCKET`."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


# --- the guest's memory state ------------------------------------------------------------


def read_meminfo(path: str = MEMINFO) -> dict[str, int]:
    """``/proc/meminfo`` as name -> KiB (lines without a number are skipped)."""
    out: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[name.strip()] = int(fields[0])
    return out


def read_psi(path: str = PSI_MEMORY) -> tuple[int, int] | None:
    """``some avg10`` and ``full avg10`` of a PSI file in hundredths of a percent, or None
    when the kernel has no PSI (file missing, or PSI disabled: reading fails)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    found: dict[str, int] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "avg10":
                try:
                    found[kind] = min(10000, max(0, round(float(value) * 100)))
                except ValueError:
                    return None
    if "some" not in found:
        return None
    return found["some"], found.get("full", 0)  # older kernels: no "full" line for memory


def memory_report(meminfo: str = MEMINFO, psi: str = PSI_MEMORY) -> MemReportRequest:
    """The MEM_REPORT payload for this guest, now."""
    info = read_meminfo(meminfo)
    total = info.get("MemTotal", 0)
    available = min(total, info.get("MemAvailable", info.get("MemFree", 0)))
    swap_total = info.get("SwapTotal", 0)
    swap_free = min(swap_total, info.get("SwapFree", 0))
    pressure = read_psi(psi)
    if pressure is None:
        return MemReportRequest(
            total, available, swap_total, swap_free, 0, 0, int(MemReportFlag.NO_PSI)
        )
    return MemReportRequest(total, available, swap_total, swap_free, pressure[0], pressure[1], 0)


# --- a process's pages -> gfns ----------------------------------------------------------


def resolve_range(pid: int, addr: int, length: int, proc: str = "/proc") -> list[int]:
    """The gfn behind each page of ``[addr, addr + length)`` in process ``pid``, from
    ``/proc/PID/pagemap`` (inside a guest a page frame number *is* a gfn); NO_GFN for a
    page with no frame (never touched, swapped out).  Needs CAP_SYS_ADMIN: without it the
    kernel reports every frame as 0, which is refused (AccessDenied) rather than
    nominating gfn 0."""
    pages = length // PAGE_SIZE
    try:
        with open(f"{proc}/{pid}/pagemap", "rb") as f:
            f.seek(addr // PAGE_SIZE * 8)
            raw = f.read(pages * 8)
    except FileNotFoundError:
        raise InvalidArgument(f"no process {pid}", op="RANGE") from None
    except OSError as err:
        raise AccessDenied(f"cannot read /proc/{pid}/pagemap: {err.strerror}") from None
    raw = raw.ljust(pages * 8, b"\0")  # past the end of the address space: not present
    entries = struct.unpack(f"<{pages}Q", raw)
    present = [e & _PFN_MASK if e & _PRESENT else NO_GFN for e in entries]
    if any(g == 0 for g in present) and all(g in (0, NO_GFN) for g in present):
        raise AccessDenied(
            "the daemon reads no frame numbers from pagemap (it needs "
            "CAP_SYS_ADMIN: run it as root)"
        )
    return present


def _process_uid(pid: int, proc: str = "/proc") -> int:
    try:
        return os.stat(f"{proc}/{pid}").st_uid
    except OSError:
        raise InvalidArgument(f"no process {pid}", op="RANGE") from None


# --- the daemon ---------------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


class GuestDaemon:
    """The port's one owner: a session to the host, a local socket, a memory reporter."""

    def __init__(
        self,
        client: GuestClient,
        path: str = DEFAULT_SOCKET,
        *,
        interval: float = REPORT_INTERVAL,
        mode: int = 0o660,
        verbose: bool = False,
        log: TextIO | None = None,
        report: Callable[[], MemReportRequest] = memory_report,
    ) -> None:
        self.client = client
        self.path = path
        self.interval = interval
        self.mode = mode
        self.verbose = verbose
        self._log_file = log or sys.stderr
        self._report = report
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        # Counters (each written by one thread only; read for tests and `status`).
        self.reports_sent = 0
        self.connections = 0
        self._last_report_error: str | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def log(self, message: str) -> None:
        self._log_file.write(f"memd-guest daemon: {message}\n")
        self._log_file.flush()

    # --- life cycle ---------------------------------------------------------------------

    def bind(self) -> None:
        """Create the listening socket (refuses to take over from a live daemon)."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            pass
        else:
            raise Unavailable(f"another memd-guest daemon listens on {self.path}", target=self.path)
        finally:
            probe.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a dead daemon's socket
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never reachable with wider permissions than asked
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        sock.listen(16)
        # close() does not wake a blocked accept: the accept loop polls the stop flag.  Set
        # here, not in that thread, which could find the socket already closed by close().
        sock.settimeout(0.5)
        self._listener = sock

    def start(self) -> None:
        """Bind (if not yet) and start the reporter and the accept loop in threads."""
        if self._listener is None:
            self.bind()
        for target, name in ((self._report_loop, "reporter"), (self._accept_loop, "accept")):
            thread = threading.Thread(target=target, name=f"memd-guest-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (main thread)."""

        def stop(signum: int, _frame: object) -> None:
            self._stop.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.start()
        self.log(f"listening on {self.path}, reporting every {self.interval:g} s")
        while not self._stop.wait(1.0):
            pass
        self.close()
        self.log("stopped")

    def close(self) -> None:
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):  # wakes an accept() blocked in its thread
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self.client.close()

    # --- memory reports -----------------------------------------------------------------

    def report_once(self) -> bool:
        """Connect if needed and send one MEM_REPORT; False if the host did not grant it."""
        server = self.client.connect()
        if not server.capabilities & Capability.MEM_REPORT:
            return False
        reply = self.client.pipeline([self._report()])[0]
        if isinstance(reply, ErrorReply):
            raise MemdError(
                f"the host refused MEM_REPORT: {Status(reply.status).name}"
                f"{': ' + reply.message if reply.message else ''}"
            )
        self.reports_sent += 1
        return True

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.report_once()
                problem = None if sent else "the host does not take memory reports"
            except (MemdError, OSError, ValueError) as err:
                problem = str(err)
            if problem != self._last_report_error:  # log changes, not every interval
                self.log(problem if problem else "session up, reporting memory")
                self._last_report_error = problem
            self._stop.wait(self.interval)

    # --- local programs -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            self.connections += 1
            thread = threading.Thread(
                target=self._serve,
                args=(conn,),
                daemon=True,
                name=f"memd-guest-local-{self.connections}",
            )
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                pid, uid, gid = peer_credentials(conn)
            except OSError:
                pid, uid, gid = 0, -1, -1
            if self.verbose:
                self.log(f"local client pid={pid} uid={uid} gid={gid}")
            LocalSession(self, conn, pid, uid, gid).run()


class LocalSession:
    """One local program's connection: the host side of the protocol, forwarding."""

    def __init__(
        self, daemon: GuestDaemon, conn: socket.socket, pid: int, uid: int, gid: int
    ) -> None:
        self.daemon = daemon
        self.conn = conn
        self.pid, self.uid, self.gid = pid, uid, gid
        self.decoder = FrameDecoder()
        self.version: int | None = None  # negotiated with the local client

    def run(self) -> None:
        self.conn.settimeout(PARTIAL_FRAME_TIMEOUT)
        while not self.daemon.stopping:
            try:
                data = self.conn.recv(_RECV)
            except TimeoutError:
                items = self.decoder.abandon_partial() if self.decoder.buffered else []
            except OSError:
                return
            else:
                if not data:
                    return
                items = self.decoder.feed(data)
            frames = [f for f in items if isinstance(f, Frame)]
            if frames:
                try:
                    self.conn.sendall(self.answer(frames))
                except OSError:
                    return

    def _error(self, frame: Frame, status: Status, message: str = "") -> bytes:
        return encode_error(
            frame.op, frame.request_id, status, message, version=self.version or MIN_VERSION
        )

    def answer(self, frames: list[Frame]) -> bytes:
        """Reply bytes for a run of frames, in order (forwarded ones as one pipeline)."""
        out: list[bytes] = []
        forward: list[tuple[Frame, Request]] = []
        for frame in frames:
            if frame.is_reply:
                continue  # a local client never sends replies
            try:
                request = decode_request(frame)
            except FrameError as err:
                status = Status(err.fields.get("status", Status.BAD_FRAME))
                out.append(self._flush(forward) + self._error(frame, status, err.message))
                forward = []
                continue
            if isinstance(request, SyncRequest | HelloRequest | RangeRequest) or (
                self.version is None or frame.op == Op.MEM_REPORT
            ):
                out.append(self._flush(forward) + self._local(frame, request))
                forward = []
            else:
                forward.append((frame, request))
        out.append(self._flush(forward))
        return b"".join(out)

    def _local(self, frame: Frame, request: Request) -> bytes:
        if isinstance(request, SyncRequest):
            self.version = None
            return encode_reply(frame.request_id, SyncReply(request.nonce), version=MIN_VERSION)
        if isinstance(request, HelloRequest):
            return self._hello(frame, request)
        if self.version is None:
            return self._error(frame, Status.NEED_HELLO)
        if isinstance(request, RangeRequest):
            try:
                return self._range(frame, request)
            except MemdError as err:
                return self._error(frame, status_for_exception(err), str(err))
        return self._error(
            frame, Status.DENIED, "the memd-guest daemon sends the memory reports of this guest"
        )

    def _range(self, frame: Frame, request: RangeRequest) -> bytes:
        """RANGE_NOMINATE / RANGE_QUERY: the caller's (or, for root or the same user, another
        process's) pages, resolved to gfns here, nominated or queried on the session."""
        pid = request.pid or self.pid
        if pid <= 0:
            raise InvalidArgument("the caller's pid is unknown (no SO_PEERCRED)", op="RANGE")
        if pid != self.pid and self.uid != 0 and _process_uid(pid) != self.uid:
            raise AccessDenied(
                f"process {self.pid} (uid {self.uid}) may not name the memory "
                f"of process {pid}, which another user owns"
            )
        gfns = resolve_range(pid, request.addr, request.length)
        present = [g for g in gfns if g != NO_GFN]
        client = self.daemon.client
        if isinstance(request, RangeNominateRequest):
            done = iter(client.nominate(present) if present else [])
            items = []
            for gfn in gfns:
                if gfn == NO_GFN:
                    items.append(RangeNominateItem(gfn, Status.NOT_SHAREABLE, 0))
                else:
                    r = next(done)
                    items.append(RangeNominateItem(gfn, r.status, r.handle))
            return encode_reply(
                frame.request_id, RangeNominateReply(items), version=self.version or MIN_VERSION
            )
        infos = iter(client.share_query(present) if present else [])
        queried = []
        for gfn in gfns:
            if gfn == NO_GFN:
                queried.append(RangeQueryItem(gfn, ShareState.UNKNOWN, 0))
            else:
                info = next(infos)
                queried.append(RangeQueryItem(gfn, info.state, info.share_count))
        return encode_reply(
            frame.request_id, RangeQueryReply(queried), version=self.version or MIN_VERSION
        )

    def _hello(self, frame: Frame, request: HelloRequest) -> bytes:
        try:
            server = self.daemon.client.connect()
        except MemdError as err:
            return self._error(frame, Status.BUSY, f"memd-guest daemon: {err}")
        if not request.min_version <= server.version <= request.max_version:
            return self._error(
                frame,
                Status.VERSION,
                f"the daemon's session speaks version "
                f"{server.version} ({MIN_VERSION}..{MAX_VERSION} known)",
            )
        wanted_dedup = request.capabilities & Capability.DEDUP_OPT_IN
        if wanted_dedup and not server.capabilities & Capability.DEDUP_OPT_IN:
            return self._error(
                frame,
                Status.DENIED,
                "the memd-guest daemon's session does not "
                "consent to de-duplication: start it with --dedup",
            )
        self.version = server.version
        granted = server.capabilities & request.capabilities & ~int(Capability.MEM_REPORT)
        return encode_reply(
            frame.request_id,
            HelloReply(
                server.version,
                granted,
                server.max_batch,
                server.max_payload,
                server.max_gfns,
                server.page_size,
            ),
            version=server.version,
        )

    def _flush(self, forward: list[tuple[Frame, Request]]) -> bytes:
        if not forward:
            return b""
        try:
            replies = self.daemon.client.pipeline([req for _, req in forward])
        except MemdError as err:
            return b"".join(
                self._error(f, Status.BUSY, f"memd-guest daemon: {err}") for f, _ in forward
            )
        out = []
        for (frame, _), reply in zip(forward, replies, strict=True):
            if isinstance(reply, ErrorReply):
                out.append(self._error(frame, reply.status, reply.message))
            else:
                try:
                    out.append(
                        encode_reply(frame.request_id, reply, version=self.version or MIN_VERSION)
                    )
                except FrameError as err:
                    out.append(self._error(frame, Status.INTERNAL, err.message))
        return b"".join(out)
