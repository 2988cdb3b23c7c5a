"""The pages of one swap disk: its tmem pool, the spill tier below it, lost pages (no I/O).

:class:`DiskPages` is what :class:`memd.nbd.export.SwapDisk` reads and writes whole pages
through.  Page ``n`` of the disk is index ``n`` of object :data:`DISK_OID` in the guest's
persistent pool :data:`DISK_POOL_ID` — unless it was *spilled*:

Spill tier.  When the store declines a page (``NoSpace``: budget or cap), the coldest
pages of this disk move to the spill tier (a :class:`Spill`, e.g. the file of
:mod:`memd.nbd.spill`) to make room, and the put is tried again; if nothing can move,
the new page itself goes to the spill tier; only when that is full too does the write
fail (``NoSpace`` → ``ENOSPC``).  Coldness is a CLOCK: every read or write of a page sets
its reference byte, the hand clears set bytes and takes pages whose byte is clear.  A
read of a spilled page is served from the spill tier and the page is put back into the
store if it fits (then its spill copy goes).  A page is in at most one tier: a write or
discard drops the spill copy first, so an old copy is never readable.

Lost pages.  A disk whose previous agent kept no store (``--store ''``) starts with every page
*lost*: reads touching one raise :class:`DataLost` (``EIO``) until the page is written or
discarded whole (see the module docstring of memd.nbd.export).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final, Protocol

from memd.errors import DataLost, NoSpace, TmemError
from tmem.host import TmemHost
from tmem.types import MAX_BATCH, MAX_POOLS_PER_CLIENT, PoolFlag

log = logging.getLogger("memd.nbd")

#: The disk's object id: "memdswap" in the low word.
DISK_OID: Final = (0x6D656D6473776170, 0, 1)
#: The local pool id of the disk in its guest's client (the last one, so a guest's own
#: NEW_POOLs get ids from 0 up as before and never collide with it).
DISK_POOL_ID: Final = MAX_POOLS_PER_CLIENT - 1
#: Pages moved to the spill tier at a time when the store is full.
SPILL_BATCH: Final = 64

Handle = tuple[tuple[int, int, int], int]


class Spill(Protocol):
    """Where pages go when memory runs out (memd.nbd.spill.FileSpill)."""

    #: A previous agent crashed with pages in the spill and left no map of them.
    map_lost: bool

    @property
    def used(self) -> int: ...

    def has(self, index: int) -> bool: ...

    def put(self, index: int, page: bytes) -> bool: ...

    def get(self, index: int) -> bytes | None: ...

    def discard(self, index: int) -> None: ...

    def clear(self) -> None: ...


class DiskPages:
    """Whole pages of one disk of ``npages`` pages.  Not thread-safe: SwapDisk locks."""

    def __init__(
        self,
        tmem: TmemHost,
        guest: str,
        npages: int,
        *,
        spill: Spill | None = None,
        contents_lost: bool = False,
        cap_pages: int | None = None,
    ) -> None:
        self.tmem = tmem
        self.guest = guest
        self.npages = npages
        self.spill = spill
        #: one byte per page, 1 = lost; None when none are
        self._lost: bytearray | None = bytearray(b"\x01") * npages if contents_lost else None
        self.lost_pages = npages if contents_lost else 0
        self.spilled_out = self.spilled_in = 0  #: pages moved down / back up
        tmem.add_client(guest, cap_pages=cap_pages)
        existing = dict(tmem.pool_ids(guest))
        if DISK_POOL_ID not in existing:
            tmem.new_pool_at(guest, DISK_POOL_ID, int(PoolFlag.PERSISTENT))
        elif not existing[DISK_POOL_ID] & PoolFlag.PERSISTENT:
            # A guest filled all its pools over its channel before the disk came.
            raise ValueError(f"{guest}: pool {DISK_POOL_ID} is not persistent")
        restored = DISK_POOL_ID in existing
        if restored and spill is not None and spill.map_lost:
            self._lose_unheld()
        # CLOCK state, only with a spill tier: reference bytes, and which pages may be in
        # the store (all of a restored pool: the hand learns which are not).
        self._ref = bytearray(npages) if spill is not None else None
        self._resident = (
            bytearray(b"\x01" if restored else b"\x00") * npages if spill is not None else None
        )
        self._hand = 0

    # -- reads -----------------------------------------------------------------------------

    def _lose_unheld(self) -> None:
        """A crash lost the spill map: every page the store does not hold may have been
        spilled, so each reads as lost (EIO) until the guest writes or discards it."""
        self._lost = bytearray(self.npages)
        for chunk in batches(0, self.npages):
            held = self.tmem.get_batch(self.guest, DISK_POOL_ID, [(DISK_OID, i) for i in chunk])
            for i, page in zip(chunk, held, strict=True):
                if page is None:
                    self._lost[i] = 1
        self.lost_pages = sum(self._lost)
        log.error(
            "%s: the agent before this one crashed with pages of this swap disk in its "
            "spill file; %d pages not held in the store read as lost (EIO)",
            self.guest,
            self.lost_pages,
            extra={"event": "swap-lost", "vm": self.guest},
        )

    def is_lost(self, index: int) -> bool:
        return self._lost is not None and bool(self._lost[index])

    def check_kept(self, start: int, end: int) -> None:
        """DataLost when a page in [start, end) is lost."""
        if self._lost is not None and self._lost.find(1, start, end) >= 0:
            raise DataLost(
                f"{self.guest}: swap disk pages lost when the agent that held them died",
                op="read",
                client=self.guest,
                index=start,
            )

    def load(self, indexes: Sequence[int]) -> list[bytes | None]:
        """The pages (None: never written or discarded: zeros).  At most MAX_BATCH."""
        pages = self.tmem.get_batch(self.guest, DISK_POOL_ID, [(DISK_OID, i) for i in indexes])
        spill = self.spill
        if spill is None:
            return pages
        ref = self._ref
        assert ref is not None
        for k, index in enumerate(indexes):
            ref[index] = 1
            if pages[k] is None and spill.used and spill.has(index):
                page = spill.get(index)
                pages[k] = page
                if page is not None:
                    self._promote(index, page)
        return pages

    def _promote(self, index: int, page: bytes) -> None:
        """Bring a spilled page back into the store if it fits (else it stays spilled)."""
        assert self.spill is not None and self._resident is not None
        try:
            self.tmem.put(self.guest, DISK_POOL_ID, DISK_OID, index, page)
        except NoSpace:
            return
        self.spill.discard(index)
        self._resident[index] = 1
        self.spilled_in += 1

    # -- writes ----------------------------------------------------------------------------

    def store(self, indexes: Sequence[int], pages: Sequence[bytes]) -> list[TmemError | None]:
        """Put whole pages (distinct indexes, at most MAX_BATCH); one result each."""
        spill = self.spill
        if spill is not None and spill.used:
            for index in indexes:
                spill.discard(index)  # the old copy must never be readable again
        handles = [(DISK_OID, i) for i in indexes]
        try:
            results: list[TmemError | None] = self.tmem.put_batch(
                self.guest, DISK_POOL_ID, handles, pages
            )
        except TmemError as err:
            results = [err] * len(indexes)
        if spill is not None:
            ref, resident = self._ref, self._resident
            assert ref is not None and resident is not None
            for k, index in enumerate(indexes):
                ref[index] = 1
                if results[k] is None:
                    resident[index] = 1
                elif isinstance(results[k], NoSpace):
                    results[k] = self._store_spilling(index, pages[k])
        if self._lost is not None:
            for index, result in zip(indexes, results, strict=True):
                if result is None:
                    self._vouch(index, index + 1)
        return results

    def _store_spilling(self, index: int, page: bytes) -> TmemError | None:
        """The store is full: move cold pages down and try again; else spill this one."""
        assert self.spill is not None and self._resident is not None
        while self._spill_coldest(SPILL_BATCH, keep=index):
            try:
                self.tmem.put(self.guest, DISK_POOL_ID, DISK_OID, index, page)
            except NoSpace:
                continue
            except TmemError as err:
                return err
            self._resident[index] = 1
            return None
        self._resident[index] = 0  # a failed put flushed the old copy
        if self.spill.put(index, page):
            self.spilled_out += 1
            return None
        return NoSpace(
            f"{self.guest}: the swap disk's memory and spill space are full",
            op="put",
            client=self.guest,
            index=index,
        )

    def _spill_coldest(self, count: int, *, keep: int) -> int:
        """Move up to ``count`` cold pages from the store to the spill tier.  → moved."""
        spill, ref, resident = self.spill, self._ref, self._resident
        assert spill is not None and ref is not None and resident is not None
        moved = 0
        hand = self._hand
        for _ in range(2 * self.npages):  # two sweeps: the first may only clear bits
            if moved == count:
                break
            index = hand
            hand = hand + 1 if hand + 1 < self.npages else 0
            if not resident[index] or index == keep:
                continue
            if ref[index]:
                ref[index] = 0
                continue
            page = self.tmem.get(self.guest, DISK_POOL_ID, DISK_OID, index)
            if page is None:
                resident[index] = 0  # a restored pool's page that is not there
                continue
            if not spill.put(index, page):
                break  # the spill tier is full too
            self.tmem.flush_page(self.guest, DISK_POOL_ID, DISK_OID, index)
            resident[index] = 0
            moved += 1
        self._hand = hand
        self.spilled_out += moved
        return moved

    def forget(self, start: int, end: int) -> None:
        """Discard whole pages [start, end): they read as zeros afterwards."""
        if start >= end:
            return
        if start == 0 and end == self.npages:
            self.tmem.flush_object(self.guest, DISK_POOL_ID, DISK_OID)
            if self.spill is not None:
                self.spill.clear()
        else:
            for index in range(start, end):
                self.tmem.flush_page(self.guest, DISK_POOL_ID, DISK_OID, index)
                if self.spill is not None and self.spill.used:
                    self.spill.discard(index)
        if self._resident is not None:
            self._resident[start:end] = bytes(end - start)
        if self._lost is not None:
            self._vouch(start, end)  # whole pages: now zeros, which is allowed

    def _vouch(self, start: int, end: int) -> None:
        lost = self._lost
        assert lost is not None
        n = lost.count(1, start, end)
        if n:
            lost[start:end] = bytes(end - start)
            self.lost_pages -= n
            if not self.lost_pages:
                self._lost = None


def batches(first: int, end: int) -> list[range]:
    """[first, end) in runs of at most MAX_BATCH pages."""
    return [range(s, min(end, s + MAX_BATCH)) for s in range(first, end, MAX_BATCH)]
