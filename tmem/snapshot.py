"""Snapshot of a TmemHost: what survives a graceful agent restart.

A persistent put is a promise (frontswap keeps swapped-out guest memory there), so
an agent that is restarted on purpose must come back with every persistent page.
Ephemeral pages may vanish at any time by contract, so only their pools are kept.

Format (all little-endian), produced as a stream of byte chunks so that a large
store is never copied whole::

    b"MEMDTMEM" u32 version u32 header_length  header (UTF-8 JSON: clients, pools)
    then per page:  u32 pool_gid  u64 oid0 u64 oid1 u64 oid2  u32 index
                    u64 hash  u16 payload_length  payload   (the stored lz4 block)
    u32 0xFFFFFFFF  (end marker)

Pure: bytes in, bytes out; the agent owns the file.  Loading validates everything
it reads and raises InvalidArgument for a corrupt or foreign file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import lz4.block

from memd.errors import InvalidArgument
from tmem.store import decode_payload
from tmem.types import PAGE_SIZE

if TYPE_CHECKING:
    from tmem.host import TmemHost

MAGIC = b"MEMDTMEM"
VERSION = 1
_HEAD = struct.Struct("<8sII")
_PAGE = struct.Struct("<IQQQIQH")
_END = 0xFFFFFFFF


def dump(host: TmemHost, extra: dict[str, Any] | None = None) -> Iterator[bytes]:
    """Chunks of a snapshot of *host* (taken under its lock, so it is consistent)."""
    with host._lock:
        clients: list[dict[str, Any]] = []
        pools: list[dict[str, Any]] = []
        for c in host._clients.values():
            clients.append({
                "name": c.name, "weight": c.weight, "cap_pages": c.cap_pages,
                "dedup": c.dedup, "frozen": c.frozen,
                "authorised": sorted(u.hex() for u in c.authorised),
            })
        for p in host._pools.values():
            pools.append({
                "gid": p.gid, "persistent": p.persistent, "shared": p.shared,
                "uuid": p.uuid.hex() if p.uuid else None, "owner": p.owner,
                "members": p.members,
            })
        header = {"clients": clients, "pools": pools, "budget": host._budget,
                  "extra": extra or {}}
        blob = json.dumps(header).encode()
        chunks = [_HEAD.pack(MAGIC, VERSION, len(blob)), blob]
        pages, store = host._pages, host._store
        for pool in host._pools.values():
            if not pool.persistent:
                continue
            for oid, objno in pool.objects.items():
                for slot in pages.object_slots(objno):
                    b = pages.blob[slot]
                    payload = store.payload(b)
                    h = store.blob_hash(b) if payload else 0
                    chunks.append(_PAGE.pack(pool.gid, *oid, pages.index[slot], h,
                                             len(payload)))
                    chunks.append(payload)
        chunks.append(struct.pack("<I", _END))
    yield from chunks


def read_extra(data: bytes) -> dict[str, Any]:
    """The header's ``extra`` alone (who wrote the snapshot), without loading any page."""
    try:
        magic, version, hlen = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise InvalidArgument("not a memd tmem snapshot (or from another version)",
                                  op="load_snapshot")
        header = json.loads(bytes(data[_HEAD.size:_HEAD.size + hlen]))
        return dict(header.get("extra") or {})
    except (struct.error, ValueError, TypeError, AttributeError) as err:
        raise InvalidArgument(f"corrupt tmem snapshot: {err}", op="load_snapshot") from err


def load(host: TmemHost, chunks: Iterable[bytes]) -> dict[str, Any]:
    """Restore a snapshot into an empty *host*; return the header's ``extra``."""
    data = memoryview(b"".join(chunks))
    try:
        magic, version, hlen = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise InvalidArgument("not a memd tmem snapshot (or from another version)",
                                  op="load_snapshot")
        header = json.loads(bytes(data[_HEAD.size:_HEAD.size + hlen]))
        pos = _HEAD.size + hlen
        gids = _restore_tables(host, header)
        while True:
            (first,) = struct.unpack_from("<I", data, pos)
            if first == _END:
                break
            gid, o0, o1, o2, index, _h, n = _PAGE.unpack_from(data, pos)
            pos += _PAGE.size
            if n > PAGE_SIZE or pos + n > len(data):
                raise InvalidArgument("truncated snapshot", op="load_snapshot")
            page = decode_payload(bytes(data[pos:pos + n]))
            pos += n
            owner, local = gids[gid]
            host.put(owner, local, (o0, o1, o2), index, page)
        for c in header["clients"]:  # last: a frozen client refuses the puts above
            if c["frozen"]:
                host.freeze(c["name"])
    except (struct.error, ValueError, KeyError, TypeError, lz4.block.LZ4BlockError) as err:
        raise InvalidArgument(f"corrupt tmem snapshot: {err}", op="load_snapshot") from err
    extra = header.get("extra") or {}
    return dict(extra)


def _restore_tables(host: TmemHost, header: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Recreate clients and pools; map each saved pool gid to (owner, its local id)."""
    host.set_budget(int(header["budget"]))
    for c in header["clients"]:
        host.add_client(c["name"], weight=int(c["weight"]), cap_pages=c["cap_pages"],
                        dedup=bool(c["dedup"]))
        for u in c["authorised"]:
            host.authorize_shared(c["name"], bytes.fromhex(u))
    gids: dict[int, tuple[str, int]] = {}
    for p in header["pools"]:
        flags = (1 if p["persistent"] else 0) | (2 if p["shared"] else 0)
        uuid = bytes.fromhex(p["uuid"]) if p["uuid"] else None
        owner = p["owner"]
        members: dict[str, int] = p["members"]
        # The owner first, so it owns the pool again; each member at its old local id.
        for name in sorted(members, key=lambda m: m != owner):
            local = host.new_pool_at(name, members[name], flags, uuid)
            if name == owner:
                gids[int(p["gid"])] = (name, local)
    return gids

