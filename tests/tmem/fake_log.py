"""An in-memory PersistentLog for unit tests: committed dicts plus a pending buffer.

``crashed()`` is what a store would hold after the process died right now: the
committed state only, as a fresh log (pending writes lost, exactly like a process
killed before its transaction committed).  ``fail_next_commit`` makes the next commit
raise, after which the pending writes stay pending.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from tmem.durable import BLOB_DTYPE, PAGE_DTYPE, ClientRecord, PoolRecord, StoredState

_PAGE_COST = 64
_BLOB_COST = 32

Key = tuple[int, int, int, int, int]


class FakeLog:
    """Not thread-safe by itself: TmemHost calls it under its lock."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientRecord] = {}
        self.pools: dict[int, PoolRecord] = {}
        self.blobs: dict[int, tuple[int, int, bytes]] = {}
        self.chunks: dict[Key, list[tuple[int, int]]] = {}
        self.meta: dict[str, Any] = {}
        self.pending: list[tuple[str, Any, Any]] = []
        self._pending_blobs: dict[int, bytes | None] = {}
        self._pending_bytes = 0
        self.commits = 0
        self.budget = 0
        self.fail_next_commit = False

    # -- PersistentLog ---------------------------------------------------------------------

    def put_client(self, record: ClientRecord) -> None:
        self.pending.append(("client", record.name, copy.deepcopy(record)))

    def drop_client(self, name: str) -> None:
        self.pending.append(("client", name, None))

    def put_pool(self, record: PoolRecord) -> None:
        self.pending.append(("pool", record.gid, copy.deepcopy(record)))

    def drop_pool(self, gid: int) -> None:
        self.pending.append(("pool", gid, None))

    def put_blob(self, blob: int, h: int, scope: int, payload: bytes) -> None:
        self.pending.append(("blob", blob, (h, scope, payload)))
        self._pending_blobs[blob] = payload
        self._pending_bytes += len(payload) + _BLOB_COST

    def drop_blob(self, blob: int) -> None:
        self.pending.append(("blob", blob, None))
        self._pending_blobs[blob] = None

    def put_chunk(
        self, gid: int, oid: tuple[int, int, int], chunk: int, entries: Sequence[tuple[int, int]]
    ) -> None:
        assert entries and all(i >> 6 == chunk for i, _ in entries)
        self.pending.append(("chunk", (gid, *oid, chunk), list(entries)))
        self._pending_bytes += _PAGE_COST * len(entries)

    def drop_chunk(self, gid: int, oid: tuple[int, int, int], chunk: int) -> None:
        self.pending.append(("chunk", (gid, *oid, chunk), None))

    def payload(self, blob: int) -> bytes:
        if blob in self._pending_blobs:
            data = self._pending_blobs[blob]
            assert data is not None, f"blob {blob} was dropped"
            return data
        return self.blobs[blob][2]

    def payloads(self, blobs: Sequence[int]) -> list[bytes]:
        return [self.payload(b) for b in blobs]

    def commit(self) -> None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise OSError("injected commit failure")
        if not self.pending:
            return
        tables: dict[str, dict[Any, Any]] = {
            "client": self.clients,
            "pool": self.pools,
            "blob": self.blobs,
            "chunk": self.chunks,
        }
        for kind, key, value in self.pending:
            table = tables[kind]
            if value is None and kind != "chunk":
                del table[key]  # a drop of something absent is a host bug: fail loudly
            elif value is None:
                table.pop(key, None)  # a chunk the same commit created and emptied
            else:
                table[key] = value
        self.pending.clear()
        self._pending_blobs.clear()
        self._pending_bytes = 0
        self.commits += 1

    def bytes_used(self) -> int:
        committed = sum(len(p) + _BLOB_COST for _, _, p in self.blobs.values())
        pages = sum(len(e) for e in self.chunks.values())
        return committed + pages * _PAGE_COST + self._pending_bytes

    def set_budget(self, budget_bytes: int) -> None:
        self.budget = budget_bytes

    def load(self) -> StoredState:
        return StoredState(
            clients=[copy.deepcopy(c) for c in self.clients.values()],
            pools=[copy.deepcopy(p) for p in self.pools.values()],
            blobs=np.array(
                sorted((b, h, s, len(p)) for b, (h, s, p) in self.blobs.items()), dtype=BLOB_DTYPE
            ),
            pages=np.array(
                sorted(
                    (*k[:4], index, blob)
                    for k, entries in self.chunks.items()
                    for index, blob in entries
                ),
                dtype=PAGE_DTYPE,
            ),
            meta=dict(self.meta),
        )

    # -- for tests -------------------------------------------------------------------------

    def crashed(self) -> FakeLog:
        """A new log holding only what was committed (the process died now)."""
        other = FakeLog()
        other.clients = copy.deepcopy(self.clients)
        other.pools = copy.deepcopy(self.pools)
        other.blobs = dict(self.blobs)
        other.chunks = copy.deepcopy(self.chunks)
        other.meta = dict(self.meta)
        return other
