"""A guest's swap disk: NBD requests carried out on its persistent tmem pool (no I/O).

Layout: the disk is one tmem object (:data:`DISK_OID`) in a persistent pool of the
guest's own tmem client, at local pool id :data:`DISK_POOL_ID`; byte offset ``o`` is
in page ``o // 4096`` at ``o % 4096``.  So everything tmem does for guest pages —
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
missing pool or anything else tmem raises is ``EIO``.  Which errno, and the reply
bytes, are decided here; the server only moves bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from memd.errors import MemdError, NoSpace, TmemError
from memd.nbd.proto import Cmd, Errno, TransmissionFlag
from memd.nbd.transmission import Rejected, Request, reply_header
from tmem.host import TmemHost
from tmem.types import MAX_BATCH, MAX_INDEX, MAX_POOLS_PER_CLIENT, PAGE_SIZE, PoolFlags

#: The disk's object id: "memdswap" in the low word.
DISK_OID: Final = (0x6D656D6473776170, 0, 1)
#: The local pool id of the disk in its guest's client (the last one, so a guest's own
#: NEW_POOLs get ids from 0 up as before and never collide with it).
DISK_POOL_ID: Final = MAX_POOLS_PER_CLIENT - 1
#: Largest disk: page indexes are u32.
MAX_DISK_SIZE: Final = (MAX_INDEX + 1) * PAGE_SIZE

#: What every memd export advertises: flush (a barrier for the commit), FUA (accepted,
#: every write is as durable as a flush makes it), trim, write-zeroes (fast: a flush of
#: pages), and multi-conn (one store behind every connection, commands serialised per
#: export, so a flush on one connection covers writes completed on any).
TRANSMISSION_FLAGS: Final = int(
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO | TransmissionFlag.CAN_MULTI_CONN)

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

    def to_dict(self) -> dict[str, object]:
        return self._asdict()


class SwapDisk:
    """One guest's disk.  Thread-safe: commands are serialised by one lock, so the
    read-modify-write of partial pages never races another connection's write."""

    def __init__(self, tmem: TmemHost, guest: str, size: int, *,
                 commit: Callable[[], None] | None = None,
                 cap_pages: int | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE or size > MAX_DISK_SIZE:
            raise ValueError(f"a disk size is a positive multiple of {PAGE_SIZE} bytes "
                             f"up to {MAX_DISK_SIZE}")
        self.tmem = tmem
        self.guest = guest
        self.size = size
        self.commit = commit
        self._lock = threading.Lock()
        self.reads = self.writes = self.trims = self.errors = 0
        tmem.add_client(guest, cap_pages=cap_pages)
        existing = dict(tmem.pool_ids(guest))
        if DISK_POOL_ID not in existing:
            tmem.new_pool_at(guest, DISK_POOL_ID, int(PoolFlags.PERSISTENT))
        elif not existing[DISK_POOL_ID] & PoolFlags.PERSISTENT:
            # Only a snapshot from before swap disks could hold such a pool.
            raise ValueError(f"{guest}: pool {DISK_POOL_ID} is not persistent")

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
        except MemdError as err:
            self.errors += 1
            return reply_header(req.cookie, _errno(err))
        return reply_header(req.cookie)

    def _write_run(self, run: Sequence[Request | Rejected]) -> list[bytes]:
        """Single-page aligned writes, one put_batch."""
        handles = [(DISK_OID, r.offset // PAGE_SIZE) for r in run if isinstance(r, Request)]
        pages = [r.data for r in run if isinstance(r, Request)]
        self.writes += len(pages)
        try:
            results: Sequence[TmemError | None] = self.tmem.put_batch(
                self.guest, DISK_POOL_ID, handles, pages)
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
        handles = [(DISK_OID, r.offset // PAGE_SIZE) for r in run if isinstance(r, Request)]
        self.reads += len(handles)
        try:
            pages = self.tmem.get_batch(self.guest, DISK_POOL_ID, handles)
        except MemdError as err:
            self.errors += len(handles)
            return [reply_header(r.cookie, _errno(err)) for r in run]
        return [reply_header(r.cookie) + (_ZERO_PAGE if p is None else p)
                for r, p in zip(run, pages, strict=True)]

    # -- byte ranges onto pages ------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        chunks: list[bytes] = []
        for start in range(first, last + 1, MAX_BATCH):
            handles = [(DISK_OID, i) for i in range(start, min(last + 1, start + MAX_BATCH))]
            pages = self.tmem.get_batch(self.guest, DISK_POOL_ID, handles)
            chunks += [_ZERO_PAGE if p is None else p for p in pages]
        data = b"".join(chunks)
        skip = offset - first * PAGE_SIZE
        return data[skip:skip + length]

    def _write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        index = offset // PAGE_SIZE
        handles: list[tuple[tuple[int, int, int], int]] = []
        pages: list[bytes] = []
        view = memoryview(data)
        pos = offset
        while pos < end:
            page_start = index * PAGE_SIZE
            take = min(end, page_start + PAGE_SIZE) - pos
            chunk = view[pos - offset:pos - offset + take]
            if take == PAGE_SIZE:
                page = bytes(chunk)
            else:  # a partial page: read-modify-write
                old = self.tmem.get(self.guest, DISK_POOL_ID, DISK_OID, index) or _ZERO_PAGE
                at = pos - page_start
                page = old[:at] + bytes(chunk) + old[at + take:]
            handles.append((DISK_OID, index))
            pages.append(page)
            if len(pages) == MAX_BATCH:
                self._put(handles, pages)
                handles, pages = [], []
            pos += take
            index += 1
        if pages:
            self._put(handles, pages)

    def _put(self, handles: list[tuple[tuple[int, int, int], int]], pages: list[bytes]) -> None:
        for result in self.tmem.put_batch(self.guest, DISK_POOL_ID, handles, pages):
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
        if first_full * PAGE_SIZE == 0 and end_full * PAGE_SIZE == self.size:
            self.tmem.flush_object(self.guest, DISK_POOL_ID, DISK_OID)
            return
        for index in range(first_full, end_full):
            self.tmem.flush_page(self.guest, DISK_POOL_ID, DISK_OID, index)

    # -- introspection ---------------------------------------------------------------------

    def stats(self, name: str) -> DiskStats:
        pool = next((p for p in self.tmem.pool_stats(self.guest) if p.pool_id == DISK_POOL_ID),
                    None)
        pages = pool.pages if pool else 0
        raw = pool.bytes_raw if pool else 0
        stored = pool.bytes_stored if pool else 0
        return DiskStats(name, self.size, pages, raw, stored,
                         round(raw / stored, 2) if stored else 1.0,
                         self.reads, self.writes, self.trims, self.errors)


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


def _errno(err: MemdError) -> Errno:
    return Errno.ENOSPC if isinstance(err, NoSpace) else Errno.EIO
