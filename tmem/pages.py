"""Page slots and objects: the handle → blob translation, in parallel arrays.

tmem translates a handle (pool, object id, index) into a page descriptor.  The
2011 code used an rb-tree of objects and a radix tree of pages per object; here every
stored page is a *slot* number and every object an *objno*, and all their fields are
columns of ``array``s, so a page costs a few dozen bytes and no Python object.

Slot columns (valid while ``blob[s] >= 0``; a free slot has ``blob[s] == -1``):

============ ======= ==============================================================
``blob``     int32   page contents in the PageStore
``obj``      int32   owning object
``index``    uint32  page index within the object
``lru_prev`` int32   neighbours on the owning client's LRU list (ephemeral pages
``lru_next`` int32   only; both ``NOT_ON_LRU`` for persistent pages; -1 = list end)
============ ======= ==============================================================

Object columns (valid while ``obj_pool[o] >= 0``): ``obj_pool`` (global pool number),
``obj_count`` (pages), ``obj_oid0..2`` (the 192-bit id, so that bottom-up eviction
can drop an emptied object from its pool's dict), and ``radix[o]``: the object's
index → slot map, as in the 2011 code a two-level radix tree: a dict from
``index >> RADIX_BITS`` to an ``array('i')`` of ``RADIX_FANOUT`` slots (-1 = hole).
Dense objects (files, swap areas) cost ~4 bytes a page; a chunk is freed with its
last page.  Walking an object's chunks enumerates its pages for flush-object.

Nothing here locks: the TmemHost lock protects every field.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass

from tmem.types import Oid

NOT_ON_LRU = -2
RADIX_BITS = 6
RADIX_FANOUT = 1 << RADIX_BITS
RADIX_MASK = RADIX_FANOUT - 1
_EMPTY_CHUNK = array("i", [-1]) * RADIX_FANOUT
#: Budget charge per stored page: five int32 columns + its radix entry.
SLOT_META_BYTES = 5 * 4 + 4
#: Budget charge per radix chunk (array header + dict entry); per object (columns,
#: radix dict, pool dict entry and the oid tuple).
CHUNK_META_BYTES = 64 + 48
OBJ_META_BYTES = 5 * 4 + 64 + 232 + 160


@dataclass(slots=True)
class LruList:
    """An intrusive doubly-linked list of slots, most recently used at ``head``."""

    head: int = -1
    tail: int = -1
    count: int = 0


def _grow_to(columns: tuple[array[int], ...], need: int) -> int:
    """Grow every column to at least *need* entries; return the new length."""
    size = len(columns[0])
    if need <= size:
        return size
    new_size = max(need, size + size // 4, 256)
    for col in columns:
        fill = -1 if col.typecode == "i" else 0
        col.extend(array(col.typecode, [fill]) * (new_size - size))
    return new_size


class PageTable:
    """Slots, objects, the per-object radix maps and LRU lists."""

    def __init__(self) -> None:
        self.blob = array("i")
        self.obj = array("i")
        self.index = array("I")
        self.lru_prev = array("i")
        self.lru_next = array("i")
        self._slot_columns = (self.blob, self.obj, self.index, self.lru_prev, self.lru_next)
        self._free_slots = array("i")
        self.obj_pool = array("i")
        self.obj_count = array("i")
        self.obj_oid0 = array("Q")
        self.obj_oid1 = array("Q")
        self.obj_oid2 = array("Q")
        self._obj_columns = (
            self.obj_pool,
            self.obj_count,
            self.obj_oid0,
            self.obj_oid1,
            self.obj_oid2,
        )
        self.radix: list[dict[int, array[int]] | None] = []
        self._free_objs = array("i")
        self.live_slots = 0
        self.live_objects = 0
        self.live_chunks = 0

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, objno: int, index: int) -> int:
        """Slot of (objno, index), or -1."""
        chunk = self.radix[objno].get(index >> RADIX_BITS)  # type: ignore[union-attr]
        return -1 if chunk is None else chunk[index & RADIX_MASK]

    def object_slots(self, objno: int) -> list[int]:
        radix = self.radix[objno]
        assert radix is not None
        return [s for chunk in radix.values() for s in chunk if s >= 0]

    def oid_of(self, objno: int) -> Oid:
        return (self.obj_oid0[objno], self.obj_oid1[objno], self.obj_oid2[objno])

    # -- objects ---------------------------------------------------------------------------

    def new_object(self, pool_gid: int, oid: Oid) -> int:
        if not self._free_objs:
            start = len(self.obj_pool)
            end = _grow_to(self._obj_columns, start + 1)
            self.radix.extend([None] * (end - start))
            self._free_objs.extend(range(end - 1, start - 1, -1))
        objno = self._free_objs.pop()
        self.obj_pool[objno] = pool_gid
        self.obj_count[objno] = 0
        self.obj_oid0[objno], self.obj_oid1[objno], self.obj_oid2[objno] = oid
        self.radix[objno] = {}
        self.live_objects += 1
        return objno

    def free_object(self, objno: int) -> None:
        assert self.obj_count[objno] == 0
        self.obj_pool[objno] = -1
        self.radix[objno] = None
        self._free_objs.append(objno)
        self.live_objects -= 1

    # -- slots -----------------------------------------------------------------------------

    def add(self, objno: int, index: int, blob: int, lru: LruList | None) -> int:
        """Store a new page (the handle must be absent); put it at the LRU head."""
        if not self._free_slots:
            start = len(self.blob)
            end = _grow_to(self._slot_columns, start + 1)
            self._free_slots.extend(range(end - 1, start - 1, -1))
        slot = self._free_slots.pop()
        self.blob[slot] = blob
        self.obj[slot] = objno
        self.index[slot] = index
        radix = self.radix[objno]
        assert radix is not None
        key = index >> RADIX_BITS
        chunk = radix.get(key)
        if chunk is None:
            chunk = radix[key] = array("i", _EMPTY_CHUNK)
            self.live_chunks += 1
        chunk[index & RADIX_MASK] = slot
        self.obj_count[objno] += 1
        if lru is None:
            self.lru_prev[slot] = self.lru_next[slot] = NOT_ON_LRU
        else:
            self._lru_push(slot, lru)
        self.live_slots += 1
        return slot

    def add_many(
        self, objnos: list[int], indexes: list[int], blobs: list[int], lru: LruList | None
    ) -> None:
        """:meth:`add` for a batch of absent, distinct handles, with lookups hoisted."""
        n = len(blobs)
        free = self._free_slots
        if len(free) < n:
            start = len(self.blob)
            end = _grow_to(self._slot_columns, start + n)
            free.extend(range(end - 1, start - 1, -1))
        blob_col, obj_col, index_col = self.blob, self.obj, self.index
        prev_col, next_col, radix_of, count = (
            self.lru_prev,
            self.lru_next,
            self.radix,
            (self.obj_count),
        )
        last_objno = last_key = -1
        radix: dict[int, array[int]] = {}
        chunk = _EMPTY_CHUNK
        for objno, index, blob in zip(objnos, indexes, blobs, strict=True):
            slot = free.pop()
            blob_col[slot] = blob
            obj_col[slot] = objno
            index_col[slot] = index
            key = index >> RADIX_BITS
            if objno != last_objno or key != last_key:
                if objno != last_objno:
                    radix = radix_of[objno]  # type: ignore[assignment]
                    last_objno = objno
                found = radix.get(key)
                if found is None:
                    found = radix[key] = array("i", _EMPTY_CHUNK)
                    self.live_chunks += 1
                chunk, last_key = found, key
            chunk[index & RADIX_MASK] = slot
            count[objno] += 1
            if lru is None:
                prev_col[slot] = next_col[slot] = NOT_ON_LRU
            else:
                self._lru_push(slot, lru)
        self.live_slots += n

    def remove(self, slot: int, lru: LruList | None) -> int:
        """Drop a page from every structure; return its blob for the caller to release."""
        objno = self.obj[slot]
        index = self.index[slot]
        radix = self.radix[objno]
        assert radix is not None
        key = index >> RADIX_BITS
        chunk = radix[key]
        chunk[index & RADIX_MASK] = -1
        if chunk == _EMPTY_CHUNK:
            del radix[key]
            self.live_chunks -= 1
        self.obj_count[objno] -= 1
        if lru is not None:
            self._lru_unlink(slot, lru)
        blob = self.blob[slot]
        self.blob[slot] = -1
        self._free_slots.append(slot)
        self.live_slots -= 1
        return blob

    def on_lru(self, slot: int) -> bool:
        return self.lru_prev[slot] != NOT_ON_LRU

    def touch(self, slot: int, lru: LruList) -> None:
        """Mark a page most recently used."""
        if lru.head != slot:
            self._lru_unlink(slot, lru)
            self._lru_push(slot, lru)

    def move_lru(self, slot: int, src: LruList, dst: LruList) -> None:
        self._lru_unlink(slot, src)
        self._lru_push(slot, dst)

    def _lru_push(self, slot: int, lru: LruList) -> None:
        head = lru.head
        self.lru_prev[slot] = -1
        self.lru_next[slot] = head
        if head >= 0:
            self.lru_prev[head] = slot
        else:
            lru.tail = slot
        lru.head = slot
        lru.count += 1

    def _lru_unlink(self, slot: int, lru: LruList) -> None:
        prev, nxt = self.lru_prev[slot], self.lru_next[slot]
        if prev >= 0:
            self.lru_next[prev] = nxt
        else:
            lru.head = nxt
        if nxt >= 0:
            self.lru_prev[nxt] = prev
        else:
            lru.tail = prev
        lru.count -= 1

    # -- accounting and audit --------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes actually allocated: columns at capacity, radix dicts and chunks."""
        cols = (*self._slot_columns, *self._obj_columns, self._free_slots, self._free_objs)
        total = sum(c.buffer_info()[1] * c.itemsize for c in cols)
        total += sys.getsizeof(self.radix)
        for radix in self.radix:
            if radix is not None:
                total += sys.getsizeof(radix) + len(radix) * sys.getsizeof(_EMPTY_CHUNK)
        return total

    def live_slot_ids(self) -> list[int]:
        return [s for s, b in enumerate(self.blob) if b >= 0]

    def indexed_slots(self) -> set[int]:
        """Every slot some object's radix map points at."""
        return {s for r in self.radix if r is not None for c in r.values() for s in c if s >= 0}

    def lru_walk(self, lru: LruList, limit: int) -> list[int]:
        """Slots from head to tail (stops after *limit* to survive a corrupt cycle)."""
        out: list[int] = []
        slot = lru.head
        while slot >= 0 and len(out) <= limit:
            out.append(slot)
            slot = self.lru_next[slot]
        return out
