"""The write side of persistence: the one place TmemHost reports changes of state.

Overview
--------
Every change to persistent state — a client's settings, a pool, a persistent page —
goes through one :class:`Journal`, which hands records to its *sinks*: the host's
:class:`~tmem.durable.PersistentLog`, if it has one, then any change listeners given
at construction (:class:`~tmem.durable.RecordSink`; e.g. a migration tracking what a
guest changes while it is being copied).  Clients and pools are written as whole
records whenever they change; persistent pages as whole radix-chunk records
(``tmem.durable.CHUNK_PAGES`` indexes each), rebuilt from memory just before a commit
for every chunk an operation marked dirty — so a batch of neighbouring pages costs
one or two records, and the record always says what memory says at the commit.
:func:`tmem.audit.audit_log` builds the same records to compare.

With neither a log nor a listener the journal is idle (``tracking`` is False) and
the put path does not even mark chunks.

The journal also owns *group commit* (:meth:`TmemHost.deferred`): which thread holds
commits back, and how deeply.

Locking
-------
Pure, and every field is guarded by the host's ``TmemHost._lock``, which every caller
holds; sinks are called with it held and must not call back into the host.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import TYPE_CHECKING

from tmem.durable import ClientRecord, PersistentLog, PoolRecord, RecordSink
from tmem.pages import PageTable
from tmem.types import Oid

if TYPE_CHECKING:
    from tmem.state import Client, Pool


def client_record(client: Client) -> ClientRecord:
    return ClientRecord(
        client.name,
        client.scope,
        client.weight,
        client.cap_pages,
        client.dedup,
        client.frozen,
        sorted(client.authorised),
        dict(client.meta),
    )


def pool_record(pool: Pool) -> PoolRecord:
    return PoolRecord(
        pool.gid, pool.persistent, pool.shared, pool.uuid, pool.owner, dict(pool.members)
    )


class Journal:
    """Records of persistent state, fanned out to the log and the listeners."""

    def __init__(
        self,
        log: PersistentLog | None,
        listeners: Collection[RecordSink],
        pages: PageTable,
        pools: dict[int, Pool],
    ) -> None:
        # Wiring, fixed here.  Sinks hear each change in order, the log first; page
        # records come just before the log's commit (a failed commit raises to the
        # operation's caller, after the listeners heard it).
        self._log = log
        self._sinks: tuple[RecordSink, ...] = (() if log is None else (log,)) + tuple(listeners)
        #: Whether anything records changes; when False every method is a no-op.
        self.tracking = bool(self._sinks)
        self._pages = pages
        self._pools = pools
        #: Radix chunks of persistent objects changed since the last commit:
        #: (pool gid, oid, chunk number); written to the sinks just before the commit.
        self.dirty: set[tuple[int, Oid, int]] = set()
        #: Thread that holds a deferred section, and how deeply.
        self._deferring: int | None = None
        self._defer_depth = 0

    # -- records ---------------------------------------------------------------------------

    def reports_to(self, sink: object) -> bool:
        """Whether *sink* (the log or a listener) hears this host's changes."""
        return any(s is sink for s in self._sinks)

    def client_changed(self, client: Client) -> None:
        if self.tracking:
            record = client_record(client)
            for sink in self._sinks:
                sink.put_client(record)

    def client_dropped(self, name: str) -> None:
        for sink in self._sinks:
            sink.drop_client(name)

    def pool_changed(self, pool: Pool) -> None:
        if self.tracking:
            record = pool_record(pool)
            for sink in self._sinks:
                sink.put_pool(record)

    def pool_dropped(self, gid: int) -> None:
        for sink in self._sinks:
            sink.drop_pool(gid)

    # -- commits ---------------------------------------------------------------------------

    def hold(self) -> None:
        """This thread defers commits (nests); another thread holding them is a bug."""
        me = threading.get_ident()
        if self._deferring not in (None, me):
            raise RuntimeError("deferred commits are for one acknowledging thread")
        self._deferring = me
        self._defer_depth += 1

    def release(self) -> bool:
        """End one :meth:`hold`.  → whether it was the outermost (time to commit)."""
        assert self._deferring == threading.get_ident() and self._defer_depth > 0
        self._defer_depth -= 1
        if self._defer_depth:
            return False
        self._deferring = None
        return True

    def commit_due(self) -> bool:
        """Whether an operation ending now on this thread must commit."""
        return self.tracking and self._deferring != threading.get_ident()

    def commit(self) -> None:
        """Write the dirty chunks' records from memory, then commit the log."""
        if self.dirty:
            self._write_dirty_chunks()
        if self._log is not None:
            self._log.commit()

    def _write_dirty_chunks(self) -> None:
        """One record per dirty chunk, as memory has it now (or its deletion if empty)."""
        pages, sinks = self._pages, self._sinks
        blob_col, index_col = pages.blob, pages.index
        for gid, oid, chunk_no in self.dirty:
            pool = self._pools.get(gid)
            objno = None if pool is None else pool.objects.get(oid)
            radix = None if objno is None else pages.radix[objno]
            chunk = None if radix is None else radix.get(chunk_no)
            if chunk is None:
                for sink in sinks:
                    sink.drop_chunk(gid, oid, chunk_no)
            else:
                entries = [(index_col[s], blob_col[s]) for s in chunk if s >= 0]
                for sink in sinks:
                    sink.put_chunk(gid, oid, chunk_no, entries)
        self.dirty.clear()
