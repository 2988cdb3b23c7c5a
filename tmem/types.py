"""tmem vocabulary: limits, pool flags, handles, argument validation and stats records.

A *handle* is (pool id, object id, index): the pool id is local to a client (0 ..
``MAX_POOLS_PER_CLIENT``-1), the object id is 192 bits carried as three unsigned
64-bit words, the index is an unsigned 32-bit page number within the object.
Guests are untrusted, so every part is range-checked here before it reaches a
structure (Xen's tmem had a security advisory for missing exactly these checks).
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, fields
from typing import Any

from memd.errors import InvalidArgument

# Re-exported: tmem's callers name the shared vocabulary from here.
from memd.vocab import MAX_BATCH as MAX_BATCH
from memd.vocab import PAGE_SIZE as PAGE_SIZE
from memd.vocab import Oid as Oid
from memd.vocab import PoolFlag as PoolFlag

MAX_POOLS_PER_CLIENT = 16
MAX_INDEX = (1 << 32) - 1
MAX_OID_WORD = (1 << 64) - 1
DEFAULT_WEIGHT = 100

#: A page's contents as tmem's put pipeline takes them: PAGE_SIZE bytes, or a buffer of
#: them (the agent passes views of the frame it decoded, not copies).  Nobody may write
#: to a buffer while a put runs, and tmem keeps no reference to it after the call: what
#: it stores is a compressed copy, or ``bytes`` of the page.
PageBuffer = bytes | bytearray | memoryview


def check_oid(oid: Any, op: str) -> Oid:
    """Return *oid* as a validated 3-tuple of u64 words, or raise InvalidArgument."""
    if type(oid) is tuple and len(oid) == 3:
        a, b, c = oid
        if (
            type(a) is int is type(b) is type(c)
            and 0 <= a <= MAX_OID_WORD
            and 0 <= b <= MAX_OID_WORD
            and 0 <= c <= MAX_OID_WORD
        ):
            return oid
    raise InvalidArgument(f"{op}: object id must be three unsigned 64-bit words", op=op)


def check_index(index: Any, op: str) -> int:
    if type(index) is not int or not 0 <= index <= MAX_INDEX:
        raise InvalidArgument(f"{op}: page index must be an unsigned 32-bit integer", op=op)
    return index


def check_page(page: Any, op: str) -> bytes:
    if type(page) is bytes and len(page) == PAGE_SIZE:
        return page
    if isinstance(page, bytes | bytearray | memoryview) and len(page) == PAGE_SIZE:
        return bytes(page)
    raise InvalidArgument(f"{op}: a page must be exactly {PAGE_SIZE} bytes", op=op)


def check_weight(weight: object) -> None:
    if type(weight) is not int or not 1 <= weight <= 1_000_000:
        raise InvalidArgument("weight must be an integer in 1..1000000", op="set_weight")


def check_cap(cap: object) -> None:
    if cap is not None and (type(cap) is not int or cap < 0):
        raise InvalidArgument("cap must be a non-negative page count or None", op="set_cap")


def uuid_bytes(value: object, op: str) -> bytes:
    """A shared pool's UUID as 16 bytes, from bytes or a ``uuid.UUID``."""
    if isinstance(value, uuidlib.UUID):
        return value.bytes
    if isinstance(value, bytes) and len(value) == 16:
        return value
    raise InvalidArgument("a shared pool needs a 16-byte UUID", op=op)


@dataclass(slots=True)
class OpCounters:
    """Operation counters, kept per pool and summed per client.

    ``puts`` counts every put attempt; ``good_puts`` those that stored the page;
    ``dup_puts`` puts that replaced a page already at that handle; ``found_gets`` gets
    that returned data; ``flushes`` pages removed by flush page/object/pool;
    ``evictions`` ephemeral pages reclaimed by the host; ``no_space`` puts refused with
    NoSpace (the client's cap or the whole store full: what a guest sees as NO_SPACE).
    """

    puts: int = 0
    good_puts: int = 0
    dup_puts: int = 0
    gets: int = 0
    found_gets: int = 0
    flushes: int = 0
    flush_objects: int = 0
    evictions: int = 0
    no_space: int = 0

    def add(self, other: OpCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _flatten_ops(stats: PoolStats | ClientStats) -> dict[str, Any]:
    """A stats record as one flat dict: its fields plus its OpCounters' fields."""
    d = {f.name: getattr(stats, f.name) for f in fields(stats) if f.name != "ops"}
    d.update(stats.ops.to_dict())
    return d


@dataclass(slots=True)
class PoolStats:
    client: str
    pool_id: int
    kind: str  # "ephemeral" | "persistent"
    shared: bool
    uuid: str | None
    pages: int
    objects: int
    bytes_raw: int
    bytes_stored: int  # sum of the stored (compressed) lengths of this pool's pages
    ops: OpCounters

    def to_dict(self) -> dict[str, Any]:
        return _flatten_ops(self)


@dataclass(slots=True)
class ClientStats:
    client: str
    frozen: bool
    weight: int
    cap_pages: int | None
    dedup: bool
    pools: int
    ephemeral_pages: int
    persistent_pages: int
    bytes_raw: int
    bytes_stored: int
    ops: OpCounters

    def to_dict(self) -> dict[str, Any]:
        return _flatten_ops(self)


@dataclass(slots=True)
class StoreStats:
    budget_bytes: int
    used_bytes: int  # what the budget is charged: blob data (size-classed) + metadata
    data_bytes: int  # exact stored payload bytes
    metadata_bytes: int
    reserved_bytes: int  # slab chunks held from the allocator
    pages: int
    ephemeral_pages: int
    persistent_pages: int
    unique_blobs: int
    zero_pages: int
    dedup_hits: int
    evictions: int

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
