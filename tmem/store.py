"""The PAM blob store: lz4-compressed, de-duplicated page contents with refcounts.

Pages enter in three steps so that the expensive parts run outside any lock:

1. :func:`hash_pages` (pure, lock-free): zero check and xxh3-64 of every page.
2. :meth:`PageStore.pin_matches` (under the owner's lock): for each page, a live blob
   with the same (hash, dedup scope) whose *decompressed* bytes equal the page is
   pinned (its refcount taken).  Verifying a duplicate by decompression is ~4x
   cheaper than compressing it, so duplicates never pay for lz4 compression.
3. :func:`compress_page` (lock-free, lz4 releases the GIL) for the pages left, then
   :meth:`PageStore.intern` / :meth:`PageStore.intern_many` (under the lock) store
   them, de-duplicating once more against blobs stored in the meantime.

The payload is ``b""`` for a zero page, the raw page when compression would save less
than 1/8 (it is then served without decompression), otherwise the lz4 block.

Why comparing compressed payloads is a byte compare of the pages: lz4 block
decompression is a function, so equal payloads mean equal pages; compression is
deterministic for one library build and mode, so equal pages give equal payloads.

Blob table (parallel arrays indexed by blob id; protected by the owner's lock):

=========== ======= ==========================================================
array       type    meaning (valid while ``refs[b] > 0``)
=========== ======= ==========================================================
``loc``     int64   slab location (invalid for the zero blob)
``length``  uint16  payload length; 0 = zero page, PAGE_SIZE = stored raw
``refs``    uint32  page slots pointing here; 0 = free blob id
``hash``    uint64  xxh3-64 of the page
``scope``   uint32  dedup scope: 0 = clients that opted in, else one client's own
=========== ======= ==========================================================

Blob id 0 is the shared zero page: it owns no slab memory and is never freed.

External blobs: a blob whose scope has :data:`tmem.durable.EXTERNAL_SCOPE` set (a
persistent pool's page on a host with a persistent log) keeps its payload only in that
log: ``loc`` is ``EXTERNAL_LOC`` and the payload is read back through the log.  Its
metadata (length, refs, hash, scope) stays here, like any blob's.  A duplicate is still
compared byte for byte against it, but not read back from the log each time: the payloads
of the last :data:`COMPARED_PAYLOADS` external blobs compared are kept (``_compared``;
a blob's payload never changes while it lives, and a freed blob's entry goes with it).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import lz4.block
import numpy as np
import numpy.typing as npt
import xxhash

from memd.vocab import PAGE_SIZE
from tmem.durable import EXTERNAL_SCOPE, PersistentLog
from tmem.idtable import IdTable
from tmem.slab import SlabArena
from tmem.types import PageBuffer

ZERO_BLOB = 0
#: ``loc`` of a blob whose payload lives in the persistent log.
EXTERNAL_LOC = -1
ZERO_PAGE = bytes(PAGE_SIZE)
#: External blobs' payloads kept for dedup compares (at most 4 MiB): the same few shared
#: pages recur (a migration's 13k duplicates of 64 pages read the log 64 times, not 13k).
COMPARED_PAYLOADS = 1024
RAW_LIMIT = PAGE_SIZE - PAGE_SIZE // 8
#: Bytes of metadata per live blob: the five arrays above plus two dedup-table slots.
BLOB_META_BYTES = 8 + 2 + 4 + 8 + 4 + 8

_compress = lz4.block.compress
_decompress = lz4.block.decompress
_xxh3 = xxhash.xxh3_64_intdigest

#: hash_pages' mark for a zero page (xxh3 digests are never negative).
ZERO_HASH = -1

#: (hash, payload, pinned blob or -1): a page ready to be stored.  With a pin the
#: payload is unused (b"") and the blob reference already belongs to the caller.
EncodedPage = tuple[int, bytes, int]


def hash_pages(pages: Sequence[PageBuffer]) -> list[int]:
    """xxh3-64 of each page, ZERO_HASH for zero pages (no shared state touched).

    Every page is PAGE_SIZE long (validated by the caller), so for a buffer that is not
    ``bytes`` "starts the zero page" is "is the zero page": ``bytes == memoryview`` falls
    back to memoryview's item-by-item comparison, ~100x slower than memcmp on a match."""
    zero = ZERO_PAGE
    starts_zero = zero.startswith
    return [
        ZERO_HASH if (page == zero if type(page) is bytes else starts_zero(page)) else _xxh3(page)
        for page in pages
    ]


def same_page(stored: bytes, page: PageBuffer) -> bool:
    """Whether *stored* (a decoded page) holds exactly *page*'s bytes, memcmp-fast for
    any buffer (see :func:`hash_pages`)."""
    if type(page) is bytes:
        return stored == page
    return len(stored) == len(page) and stored.startswith(page)


