"""The contract between TmemHost and a crash-consistent store of its persistent state.

A persistent put is a promise (frontswap's contract): once the host acknowledges it, the
guest drops its own copy.  So everything needed to find a persistent page again after
the agent dies at any instant — clients (name, settings, dedup scope, the agent's
per-client metadata such as the guest's boot id), every pool (ephemeral pools too, so
pool ids stay valid), persistent pages and their blobs — is written through a
:class:`PersistentLog` that TmemHost calls for every such mutation, *under its own
lock* (pages as whole radix-chunk records, written for the chunks that operations
touched just before the commit), and committed before the lock is released (or, inside
:meth:`TmemHost.deferred`, before the caller acknowledges anything).

Invariant: whenever TmemHost's lock is free and no deferral is open, the log's committed
state is exactly the persistent part of the host's in-memory state.  A crash therefore
leaves the store at the last committed operation: a flushed page, a destroyed pool or a
previous boot's pool can never come back, and an acknowledged page is always there.

Persistent blob payloads live *only* in the log (the host keeps hash, length, scope and
refcount in memory and reads the payload back on get): tmpfs is RAM, so holding them
twice would charge every persistent page twice.  Blob ids are the host's own
(PageStore ids) and are restored exactly by :func:`tmem.restore.restore`.

This module is pure: records and a ``typing.Protocol``.  The LMDB implementation is
``hypervisor.lmdb_store``; an in-memory fake for tests is ``tests/tmem/fake_log.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tmem.pages import RADIX_FANOUT

#: Pages per chunk record: one record per radix chunk of an object (tmem.pages), so a
#: batch of neighbouring pages is one write, and a restart reads 1/64 of the records.
CHUNK_PAGES = RADIX_FANOUT

#: Bit set in the dedup scope of blobs that live in the log (persistent pools of a host
#: with a log): persistent and ephemeral blobs never de-duplicate against each other.
EXTERNAL_SCOPE = 1 << 31


@dataclass(slots=True)
class ClientRecord:
    """One client as stored.  ``meta`` belongs to the agent (boot id, reboots)."""

    name: str
    scope: int
    weight: int
    cap_pages: int | None
    dedup: bool
    frozen: bool
    authorised: list[bytes] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PoolRecord:
    """One pool as stored (ephemeral pools too: their ids survive, their pages not)."""

    gid: int
    persistent: bool
    shared: bool
    uuid: bytes | None
    owner: str
    members: dict[str, int] = field(default_factory=dict)


#: One stored blob: id, xxh3-64 of its page, dedup scope, payload length.
BLOB_DTYPE = np.dtype([("blob", "<u4"), ("hash", "<u8"), ("scope", "<u4"), ("length", "<u4")])
#: One persistent page: pool gid, the three oid words, index, blob id.
PAGE_DTYPE = np.dtype(
    [("gid", "<u4"), ("o0", "<u8"), ("o1", "<u8"), ("o2", "<u8"), ("index", "<u4"), ("blob", "<u4")]
)


def _empty(dtype: np.dtype[Any]) -> Any:
    return lambda: np.zeros(0, dtype=dtype)


@dataclass(slots=True)
class StoredState:
    """Everything :meth:`PersistentLog.load` read back: records, and two structured
    arrays (a million pages must load in well under a second; ``.tolist()`` gives tuples).

    ``blobs`` (:data:`BLOB_DTYPE`): one row per stored blob.
    ``pages`` (:data:`PAGE_DTYPE`): one row per persistent page, sorted by (gid, oid,
    index) so that an object's pages are consecutive.
    ``meta``: the agent's own records (opted-out VMs, who wrote the store).
    """

    clients: list[ClientRecord] = field(default_factory=list)
    pools: list[PoolRecord] = field(default_factory=list)
    blobs: npt.NDArray[np.void] = field(default_factory=_empty(BLOB_DTYPE))
    pages: npt.NDArray[np.void] = field(default_factory=_empty(PAGE_DTYPE))
    meta: dict[str, Any] = field(default_factory=dict)


class RecordSink(Protocol):
    """Receives the records of persistent state as they change: the write half of a
    :class:`PersistentLog`, and all an observer of changes needs (``TmemHost(...,
    listeners=...)``: a migration tracking what a guest changes while it is copied).

    Called only under the TmemHost lock, in the order the changes happened, page
    records just before each commit (:class:`tmem.journal.Journal`); no method may
    call back into TmemHost.
    """

    def put_client(self, record: ClientRecord) -> None: ...

    def drop_client(self, name: str) -> None: ...

    def put_pool(self, record: PoolRecord) -> None: ...

    def drop_pool(self, gid: int) -> None:
        """Forget the pool record (its pages are dropped one by one before this)."""
        ...

    def put_chunk(
        self, gid: int, oid: tuple[int, int, int], chunk: int, entries: Sequence[tuple[int, int]]
    ) -> None:
        """The persistent pages of one radix chunk — indexes ``chunk * CHUNK_PAGES`` up
        to the next chunk — as (index, blob) pairs in index order (at least one): the
        whole chunk's record, replacing the previous one."""
        ...

    def drop_chunk(self, gid: int, oid: tuple[int, int, int], chunk: int) -> None:
        """The chunk holds no page any more."""
        ...


class PersistentLog(RecordSink, Protocol):
    """Writes are buffered by the implementation and made durable by :meth:`commit`.

    Called only under the TmemHost lock (the agent's own meta writes take the
    implementation's lock); no method may call back into TmemHost.  Blob payloads of
    persistent pages are written here by the host's PageStore, and live only here.
    """

    def put_blob(self, blob: int, h: int, scope: int, payload: bytes) -> None: ...

    def drop_blob(self, blob: int) -> None: ...

    def payload(self, blob: int) -> bytes:
        """The payload of a stored blob, including one written but not yet committed."""
        ...

    def payloads(self, blobs: Sequence[int]) -> list[bytes]:
        """:meth:`payload` of each of *blobs*, in order (one call for many reads)."""
        ...

    def commit(self) -> None:
        """Make every buffered write durable (crash-consistent) at once, or raise."""
        ...

    def bytes_used(self) -> int:
        """What the store costs the budget now: committed database pages plus an
        estimate for buffered writes."""
        ...

    def set_budget(self, budget_bytes: int) -> None:
        """The budget changed: the store sizes its map from it."""
        ...

    def load(self) -> StoredState:
        """Everything committed, for a restart or an audit."""
        ...
