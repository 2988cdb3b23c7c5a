"""Many threads on one TmemHost: no exception but NoSpace, exact data, clean audit."""

from __future__ import annotations

import threading

from memd.errors import NoSpace
from tests.tmem.conftest import text_page
from tmem.host import TmemHost
from tmem.types import MAX_BATCH, PoolFlag


def test_concurrent_clients_budget_changes_and_batches() -> None:
    host = TmemHost(budget_bytes=2 << 20)
    errors: list[BaseException] = []
    persistent: dict[str, dict[int, bytes]] = {}

    def guest(name: str, seed: int) -> None:
        try:
            host.add_client(name, dedup=seed % 2 == 0)
            eph = host.new_pool(name, 0)
            pers = host.new_pool(name, PoolFlag.PERSISTENT)
            mine: dict[int, bytes] = {}
            for rnd in range(40):
                handles = [((seed, 0, 0), rnd * 16 + i) for i in range(16)]
                pages = [text_page(seed * 10_000 + rnd * 16 + i) for i in range(16)]
                host.put_batch(name, eph, handles, pages)
                for (_, index), page, res in zip(
                    handles, pages, host.put_batch(name, pers, handles, pages), strict=True
                ):
                    if res is None:
                        mine[index] = page
                    else:
                        assert isinstance(res, NoSpace)
                for (_, index), got in zip(
                    handles, host.get_batch(name, eph, handles), strict=True
                ):
                    assert got is None or got == pages[index - rnd * 16]
                if rnd % 5 == 0:
                    host.flush_object(name, eph, (seed, 0, 0))
            persistent[name] = mine
        except BaseException as err:
            errors.append(err)

    def operator() -> None:
        try:
            for i in range(60):
                host.set_budget((1 + i % 4) << 20)
                host.flush_kib(64)
                host.audit()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=guest, args=(f"vm{i}", i)) for i in range(6)]
    threads.append(threading.Thread(target=operator))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert host.audit() == []
    for name, mine in persistent.items():
        indexes = sorted(mine)
        for start in range(0, len(indexes), MAX_BATCH):
            part = indexes[start : start + MAX_BATCH]
            got = host.get_batch(name, 1, [((int(name[2:]), 0, 0), i) for i in part])
            assert got == [mine[i] for i in part]
