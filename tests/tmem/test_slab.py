"""SlabArena: blobs round-trip and emptied chunks go back to the allocator."""

from __future__ import annotations

import os

from tmem.slab import CHUNK_BYTES, GRAIN, SlabArena


def test_round_trip_every_class() -> None:
    arena = SlabArena()
    blobs = {n: os.urandom(n) for n in (1, GRAIN - 1, GRAIN, GRAIN + 1, 1000, 4095, 4096)}
    locs = {n: arena.store(b) for n, b in blobs.items()}
    for n, loc in locs.items():
        assert bytes(arena.view(loc, n)) == blobs[n]
    assert arena.live_blobs == len(blobs)
    for loc in locs.values():
        arena.free(loc)
    assert arena.used_bytes == 0 and arena.live_blobs == 0


def test_freed_elements_are_reused_and_chunks_released() -> None:
    arena = SlabArena()
    payload = b"x" * 3000  # class of 3008 bytes: 21 per chunk
    locs = [arena.store(payload) for _ in range(21 * 10)]
    assert arena.reserved_bytes == 10 * CHUNK_BYTES
    for loc in locs:
        arena.free(loc)
    # At most one chunk's worth of free elements is kept (hysteresis); the rest is freed.
    assert arena.reserved_bytes <= 2 * CHUNK_BYTES
    again = [arena.store(payload) for _ in range(21 * 10)]
    assert all(bytes(arena.view(loc, 3000)) == payload for loc in again)
    assert arena.reserved_bytes == 10 * CHUNK_BYTES
