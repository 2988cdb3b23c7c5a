"""tmem against a reference model: a dict of handle → bytes per pool.

The host may evict ephemeral pages whenever it likes, so the model cannot predict
them; what it does check exactly is the coherency contract: a get returns either the
last page put at that handle or nothing, never stale or foreign data; once a get has
missed it keeps missing until the next put; persistent pages are never lost; and the
audit is clean after every step.
"""

from __future__ import annotations

import uuid

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memd.errors import NoSpace
from tmem.host import TmemHost
from tmem.types import PAGE_SIZE, PoolFlag

CLIENTS = ("a", "b")
SHARED_KEY = uuid.UUID(int=7)


def _page(kind: int, seed: int) -> bytes:
    if kind == 0:
        return bytes(PAGE_SIZE)
    if kind == 1:
        return bytes([seed % 251]) * PAGE_SIZE  # duplicates across handles
    body = seed.to_bytes(4, "little") * (PAGE_SIZE // 4)
    return body if kind == 2 else bytes((i * seed + i // 7) % 256 for i in range(PAGE_SIZE))


pages = st.builds(_page, st.integers(0, 3), st.integers(0, 40))
oids = st.sampled_from([(0, 0, 0), (1, 2, 3), (2**64 - 1, 0, 5)])
indexes = st.sampled_from([0, 1, 63, 64, 2**32 - 1])


class TmemModel(RuleBasedStateMachine):
    @initialize(budget_kib=st.integers(16, 400), dedup=st.booleans())
    def setup(self, budget_kib: int, dedup: bool) -> None:
        self.host = TmemHost(budget_bytes=budget_kib * 1024)
        # (client, local pool id) -> (persistent, shared, {(oid, index): page})
        self.pools: dict[
            tuple[str, int], tuple[bool, bool, dict[tuple[tuple[int, int, int], int], bytes]]
        ] = {}
        self.shared_data: dict[tuple[tuple[int, int, int], int], bytes] = {}
        for c in CLIENTS:
            self.host.add_client(c, dedup=dedup)
            self.host.authorize_shared(c, SHARED_KEY)

    def _data(self, key: tuple[str, int]) -> dict[tuple[tuple[int, int, int], int], bytes]:
        return self.pools[key][2]

    @rule(client=st.sampled_from(CLIENTS), kind=st.sampled_from(["eph", "pers", "shared"]))
    def new_pool(self, client: str, kind: str) -> None:
        if len([k for k in self.pools if k[0] == client]) >= 4:
            return
        flags = {"eph": 0, "pers": PoolFlag.PERSISTENT, "shared": PoolFlag.SHARED}[kind]
        pool = self.host.new_pool(client, flags, SHARED_KEY if kind == "shared" else None)
        if (client, pool) not in self.pools:
            data = self.shared_data if kind == "shared" else {}
            self.pools[(client, pool)] = (kind == "pers", kind == "shared", data)

    @precondition(lambda self: self.pools)
    @rule(data=st.data())
    def destroy_pool(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pools)))
        _, shared, _ = self.pools.pop(key)
        self.host.destroy_pool(*key)
        if shared and not any(s for _, s, _ in self.pools.values()):
            self.shared_data.clear()

    @precondition(lambda self: self.pools)
    @rule(data=st.data(), oid=oids, index=indexes, page=pages)
    def put(self, data: st.DataObject, oid: tuple[int, int, int], index: int, page: bytes) -> None:
        key = data.draw(st.sampled_from(sorted(self.pools)))
        store = self._data(key)
        try:
            self.host.put(*key, oid, index, page)
            store[(oid, index)] = page
        except NoSpace:
            store.pop((oid, index), None)  # the old data must be gone too

    @precondition(lambda self: self.pools)
    @rule(data=st.data(), oid=oids, index=indexes)
    def get(self, data: st.DataObject, oid: tuple[int, int, int], index: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.pools)))
        persistent, shared, store = self.pools[key]
        got = self.host.get(*key, oid, index)
        want = store.get((oid, index))
        if persistent:
            assert got == want
        else:
            assert got is None or got == want  # evicted or exact, never stale
            if got is None or not shared:
                store.pop((oid, index), None)  # a miss keeps missing; private get is exclusive

    @precondition(lambda self: self.pools)
    @rule(data=st.data(), oid=oids, index=indexes)
    def flush_page(self, data: st.DataObject, oid: tuple[int, int, int], index: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.pools)))
        self.host.flush_page(*key, oid, index)
        self._data(key).pop((oid, index), None)

    @precondition(lambda self: self.pools)
    @rule(data=st.data(), oid=oids)
    def flush_object(self, data: st.DataObject, oid: tuple[int, int, int]) -> None:
        key = data.draw(st.sampled_from(sorted(self.pools)))
        self.host.flush_object(*key, oid)
        store = self._data(key)
        for handle in [h for h in store if h[0] == oid]:
            del store[handle]

    @rule(budget_kib=st.integers(0, 400))
    def set_budget(self, budget_kib: int) -> None:
        self.host.set_budget(budget_kib * 1024)

    @rule(kib=st.integers(0, 64))
    def evict(self, kib: int) -> None:
        self.host.flush_kib(kib)

    @invariant()
    def audit_is_clean(self) -> None:
        if hasattr(self, "host"):
            assert self.host.audit() == []

    @invariant()
    def persistent_pages_are_all_there(self) -> None:
        for (client, pool), (persistent, _, store) in getattr(self, "pools", {}).items():
            if persistent:
                for (oid, index), page in store.items():
                    assert self.host.get(client, pool, oid, index) == page


TmemModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_tmem_model = TmemModel.TestCase
