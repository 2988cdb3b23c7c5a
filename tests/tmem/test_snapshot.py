"""Snapshots: a restarted agent keeps every persistent page and every pool id."""

from __future__ import annotations

import struct
import uuid

import pytest

from memd.errors import InvalidArgument
from tests.tmem.conftest import OID, random_page, text_page
from tmem import snapshot
from tmem.host import TmemHost
from tmem.types import PAGE_SIZE, PoolFlags


def test_round_trip_keeps_persistent_pages_pool_ids_and_settings() -> None:
    old = TmemHost(budget_bytes=32 << 20)
    key = uuid.uuid4().bytes
    old.add_client("vm1", weight=300, cap_pages=5000, dedup=True)
    old.add_client("vm2")
    for vm in ("vm1", "vm2"):
        old.authorize_shared(vm, key)
    eph = old.new_pool("vm1", 0)
    pers = old.new_pool("vm1", PoolFlags.PERSISTENT)
    old.destroy_pool("vm1", eph)  # leave a hole: pool ids must come back as they were
    eph2 = old.new_pool("vm1", 0)
    shared1 = old.new_pool("vm1", PoolFlags.SHARED, key)
    old.new_pool("vm2", PoolFlags.PERSISTENT)
    shared2 = old.new_pool("vm2", PoolFlags.SHARED, key)
    pages = {i: (text_page(i) if i % 3 else random_page()) for i in range(300)}
    pages[7] = bytes(PAGE_SIZE)
    for i, page in pages.items():
        old.put("vm1", pers, OID, i, page)
        old.put("vm1", eph2, OID, i, page)
    old.put("vm2", 0, (9, 9, 9), 1, text_page(1))
    old.freeze("vm2")

    data = b"".join(snapshot.dump(old, extra={"boot_ids": {"vm1": "ab"}}))
    new = TmemHost(budget_bytes=1)
    extra = snapshot.load(new, [data])

    assert extra == {"boot_ids": {"vm1": "ab"}}
    assert new.pool_ids("vm1") == old.pool_ids("vm1")
    assert new.pool_ids("vm2") == old.pool_ids("vm2")
    for i, page in pages.items():
        assert new.get("vm1", pers, OID, i) == page
    assert new.get("vm2", 0, (9, 9, 9), 1) == text_page(1)
    assert new.get("vm1", eph2, OID, 1) is None  # ephemeral pages may go, the pool stays
    new.put("vm1", shared1, OID, 0, text_page(5))  # shared membership survived
    assert new.get("vm2", shared2, OID, 0) == text_page(5)
    c1, c2 = new.client_stats("vm1")[0], new.client_stats("vm2")[0]
    assert (c1.weight, c1.cap_pages, c1.dedup, c2.frozen) == (300, 5000, True, True)
    assert new.budget_bytes == 32 << 20
    assert new.audit() == []


@pytest.mark.parametrize("damage", ["magic", "truncate", "length"])
def test_corrupt_snapshots_are_refused(damage: str) -> None:
    host = TmemHost()
    host.add_client("vm")
    pool = host.new_pool("vm", PoolFlags.PERSISTENT)
    host.put("vm", pool, OID, 0, text_page(1))
    data = bytearray(b"".join(snapshot.dump(host)))
    if damage == "magic":
        data[0] ^= 1
    elif damage == "truncate":
        del data[-10:]
    else:  # the page record's payload length field: far past the end of the file
        (hlen,) = struct.unpack_from("<I", data, 12)
        struct.pack_into("<H", data, 16 + hlen + 40, 0xFFFF)
    with pytest.raises(InvalidArgument):
        snapshot.load(TmemHost(), [bytes(data)])
