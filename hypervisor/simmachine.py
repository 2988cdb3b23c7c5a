"""SimMachine: an in-process machine with guests, the embedded default backend.

Owns the frame arena and everything a hypervisor would own for the sharing
manager: per-frame owner and mapcount, the free-frame stack, per-domain p2m
tables, per-domain dirty tracking, and the guests' read/write path with its
copy-on-write fault.

Structures (all flat arrays, no object per page):

* ``_mem``       anonymous mmap of ``nr_frames * page_size`` bytes (lazily zero:
                 untouched frames cost no RAM); ``_arena`` is a NumPy view of it.
* ``_owner``     int32 per frame: domid, ``DOMID_COW`` or ``DOMID_FREE``.
* ``_mapcount``  int32 per frame: p2m entries (all domains) pointing at it.
* ``_scrub``     uint8 per frame: 1 if the frame held guest data since it was
                 last zeroed; domain creation zeroes only those.
* ``_free``      int64 stack of free mfns (valid entries: the whole array).
* per domain:    ``p2m`` int64 mfn per gfn (``INVALID_MFN`` if unmapped),
                 ``ptype`` uint8 PageType per gfn, ``dirty`` uint8 per gfn.

Locking: ``_lock`` (one per machine, exported as :attr:`SimMachine.lock`, the
p2m lock of the Machine protocol) covers the p2m tables, the frame tables, the
free stack and each guest write's (check type, store bytes) pair.  The sharing
manager holds it for a whole operation and calls the mutators (``set_entry``,
``set_frame_owner``, ``alloc_frame``, ``free_frame``, ``copy_frame`` and their
batch forms ``set_entries``, ``free_frames``), which
therefore do not lock themselves; the machine's own operations (domain
create/destroy, balloon, guest read/write, ``collect_dirty``) take it.  Queries
read without it (one array element read is atomic under the GIL).  The write
fault handler is called with ``_lock`` *released*: it is the manager's unshare,
which takes the lock itself.

Why a write can never slip into a shared frame: a guest write only stores bytes
while holding ``_lock`` and after seeing the entry's type is RAM; nominate turns
the type to SHARED while holding ``_lock``; every later write sees SHARED, calls
the fault handler (unshare, which waits for any share in progress) and retries.
"""

from __future__ import annotations

import mmap
import threading
from array import array
from dataclasses import dataclass, field

import numpy as np

from memd.errors import NoSuchDomain, OutOfFrames, SharingError
from memd.vocab import PAGE_SIZE
from sharing.machine import (
    DOMID_FREE,
    DOMID_MAX,
    INVALID_MFN,
    Int32Array,
    Int64Array,
    PageType,
    Uint8Array,
    WriteFaultHandler,
)

_RAM = int(PageType.RAM)
_SHARED = int(PageType.SHARED)
_INVALID = int(PageType.INVALID)


@dataclass(eq=False, slots=True)
class _SimDomain:
    """One guest: p2m arrays plus NumPy views of them (the arrays never resize)."""

    domid: int
    nr: int
    p2m: array[int]
    ptype: array[int]
    dirty: bytearray
    p2m_np: Int64Array = field(init=False)
    ptype_np: Uint8Array = field(init=False)
    dirty_np: Uint8Array = field(init=False)

    def __post_init__(self) -> None:
        self.p2m_np = np.frombuffer(self.p2m, dtype=np.int64)
        self.ptype_np = np.frombuffer(self.ptype, dtype=np.uint8)
        self.dirty_np = np.frombuffer(self.dirty, dtype=np.uint8)


