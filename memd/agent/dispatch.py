"""Sans-I/O request dispatch: what a guest's decoder produced in, reply bytes out.

The seam between the agent's I/O and the protocol's meaning: :mod:`memd.agent.server`
feeds a connection's bytes to a :class:`~memd.wire.FrameDecoder` and hands the decoder's
output to :meth:`Dispatcher.handle_all`, which returns the bytes to write back (as
parts, in order, for one vectored write: a GET_BATCH reply's pages are not joined).  Nothing
here touches a socket or an event loop, so tests drive it with bytes alone
(tests/agent/test_dispatch.py).

The guest's identity is the channel its bytes arrived on (``GuestState.name``); no
field of a request can name another guest.  Every request is decoded and validated
by :mod:`memd.wire`; the tmem/sharing layer then checks what only it can know (the
client, the pool, caps, budget).  A PUT's or PUT_BATCH's shape — oid words, indexes,
page lengths, batch size — is proven by the decoder's unpacking and length checks, so
those go to tmem's ``put*_prevalidated`` entries, which do not check it again nor copy
the pages (they are views of the frame's payload).  Every failure becomes an error
reply with a status, never an exception out of :meth:`Dispatcher.handle` — one
malformed or hostile frame cannot take the agent down or touch another guest.

``GuestState`` and the dispatcher are used by the event loop thread only, except
``latency`` (its own lock; read by the metrics thread).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memd import wire
from memd.agent.latency import LatencyHistograms
from memd.errors import FrameError, MemdError, NoSuchClient, NoSuchPool
from memd.wire import Buffer, Capability, Op, ShareState, Status
from sharing.consent import ConsentBook
from sharing.guest import GuestSharing, PageSharing
from tmem.host import TmemHost
from tmem.types import PoolFlag

log = logging.getLogger("memd.agent")

#: What this host grants when asked (dedup consent is the guest's, see GuestState).
HOST_CAPABILITIES = int(
    Capability.BATCH
    | Capability.SHARING
    | Capability.STATS
    | Capability.DEDUP_OPT_IN
    | Capability.MEM_REPORT
)


@dataclass
class GuestState:
    """What the agent knows about one guest; valid across reconnects of its channel."""

    name: str
    boot_id: bytes | None = None  # from the last HELLO; a change means the guest rebooted
    version: int | None = None  # negotiated; None until a HELLO on this connection
    capabilities: int = 0
    requests: int = 0
    errors: int = 0
    bad_frames: int = 0
    reboots: int = 0
    #: Connections that ended (the guest hung up, or the agent did: corrupt frames, detach).
    disconnects: int = 0
    connected: bool = False
    #: The guest's last MEM_REPORT (validated by memd.wire) and when it came (time.time()).
    memory: wire.MemReportRequest | None = None
    memory_at: float | None = None
    mem_reports: int = 0

    def on_disconnect(self) -> None:
        self.version = None
        self.connected = False

    def memory_dict(self, now: float | None = None) -> dict[str, object] | None:
        """The last memory report for operators (KiB; PSI as percent), or None."""
        m, at = self.memory, self.memory_at
        if m is None or at is None:
            return None
        psi = not m.flags & wire.MemReportFlag.NO_PSI
        return {
            "mem_total_kib": m.mem_total_kib,
            "mem_available_kib": m.mem_available_kib,
            "swap_total_kib": m.swap_total_kib,
            "swap_free_kib": m.swap_free_kib,
            "psi_some_avg10": m.psi_some_avg10 / 100 if psi else None,
            "psi_full_avg10": m.psi_full_avg10 / 100 if psi else None,
            "reported_at": round(at, 3),
            "age_s": round(max(0.0, (time.time() if now is None else now) - at), 1),
            "reports": self.mem_reports,
        }


class Dispatcher:
    """Turns guest requests into TmemHost / sharing calls."""

    def __init__(
        self,
        tmem: TmemHost,
        sharing: GuestSharing | None = None,
        *,
        guest_cap_pages: int | None = None,
        consent: ConsentBook | None = None,
        sharing_offered: Callable[[], bool] | None = None,
    ) -> None:
        self.tmem = tmem
        self.sharing = sharing
        #: Consent to cross-guest merging (sharing.consent): HELLO records the guest's
        #: word; tmem's dedup follows the book's answer whenever it changes.
        self.consent = consent or ConsentBook()
        self.consent.subscribe(self._consent_changed)
        #: Whether HELLO grants SHARING now (default: whenever there is a ``sharing``);
        #: the agent's router exists from the start, but has somewhere to send a guest's
        #: nominations only once there are simulated guests or a QEMU is attached.
        self._sharing_offered = sharing_offered or (lambda: sharing is not None)
        #: Cap given to each guest when it first appears, so that no guest can fill the
        #: store (persistent pages are never evicted) and starve the others.
        self.guest_cap_pages = guest_cap_pages
        #: guest → local id of the pool behind its NBD swap disk (memd.nbd.export).  The
        #: guest's channel cannot name that pool (NO_POOL: the disk's pages are reached
        #: through the disk only), LIST_POOLS does not show it, and a reboot keeps it.
        self.disk_pools: dict[str, int] = {}
        #: Time spent per op (memd serve --metrics reads it from another thread).
        self.latency = LatencyHistograms()

    def handle_all(
        self, guest: GuestState, items: Sequence[wire.Frame | FrameError]
    ) -> list[Buffer]:
        """Replies for what a guest's decoder returned from one read, as the parts of
        their bytes in order (write them as one vectored write: ``transport.writelines``):
        each frame is handled; a corrupt stretch (FrameError) gets no reply — there is no
        request id to answer — and counts as a bad frame of the guest."""
        parts: list[Buffer] = []
        for item in items:
            if isinstance(item, FrameError):
                guest.bad_frames += 1
                continue
            parts += self._timed(guest, item)
        return parts

    def handle(self, guest: GuestState, frame: wire.Frame) -> bytes:
        """Reply bytes for one frame (b"" when no reply is due)."""
        return b"".join(self._timed(guest, frame))

    def _timed(self, guest: GuestState, frame: wire.Frame) -> list[Buffer]:
        t0 = time.perf_counter()
        reply = self._handle(guest, frame)
        # Op names from the enum only: a hostile guest's opcodes must not make labels.
        op = _OP_LABELS.get(frame.op, "unknown")
        self.latency.observe(op, time.perf_counter() - t0)
        return reply

    def _handle(self, guest: GuestState, frame: wire.Frame) -> list[Buffer]:
        if frame.is_reply:
            guest.bad_frames += 1
            return []  # guests never send replies: ignore, do not echo
        guest.requests += 1
        try:
            request = wire.decode_request(frame)
        except FrameError as err:
            guest.bad_frames += 1
            return self._error(guest, frame, err)
        try:
            return self._dispatch(guest, frame, request)
        except MemdError as err:
            return self._error(guest, frame, err)
        except Exception as err:  # a bug must cost one reply, not the agent
            log.exception("guest %s: internal error in %s", guest.name, _op_name(frame.op))
            return self._error(guest, frame, err)

    # -------------------------------------------------------------------------------------

    def _error(self, guest: GuestState, frame: wire.Frame, err: BaseException) -> list[Buffer]:
        guest.errors += 1
        status = wire.status_for_exception(err)
        message = str(err) if isinstance(err, MemdError) else "internal error"
        return self._status_reply(guest, frame, status, message[: wire.MAX_MESSAGE])

    def _reply(self, guest: GuestState, frame: wire.Frame, msg: wire.Reply) -> list[Buffer]:
        return wire.encode_reply_parts(
            frame.request_id, msg, version=guest.version or wire.PROTOCOL_VERSION
        )

    def _status_reply(
        self, guest: GuestState, frame: wire.Frame, status: Status, message: str = ""
    ) -> list[Buffer]:
        return [
            wire.encode_error(
                frame.op,
                frame.request_id,
                status,
                message,
                version=guest.version or wire.PROTOCOL_VERSION,
            )
        ]

    def _dispatch(self, guest: GuestState, frame: wire.Frame, req: wire.Request) -> list[Buffer]:
        name, tmem = guest.name, self.tmem
        if isinstance(req, wire.SyncRequest):
            # docs/protocol.md: a SYNC starts the conversation over; HELLO comes next.
            reply = self._reply(guest, frame, wire.SyncReply(req.nonce))
            guest.version = None
            return reply
        if isinstance(req, wire.HelloRequest):
            return self._hello(guest, frame, req)
        if guest.version is None:
            return self._status_reply(guest, frame, Status.NEED_HELLO)
        pool_id = getattr(req, "pool", None)
        if pool_id is not None and pool_id == self.disk_pools.get(name):
            raise NoSuchPool(
                "that pool id is not one of this guest's pools", client=name, pool=pool_id
            )
        match req:
            case wire.NewPoolRequest():
                if req.page_size != wire.PAGE_SIZE:
                    return self._status_reply(
                        guest, frame, Status.INVALID, f"page size must be {wire.PAGE_SIZE}"
                    )
                flags = (PoolFlag.PERSISTENT if req.flags & wire.PoolFlag.PERSISTENT else 0) | (
                    PoolFlag.SHARED if req.flags & wire.PoolFlag.SHARED else 0
                )
                pool = tmem.new_pool(
                    name, int(flags), req.uuid if req.flags & wire.PoolFlag.SHARED else None
                )
                return self._reply(guest, frame, wire.NewPoolReply(pool))
            case wire.DestroyPoolRequest():
                tmem.destroy_pool(name, req.pool)
            case wire.PutRequest():  # shape proven by the decoder (module docstring)
                tmem.put_prevalidated(name, req.pool, req.oid, req.index, req.page)
            case wire.GetRequest():
                page = tmem.get(name, req.pool, req.oid, req.index)
                if page is None:
                    return self._status_reply(guest, frame, Status.NOT_FOUND)
                return self._reply(guest, frame, wire.GetReply(page))
            case wire.FlushPageRequest():
                tmem.flush_page(name, req.pool, req.oid, req.index)
            case wire.FlushObjectRequest():
                tmem.flush_object(name, req.pool, req.oid)
            case wire.PutBatchRequest():  # shape proven by the decoder (module docstring)
                results = tmem.put_batch_prevalidated(name, req.pool, req.handles, req.pages)
                statuses = (
                    [Status.OK] * len(results)
                    if not any(results)
                    else [Status.OK if r is None else wire.status_for_exception(r) for r in results]
                )
                return self._reply(guest, frame, wire.PutBatchReply(statuses))
            case wire.GetBatchRequest():
                pages = tmem.get_batch(name, req.pool, list(req.handles))
                statuses = [Status.NOT_FOUND if p is None else Status.OK for p in pages]
                return self._reply(guest, frame, wire.GetBatchReply(statuses, pages))
            case wire.ListPoolsRequest():
                return self._reply(guest, frame, wire.ListPoolsReply(self._pools(name)))
            case wire.StatsRequest():
                return self._reply(guest, frame, wire.StatsReply(self._stats(guest)))
            case wire.MemReportRequest():
                if not guest.capabilities & Capability.MEM_REPORT:
                    return self._status_reply(
                        guest,
                        frame,
                        Status.UNSUPPORTED_OP,
                        "MEM_REPORT was not negotiated in HELLO",
                    )
                # memd.wire validated the ranges (available <= total, PSI 0..100 %).
                guest.memory = req
                guest.memory_at = time.time()
                guest.mem_reports += 1
            case wire.NominateRequest() | wire.ShareQueryRequest() | wire.AboutToWriteRequest():
                return self._sharing(guest, frame, req)
            case _:
                return self._status_reply(guest, frame, Status.UNSUPPORTED_OP)
        # The op's own empty OK reply (PutReply, ...): the reply type names the op.
        return self._reply(guest, frame, wire.spec_of(req).reply())

    def _hello(self, guest: GuestState, frame: wire.Frame, req: wire.HelloRequest) -> list[Buffer]:
        version = wire.negotiate_version(req)
        if version is None:
            speaks = f"host speaks versions {wire.MIN_VERSION}..{wire.MAX_VERSION}"
            return self._status_reply(guest, frame, Status.VERSION, speaks)
        capabilities = req.capabilities & HOST_CAPABILITIES
        if self.sharing is None or not self._sharing_offered():
            capabilities &= ~int(Capability.SHARING)
        consent = self.consent.hello(guest.name, bool(capabilities & Capability.DEDUP_OPT_IN))
        # A new boot id means the guest rebooted: everything it stored belongs to a dead
        # kernel (but a swap disk the host serves it, which outlives its kernel).  The
        # drop and the new boot id are one store transaction, so that after an agent
        # crash neither a previous boot's pool nor a stale boot id survives.
        rebooted = guest.boot_id is not None and req.boot_id != guest.boot_id
        reboots = guest.reboots + rebooted
        disk = self.disk_pools.get(guest.name)
        dropped = self.tmem.open_session(
            guest.name,
            cap_pages=self.guest_cap_pages,
            dedup=consent,
            reset=rebooted,
            meta={"boot_id": req.boot_id.hex(), "reboots": reboots},
            keep=() if disk is None else (disk,),
        )
        if rebooted:
            log.info(
                "guest %s rebooted: dropped %d pools",
                guest.name,
                dropped,
                extra={"event": "reboot", "vm": guest.name},
            )
        guest.reboots = reboots
        guest.boot_id = req.boot_id
        guest.version = version
        guest.capabilities = capabilities
        return self._reply(
            guest,
            frame,
            wire.HelloReply(
                version=version,
                capabilities=guest.capabilities,
                max_batch=wire.MAX_BATCH,
                max_payload=wire.MAX_PAYLOAD,
                max_gfns=wire.MAX_GFNS,
            ),
        )

    def _consent_changed(self, name: str) -> None:
        """tmem de-duplicates across guests exactly as merging does (one rule)."""
        with contextlib.suppress(NoSuchClient):  # no session yet: its HELLO passes it
            self.tmem.set_dedup(name, self.consent.allows(name))

    def _pools(self, name: str) -> list[wire.PoolInfo]:
        out = []
        for stats in self.tmem.pool_stats(name):
            if stats.pool_id == self.disk_pools.get(name):
                continue
            flags = (wire.PoolFlag.PERSISTENT if stats.kind == "persistent" else 0) | (
                wire.PoolFlag.SHARED if stats.shared else 0
            )
            uuid = bytes.fromhex(stats.uuid.replace("-", "")) if stats.uuid else bytes(16)
            out.append(wire.PoolInfo(stats.pool_id, int(flags), uuid, stats.pages))
        return out

    def _stats(self, guest: GuestState) -> dict[str, int | str]:
        client = self.tmem.client_stats(guest.name)[0].to_dict()
        out: dict[str, int | str] = {
            k: (int(v) if isinstance(v, bool) else v)
            for k, v in client.items()
            if isinstance(v, int | str)
        }
        out["requests"] = guest.requests
        out["errors"] = guest.errors
        out["bad_frames"] = guest.bad_frames
        return out

    def _sharing(self, guest: GuestState, frame: wire.Frame, req: wire.Request) -> list[Buffer]:
        if self.sharing is None or not guest.capabilities & Capability.SHARING:
            return self._status_reply(
                guest, frame, Status.DENIED, "page sharing is not enabled for this guest"
            )
        if isinstance(req, wire.NominateRequest):
            results = [
                wire.NominateResult(Status.OK, r)
                if isinstance(r, int)
                else wire.NominateResult(wire.status_for_exception(r), 0)
                for r in self.sharing.nominate(guest.name, req.gfns)
            ]
            return self._reply(guest, frame, wire.NominateReply(results))
        if isinstance(req, wire.ShareQueryRequest):
            infos = [
                wire.ShareInfo(_share_state(p), p.count)
                for p in self.sharing.query(guest.name, req.gfns)
            ]
            return self._reply(guest, frame, wire.ShareQueryReply(infos))
        assert isinstance(req, wire.AboutToWriteRequest)
        self.sharing.about_to_write(guest.name, req.gfn)
        return self._reply(guest, frame, wire.AboutToWriteReply())


def _share_state(page: PageSharing) -> ShareState:
    """SHARE_QUERY's state of a page (docs/protocol.md)."""
    if not page.mapped:
        return ShareState.UNKNOWN
    if page.count >= 2:
        return ShareState.SHARED
    return ShareState.NOMINATED if page.nominated else ShareState.PRIVATE


#: Latency label per opcode (``put_batch``, ...).
_OP_LABELS = {int(op): op.name.lower() for op in Op}


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op:#x}"
