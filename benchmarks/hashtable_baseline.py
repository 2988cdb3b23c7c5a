"""The pre-patch design, as a benchmark baseline: one global handle hashtable.

This is what the Xen RFC (seed 003) removed: a handle is looked up in a
hashtable of ``SHR_HASH_LENGTH`` = 1000 buckets chained through their entries,
new entries go to the front of their bucket, and every share and unshare walks
the chains (lookup of both handles, delete of the client handle), all under one
global lock.  Each entry owns a list of gfn_info (domain, gfn); per frame the
machine keeps ``shr_handle``.  Structures are flat arrays like the real manager's,
so the comparison measures the algorithm, not Python object overhead.

Only what the benchmark drives is implemented: nominate, share (with the same
byte compare as the mfn-keyed manager, for parity), unshare.  Not for production.
"""

from __future__ import annotations

import sys
from array import array

from memd.errors import ContentMismatch, NotShareable, StaleClientHandle, StaleSourceHandle
from sharing.machine import DOMID_COW, Machine, PageType

SHR_HASH_LENGTH = 1000
NIL = -1
_RAM = int(PageType.RAM)
_SHARED = int(PageType.SHARED)


class HashtableSharing:
    """Xen's mem_sharing.c before the RFC: handles found through a global hashtable."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine
        self._lock = machine.lock
        self._buckets = array("i", [NIL]) * SHR_HASH_LENGTH
        # hash entries
        self._h_handle = array("Q")
        self._h_mfn = array("q")
        self._h_next = array("i")
        self._h_gfns = array("i")
        self._h_free = NIL
        # gfn_info entries (singly linked per hash entry)
        self._g_dom = array("H")
        self._g_gfn = array("I")
        self._g_next = array("i")
        self._g_free = NIL
        self._shr_handle = array("Q", [0]) * machine.nr_frames  # page_info->shr_handle
        self._next_handle = 1
        self.nr_saved_mfns = 0

    def metadata_bytes(self) -> int:
        arrays = [
            self._buckets,
            self._h_handle,
            self._h_mfn,
            self._h_next,
            self._h_gfns,
            self._g_dom,
            self._g_gfn,
            self._g_next,
            self._shr_handle,
        ]
        return sum(sys.getsizeof(a) for a in arrays)

    # --- the hashtable ------------------------------------------------------------------

    def _lookup(self, handle: int) -> int:
        e = self._buckets[handle % SHR_HASH_LENGTH]
        hh, nxt = self._h_handle, self._h_next
        while e != NIL:
            if hh[e] == handle:
                return e
            e = nxt[e]
        return NIL

    def _insert(self, handle: int, mfn: int) -> int:
        e = self._h_free
        if e == NIL:
            e = len(self._h_handle)
            self._h_handle.append(handle)
            self._h_mfn.append(mfn)
            self._h_next.append(NIL)
            self._h_gfns.append(NIL)
        else:
            self._h_free = self._h_next[e]
            self._h_handle[e] = handle
            self._h_mfn[e] = mfn
        b = handle % SHR_HASH_LENGTH
        self._h_next[e] = self._buckets[b]
        self._h_gfns[e] = NIL
        self._buckets[b] = e
        return e

    def _delete(self, handle: int) -> None:
        b = handle % SHR_HASH_LENGTH
        prev, e = NIL, self._buckets[b]
        hh, nxt = self._h_handle, self._h_next
        while e != NIL and hh[e] != handle:
            prev, e = e, nxt[e]
        if e == NIL:
            raise RuntimeError(f"no hash entry for handle {handle:#x}")
        if prev == NIL:
            self._buckets[b] = nxt[e]
        else:
            nxt[prev] = nxt[e]
        nxt[e] = self._h_free
        self._h_free = e

    def _gfn_alloc(self, domid: int, gfn: int) -> int:
        g = self._g_free
        if g == NIL:
            g = len(self._g_dom)
            self._g_dom.append(domid)
            self._g_gfn.append(gfn)
            self._g_next.append(NIL)
        else:
            self._g_free = self._g_next[g]
            self._g_dom[g] = domid
            self._g_gfn[g] = gfn
        return g

    # --- operations ---------------------------------------------------------------------

    def nominate(self, domid: int, gfn: int) -> int:
        m = self._m
        with self._lock:
            mfn, ptype = m.lookup(domid, gfn)
            if ptype == _SHARED:
                return self._shr_handle[mfn]
            if ptype != _RAM:
                raise NotShareable("not mapped", op="nominate", domain=domid, gfn=gfn)
            handle = self._next_handle
            self._next_handle += 1
            e = self._insert(handle, mfn)
            g = self._gfn_alloc(domid, gfn)
            self._g_next[g] = NIL
            self._h_gfns[e] = g
            m.set_frame_owner(mfn, DOMID_COW)
            m.set_entry(domid, gfn, mfn, _SHARED)
            self._shr_handle[mfn] = handle
            return handle

    def share(self, source_handle: int, client_handle: int) -> None:
        m = self._m
        with self._lock:
            se = self._lookup(source_handle)
            if se == NIL:
                raise StaleSourceHandle("stale source", handle=source_handle)
            ce = self._lookup(client_handle)
            if ce == NIL:
                raise StaleClientHandle("stale client", handle=client_handle)
            smfn, cmfn = self._h_mfn[se], self._h_mfn[ce]
            if not m.frames_equal(smfn, cmfn):
                raise ContentMismatch("bytes differ", handle=client_handle)
            g = self._h_gfns[ce]
            while g != NIL:
                nxt = self._g_next[g]
                m.set_entry(self._g_dom[g], self._g_gfn[g], smfn, _SHARED)
                self._g_next[g] = self._h_gfns[se]
                self._h_gfns[se] = g
                g = nxt
            self._delete(client_handle)
            self._shr_handle[cmfn] = 0
            m.free_frame(cmfn)
            self.nr_saved_mfns += 1

    def unshare(self, domid: int, gfn: int) -> bool:
        m = self._m
        with self._lock:
            mfn, ptype = m.lookup(domid, gfn)
            if ptype != _SHARED:
                return False
            handle = self._shr_handle[mfn]
            e = self._lookup(handle)
            prev, g = NIL, self._h_gfns[e]
            while g != NIL and not (self._g_dom[g] == domid and self._g_gfn[g] == gfn):
                prev, g = g, self._g_next[g]
            last = prev == NIL and self._g_next[g] == NIL
            if last:
                self._delete(handle)
                self._shr_handle[mfn] = 0
                m.set_frame_owner(mfn, domid)
                m.set_entry(domid, gfn, mfn, _RAM)
            else:
                new = m.alloc_frame(domid)
                m.copy_frame(mfn, new)
                m.set_entry(domid, gfn, new, _RAM)
                self.nr_saved_mfns -= 1
            if prev == NIL:
                self._h_gfns[e] = self._g_next[g]
            else:
                self._g_next[prev] = self._g_next[g]
            self._g_next[g] = self._g_free
            self._g_free = g
            return True