class SimMachine:
    """Frames in one arena, guests that read and write their own pages."""

    def __init__(self, nr_frames: int, page_size: int = PAGE_SIZE) -> None:
        if nr_frames <= 0 or page_size <= 0:
            raise ValueError("nr_frames and page_size must be positive")
        self._page_size = page_size
        self._nr_frames = nr_frames
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._mem = mmap.mmap(-1, nr_frames * page_size, flags=flags)
        self._arena: Uint8Array = np.frombuffer(self._mem, dtype=np.uint8).reshape(
            nr_frames, page_size
        )
        self._owner = array("i", [DOMID_FREE]) * nr_frames
        self._mapcount = array("i", [0]) * nr_frames
        self._scrub = bytearray(nr_frames)
        self._owner_np: Int32Array = np.frombuffer(self._owner, dtype=np.int32)
        self._mapcount_np: Int32Array = np.frombuffer(self._mapcount, dtype=np.int32)
        self._scrub_np: Uint8Array = np.frombuffer(self._scrub, dtype=np.uint8)
        # Pop from the end: low mfns are handed out first.
        self._free = array("q")
        self._free.frombytes(np.arange(nr_frames - 1, -1, -1, dtype=np.int64).tobytes())
        self._domains: dict[int, _SimDomain] = {}
        self._fault: WriteFaultHandler | None = None
        self._lock = threading.Lock()
        self._next_domid = 1

    # --- Machine protocol: geometry -----------------------------------------------------

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def nr_frames(self) -> int:
        return self._nr_frames

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    @property
    def nr_free_frames(self) -> int:
        return len(self._free)

    def domains(self) -> list[int]:
        return sorted(self._domains)

    def nr_gfns(self, domid: int) -> int:
        return self._domain(domid).nr

    # --- domains ------------------------------------------------------------------------

    def create_domain(self, nr_pages: int, domid: int | None = None) -> int:
        """Create a guest with ``nr_pages`` zeroed private pages; returns its domid.

        Raises OutOfFrames if the machine lacks free frames, ValueError for a bad
        size or a domid that is taken or out of range."""
        if nr_pages <= 0:
            raise ValueError("a domain needs at least one page")
        with self._lock:
            if domid is None:
                while self._next_domid in self._domains:
                    self._next_domid += 1
                domid = self._next_domid
                self._next_domid += 1
            if not 0 <= domid <= DOMID_MAX or domid in self._domains:
                raise ValueError(f"domid {domid} is taken or out of range")
            if nr_pages > len(self._free):
                raise OutOfFrames(
                    f"cannot create a domain of {nr_pages} pages: {len(self._free)} frames free",
                    op="create_domain",
                    domain=domid,
                )
            cut = len(self._free) - nr_pages
            mfns = np.frombuffer(self._free[cut:], dtype=np.int64)[::-1].copy()
            del self._free[cut:]
            dirty_frames = mfns[self._scrub_np[mfns] != 0]
            if len(dirty_frames):
                self._arena[dirty_frames] = 0  # never hand a guest another guest's bytes
                self._scrub_np[dirty_frames] = 0
            self._owner_np[mfns] = domid
            self._mapcount_np[mfns] = 1
            p2m = array("q")
            p2m.frombytes(mfns.tobytes())
            ptype = array("B", [_RAM]) * nr_pages
            self._domains[domid] = _SimDomain(
                domid, nr_pages, p2m, ptype, bytearray(b"\x01") * nr_pages
            )
            return domid

    def destroy_domain(self, domid: int) -> None:
        with self._lock:
            dom = self._domain(domid)
            if np.any(dom.ptype_np == _SHARED):
                raise SharingError(
                    f"domain {domid} still maps shared frames; release them first",
                    op="destroy_domain",
                    domain=domid,
                )
            mfns = dom.p2m_np[dom.ptype_np == _RAM]
            self._release_frames(mfns)
            del self._domains[domid]

    def balloon_out(self, domid: int, gfn: int) -> None:
        """Unmap a private page and free its frame (the entry becomes INVALID)."""
        with self._lock:
            dom = self._domain(domid)
            self._check_gfn(dom, gfn)
            if dom.ptype[gfn] != _RAM:
                raise SharingError(
                    f"gfn {gfn:#x} of domain {domid} is not a private page",
                    op="balloon_out",
                    domain=domid,
                    gfn=gfn,
                )
            mfn = dom.p2m[gfn]
            dom.p2m[gfn] = INVALID_MFN
            dom.ptype[gfn] = _INVALID
            self._mapcount[mfn] -= 1
            self._release_frames(np.array([mfn], dtype=np.int64))

    # --- Machine protocol: p2m ----------------------------------------------------------

    def lookup(self, domid: int, gfn: int) -> tuple[int, int]:
        dom = self._domains.get(domid)
        if dom is None or not 0 <= gfn < dom.nr:
            raise self._no_such(domid, gfn, "lookup")
        return dom.p2m[gfn], dom.ptype[gfn]

    def lookup_range(self, domid: int, start: int, count: int) -> tuple[Int64Array, Uint8Array]:
        dom = self._domain(domid)
        if start < 0 or count < 0 or start + count > dom.nr:
            raise self._no_such(domid, start + count - 1, "lookup_range")
        return (
            dom.p2m_np[start : start + count].copy(),
            dom.ptype_np[start : start + count].copy(),
        )

    def lookup_many(self, domid: int, gfns: Int64Array) -> tuple[Int64Array, Uint8Array]:
        dom = self._domain(domid)
        gfns = np.asarray(gfns, dtype=np.int64)
        if len(gfns) and (int(gfns.min()) < 0 or int(gfns.max()) >= dom.nr):
            bad = int(gfns[(gfns < 0) | (gfns >= dom.nr)][0])
            raise self._no_such(domid, bad, "lookup_many")
        return dom.p2m_np[gfns], dom.ptype_np[gfns]

    def set_entry(self, domid: int, gfn: int, mfn: int, ptype: int) -> None:
        dom = self._domains.get(domid)
        if dom is None or not 0 <= gfn < dom.nr:
            raise self._no_such(domid, gfn, "set_entry")
        mapcount = self._mapcount
        old = dom.p2m[gfn]
        if old >= 0:
            mapcount[old] -= 1
        if mfn >= 0:
            mapcount[mfn] += 1
        dom.p2m[gfn] = mfn
        dom.ptype[gfn] = ptype

    def set_entries(self, domid: int, gfns: Int64Array, mfns: Int64Array, ptype: int) -> None:
        """Same end state as ``set_entry(domid, g, m, ptype)`` for each pair in order
        (a repeated gfn ends on its last mfn).  Validates every gfn and mfn before
        changing anything."""
        dom = self._domain(domid)
        g = np.asarray(gfns, dtype=np.int64)
        new = np.asarray(mfns, dtype=np.int64)
        if g.shape != new.shape or g.ndim != 1:
            raise ValueError("set_entries needs two equally long 1-d arrays")
        if len(g) == 0:
            return
        if int(g.min()) < 0 or int(g.max()) >= dom.nr:
            raise self._no_such(domid, int(g[(g < 0) | (g >= dom.nr)][0]), "set_entries")
        if int(new.max()) >= self._nr_frames or int(new.min()) < INVALID_MFN:
            raise SharingError("set_entries: mfn out of range", op="set_entries", domain=domid)
        uniq, last = np.unique(g[::-1], return_index=True)
        if len(uniq) != len(g):  # keep each gfn's last mfn
            g, new = uniq, new[::-1][last]
        old = dom.p2m_np[g]
        counts = self._mapcount_np
        np.subtract.at(counts, old[old >= 0], 1)
        np.add.at(counts, new[new >= 0], 1)
        dom.p2m_np[g] = new
        dom.ptype_np[g] = ptype

    # --- Machine protocol: frames -------------------------------------------------------

    def frame_info(self, mfn: int) -> tuple[int, int]:
        self._check_mfn(mfn)
        return self._owner[mfn], self._mapcount[mfn]

    def frame_info_many(self, mfns: Int64Array) -> tuple[Int32Array, Int32Array]:
        return self._owner_np[mfns].copy(), self._mapcount_np[mfns].copy()

    def frames_owned_by(self, owner: int) -> Int64Array:
        return np.flatnonzero(self._owner_np == owner).astype(np.int64)

    def set_frame_owner(self, mfn: int, owner: int) -> None:
        self._check_mfn(mfn)
        self._owner[mfn] = owner

    def read_frame(self, mfn: int) -> bytes:
        self._check_mfn(mfn)
        ps = self._page_size
        return self._mem[mfn * ps : (mfn + 1) * ps]

    def read_frames(self, mfns: Int64Array) -> Uint8Array:
        return self._arena[mfns]

    def frames_equal(self, mfn_a: int, mfn_b: int) -> bool:
        # Two slice copies and a memcmp: measured faster than a memoryview compare
        # (which walks item by item) and than NumPy per pair.
        ps = self._page_size
        mem = self._mem
        return mem[mfn_a * ps : (mfn_a + 1) * ps] == mem[mfn_b * ps : (mfn_b + 1) * ps]

    def alloc_frame(self, owner: int) -> int:
        if not self._free:
            raise OutOfFrames("no free frame", op="alloc_frame", domain=owner)
        mfn = self._free.pop()
        self._owner[mfn] = owner
        self._scrub[mfn] = 1
        return mfn

    def free_frame(self, mfn: int) -> None:
        if not 0 <= mfn < self._nr_frames:
            raise SharingError(f"no frame {mfn:#x}", mfn=mfn)
        if self._mapcount[mfn] != 0 or self._owner[mfn] == DOMID_FREE:
            raise SharingError(
                f"frame {mfn:#x} is still mapped or already free", op="free_frame", mfn=mfn
            )
        self._owner[mfn] = DOMID_FREE
        self._scrub[mfn] = 1
        self._free.append(mfn)

    def free_frames(self, mfns: Int64Array) -> None:
        """:meth:`free_frame` of each mfn, in order; checks all before freeing any."""
        f = np.asarray(mfns, dtype=np.int64)
        if len(f) == 0:
            return
        if int(f.min()) < 0 or int(f.max()) >= self._nr_frames:
            raise SharingError("free_frames: mfn out of range", op="free_frames")
        if (
            len(np.unique(f)) != len(f)
            or (self._mapcount_np[f] != 0).any()
            or (self._owner_np[f] == DOMID_FREE).any()
        ):
            raise SharingError(
                "free_frames: a frame is still mapped, already free or listed twice",
                op="free_frames",
            )
        self._owner_np[f] = DOMID_FREE
        self._scrub_np[f] = 1
        self._free.frombytes(f.tobytes())

    def copy_frame(self, src: int, dst: int) -> None:
        ps = self._page_size
        self._mem[dst * ps : (dst + 1) * ps] = self._mem[src * ps : (src + 1) * ps]

    # --- Machine protocol: guest activity -----------------------------------------------

    def set_write_fault_handler(self, handler: WriteFaultHandler | None) -> None:
        self._fault = handler

    def collect_dirty(self, domid: int) -> Int64Array:
        with self._lock:
            dom = self._domain(domid)
            gfns = np.flatnonzero(dom.dirty_np).astype(np.int64)
            dom.dirty_np[:] = 0
            return gfns

    # --- the guests ---------------------------------------------------------------------

    def write(self, domid: int, gfn: int, data: bytes, offset: int = 0) -> None:
        """A guest stores ``data`` at ``offset`` in its page ``gfn``.

        A write to a SHARED page first takes the copy-on-write fault (the registered
        handler, i.e. unshare) and then retries.  Raises NoSuchDomain for an unknown
        domain, a gfn out of range or an unmapped gfn; ValueError if the data does
        not fit in the page; SharingError if a shared page has no fault handler."""
        ps = self._page_size
        if offset < 0 or offset + len(data) > ps:
            raise ValueError(f"{len(data)} bytes at offset {offset} do not fit in a page")
        while True:
            with self._lock:
                dom = self._domains.get(domid)
                if dom is None or not 0 <= gfn < dom.nr:
                    raise self._no_such(domid, gfn, "write")
                ptype = dom.ptype[gfn]
                if ptype == _RAM:
                    base = dom.p2m[gfn] * ps + offset
                    self._mem[base : base + len(data)] = data
                    dom.dirty[gfn] = 1
                    return
                handler = self._fault
            if ptype != _SHARED:
                raise NoSuchDomain(
                    f"gfn {gfn:#x} of domain {domid} is not mapped",
                    op="write",
                    domain=domid,
                    gfn=gfn,
                )
            if handler is None:
                raise SharingError(
                    "write to a shared page and no fault handler is set",
                    op="write",
                    domain=domid,
                    gfn=gfn,
                )
            handler(domid, gfn)

    def read(self, domid: int, gfn: int) -> bytes:
        """What the guest sees in its page ``gfn``."""
        ps = self._page_size
        with self._lock:
            dom = self._domains.get(domid)
            if dom is None or not 0 <= gfn < dom.nr or dom.ptype[gfn] == _INVALID:
                raise self._no_such(domid, gfn, "read")
            base = dom.p2m[gfn] * ps
            return self._mem[base : base + ps]

    def fill(self, domid: int, start: int, pages: Uint8Array) -> None:
        """Batch write of ``len(pages)`` whole pages from gfn ``start`` (setup helper).

        Pages that are shared take the normal write path (CoW) one by one."""
        n = len(pages)
        with self._lock:
            dom = self._domain(domid)
            if start < 0 or start + n > dom.nr or pages.shape[1:] != (self._page_size,):
                raise ValueError("pages do not fit the domain")
            types = dom.ptype_np[start : start + n]
            private = np.flatnonzero(types == _RAM)
            self._arena[dom.p2m_np[start + private]] = pages[private]
            dom.dirty_np[start + private] = 1
            rest = np.flatnonzero(types != _RAM)
        for i in rest.tolist():
            self.write(domid, start + i, pages[i].tobytes())

    # --- helpers ------------------------------------------------------------------------

    def _domain(self, domid: int) -> _SimDomain:
        dom = self._domains.get(domid)
        if dom is None:
            raise NoSuchDomain(f"no domain {domid}", domain=domid)
        return dom

    @staticmethod
    def _check_gfn(dom: _SimDomain, gfn: int) -> None:
        if not 0 <= gfn < dom.nr:
            raise NoSuchDomain(
                f"gfn {gfn:#x} is outside domain {dom.domid}", domain=dom.domid, gfn=gfn
            )

    def _check_mfn(self, mfn: int) -> None:
        if not 0 <= mfn < self._nr_frames:
            raise SharingError(f"no frame {mfn:#x}", mfn=mfn)

    def _no_such(self, domid: int, gfn: int, op: str) -> NoSuchDomain:
        if domid not in self._domains:
            return NoSuchDomain(f"no domain {domid}", op=op, domain=domid)
        return NoSuchDomain(f"gfn {gfn:#x} is outside domain {domid}", op=op, domain=domid, gfn=gfn)

    def _release_frames(self, mfns: Int64Array) -> None:
        """Free frames (caller holds _lock and has dropped their mappings)."""
        self._owner_np[mfns] = DOMID_FREE
        self._mapcount_np[mfns] = 0
        self._scrub_np[mfns] = 1
        self._free.frombytes(mfns.astype(np.int64).tobytes())
