"""Reverse maps: for each shared frame, the list of (domain, gfn) that map it.

This is the structure the Xen RFC hung off ``page_info``: the gfn list lives
with the frame's own record, found by mfn, so there is no handle hashtable to
search.  Here every list is threaded through one pool of entries held in flat
arrays (no Python object per page):

* per frame (indexed by mfn):  ``head``  int32, first entry, -1 = empty list
* per entry (pool index e):    ``next``/``prev`` int32 links (-1 ends),
                               ``dom`` uint16 domid, ``gfn`` uint32 gfn
* per domain (indexed by gfn): ``slot`` int32, the entry of (domain, gfn), -1 none

Entry states: *live* (on exactly one frame's list; ``slot[dom][gfn] == e``) or
*free* (on the free list, chained through ``next``; ``prev``, ``dom`` and ``gfn``
are meaningless).  Removing a gfn is O(1) at any list length because ``slot``
finds the entry directly; Xen needs a hash once a list passes 256 entries (the
zero page) because it must search its list for the gfn, we never search.

Not thread-safe: the owner (``SharingManager``) holds its lock around every call.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

NO_ENTRY = -1


class ReverseMaps:
    """The per-frame gfn lists of every shared frame, plus per-domain back pointers."""

    def __init__(self, nr_frames: int) -> None:
        self.head = array("i", [NO_ENTRY]) * nr_frames
        self.next = array("i")
        self.prev = array("i")
        self.dom = array("H")
        self.gfn = array("I")
        self.slot: dict[int, array[int]] = {}
        self.free_head = NO_ENTRY
        self.nr_free = 0

    # --- capacity -----------------------------------------------------------------------

    def ensure_frames(self, nr_frames: int) -> None:
        """Grow the per-frame table to cover mfns below ``nr_frames``."""
        if nr_frames > len(self.head):
            self.head.extend(array("i", [NO_ENTRY]) * (nr_frames - len(self.head)))

    def add_domain(self, domid: int, nr_gfns: int) -> None:
        if domid not in self.slot:
            self.slot[domid] = array("i", [NO_ENTRY]) * nr_gfns

    def drop_domain(self, domid: int) -> None:
        """Forget a domain's back pointers (it must have no live entries left)."""
        self.slot.pop(domid, None)

    @property
    def nr_live(self) -> int:
        return len(self.next) - self.nr_free

    # --- list operations ----------------------------------------------------------------

    def add(self, mfn: int, domid: int, gfn: int) -> int:
        """Put (domid, gfn) at the front of mfn's list; returns the entry."""
        e = self.free_head
        if e == NO_ENTRY:
            e = len(self.next)
            self.next.append(NO_ENTRY)
            self.prev.append(NO_ENTRY)
            self.dom.append(domid)
            self.gfn.append(gfn)
        else:
            self.free_head = self.next[e]
            self.nr_free -= 1
            self.dom[e] = domid
            self.gfn[e] = gfn
        first = self.head[mfn]
        self.next[e] = first
        self.prev[e] = NO_ENTRY
        if first != NO_ENTRY:
            self.prev[first] = e
        self.head[mfn] = e
        self.slot[domid][gfn] = e
        return e

    def remove(self, mfn: int, e: int) -> bool:
        """Unlink entry e from mfn's list and free it; True if the list is now empty."""
        nxt = self.next[e]
        prv = self.prev[e]
        if prv == NO_ENTRY:
            self.head[mfn] = nxt
        else:
            self.next[prv] = nxt
        if nxt != NO_ENTRY:
            self.prev[nxt] = prv
        self.slot[self.dom[e]][self.gfn[e]] = NO_ENTRY
        self.next[e] = self.free_head
        self.free_head = e
        self.nr_free += 1
        return self.head[mfn] == NO_ENTRY

    def relink(self, mfn: int, e: int) -> None:
        """Undo :meth:`remove` of the most recently freed entry e (rollback path)."""
        if self.free_head != e:
            raise RuntimeError("relink must undo the last remove")
        self.free_head = self.next[e]
        self.nr_free -= 1
        first = self.head[mfn]
        self.next[e] = first
        self.prev[e] = NO_ENTRY
        if first != NO_ENTRY:
            self.prev[first] = e
        self.head[mfn] = e
        self.slot[self.dom[e]][self.gfn[e]] = e

    def is_single(self, mfn: int, e: int) -> bool:
        """True if entry e is the only one on mfn's list."""
        return self.head[mfn] == e and self.next[e] == NO_ENTRY

    def splice(self, src: int, dst: int) -> list[int]:
        """Move every entry of src's list to the front of dst's list; returns them.

        O(entries moved): the caller repoints each moved gfn anyway."""
        head = self.head
        nxt = self.next
        e = head[src]
        if e != NO_ENTRY and nxt[e] == NO_ENTRY:
            # The common case, one entry (a freshly nominated page): no walk.
            first_dst = head[dst]
            nxt[e] = first_dst
            if first_dst != NO_ENTRY:
                self.prev[first_dst] = e
            head[dst] = e
            head[src] = NO_ENTRY
            return [e]
        moved: list[int] = []
        last = NO_ENTRY
        while e != NO_ENTRY:
            moved.append(e)
            last = e
            e = nxt[e]
        if last == NO_ENTRY:
            return moved
        first_dst = self.head[dst]
        nxt[last] = first_dst
        if first_dst != NO_ENTRY:
            self.prev[first_dst] = last
        self.head[dst] = self.head[src]
        self.head[src] = NO_ENTRY
        return moved

    def entries(self, mfn: int, limit: int | None = None) -> Iterator[int]:
        """The entries on mfn's list, front to back (stops after ``limit`` steps,
        so a corrupted cyclic list cannot hang the caller)."""
        steps = len(self.next) + 1 if limit is None else limit
        e = self.head[mfn]
        nxt = self.next
        while e != NO_ENTRY and steps > 0:
            yield e
            e = nxt[e]
            steps -= 1

    def gfns(self, mfn: int) -> list[tuple[int, int]]:
        """The (domid, gfn) pairs that map mfn."""
        return [(self.dom[e], self.gfn[e]) for e in self.entries(mfn)]

    def nbytes(self) -> int:
        """Bytes held by the arrays (allocated capacity included)."""
        arrays = [self.head, self.next, self.prev, self.dom, self.gfn, *self.slot.values()]
        return sum(sys.getsizeof(a) for a in arrays) + sys.getsizeof(self.slot)