def compress_page(page: PageBuffer) -> bytes:
    """The payload stored for a non-zero page: lz4, or the page itself as ``bytes`` when
    lz4 does not pay (a copy only for a buffer: nothing stored may refer to the caller's
    memory)."""
    payload: bytes = _compress(page, store_size=False)
    if len(payload) > RAW_LIMIT:
        return page if type(page) is bytes else bytes(page)
    return payload


def decode_payload(payload: bytes) -> bytes:
    """The page a payload stands for (see :func:`compress_page`)."""
    n = len(payload)
    if n == 0:
        return ZERO_PAGE
    if n == PAGE_SIZE:
        return payload
    return _decompress(payload, uncompressed_size=PAGE_SIZE)  # type: ignore[no-any-return]


def _grown(arr: array[int], need: int) -> None:
    if need > len(arr):
        arr.extend(array(arr.typecode, [0]) * max(need - len(arr), len(arr) // 4, 64))


class PageStore:
    """Refcounted, de-duplicated page contents.  Not locked: the owner serialises."""

    def __init__(self, log: PersistentLog | None = None) -> None:
        #: Where external blobs (scope with EXTERNAL_SCOPE) keep their payload.
        self.log = log
        self.arena = SlabArena()
        self._loc = array("q", [0])
        self._length = array("H", [0])
        self._refs = array("I", [0])
        self._hash = array("Q", [0])
        self._scope = array("I", [0])
        self._free_ids = array("i")
        #: external blob → its payload, for dedup compares (see the module docstring).
        self._compared: dict[int, bytes] = {}
        self._dedup = IdTable(self._key_hash_of, hash_many=self._key_hashes_of)
        self.live_blobs = 0  # excluding the zero blob
        self.data_bytes = 0  # exact payload bytes of live blobs
        self.dedup_hits = 0

    # -- lookups ---------------------------------------------------------------------------

    def _key_hash_of(self, blob: int) -> int:
        return self._hash[blob] ^ self._scope[blob]

    def _key_hashes_of(self, blobs: npt.NDArray[np.int32]) -> npt.NDArray[np.uint64]:
        hashes = np.frombuffer(self._hash, dtype=np.uint64)[blobs]
        return hashes ^ np.frombuffer(self._scope, dtype=np.uint32)[blobs].astype(np.uint64)

    def refs(self, blob: int) -> int:
        return self._refs[blob]

    def payload_length(self, blob: int) -> int:
        return self._length[blob]

    def find(self, h: int, payload: bytes, scope: int) -> int:
        """Live blob with this content in this scope, or -1."""
        if not payload:
            return ZERO_BLOB
        n = len(payload)
        table = self._dedup
        slots, mask = table.slots, table.mask
        hashes, scopes, length = self._hash, self._scope, self._length
        i = (h ^ scope) & mask
        blob = slots[i]
        while blob >= 0:
            if (
                hashes[blob] == h
                and scopes[blob] == scope
                and length[blob] == n
                and self._compare_data(blob) == payload
            ):
                return blob
            i = (i + 1) & mask
            blob = slots[i]
        return -1

    # -- updates ---------------------------------------------------------------------------

    def pin_matches(self, hashes: list[int], pages: Sequence[PageBuffer], scope: int) -> list[int]:
        """Per page: a live blob of this scope holding exactly these bytes, pinned (its
        reference taken for the caller), or -1.  Zero pages always get -1."""
        out: list[int] = []
        append = out.append
        table = self._dedup
        slots, mask = table.slots, table.mask
        stored_hash, scopes, length, loc = self._hash, self._scope, self._length, self._loc
        refs, view = self._refs, self.arena.view
        for h, page in zip(hashes, pages, strict=True):
            found = -1
            if h >= 0:
                i = (h ^ scope) & mask
                blob = slots[i]
                while blob >= 0:
                    if stored_hash[blob] == h and scopes[blob] == scope:
                        n = length[blob]
                        where = loc[blob]
                        data = view(where, n) if where >= 0 else self._compare_data(blob)
                        same = same_page(
                            bytes(data)
                            if n == PAGE_SIZE
                            else _decompress(data, uncompressed_size=PAGE_SIZE),
                            page,
                        )
                        if same:
                            refs[blob] += 1
                            found = blob
                            break
                    i = (i + 1) & mask
                    blob = slots[i]
            if found >= 0:
                self.dedup_hits += 1
            append(found)
        return out

    def intern(self, h: int, payload: bytes, scope: int, dedup: bool = True) -> int:
        """Take a reference to a blob holding *payload*, storing it if it is new."""
        if not payload:
            self._refs[ZERO_BLOB] += 1
            return ZERO_BLOB
        if dedup:
            blob = self.find(h, payload, scope)
            if blob >= 0:
                self._refs[blob] += 1
                self.dedup_hits += 1
                return blob
        if self._free_ids:
            blob = self._free_ids.pop()
        else:
            blob = len(self._refs)
            for arr in (self._loc, self._length, self._refs, self._hash, self._scope):
                _grown(arr, blob + 1)
            # _grown over-allocates: hand out the spare ids through the free stack.
            self._free_ids.extend(range(len(self._refs) - 1, blob, -1))
        if scope & EXTERNAL_SCOPE:
            assert self.log is not None, "an external blob needs a persistent log"
            self.log.put_blob(blob, h, scope, payload)
            self._loc[blob] = EXTERNAL_LOC
        else:
            self._loc[blob] = self.arena.store(payload)
        self._length[blob] = len(payload)
        self._refs[blob] = 1
        self._hash[blob] = h
        self._scope[blob] = scope
        self._dedup.insert(h ^ scope, blob)
        self.live_blobs += 1
        self.data_bytes += len(payload)
        return blob

    def intern_many(self, encoded: list[EncodedPage], scope: int) -> list[int]:
        """:meth:`intern` for a batch; pinned pages pass through (already referenced)."""
        intern = self.intern
        return [
            pinned if pinned >= 0 else intern(h, payload, scope) for h, payload, pinned in encoded
        ]

    def intern_payloads(self, hashes: list[int], payloads: list[bytes], scope: int) -> list[int]:
        """:meth:`intern` of each (hash, payload), one reference each: the same blobs
        and table, with the loop's lookups hoisted (a migration installs ~250k pages a
        second through here)."""
        out: list[int] = []
        append = out.append
        table = self._dedup
        stored_hash, scopes, length, refs = self._hash, self._scope, self._length, self._refs
        external = bool(scope & EXTERNAL_SCOPE)
        if external:
            assert self.log is not None, "an external blob needs a persistent log"
        put_blob = self.log.put_blob if self.log is not None else None
        free_ids, data, insert, loc = self._free_ids, self._compare_data, table.insert, self._loc
        zeros = added = added_bytes = hits = 0
        try:
            for h, payload in zip(hashes, payloads, strict=True):
                n = len(payload)
                if not n:
                    zeros += 1
                    append(ZERO_BLOB)
                    continue
                slots, mask = table.slots, table.mask  # insert may have grown the table
                i = (h ^ scope) & mask
                blob = slots[i]
                while blob >= 0:
                    if (
                        stored_hash[blob] == h
                        and scopes[blob] == scope
                        and length[blob] == n
                        and data(blob) == payload
                    ):
                        break
                    i = (i + 1) & mask
                    blob = slots[i]
                if blob >= 0:
                    refs[blob] += 1
                    hits += 1
                    append(blob)
                    continue
                if not free_ids:
                    top = len(refs)
                    for arr in (loc, length, refs, stored_hash, scopes):
                        _grown(arr, top + 1)
                    free_ids.extend(range(len(refs) - 1, top - 1, -1))
                blob = free_ids.pop()
                if external:
                    put_blob(blob, h, scope, payload)  # type: ignore[misc]
                    loc[blob] = EXTERNAL_LOC
                else:
                    loc[blob] = self.arena.store(payload)
                length[blob] = n
                refs[blob] = 1
                stored_hash[blob] = h
                scopes[blob] = scope
                insert(h ^ scope, blob)
                added += 1
                added_bytes += n
                append(blob)
        finally:  # the counters kept in locals, as far as the loop got
            refs[ZERO_BLOB] += zeros
            self.live_blobs += added
            self.data_bytes += added_bytes
            self.dedup_hits += hits
        return out

    def release(self, blob: int) -> None:
        """Drop one reference; free the blob when it was the last."""
        refs = self._refs[blob] - 1
        self._refs[blob] = refs
        if refs or blob == ZERO_BLOB:
            return
        self._dedup.remove(self._hash[blob] ^ self._scope[blob], blob)
        loc = self._loc[blob]
        if loc >= 0:
            self.arena.free(loc)
        else:
            assert self.log is not None
            self.log.drop_blob(blob)
            self._compared.pop(blob, None)
        self.data_bytes -= self._length[blob]
        self.live_blobs -= 1
        self._free_ids.append(blob)

    def payload(self, blob: int) -> bytes:
        """A copy of the stored payload (decode it with :func:`decode_payload`)."""
        n = self._length[blob]
        return b"" if n == 0 else self._data(blob)

    def _data(self, blob: int) -> bytes:
        loc = self._loc[blob]
        if loc >= 0:
            return bytes(self.arena.view(loc, self._length[blob]))
        assert self.log is not None
        return self.log.payload(blob)

    def _compare_data(self, blob: int) -> bytes:
        """The payload of *blob* to compare a candidate duplicate with: an external
        blob's is read from the log once and kept (``_compared``)."""
        loc = self._loc[blob]
        if loc >= 0:
            return bytes(self.arena.view(loc, self._length[blob]))
        known = self._compared.get(blob)
        if known is None:
            assert self.log is not None
            known = self.log.payload(blob)
            if len(self._compared) >= COMPARED_PAYLOADS:
                self._compared.clear()
            self._compared[blob] = known
        return known

    def export_columns(
        self, blobs: npt.NDArray[np.int32]
    ) -> tuple[list[int], list[bool], list[bytes]]:
        """For each blob id in *blobs* (live ones; repeats allowed): its xxh3 (0 for the
        zero page), whether other pages share it (refcount over 1, never the zero page)
        and a copy of its stored payload — a migration's read of thousands of pages in a
        few numpy gathers and one log read of the distinct external blobs, sorted."""
        live = blobs != ZERO_BLOB
        hashes = np.frombuffer(self._hash, dtype=np.uint64)[blobs] * live
        shared = (np.frombuffer(self._refs, dtype=np.uint32)[blobs] > 1) & live
        distinct = np.unique(blobs[live])
        outside = np.frombuffer(self._loc, dtype=np.int64)[distinct] < 0
        payload_of: dict[int, bytes] = {ZERO_BLOB: b""}
        external = distinct[outside].tolist()
        if external:
            assert self.log is not None  # external blobs live in the log
            payload_of.update(zip(external, self.log.payloads(external), strict=True))
        for blob in distinct[~outside].tolist():
            payload_of[blob] = self.payload(blob)
        payloads = list(map(payload_of.__getitem__, blobs.tolist()))
        return hashes.tolist(), shared.tolist(), payloads

    def is_external(self, blob: int) -> bool:
        return blob != ZERO_BLOB and self._loc[blob] < 0

    # -- restart ---------------------------------------------------------------------------

    def restore(self, blobs: npt.NDArray[np.void], refs: npt.NDArray[np.int64]) -> None:
        """Re-create external blobs (rows of ``tmem.durable.BLOB_DTYPE``) at their stored
        ids, with recomputed refcounts (*refs*, indexed by blob id; entry 0 is the zero
        page's).  Into an empty store only; ids not restored become free ids."""
        assert self.live_blobs == 0, "restore into an empty store"
        self._compared.clear()
        ids = blobs["blob"].astype(np.int64)
        top = max(int(ids.max(initial=0)) + 1, len(refs))
        for arr in (self._loc, self._length, self._refs, self._hash, self._scope):
            _grown(arr, top)
        # Column views (released before anything resizes the arrays again).
        np.frombuffer(self._loc, dtype=np.int64)[ids] = EXTERNAL_LOC
        np.frombuffer(self._length, dtype=np.uint16)[ids] = blobs["length"]
        np.frombuffer(self._hash, dtype=np.uint64)[ids] = blobs["hash"]
        np.frombuffer(self._scope, dtype=np.uint32)[ids] = blobs["scope"]
        np.frombuffer(self._refs, dtype=np.uint32)[: len(refs)] = refs
        self._dedup.insert_many(ids.astype(np.int32))
        self.data_bytes = int(blobs["length"].sum())
        self.live_blobs = len(ids)
        used = np.zeros(len(self._refs), dtype=bool)
        used[ids] = True
        used[ZERO_BLOB] = True
        # Popped from the end: the lowest free ids are handed out first.
        self._free_ids = array("i", np.flatnonzero(~used)[::-1].astype(np.int32).tobytes())

    def payload_lengths(self, blobs: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint16]:
        """Payload length of each blob id in *blobs* (vectorised)."""
        return np.frombuffer(self._length, dtype=np.uint16)[blobs]

    # -- accounting ------------------------------------------------------------------------

    def charged_bytes(self) -> int:
        """What the store costs the budget: size-classed data + per-blob metadata."""
        return self.arena.used_bytes + self.live_blobs * BLOB_META_BYTES

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping actually allocated (arrays at capacity, tables, slabs)."""
        arrays = (self._loc, self._length, self._refs, self._hash, self._scope, self._free_ids)
        return (
            sum(a.buffer_info()[1] * a.itemsize for a in arrays)
            + self._dedup.nbytes
            + self.arena.overhead_bytes()
        )

    def zero_refs(self) -> int:
        return self._refs[ZERO_BLOB]

    def blob_scope(self, blob: int) -> int:
        return self._scope[blob]

    def live_blob_ids(self) -> list[int]:
        return [b for b in range(1, len(self._refs)) if self._refs[b]]

    def blob_hash(self, blob: int) -> int:
        return self._hash[blob]

    def dedup_members(self) -> set[int]:
        return set(self._dedup)
