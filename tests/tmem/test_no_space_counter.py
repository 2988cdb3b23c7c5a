"""``OpCounters.no_space``: every put refused with NoSpace is counted, once, whether the
guest's cap or the whole store refused it, single or batched (memd serve --metrics
exports it as memd_tmem_no_space_total)."""

from __future__ import annotations

import os

import pytest

from memd.errors import NoSpace
from tmem.host import TmemHost
from tmem.types import PoolFlag


def _page(i: int) -> bytes:
    return i.to_bytes(4, "little") + os.urandom(4092)  # incompressible, never a duplicate


def test_cap_refusals_are_counted_single_and_batched() -> None:
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("g", cap_pages=10)
    pool = host.new_pool("g", int(PoolFlag.PERSISTENT))
    results = host.put_batch(
        "g", pool, [((1, 0, 0), i) for i in range(14)], [_page(i) for i in range(14)]
    )
    assert [r is None for r in results] == [True] * 10 + [False] * 4
    with pytest.raises(NoSpace):
        host.put("g", pool, (2, 0, 0), 0, _page(99))
    ops = host.client_stats("g")[0].ops
    assert (ops.puts, ops.good_puts, ops.no_space) == (15, 10, 5)


def test_a_full_store_is_counted_too() -> None:
    host = TmemHost(budget_bytes=1 << 20)  # persistent pages are never evicted
    host.add_client("g")
    pool = host.new_pool("g", int(PoolFlag.PERSISTENT))
    refused = 0
    for i in range(400):  # 1.6 MiB of incompressible pages into 1 MiB
        try:
            host.put("g", pool, (1, 0, 0), i, _page(i))
        except NoSpace:
            refused += 1
    ops = host.client_stats("g")[0].ops
    assert refused > 0
    assert ops.no_space == refused == ops.puts - ops.good_puts


def test_ephemeral_puts_at_the_cap_evict_instead() -> None:
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("g", cap_pages=10)
    pool = host.new_pool("g", int(PoolFlag.EPHEMERAL))
    for i in range(20):
        host.put("g", pool, (1, 0, 0), i, _page(i))
    ops = host.client_stats("g")[0].ops
    assert (ops.no_space, ops.evictions) == (0, 10)
