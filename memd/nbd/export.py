"""A guest's swap disk: NBD requests carried out on its persistent tmem pool (no I/O).

Layout: the disk is one tmem object in a persistent pool of the guest's own tmem client
(:mod:`memd.nbd.pages`, which also owns the spill tier and lost pages); byte offset ``o``
is in page ``o // 4096`` at ``o % 4096``.  So everything tmem does for guest pages —
lz4, de-duplication, the per-guest cap, the budget, stats and audit — holds for the
disk, and a socket's export can only ever name its own guest's pool: the guest name
is fixed when the export is made, never taken from the wire.

Commands:

* WRITE — whole pages are puts (runs of single-page writes from pipelined requests
  become one ``put_batch``); a partial page is read-modify-write;
* READ — gets (batched the same way); a page never written, or trimmed, reads as zeros;
* TRIM — flushes the pages the range covers entirely (the edges are left: a discard
  is advisory); the whole disk is one ``flush_object``;
* WRITE_ZEROES — flushes whole pages (stores nothing: they read as zeros), zeroes the
  edges by read-modify-write;
* FLUSH — returns once the store's ``commit`` (if it has one) returned.

Errors: the store declining a page (budget, cap) is ``ENOSPC``; a frozen guest, a
missing pool or anything else tmem raises is ``EIO``.

Lost contents: a disk made with ``contents_lost=True`` (the agent that served it before
died, and nothing restored its pool) holds none of the pages the guest wrote then.  A
swap-in of such a page must fail, not return zeros: the guest kernel then kills the one
process that owned it (SIGBUS) instead of running it on wrong memory.  So every page
starts *lost*; a read (or the old half of a read-modify-write) touching a lost page is
``EIO``; writing a page, or trimming or zeroing it whole, makes it good again.  A guest
that boots afresh and runs ``swapon --discard`` trims the whole disk, which clears it.

Which errno, and the reply bytes, are decided here; the server only moves bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from memd.errors import MemdError, NoSpace, TmemError
from memd.nbd.pages import DISK_OID, DISK_POOL_ID, DiskPages, Spill, batches
from memd.nbd.proto import Cmd, Errno, TransmissionFlag
from memd.nbd.transmission import Rejected, Request, reply_header
from tmem.host import TmemHost
from tmem.types import MAX_BATCH, MAX_INDEX, PAGE_SIZE

__all__ = [
    "DISK_OID",
    "DISK_POOL_ID",
    "MAX_DISK_SIZE",
    "TRANSMISSION_FLAGS",
    "DiskStats",
    "SwapDisk",
]

#: Largest disk: page indexes are u32.
MAX_DISK_SIZE: Final = (MAX_INDEX + 1) * PAGE_SIZE

#: What every memd export advertises: flush (a barrier for the commit), FUA (accepted,
#: every write is as durable as a flush makes it), trim, write-zeroes (fast: a flush of
#: pages), and multi-conn (one store behind every connection, commands serialised per
#: export, so a flush on one connection covers writes completed on any).
TRANSMISSION_FLAGS: Final = int(
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.CAN_MULTI_CONN
)

_ZERO_PAGE: Final = bytes(PAGE_SIZE)


class DiskStats(NamedTuple):
    name: str
    size: int
    pages: int  #: pages stored (never-written and trimmed pages are not)
    bytes_raw: int
    bytes_stored: int  #: what the pages take in the store, compressed and de-duplicated
    ratio: float  #: bytes_raw / bytes_stored (1.0 when empty)
    reads: int
    writes: int
    trims: int
    errors: int
    lost_pages: int  #: pages of a crashed agent's disk not written since (reads: EIO)
    spilled_pages: int  #: pages in the spill tier now
    spilled_out: int  #: pages moved to the spill tier so far
    spilled_in: int  #: pages brought back from it so far

    def to_dict(self) -> dict[str, object]:
        return self._asdict()


class SwapDisk:
    """One guest's disk.  Thread-safe: commands are serialised by one lock, so the
    read-modify-write of partial pages never races another connection's write."""

    def __init__(
        self,
        tmem: TmemHost,
        guest: str,
        size: int,
        *,
        commit: Callable[[], None] | None = None,
        cap_pages: int | None = None,
        contents_lost: bool = False,
        spill: Spill | None = None,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE or size > MAX_DISK_SIZE:
            raise ValueError(
                f"a disk size is a positive multiple of {PAGE_SIZE} bytes up to {MAX_DISK_SIZE}"
            )
        self.tmem = tmem
        self.guest = guest
        self.size = size
        self.commit = commit
        self._lock = threading.Lock()
        self.reads = self.writes = self.trims = self.errors = 0
        self.pages = DiskPages(
            tmem,
            guest,
            size // PAGE_SIZE,
            spill=spill,
            contents_lost=contents_lost,
            cap_pages=cap_pages,
        )

    def quiesce(self) -> None:
        """Return once no batch is running (a worker thread's): then the disk's spill file
        may be closed."""
        with self._lock:
            pass

    # -- requests --------------------------------------------------------------------------

    def execute(self, requests: Sequence[Request | Rejected]) -> list[bytes]:
        """Reply bytes for each request, in order (b"" for DISC, which has no reply)."""
        out: list[bytes] = []
        with self._lock:
            i, n = 0, len(requests)
            while i < n:
                req = requests[i]
                if isinstance(req, Rejected):
                    self.errors += 1
                    out.append(reply_header(req.cookie, req.error))
                    i += 1
                    continue
                if req.cmd in (Cmd.WRITE, Cmd.READ) and _one_page(req):
                    j = _run_end(requests, i, req.cmd)
                    run = requests[i:j]
                    out += self._write_run(run) if req.cmd == Cmd.WRITE else self._read_run(run)
                    i = j
                    continue
                out.append(self._one(req))
                i += 1
        return out

    def _one(self, req: Request) -> bytes:
        try:
            match req.cmd:
                case Cmd.READ:
                    self.reads += 1
                    return reply_header(req.cookie) + self._read(req.offset, req.length)
                case Cmd.WRITE:
                    self.writes += 1
                    self._write(req.offset, req.data)
                case Cmd.TRIM:
                    self.trims += 1
                    self._discard(req.offset, req.length, zero_edges=False)
                case Cmd.WRITE_ZEROES:
                    self.writes += 1
                    self._discard(req.offset, req.length, zero_edges=True)
                case Cmd.FLUSH:
                    if self.commit is not None:
                        self.commit()
                case Cmd.DISC:
                    return b""
        except (MemdError, OSError) as err:  # OSError: the spill file failed a read
            self.errors += 1
            return reply_header(req.cookie, _errno(err))
        return reply_header(req.cookie)

    def _write_run(self, run: Sequence[Request | Rejected]) -> list[bytes]:
        """Single-page aligned writes, one put_batch."""
        indexes = [r.offset // PAGE_SIZE for r in run if isinstance(r, Request)]
        pages = [r.data for r in run if isinstance(r, Request)]
        self.writes += len(pages)
        try:
            results: Sequence[TmemError | None] = self.pages.store(indexes, pages)
        except MemdError as err:
            results = [err if isinstance(err, TmemError) else TmemError(str(err))] * len(pages)
        out = []
        for r, result in zip(run, results, strict=True):
            if result is None:
                out.append(reply_header(r.cookie))
            else:
                self.errors += 1
                out.append(reply_header(r.cookie, _errno(result)))
        return out

    def _read_run(self, run: Sequence[Request | Rejected]) -> list[bytes]:
        indexes = [r.offset // PAGE_SIZE for r in run if isinstance(r, Request)]
        self.reads += len(indexes)
        try:
            pages = self.pages.load(indexes)
        except (MemdError, OSError) as err:
            self.errors += len(indexes)
            return [reply_header(r.cookie, _errno(err)) for r in run]
        is_lost = self.pages.is_lost
        out = []
        for r, index, p in zip(run, indexes, pages, strict=True):
            if is_lost(index):
                self.errors += 1
                out.append(reply_header(r.cookie, Errno.EIO))
            else:
                out.append(reply_header(r.cookie) + (_ZERO_PAGE if p is None else p))
        return out

    # -- byte ranges onto pages ------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        self.pages.check_kept(first, last + 1)
        chunks: list[bytes] = []
        for run in batches(first, last + 1):
            chunks += [_ZERO_PAGE if p is None else p for p in self.pages.load(run)]
        data = b"".join(chunks)
        skip = offset - first * PAGE_SIZE
        return data[skip : skip + length]

    def _write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        index = offset // PAGE_SIZE
        indexes: list[int] = []
        pages: list[bytes] = []
        view = memoryview(data)
        pos = offset
        while pos < end:
            page_start = index * PAGE_SIZE
            take = min(end, page_start + PAGE_SIZE) - pos
            chunk = view[pos - offset : pos - offset + take]
            if take == PAGE_SIZE:
                page = bytes(chunk)
            else:  # a partial page: read-modify-write
                self.pages.check_kept(index, index + 1)
                old = self.pages.load([index])[0] or _ZERO_PAGE
                at = pos - page_start
                page = old[:at] + bytes(chunk) + old[at + take :]
            indexes.append(index)
            pages.append(page)
            if len(pages) == MAX_BATCH:
                self._put(indexes, pages)
                indexes, pages = [], []
            pos += take
            index += 1
        if pages:
            self._put(indexes, pages)

    def _put(self, indexes: list[int], pages: list[bytes]) -> None:
        for result in self.pages.store(indexes, pages):
            if result is not None:
                raise result

    def _discard(self, offset: int, length: int, *, zero_edges: bool) -> None:
        if length == 0:
            return
        end = offset + length
        first_full = -(-offset // PAGE_SIZE)
        end_full = end // PAGE_SIZE
        if zero_edges:
            head_end = min(end, first_full * PAGE_SIZE)
            if offset < head_end:
                self._write(offset, bytes(head_end - offset))
            tail_start = max(offset, end_full * PAGE_SIZE, head_end)
            if tail_start < end:
                self._write(tail_start, bytes(end - tail_start))
        self.pages.forget(first_full, end_full)

    # -- introspection ---------------------------------------------------------------------

    def stats(self, name: str) -> DiskStats:
        pool = next(
            (p for p in self.tmem.pool_stats(self.guest) if p.pool_id == DISK_POOL_ID), None
        )
        pages = pool.pages if pool else 0
        raw = pool.bytes_raw if pool else 0
        stored = pool.bytes_stored if pool else 0
        spill = self.pages.spill
        return DiskStats(
            name,
            self.size,
            pages,
            raw,
            stored,
            round(raw / stored, 2) if stored else 1.0,
            self.reads,
            self.writes,
            self.trims,
            self.errors,
            self.pages.lost_pages,
            spill.used if spill else 0,
            self.pages.spilled_out,
            self.pages.spilled_in,
        )


def _one_page(req: Request) -> bool:
    return req.length == PAGE_SIZE and not req.offset % PAGE_SIZE


def _run_end(requests: Sequence[Request | Rejected], start: int, cmd: Cmd) -> int:
    """End of the run of single-page ``cmd`` requests from ``start`` (at most MAX_BATCH;
    a run of writes stops before a page it already holds, so a batch never names one
    handle twice)."""
    seen: set[int] = set()
    j = start
    while j < len(requests) and j - start < MAX_BATCH:
        r = requests[j]
        if not isinstance(r, Request) or r.cmd != cmd or not _one_page(r):
            break
        if cmd == Cmd.WRITE:
            if r.offset in seen:
                break
            seen.add(r.offset)
        j += 1
    return j


def _errno(err: MemdError | OSError) -> Errno:
    return Errno.ENOSPC if isinstance(err, NoSpace) else Errno.EIO
