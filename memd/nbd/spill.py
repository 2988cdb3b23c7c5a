"""The swap disk's spill tier: 4 KiB pages in a sparse file, for when memory runs out.

When the store cannot take a disk page (budget or cap), :class:`memd.nbd.export.SwapDisk`
moves the coldest pages of that disk here and reads them back (and up into memory again)
when the guest swaps them in.  One file per disk, in ``--spill-dir``; slot ``s`` is at
byte ``s * 4096``; a page index maps to a slot in an ``array`` (4 bytes per disk page),
freed slots are reused before the file grows.  The file is sparse and created mode
0600; it never holds more than ``capacity`` pages, and a write the filesystem refuses
(ENOSPC, EIO) counts as full: :meth:`put` returns False and the page stays where it was.

Durability: none is needed beyond the agent's life (the pages are a guest's swap): no
fsync.  A graceful stop keeps the file and writes the slot map beside it
(``FILE.map``), which the next agent loads beside the store that restores the disk's
other pages; a crash loses the map, and the next agent truncates the file: every page
of that disk the store does not hold is then *lost* (EIO until rewritten, see
memd.nbd.pages), never read as zeros.
"""

from __future__ import annotations

import contextlib
import logging
import os
from array import array
from pathlib import Path

PAGE = 4096
_NONE = -1

log = logging.getLogger("memd.nbd")


class FileSpill:
    """Pages of one disk of ``pages`` pages, at most ``capacity`` of them, in ``path``."""

    def __init__(self, path: Path, pages: int, capacity: int, *, restore: bool) -> None:
        self.path = path
        self.capacity = capacity
        self.slot_of = array("i", [_NONE]) * pages
        self.free: list[int] = []
        self.slots = 0  #: slots the file has (used + free)
        self.reads = self.writes = 0
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        mapfile = path.with_name(path.name + ".map")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        #: The previous agent spilled pages here but left no map (it crashed): those
        #: pages are gone, and the disk must say so for every page it does not hold.
        self.map_lost = restore and not mapfile.exists() and os.fstat(self.fd).st_size > 0
        if restore and mapfile.exists():
            self._load_map(mapfile)
        else:
            os.ftruncate(self.fd, 0)
        with contextlib.suppress(FileNotFoundError):
            mapfile.unlink()  # used once: a later crash must not bring back stale slots

    @property
    def used(self) -> int:
        return self.slots - len(self.free)

    def has(self, index: int) -> bool:
        return self.slot_of[index] != _NONE

    def put(self, index: int, page: bytes) -> bool:
        """Store ``page`` for ``index`` (replacing an older copy); False when full."""
        slot = self.slot_of[index]
        if slot == _NONE:
            if self.free:
                slot = self.free.pop()
            elif self.slots < self.capacity:
                slot = self.slots
                self.slots += 1
            else:
                return False
        try:
            written = os.pwrite(self.fd, page, slot * PAGE)
        except OSError as err:
            log.warning("spill file %s: %s; treated as full", self.path, err)
            written = -1
        if written != PAGE:
            if self.slot_of[index] == _NONE:
                self.free.append(slot)
            else:  # the old copy may be half overwritten: it is gone
                self.discard(index)
            return False
        self.slot_of[index] = slot
        self.writes += 1
        return True

    def get(self, index: int) -> bytes | None:
        slot = self.slot_of[index]
        if slot == _NONE:
            return None
        data = os.pread(self.fd, PAGE, slot * PAGE)
        if len(data) != PAGE:
            raise OSError(f"spill file {self.path}: short read at slot {slot}")
        self.reads += 1
        return data

    def discard(self, index: int) -> None:
        slot = self.slot_of[index]
        if slot != _NONE:
            self.slot_of[index] = _NONE
            self.free.append(slot)

    def clear(self) -> None:
        for index in range(len(self.slot_of)):
            self.slot_of[index] = _NONE
        self.free.clear()
        self.slots = 0
        os.ftruncate(self.fd, 0)

    def close(self, *, keep: bool) -> None:
        """Close the file; ``keep``: write the slot map so the next agent can use it."""
        if keep and self.used:
            mapfile = self.path.with_name(self.path.name + ".map")
            tmp = mapfile.with_name(mapfile.name + ".tmp")
            with open(tmp, "wb") as f:
                array("i", [self.slots]).tofile(f)
                self.slot_of.tofile(f)
            os.replace(tmp, mapfile)
        os.close(self.fd)

    def _load_map(self, mapfile: Path) -> None:
        raw = array("i")
        raw.frombytes(mapfile.read_bytes())
        if len(raw) != len(self.slot_of) + 1 or not 0 <= raw[0] <= self.capacity:
            log.warning("spill map %s does not fit this disk: ignored", mapfile)
            os.ftruncate(self.fd, 0)
            return
        self.slots = raw[0]
        used = set()
        for index, slot in enumerate(raw[1:]):
            if slot != _NONE:
                if not 0 <= slot < self.slots or slot in used:
                    log.warning("spill map %s is inconsistent: ignored", mapfile)
                    self.slot_of = array("i", [_NONE]) * len(self.slot_of)
                    self.slots = 0
                    os.ftruncate(self.fd, 0)
                    return
                used.add(slot)
                self.slot_of[index] = slot
        self.free = [s for s in range(self.slots) if s not in used]
