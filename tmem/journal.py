"""The write side of persistence: the records TmemHost hands its PersistentLog.

Clients and pools are written as whole records whenever they change; persistent pages
as whole radix-chunk records (``tmem.durable.CHUNK_PAGES`` indexes each), rebuilt from
memory just before a commit for every chunk an operation marked dirty — so a batch of
neighbouring pages costs one or two records, and the record always says what memory
says at the commit.  :func:`tmem.audit.audit_log` builds the same records to compare.

Pure, and called with the host's lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmem.durable import ClientRecord, PersistentLog, PoolRecord

if TYPE_CHECKING:
    from tmem.host import TmemHost, _Client, _Pool


def client_record(client: _Client) -> ClientRecord:
    return ClientRecord(client.name, client.scope, client.weight, client.cap_pages,
                        client.dedup, client.frozen, sorted(client.authorised),
                        dict(client.meta))


def pool_record(pool: _Pool) -> PoolRecord:
    return PoolRecord(pool.gid, pool.persistent, pool.shared, pool.uuid, pool.owner,
                      dict(pool.members))


def write_dirty_chunks(host: TmemHost, log: PersistentLog) -> None:
    """One record per dirty chunk, as memory has it now (or its deletion if empty)."""
    pages = host._pages
    blob_col, index_col = pages.blob, pages.index
    for gid, oid, chunk_no in host._dirty:
        pool = host._pools.get(gid)
        objno = None if pool is None else pool.objects.get(oid)
        radix = None if objno is None else pages.radix[objno]
        chunk = None if radix is None else radix.get(chunk_no)
        if chunk is None:
            log.drop_chunk(gid, oid, chunk_no)
        else:
            log.put_chunk(gid, oid, chunk_no,
                          [(index_col[s], blob_col[s]) for s in chunk if s >= 0])
    host._dirty.clear()
