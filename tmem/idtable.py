"""Open-addressing hash table of small integer ids, with keys kept by the caller.

The tmem store needs two indexes with millions of entries: handle → page slot and
content hash → blob.  A Python dict costs ~100 bytes an entry here (the key and
value int objects plus the entry), more than the whole per-page budget.  This table
stores only the *ids* (int32, -1 = empty) in one ``array``; the key of an id lives in
the caller's own per-id arrays, so the caller passes:

* ``hash_of(id)`` - recompute the hash of a stored id (for growing and deletion);
* ``match(id)``   - on lookup, does this stored id carry the wanted key?

Linear probing, load factor kept in [1/8, 1/2], deletion by backward shift (no
tombstones, so lookups never degrade).  Cost: 4 bytes × capacity ≈ 8-32 bytes per
entry.  Not thread-safe: the owner's lock protects it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

_EMPTY = -1
_MIN_CAPACITY = 64


class IdTable:
    """A set of ids findable by a caller-defined key hash."""

    __slots__ = ("_count", "_hash_many", "_hash_of", "mask", "slots")

    def __init__(
        self,
        hash_of: Callable[[int], int],
        capacity: int = _MIN_CAPACITY,
        *,
        hash_many: Callable[[npt.NDArray[np.int32]], npt.NDArray[np.uint64]] | None = None,
    ) -> None:
        size = _MIN_CAPACITY
        while size < capacity:
            size *= 2
        self.slots = array("i", [_EMPTY]) * size
        self.mask = size - 1
        self._count = 0
        self._hash_of = hash_of
        self._hash_many = hash_many

    # ``slots`` and ``mask`` are read directly by hot probe loops (PageStore.find):
    # a probe starts at ``h & mask`` and walks forward until an empty (-1) entry.

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.slots.itemsize

    def find(self, h: int, match: Callable[[int], bool]) -> int:
        """The stored id whose key hashes to *h* and satisfies *match*, else -1."""
        slots = self.slots
        mask = self.mask
        i = h & mask
        ident = slots[i]
        while ident != _EMPTY:
            if match(ident):
                return ident
            i = (i + 1) & mask
            ident = slots[i]
        return _EMPTY

    def insert(self, h: int, ident: int) -> None:
        """Add *ident* (not already present) under hash *h*."""
        if (self._count + 1) * 2 > len(self.slots):
            self._resize(len(self.slots) * 2)
        slots = self.slots
        mask = self.mask
        i = h & mask
        while slots[i] != _EMPTY:
            i = (i + 1) & mask
        slots[i] = ident
        self._count += 1

    def insert_many(self, idents: npt.NDArray[np.int32]) -> None:
        """Add many ids (none already present) at once, placed by the vectorised
        rebuild of :meth:`_resize` (needs ``hash_many``)."""
        if not len(idents):
            return
        current = np.frombuffer(self.slots, dtype=np.int32)
        merged = np.concatenate([current[current != _EMPTY], idents.astype(np.int32)])
        size = len(self.slots)
        while len(merged) * 2 > size:
            size *= 2
        unplaced = np.full(size, _EMPTY, dtype=np.int32)
        unplaced[: len(merged)] = merged
        self.slots = array("i", unplaced.tobytes())  # not a valid table until re-laid:
        self._resize(size)

    def remove(self, h: int, ident: int) -> None:
        """Remove *ident*, stored under hash *h*; KeyError if it is not there."""
        slots = self.slots
        mask = self.mask
        i = h & mask
        while slots[i] != ident:
            if slots[i] == _EMPTY:
                raise KeyError(ident)
            i = (i + 1) & mask
        # Backward-shift deletion: pull later members of the run into the hole when
        # their home position does not lie cyclically in (hole, j].
        hash_of = self._hash_of
        hole = i
        j = i
        while True:
            j = (j + 1) & mask
            moved = slots[j]
            if moved == _EMPTY:
                break
            home = hash_of(moved) & mask
            # Does *moved*'s home lie cyclically in (hole, j]?  Then it must stay.
            stays = hole < home <= j if hole <= j else (home > hole or home <= j)
            if not stays:
                slots[hole] = moved
                hole = j
        slots[hole] = _EMPTY
        self._count -= 1
        if len(slots) > _MIN_CAPACITY and self._count * 8 < len(slots):
            self._resize(len(slots) // 2)

    def __iter__(self) -> Iterator[int]:
        return (ident for ident in self.slots if ident != _EMPTY)

    def _resize(self, size: int) -> None:
        current = np.frombuffer(self.slots, dtype=np.int32)
        ids = current[current != _EMPTY].copy()
        mask = size - 1
        if self._hash_many is not None and len(ids):
            homes = (self._hash_many(ids) & np.uint64(mask)).astype(np.int64)
        else:
            homes = np.array([self._hash_of(int(i)) & mask for i in ids], dtype=np.int64)
        table = np.full(size, _EMPTY, dtype=np.int32)
        # Linear probing, vectorised: sorted by home, each id lands at the first slot at
        # or after its home that the ids before it left free (a running maximum).
        order = np.argsort(homes, kind="stable")
        ids, homes = ids[order], homes[order]
        rank = np.arange(len(ids), dtype=np.int64)
        pos = np.maximum.accumulate(homes - rank) + rank if len(ids) else homes
        fits = pos <= mask
        table[pos[fits]] = ids[fits]
        for ident in ids[~fits].tolist():  # runs that wrap past the end: rare, in order
            i = 0
            while table[i] != _EMPTY:
                i += 1
            table[i] = ident
        self.slots = array("i", table.tobytes())
        self.mask = mask
        self._count = len(ids)
