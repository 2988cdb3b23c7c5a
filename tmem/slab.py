"""Size-classed slab arena for compressed pages (the PAM's backing memory).

One Python ``bytes`` object per stored page would cost ~45 bytes of header and
allocator rounding each; instead blobs live in fixed 64 KiB ``bytearray`` chunks,
one family of chunks per size class (multiples of ``GRAIN`` bytes up to a page), like
zsmalloc.  A blob is named by one integer *location* ``class << 32 | element``.

Structure (all fields protected by the owning store's lock), per size class ``c``:

* ``chunks``  list of chunks (``None`` once released);
* ``free``    stack of free element numbers of the class (element = chunk × per_chunk
  + position), so allocation is a pop;
* ``live``    live blobs per chunk.

A chunk whose last blob is freed is released (its elements filtered out of the free
stack) when the class keeps at least another chunk's worth of free elements, so
lowering the memory budget really returns memory while alloc/free at a chunk edge
does not flap.  Blobs are never moved (no compaction): the waste this leaves is
reported as ``reserved_bytes - used_bytes``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np

from memd.vocab import PAGE_SIZE

GRAIN = 32
NUM_CLASSES = PAGE_SIZE // GRAIN
CHUNK_BYTES = 64 * 1024


@dataclass(slots=True)
class _SizeClass:
    size: int
    per_chunk: int
    chunks: list[bytearray | None] = field(default_factory=list)
    views: list[memoryview | None] = field(default_factory=list)
    live: array[int] = field(default_factory=lambda: array("i"))
    free: array[int] = field(default_factory=lambda: array("i"))
    spare_numbers: list[int] = field(default_factory=list)  # released chunk numbers


def size_class(length: int) -> int:
    """The class index holding blobs of *length* bytes (1 ≤ length ≤ PAGE_SIZE)."""
    return (length - 1) // GRAIN


class SlabArena:
    """Allocate, write, read and free blobs of 1..PAGE_SIZE bytes."""

    def __init__(self) -> None:
        self._classes = [
            _SizeClass(size=(c + 1) * GRAIN, per_chunk=CHUNK_BYTES // ((c + 1) * GRAIN))
            for c in range(NUM_CLASSES)
        ]
        self.used_bytes = 0  # sum of the class sizes of live blobs
        self.reserved_bytes = 0  # bytes of chunks currently allocated
        self.live_blobs = 0

    def store(self, payload: bytes) -> int:
        """Copy *payload* into a free element; return its location."""
        n = len(payload)
        cls_no = (n - 1) // GRAIN
        cls = self._classes[cls_no]
        if not cls.free:
            self._grow(cls)
        elem = cls.free.pop()
        chunk_no, pos = divmod(elem, cls.per_chunk)
        cls.live[chunk_no] += 1
        off = pos * cls.size
        cls.chunks[chunk_no][off : off + n] = payload  # type: ignore[index]
        self.used_bytes += cls.size
        self.live_blobs += 1
        return (cls_no << 32) | elem

    def view(self, loc: int, length: int) -> memoryview:
        """Zero-copy view of the blob at *loc* (valid until the blob is freed)."""
        cls = self._classes[loc >> 32]
        chunk_no, pos = divmod(loc & 0xFFFFFFFF, cls.per_chunk)
        off = pos * cls.size
        return cls.views[chunk_no][off : off + length]  # type: ignore[index]

    def free(self, loc: int) -> None:
        cls = self._classes[loc >> 32]
        elem = loc & 0xFFFFFFFF
        cls.free.append(elem)
        chunk_no = elem // cls.per_chunk
        cls.live[chunk_no] -= 1
        self.used_bytes -= cls.size
        self.live_blobs -= 1
        if cls.live[chunk_no] == 0 and len(cls.free) >= 2 * cls.per_chunk:
            self._release(cls, chunk_no)

    def _grow(self, cls: _SizeClass) -> None:
        data = bytearray(CHUNK_BYTES)
        if cls.spare_numbers:
            chunk_no = cls.spare_numbers.pop()
            cls.chunks[chunk_no] = data
            cls.views[chunk_no] = memoryview(data)
        else:
            chunk_no = len(cls.chunks)
            cls.chunks.append(data)
            cls.views.append(memoryview(data))
            cls.live.append(0)
        first = chunk_no * cls.per_chunk
        # Popped from the end: the chunk fills in address order.  (NumPy builds the run
        # in C: a Python range would create a Python int per element, up to 2048.)
        cls.free.frombytes(
            np.arange(first + cls.per_chunk - 1, first - 1, -1, dtype=np.int32).tobytes()
        )
        self.reserved_bytes += CHUNK_BYTES

    def _release(self, cls: _SizeClass, chunk_no: int) -> None:
        first = chunk_no * cls.per_chunk
        last = first + cls.per_chunk
        cls.free = array("i", (e for e in cls.free if not first <= e < last))
        # Dropping our references frees the chunk; a view still held by a reader keeps
        # its bytes alive until that reader is done (no BufferError, no dangling read).
        cls.chunks[chunk_no] = None
        cls.views[chunk_no] = None
        cls.spare_numbers.append(chunk_no)
        self.reserved_bytes -= CHUNK_BYTES

    def overhead_bytes(self) -> int:
        """Bookkeeping bytes outside the chunks (free stacks, chunk lists)."""
        total = 0
        for cls in self._classes:
            total += 16 * len(cls.chunks) + 200 * (len(cls.chunks) - len(cls.spare_numbers))
            total += (cls.free.buffer_info()[1] + cls.live.buffer_info()[1]) * 4
        return total
