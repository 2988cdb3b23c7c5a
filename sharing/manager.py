"""SharingManager: nominate, share and unshare guest pages, keyed by mfn.

Overview (the design of Xen's ``mem_sharing.c`` after the RFC that dropped the
handle hashtable, with a content check Xen does not make):

* ``nominate(d, gfn)`` turns a private page into a shared frame of one gfn: the
  frame gets a *sharing record* (a fresh 64-bit version, the handle, and a
  reverse map holding (d, gfn)), its owner becomes ``DOMID_COW`` and the p2m entry
  becomes SHARED (read-only: a guest write faults into ``unshare``).
* ``share(src, cli)`` checks both handles against the records the gfns map
  *now*, compares the frames' bytes, moves every gfn of the client frame onto
  the source frame and frees the client frame.
* ``unshare(d, gfn)`` gives the gfn a private page again: in place if it is the
  frame's last gfn, else a copy in a newly allocated frame.

Structures and validity (per mfn, flat arrays sized to the machine's frames):

* ``_version[mfn]`` uint64: 0 = the frame has no sharing record; otherwise the
  record's version, unique for the manager's lifetime (never reused, so a handle
  kept across unshare + free + reallocation of that mfn is detectably stale).
* ``_rmap.head[mfn]``: the record's reverse map; non-empty iff ``_version`` is
  non-zero.  See :mod:`sharing.rmap` for entries and per-domain back pointers.

Counters (named as in Xen, recomputed by :func:`sharing.audit.audit`):

* ``nr_shared_mfns``: frames with a sharing record.
* ``nr_saved_mfns``: frames freed by merging = reverse-map entries − records.
* ``shr_pages[d]``: gfns of domain d in SHARED state (its reverse-map entries).
* Invariant: ``sum(shr_pages) == nr_saved_mfns + nr_shared_mfns``.

Locking.  One lock, ``_lock``, protects every field above, and it is the
machine's p2m lock (``machine.lock``): each operation holds it from its first
lookup to its last remap, and the machine's guest write path takes the same
lock around its (check type, store bytes) pair.  So no guest write can land
between share's byte compare and its merge, nor between nominate's retype and
anything after it; a write to a SHARED page faults into ``unshare`` *without*
the lock and waits for it.  The lock order of a finer-grained design — gfns by
(domain, gfn), then frames by mfn — holds trivially, as one lock covers both
levels.  Why not striped locks: under CPython's GIL these critical sections
are pure Python and cannot run in parallel anyway; one lock costs one acquire
per operation (the machine's mutators then need no lock of their own, which
halves the cost of share), and compare-then-merge of two frames needs both
frames stable, which one lock gives with no ordering hazard.

Domain teardown is incremental: ``teardown_step(d, budget)`` releases at most
``budget`` shared references per lock hold, so a domain holding 100k references
to the zero page does not stall everyone else.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from memd.errors import (
    ContentMismatch,
    NotShareable,
    SharingError,
    StaleClientHandle,
    StaleSourceHandle,
)
from sharing.machine import DOMID_COW, INVALID_MFN, Int64Array, Machine, PageType
from sharing.rmap import NO_ENTRY, ReverseMaps

if TYPE_CHECKING:
    from sharing.audit import AuditReport

_RAM = int(PageType.RAM)
_SHARED = int(PageType.SHARED)
_INVALID = int(PageType.INVALID)


@dataclass
class _Teardown:
    """Progress of an incremental domain teardown."""

    pending: Int64Array  # gfns that held a reverse-map entry when teardown began
    pos: int = 0


class SharingManager:
    """The mfn-keyed page-sharing manager over one :class:`~sharing.machine.Machine`."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._lock = machine.lock
        nr = machine.nr_frames
        self._version = array("Q", [0]) * nr
        self._rmap = ReverseMaps(nr)
        self._next_version = 1
        self._nr_shared_mfns = 0
        self._nr_saved_mfns = 0
        self._shr_pages: dict[int, int] = {}
        self._dying: set[int] = set()
        self._teardowns: dict[int, _Teardown] = {}
        # Bound once: these run on every operation.
        self._lookup = machine.lookup
        self._set_entry = machine.set_entry
        self._frames_equal = machine.frames_equal
        self._free_frame = machine.free_frame
        machine.set_write_fault_handler(self._write_fault)

    # --- counters -----------------------------------------------------------------------

    @property
    def machine(self) -> Machine:
        return self._machine

    @property
    def nr_shared_mfns(self) -> int:
        return self._nr_shared_mfns

    @property
    def nr_saved_mfns(self) -> int:
        return self._nr_saved_mfns

    def shr_pages(self, domid: int) -> int:
        return self._shr_pages.get(domid, 0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "nr_shared_mfns": self._nr_shared_mfns,
                "nr_saved_mfns": self._nr_saved_mfns,
                "shr_pages": dict(sorted(self._shr_pages.items())),
                "rmap_entries": self._rmap.nr_live,
                "metadata_bytes": self.metadata_bytes(),
            }

    def metadata_bytes(self) -> int:
        """Bytes of sharing metadata held (array capacity included)."""
        return self._rmap.nbytes() + self._version.buffer_info()[1] * self._version.itemsize

    # --- queries ------------------------------------------------------------------------

    def handle_of(self, domid: int, gfn: int) -> int | None:
        """The current handle of a SHARED gfn, None if the gfn is private."""
        with self._lock:
            mfn, ptype = self._machine.lookup(domid, gfn)
            return self._version[mfn] if ptype == _SHARED else None

    def gfns_of(self, mfn: int) -> list[tuple[int, int]]:
        """The reverse map of a shared frame: the (domid, gfn) pairs mapping it."""
        with self._lock:
            if mfn >= len(self._version) or self._version[mfn] == 0:
                return []
            return self._rmap.gfns(mfn)

    # --- nominate -----------------------------------------------------------------------

    def nominate(self, domid: int, gfn: int) -> int:
        """Make a page shareable and return its handle.

        A private page gets a new sharing record with a fresh version; a page that
        is already shared returns its record's current version (as Xen does).
        Raises NoSuchDomain (unknown domain, gfn out of range) and NotShareable
        (unmapped page, page with other references, domain being torn down)."""
        m = self._machine
        with self._lock:
            mfn, ptype = m.lookup(domid, gfn)
            if ptype == _SHARED:
                return self._version[mfn]
            if domid in self._dying:
                raise NotShareable(f"domain {domid} is being torn down", op="nominate",
                                   domain=domid, gfn=gfn)
            if ptype != _RAM:
                raise NotShareable(f"gfn {gfn:#x} of domain {domid} is not mapped",
                                   op="nominate", domain=domid, gfn=gfn)
            owner, mapcount = m.frame_info(mfn)
            if owner != domid or mapcount != 1:
                raise NotShareable(
                    f"frame {mfn:#x} has other references (owner {owner}, {mapcount} maps)",
                    op="nominate", domain=domid, gfn=gfn, mfn=mfn)
            if mfn >= len(self._version):
                self._grow(m.nr_frames)
            rmap = self._rmap
            if domid not in rmap.slot:
                rmap.add_domain(domid, m.nr_gfns(domid))
            version = self._next_version
            self._next_version = version + 1
            m.set_frame_owner(mfn, DOMID_COW)
            try:
                m.set_entry(domid, gfn, mfn, _SHARED)
            except BaseException:
                m.set_frame_owner(mfn, domid)
                raise
            self._version[mfn] = version
            rmap.add(mfn, domid, gfn)
            self._nr_shared_mfns += 1
            self._shr_pages[domid] = self._shr_pages.get(domid, 0) + 1
            return version

    # --- share --------------------------------------------------------------------------

    def share(self, source_domain: int, source_gfn: int, source_handle: int,
              client_domain: int, client_gfn: int, client_handle: int) -> None:
        """Merge the client page into the source page.

        Both handles must name the records their gfns map now.  Raises
        StaleSourceHandle / StaleClientHandle (handle no longer current, or the
        gfn is no longer shared), ContentMismatch (bytes differ: nothing changes),
        NoSuchDomain.  Sharing a page with itself is a successful no-op."""
        lookup = self._lookup
        version = self._version
        lock = self._lock
        lock.acquire()  # explicit acquire/release: half the cost of ``with`` here
        try:
            smfn, stype = lookup(source_domain, source_gfn)
            if stype != _SHARED or version[smfn] != source_handle:
                raise StaleSourceHandle(
                    f"source handle {source_handle:#x} is stale for gfn {source_gfn:#x} "
                    f"of domain {source_domain}", op="share", domain=source_domain,
                    gfn=source_gfn, mfn=smfn, handle=source_handle)
            cmfn, ctype = lookup(client_domain, client_gfn)
            if ctype != _SHARED or version[cmfn] != client_handle:
                raise StaleClientHandle(
                    f"client handle {client_handle:#x} is stale for gfn {client_gfn:#x} "
                    f"of domain {client_domain}", op="share", domain=client_domain,
                    gfn=client_gfn, mfn=cmfn, handle=client_handle)
            if smfn == cmfn:
                return
            if not self._frames_equal(smfn, cmfn):
                raise ContentMismatch(
                    f"frames {smfn:#x} and {cmfn:#x} hold different bytes", op="share",
                    domain=client_domain, gfn=client_gfn, mfn=cmfn, handle=client_handle)
            rmap = self._rmap
            set_entry = self._set_entry
            head = rmap.head
            e = head[cmfn]
            if rmap.next[e] == NO_ENTRY:
                # The common case, one gfn on the client frame: move it inline.
                first = head[smfn]
                rmap.next[e] = first
                if first != NO_ENTRY:
                    rmap.prev[first] = e
                head[smfn] = e
                head[cmfn] = NO_ENTRY
                set_entry(client_domain, client_gfn, smfn, _SHARED)
            else:
                dom = rmap.dom
                gfn = rmap.gfn
                for e in rmap.splice(cmfn, smfn):
                    set_entry(dom[e], gfn[e], smfn, _SHARED)
            version[cmfn] = 0
            self._free_frame(cmfn)
            self._nr_shared_mfns -= 1
            self._nr_saved_mfns += 1
        finally:
            lock.release()

    # --- unshare ------------------------------------------------------------------------

    def unshare(self, domid: int, gfn: int) -> bool:
        """Give a shared gfn a private page again; False if it was not shared.

        The frame's last gfn becomes private in place (no copy, no allocation);
        otherwise a new frame is allocated, filled and mapped.  Raises OutOfFrames
        (every structure and counter unchanged) and NoSuchDomain."""
        m = self._machine
        with self._lock:
            mfn, ptype = m.lookup(domid, gfn)
            if ptype != _SHARED:
                return False
            rmap = self._rmap
            e = self._entry_of(domid, gfn, mfn)
            if rmap.is_single(mfn, e):
                rmap.remove(mfn, e)
                self._version[mfn] = 0
                m.set_frame_owner(mfn, domid)
                m.set_entry(domid, gfn, mfn, _RAM)
                self._nr_shared_mfns -= 1
            else:
                new = m.alloc_frame(domid)  # OutOfFrames: nothing has changed yet
                rmap.remove(mfn, e)
                self._nr_saved_mfns -= 1
                try:
                    m.copy_frame(mfn, new)
                    m.set_entry(domid, gfn, new, _RAM)
                except BaseException:
                    # Restore every structure and counter, then give the frame back.
                    rmap.relink(mfn, e)
                    self._nr_saved_mfns += 1
                    m.set_frame_owner(new, domid)
                    m.free_frame(new)
                    raise
            self._shr_pages[domid] -= 1
            return True

    def _write_fault(self, domid: int, gfn: int) -> None:
        """The machine's copy-on-write fault: a guest wrote a SHARED page."""
        self.unshare(domid, gfn)

    # --- teardown -----------------------------------------------------------------------

    def teardown_step(self, domid: int, budget: int = 4096) -> int:
        """Release up to ``budget`` of the domain's shared references; returns how
        many remain (0 = done).  The first call marks the domain dying (no more
        nominations).  Raises NoSuchDomain for an unknown domain."""
        m = self._machine
        with self._lock:
            td = self._teardowns.get(domid)
            if td is None:
                m.nr_gfns(domid)  # NoSuchDomain if unknown
                self._dying.add(domid)
                slot = self._rmap.slot.get(domid)
                pending = (np.flatnonzero(np.frombuffer(slot, dtype=np.int32) >= 0)
                           if slot is not None else np.zeros(0, dtype=np.int64))
                td = self._teardowns[domid] = _Teardown(pending.astype(np.int64))
            end = min(td.pos + max(budget, 1), len(td.pending))
            for gfn in td.pending[td.pos:end].tolist():
                self._release_locked(domid, gfn)
            td.pos = end
            remaining = len(td.pending) - end
            if remaining == 0:
                self._rmap.drop_domain(domid)
                self._shr_pages.pop(domid, None)
            return remaining

    def destroy_domain(self, domid: int, budget: int = 4096) -> None:
        """Release all the domain's shared references in steps of ``budget`` (the
        lock is dropped between steps), then destroy it on the machine."""
        while self.teardown_step(domid, budget):
            pass
        self._machine.destroy_domain(domid)  # takes the machine lock itself
        with self._lock:
            self._teardowns.pop(domid, None)
            self._dying.discard(domid)

    def _release_locked(self, domid: int, gfn: int) -> None:
        """Drop one shared reference without copying (the gfn is going away)."""
        slot = self._rmap.slot[domid]
        e = slot[gfn]
        if e == NO_ENTRY:
            return  # unshared since teardown began
        m = self._machine
        mfn, _ = m.lookup(domid, gfn)
        last = self._rmap.remove(mfn, e)
        m.set_entry(domid, gfn, INVALID_MFN, _INVALID)
        self._shr_pages[domid] -= 1
        if last:
            self._version[mfn] = 0
            self._nr_shared_mfns -= 1
            m.free_frame(mfn)
        else:
            self._nr_saved_mfns -= 1

    # --- audit --------------------------------------------------------------------------

    def audit(self) -> AuditReport:
        """Recompute every structure and counter; see :func:`sharing.audit.audit`."""
        from sharing.audit import audit

        return audit(self)

    # --- helpers ------------------------------------------------------------------------

    def _entry_of(self, domid: int, gfn: int, mfn: int) -> int:
        slot = self._rmap.slot.get(domid)
        e = NO_ENTRY if slot is None else slot[gfn]
        if e == NO_ENTRY:
            raise SharingError(
                f"gfn {gfn:#x} of domain {domid} is SHARED but has no reverse-map entry",
                op="unshare", domain=domid, gfn=gfn, mfn=mfn)
        return e

    def _grow(self, nr_frames: int) -> None:
        if nr_frames > len(self._version):
            self._version.extend(array("Q", [0]) * (nr_frames - len(self._version)))
            self._rmap.ensure_frames(nr_frames)
