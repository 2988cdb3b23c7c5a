"""LmdbStore: the crash-consistent store of persistent tmem state (a PersistentLog).

LMDB is a copy-on-write B+tree in one memory-mapped file with one writer: after the
process dies at any instant the file holds exactly the last committed transaction.
``sync=False`` (the default here) keeps that guarantee against any crash of the agent
and gives up only power-loss durability; ``durable=True`` fsyncs every commit.
``writemap`` stays off: measured here it is no faster on tmpfs for this write mix
(fresh pages fault in through the map), and a stray write cannot reach the file.  The
default directory is on tmpfs (``$MEMD_RUN_DIR/store``): it survives the agent and dies
with the host, like the guests whose pages it holds.

Layout (named sub-databases; integers big-endian in keys so that they sort):

=========== ==================================== =========================================
database    key                                  value
=========== ==================================== =========================================
``meta``    name (utf-8)                         JSON: ``format``, ``writer`` (host boot id,
                                                 control socket, pid, durable), agent records
``clients`` client name (utf-8)                  JSON: scope, weight, cap, dedup, frozen,
                                                 authorised UUIDs, the agent's meta
``pools``   u32 gid                              JSON: kind, uuid, owner, members
``pages``   u32 gid, u64 oid ×3, u32 chunk       u64 bitmap of the chunk's 64 indexes,
            (index // 64)                        then a u32 blob id per set bit (LE)
``blobs``   u32 blob id                          u64 xxh3, u32 scope (little-endian),
                                                 then the payload
=========== ==================================== =========================================

Refcounts and every counter are recomputed at reopen (``tmem.restore``), so a put
writes the record of its radix chunk (one per 64 neighbouring pages: a batch is one
or two records) and, for new content only, one blob record.

Writes are buffered (``_pending``) while TmemHost runs an operation and applied in one
write transaction by :meth:`commit`; a buffered blob's payload is served from
``_pending_blobs`` until then.  The map size follows the budget (``budget + slack``,
see :func:`map_size_for`); a commit that hits MDB_MAP_FULL grows the map up to
``2 × budget + slack`` and is replayed from the buffer, beyond that it fails with
NoSpace.  :meth:`bytes_used` is the database pages really in use after the last commit
(branch + leaf + overflow of every sub-database; free-list pages are reusable and not
counted) plus an estimate for buffered writes.

Locking: ``_lock`` guards the buffer, the counters and every use of ``env``, including
the read transaction kept for payload reads (replaced after each commit: LMDB's
set_mapsize needs no transaction open in the process).  TmemHost calls in with its own
lock held (order: host lock, then ``_lock``); the agent's meta writes take ``_lock``
alone.  One store directory serves one agent: an ``flock`` on ``memd.lock`` refuses a
second one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
from array import array
from collections.abc import Sequence
from itertools import groupby, islice
from operator import itemgetter, lt
from pathlib import Path
from typing import Any, cast

import lmdb
import numpy as np
import numpy.typing as npt

from memd import paths
from memd.errors import BackendError, NoSpace
from tmem.durable import (
    BLOB_DTYPE,
    CHUNK_PAGES,
    PAGE_DTYPE,
    ClientRecord,
    PoolRecord,
    StoredState,
)

log = logging.getLogger("memd.store")

FORMAT = 1
PSIZE = 4096
#: Room above the budget for B+tree fill (half-full pages after splits), branch pages and
#: the free list; see docs/tmem.md.
MIN_SLACK = 64 << 20
_PAGE_KEY = struct.Struct(">IQQQI")
_BLOB_KEY = struct.Struct(">I")
_BLOB_HEAD = struct.Struct("<QI")
_U64 = struct.Struct("<Q")
#: Largest node LMDB keeps inside a 4 KiB leaf page; bigger values go to overflow pages.
_NODE_MAX = ((PSIZE - 16) // 2 & -2) - 2
_CHUNK_RECORD_COST = 8 + _PAGE_KEY.size + 8 + 2
_KEY_DTYPE = np.dtype(
    [("gid", ">u4"), ("o0", ">u8"), ("o1", ">u8"), ("o2", ">u8"), ("chunk", ">u4")]
)
_HEAD_DTYPE = np.dtype([("hash", "<u8"), ("scope", "<u4")])


def _expand_chunks(keys: list[bytes], values: list[bytes]) -> npt.NDArray[np.void]:
    """Chunk records → one PAGE_DTYPE row per page, in key order (vectorised)."""
    cols = np.frombuffer(b"".join(keys), dtype=_KEY_DTYPE)
    bitmaps = np.frombuffer(b"".join(v[:8] for v in values), dtype="<u8")
    blob_ids = np.frombuffer(b"".join(v[8:] for v in values), dtype="<u4")
    # Bit i of a chunk's bitmap is index chunk * 64 + i; nonzero() walks row-major, that
    # is by record and then by index: the order the blob ids are stored in.
    bits = np.unpackbits(bitmaps.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    record, bit = np.nonzero(bits)
    if len(record) != len(blob_ids):
        raise BackendError("tmem store: a page chunk record is corrupt")
    pages = np.zeros(len(record), dtype=PAGE_DTYPE)
    for name in ("gid", "o0", "o1", "o2"):
        pages[name] = cols[name][record]
    pages["index"] = cols["chunk"][record].astype(np.uint32) * CHUNK_PAGES + bit
    pages["blob"] = blob_ids
    return pages


def map_size_for(budget_bytes: int) -> int:
    """The LMDB map size for a budget: budget plus slack, in whole MiB."""
    size = budget_bytes + max(MIN_SLACK, budget_bytes // 4)
    return (size + (1 << 20) - 1) & ~((1 << 20) - 1)


#: blob_cost's constants: the longest payload kept inside a leaf page, and overheads.
_INLINE_EXTRA = _BLOB_HEAD.size + 8 + _BLOB_KEY.size + 2
_INLINE_MAX = _NODE_MAX - 8 - _BLOB_KEY.size - _BLOB_HEAD.size
_OVERFLOW_EXTRA = _BLOB_HEAD.size + 16


def blob_cost(length: int) -> int:
    """Database bytes a blob record of a *length*-byte payload takes (estimate)."""
    value = _BLOB_HEAD.size + length
    node = 8 + _BLOB_KEY.size + value
    if node <= _NODE_MAX:
        return node + 2
    return -(-(value + 16) // PSIZE) * PSIZE  # overflow pages, 16-byte header each run


class LmdbStore:
    """A PersistentLog on LMDB (see the module docstring for the layout and locking)."""

    def __init__(
        self,
        path: str | Path,
        *,
        budget_bytes: int,
        durable: bool = False,
        control_path: str | None = None,
        host_boot_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.durable = durable
        if host_boot_id is None:
            host_boot_id = paths.host_boot_id()
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lockfd = os.open(self.path / "memd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            raise BackendError(
                f"tmem store {self.path} is in use by another memd agent; "
                "give this one its own --store",
                target=str(self.path),
            ) from None
        self._lock = threading.Lock()
        self._budget = budget_bytes
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size_for(budget_bytes),
            max_dbs=8,
            writemap=False,
            sync=durable,
            metasync=durable,
            readahead=False,
            meminit=False,
            lock=True,
        )
        names = ("meta", "clients", "pools", "pages", "blobs")
        self._meta, self._clients, self._pools, self._pages, self._blobs = (
            self.env.open_db(n.encode()) for n in names
        )
        self._dbs = (self._meta, self._clients, self._pools, self._pages, self._blobs)
        # Buffered writes: (database, key, value or None for a delete), in order.
        self._pending: list[tuple[Any, bytes, bytes | None]] = []
        self._pending_blobs: dict[int, bytes | None] = {}
        self._pending_bytes = 0
        self._committed_bytes = 0
        self._db_pages: dict[Any, int] = {}  # database pages in use, per sub-database
        self.commits = 0
        # Keys above the highest key ever stored are appended (LMDB then fills pages
        # fully instead of splitting them in half).  ``_top`` is at least the highest key
        # in the database: it only grows (deletes leave it), so an append is never refused.
        self._top: dict[Any, bytes] = {}
        #: A read transaction kept for payload reads, replaced after every commit (a
        #: fresh one per read costs more than the read); None while a commit runs.  It
        #: hands out buffers into the map, valid only until its next use: each read copies
        #: its payload out (once) before letting go of ``_lock``.
        self._reader: lmdb.Transaction | None = None
        try:
            self._check_owner(control_path, host_boot_id)
        except BaseException:
            self.close()
            raise
        self._reader = self._begin_reader()

    # -- opening ---------------------------------------------------------------------------

    def _check_owner(self, control_path: str | None, host_boot_id: str) -> None:
        """Refuse another agent's store; discard one from before a host reboot, unless
        it was written --durable and is opened so again (then it is intact after a power
        loss too; each guest's pools go at its next HELLO, under its new boot id)."""
        meta = self.meta()
        writer = dict(meta.get("writer") or {})
        if meta and meta.get("format") != FORMAT:
            raise BackendError(
                f"tmem store {self.path} has format {meta.get('format')}, this memd reads {FORMAT}",
                target=str(self.path),
            )
        if (
            writer
            and writer.get("control")
            and control_path
            and (writer["control"] != control_path)
        ):
            raise BackendError(
                f"tmem store {self.path} belongs to the agent serving {writer['control']}, "
                f"not to this one ({control_path}): give this agent its own --store",
                target=str(self.path),
            )
        with self._lock, self.env.begin(write=True) as txn:
            durable = bool(writer.get("durable")) and self.durable
            if writer and writer.get("host_boot_id") != host_boot_id and not durable:
                log.warning(
                    "tmem store %s was written before the host rebooted: its guests "
                    "are gone, starting empty",
                    self.path,
                    extra={"event": "store-discarded"},
                )
                for db in self._dbs:
                    txn.drop(db, delete=False)
            record = {
                "host_boot_id": host_boot_id,
                "control": control_path,
                "pid": os.getpid(),
                "durable": self.durable,
            }
            txn.put(b"format", json.dumps(FORMAT).encode(), db=self._meta)
            txn.put(b"writer", json.dumps(record).encode(), db=self._meta)
            for db in (self._pages, self._blobs):
                cursor = txn.cursor(db=db)
                self._top[db] = cursor.key() if cursor.last() else b""
            self._db_pages = {db: self._pages_of(txn, db) for db in self._dbs}
            self._committed_bytes = sum(self._db_pages.values()) * PSIZE

    def _begin_reader(self) -> lmdb.Transaction:
        return self.env.begin(db=self._blobs, buffers=True)

    def _end_reader(self) -> bool:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.abort()
        return reader is not None

    def close(self) -> None:
        with self._lock:
            self._end_reader()
            self.env.close()
            os.close(self._lockfd)

    # -- PersistentLog: writes (buffered) --------------------------------------------------

    def put_client(self, record: ClientRecord) -> None:
        value = {
            "scope": record.scope,
            "weight": record.weight,
            "cap": record.cap_pages,
            "dedup": record.dedup,
            "frozen": record.frozen,
            "authorised": [u.hex() for u in record.authorised],
            "meta": record.meta,
        }
        self._pending.append((self._clients, record.name.encode(), json.dumps(value).encode()))

    def drop_client(self, name: str) -> None:
        self._pending.append((self._clients, name.encode(), None))

    def put_pool(self, record: PoolRecord) -> None:
        value = {
            "persistent": record.persistent,
            "shared": record.shared,
            "uuid": record.uuid.hex() if record.uuid else None,
            "owner": record.owner,
            "members": record.members,
        }
        self._pending.append((self._pools, _BLOB_KEY.pack(record.gid), json.dumps(value).encode()))

    def drop_pool(self, gid: int) -> None:
        self._pending.append((self._pools, _BLOB_KEY.pack(gid), None))

    def put_blob(self, blob: int, h: int, scope: int, payload: bytes) -> None:
        self._pending.append(
            (self._blobs, _BLOB_KEY.pack(blob), _BLOB_HEAD.pack(h, scope) + payload)
        )
        self._pending_blobs[blob] = payload
        n = len(payload)  # blob_cost(n), inline: this is the put path
        self._pending_bytes += (
            n + _INLINE_EXTRA if n <= _INLINE_MAX else (n + _OVERFLOW_EXTRA + PSIZE - 1) & -PSIZE
        )

    def drop_blob(self, blob: int) -> None:
        self._pending.append((self._blobs, _BLOB_KEY.pack(blob), None))
        self._pending_blobs[blob] = None

    def put_chunk(
        self, gid: int, oid: tuple[int, int, int], chunk: int, entries: Sequence[tuple[int, int]]
    ) -> None:
        bitmap = 0
        base = chunk * CHUNK_PAGES
        for index, _ in entries:
            bitmap |= 1 << (index - base)
        value = _U64.pack(bitmap) + array("I", [blob for _, blob in entries]).tobytes()
        self._pending.append((self._pages, _PAGE_KEY.pack(gid, *oid, chunk), value))
        self._pending_bytes += _CHUNK_RECORD_COST + 4 * len(entries)

    def drop_chunk(self, gid: int, oid: tuple[int, int, int], chunk: int) -> None:
        self._pending.append((self._pages, _PAGE_KEY.pack(gid, *oid, chunk), None))

    # -- PersistentLog: reads, commit, accounting ------------------------------------------

    def payload(self, blob: int) -> bytes:
        pending = self._pending_blobs.get(blob, b"")
        if pending:
            return pending
        with self._lock:
            assert self._reader is not None
            value = self._reader.get(_BLOB_KEY.pack(blob))
            if value is None:
                raise BackendError(f"tmem store: blob {blob} is missing", target=str(self.path))
            return cast(memoryview, value)[_BLOB_HEAD.size :].tobytes()  # buffers=True

    def payloads(self, blobs: Sequence[int]) -> list[bytes]:
        """:meth:`payload` of each blob, in one hold of the lock (a migration reads a
        few thousand at a time)."""
        pending = self._pending_blobs
        key, head = _BLOB_KEY.pack, _BLOB_HEAD.size
        out: list[bytes] = []
        with self._lock:
            assert self._reader is not None
            get = self._reader.get
            for blob in blobs:
                data = pending.get(blob)
                if not data:
                    value = get(key(blob))
                    if value is None:
                        raise BackendError(
                            f"tmem store: blob {blob} is missing", target=str(self.path)
                        )
                    data = cast(memoryview, value)[head:].tobytes()
                out.append(data)
        return out

    def commit(self) -> None:
        with self._lock:
            if not self._pending:
                return
            self._end_reader()  # no transaction may be open when the map grows
            try:
                while True:
                    try:
                        self._apply()
                        break
                    except lmdb.MapFullError:
                        self._grow()
            finally:
                self._reader = self._begin_reader()
            self._pending = []
            self._pending_blobs.clear()
            self._pending_bytes = 0
            self.commits += 1

    def _apply(self) -> None:
        """One write transaction with every buffered write (aborted whole on error)."""
        top = self._top
        with self.env.begin(write=True) as txn:
            # Runs of puts to one database go through putmulti (a loop in C); a run whose
            # keys ascend above every stored key is appended (pages filled, not split).
            # Grouped by database first (a C key function: a migration buffers ~100k
            # writes a second), then, only in a run holding deletes, by kind.
            touched = set()
            for db, writes in groupby(self._pending, key=itemgetter(0)):
                touched.add(db)
                items = [(key, value) for _, key, value in writes]
                if None not in map(itemgetter(1), items):
                    self._put_run(txn, db, items, top)
                    continue
                for is_put, run in groupby(items, key=lambda kv: kv[1] is not None):
                    if is_put:
                        self._put_run(txn, db, list(run), top)
                    else:
                        for key, _ in run:
                            txn.delete(key, db=db)
            for db in touched:
                self._db_pages[db] = self._pages_of(txn, db)
        self._committed_bytes = sum(self._db_pages.values()) * PSIZE

    @staticmethod
    def _put_run(
        txn: lmdb.Transaction, db: Any, items: list[tuple[bytes, Any]], top: dict[Any, bytes]
    ) -> None:
        if db not in top:
            txn.cursor(db=db).putmulti(items)
            return
        keys = [k for k, _ in items]
        ascending = keys[0] > top[db] and all(map(lt, keys, islice(keys, 1, None)))
        _, added = txn.cursor(db=db).putmulti(items, append=ascending)
        if added != len(items):
            # MDB_APPEND skips (silently) a key that is not above the last one:
            # never expected, since ``top`` only grows, but never a lost write.
            log.error(
                "tmem store: append refused %d of %d keys; rewritten",
                len(items) - added,
                len(items),
            )
            txn.cursor(db=db).putmulti(items)
        top[db] = max(top[db], keys[-1] if ascending else max(keys))  # every put

    def _grow(self) -> None:
        current = self.env.info()["map_size"]
        ceiling = 2 * self._budget + map_size_for(0)
        if current >= ceiling:
            log.critical(
                "tmem store %s is full at %d bytes: persistent state in memory is "
                "ahead of the store until guests flush",
                self.path,
                current,
            )
            raise NoSpace(f"tmem store {self.path} is full ({current >> 20} MiB)", op="commit")
        self.env.set_mapsize(min(ceiling, current + current // 4 + (16 << 20)))

    @staticmethod
    def _pages_of(txn: lmdb.Transaction, db: Any) -> int:
        st = txn.stat(db)
        return int(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])

    def bytes_used(self) -> int:
        return max(0, self._committed_bytes + self._pending_bytes)

    def set_budget(self, budget_bytes: int) -> None:
        with self._lock:
            self._budget = budget_bytes
            used = (self.env.info()["last_pgno"] + 1) * PSIZE
            had_reader = self._end_reader()
            self.env.set_mapsize(max(map_size_for(budget_bytes), used))
            if had_reader:
                self._reader = self._begin_reader()

    def file_bytes(self) -> int:
        """Bytes of the data file the database spans (its high-water mark)."""
        with self._lock:
            return int((self.env.info()["last_pgno"] + 1) * PSIZE)

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> StoredState:
        state = StoredState()
        blob_keys: list[bytes] = []
        heads: list[bytes] = []
        lengths: list[int] = []
        page_keys: list[bytes] = []
        page_values: list[bytes] = []
        with self._lock, self.env.begin(buffers=True) as txn:
            state.meta = {
                bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor(db=self._meta)
            }
            for k, v in txn.cursor(db=self._clients):
                c = json.loads(bytes(v))
                state.clients.append(
                    ClientRecord(
                        bytes(k).decode(),
                        int(c["scope"]),
                        int(c["weight"]),
                        c["cap"],
                        bool(c["dedup"]),
                        bool(c["frozen"]),
                        [bytes.fromhex(u) for u in c["authorised"]],
                        dict(c["meta"]),
                    )
                )
            for k, v in txn.cursor(db=self._pools):
                p = json.loads(bytes(v))
                state.pools.append(
                    PoolRecord(
                        _BLOB_KEY.unpack(k)[0],
                        bool(p["persistent"]),
                        bool(p["shared"]),
                        bytes.fromhex(p["uuid"]) if p["uuid"] else None,
                        str(p["owner"]),
                        {str(m): int(i) for m, i in p["members"].items()},
                    )
                )
            # Blobs: only the key and the 12-byte head of each value are copied out.
            head = _BLOB_HEAD.size
            for k, v in txn.cursor(db=self._blobs):
                blob_keys.append(bytes(k))
                heads.append(bytes(v[:head]))
                lengths.append(len(v) - head)
            for k, v in txn.cursor(db=self._pages):
                page_keys.append(bytes(k))
                page_values.append(bytes(v))
        if blob_keys:
            cols = np.frombuffer(b"".join(heads), dtype=_HEAD_DTYPE)
            blobs = np.zeros(len(blob_keys), dtype=BLOB_DTYPE)
            blobs["blob"] = np.frombuffer(b"".join(blob_keys), dtype=">u4")
            blobs["hash"], blobs["scope"] = cols["hash"], cols["scope"]
            blobs["length"] = lengths
            state.blobs = blobs
        if page_keys:
            state.pages = _expand_chunks(page_keys, page_values)
        return state

    # -- the agent's own records -----------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        with self._lock, self.env.begin(db=self._meta) as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor()}

    def put_meta(self, key: str, value: Any) -> None:
        """Write one agent record now (its own transaction)."""
        with self._lock, self.env.begin(write=True, db=self._meta) as txn:
            txn.put(key.encode(), json.dumps(value).encode())
