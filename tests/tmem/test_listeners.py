"""Change listeners (``TmemHost(listeners=...)``): they hear every change of persistent
state the log hears, at the same points, and a host that has one (with or without a
log) behaves exactly like one without."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

from tests.tmem.conftest import OID, text_page
from tests.tmem.fake_log import FakeLog
from tmem.durable import ClientRecord, PoolRecord
from tmem.host import TmemHost
from tmem.types import PoolFlag

P = int(PoolFlag.PERSISTENT)
ChunkKey = tuple[int, int, int, int, int]


class RecordingSink:
    """The state the records describe, plus every chunk event in order."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientRecord] = {}
        self.pools: dict[int, PoolRecord] = {}
        self.chunks: dict[ChunkKey, list[tuple[int, int]]] = {}
        self.chunk_events: list[tuple[ChunkKey, bool]] = []  # (key, still has pages)

    def put_client(self, record: ClientRecord) -> None:
        self.clients[record.name] = record

    def drop_client(self, name: str) -> None:
        del self.clients[name]

    def put_pool(self, record: PoolRecord) -> None:
        self.pools[record.gid] = record

    def drop_pool(self, gid: int) -> None:
        del self.pools[gid]

    def put_chunk(
        self, gid: int, oid: tuple[int, int, int], chunk: int, entries: Sequence[tuple[int, int]]
    ) -> None:
        self.chunks[(gid, *oid, chunk)] = list(entries)
        self.chunk_events.append(((gid, *oid, chunk), True))

    def drop_chunk(self, gid: int, oid: tuple[int, int, int], chunk: int) -> None:
        self.chunks.pop((gid, *oid, chunk), None)
        self.chunk_events.append(((gid, *oid, chunk), False))


def _workload(host: TmemHost, key: bytes = uuid.UUID(int=7).bytes) -> None:
    host.open_session("a", cap_pages=None, dedup=True, meta={"boot_id": "1"}, reset=False)
    host.add_client("b", weight=50)
    host.authorize_shared("a", key)
    pers = host.new_pool("a", P)
    eph = host.new_pool("a", 0)
    shared = host.new_pool("a", int(PoolFlag.SHARED), key)
    gone = host.new_pool("b", P)
    host.put_batch("a", pers, [(OID, i) for i in range(70)], [text_page(i) for i in range(70)])
    host.put_batch("a", eph, [(OID, i) for i in range(10)], [text_page(i) for i in range(10)])
    host.put("a", shared, OID, 0, text_page(1))
    host.put("b", gone, OID, 0, text_page(2))
    host.flush_page("a", pers, OID, 3)
    host.flush_object("a", pers, OID)  # empties both chunks of the object
    host.put("a", pers, (9, 9, 9), 5, text_page(5))
    host.set_weight("a", 7)
    host.freeze("b")
    host.destroy_pool("b", gone)
    host.remove_client("b")


def test_a_listener_beside_the_log_ends_with_what_the_log_committed() -> None:
    log, sink = FakeLog(), RecordingSink()
    host = TmemHost(log=log, listeners=[sink])
    _workload(host)
    assert sink.clients == log.clients and set(sink.clients) == {"a"}
    assert sink.pools == log.pools
    assert sink.chunks == log.chunks and len(sink.chunks) == 1
    assert host.audit() == []


def test_a_listener_without_a_log_hears_persistent_chunks_once_per_commit() -> None:
    sink = RecordingSink()
    host = TmemHost(listeners=[sink])
    host.add_client("g")
    pers = host.new_pool("g", P)
    eph = host.new_pool("g", 0)
    host.put("g", eph, OID, 0, text_page(0))
    assert sink.chunk_events == []  # ephemeral pages are not persistent state
    with host.deferred():
        for i in range(3):
            host.put("g", pers, OID, i, text_page(i))
        assert sink.chunk_events == []  # held until the deferred section ends
    gid = next(g for g, p in sink.pools.items() if p.persistent)
    blobs = [b for _, b in sink.chunks[(gid, *OID, 0)]]
    assert sink.chunk_events == [((gid, *OID, 0), True)] and len(blobs) == 3
    host.flush_page("g", pers, OID, 1)
    assert [i for i, _ in sink.chunks[(gid, *OID, 0)]] == [0, 2]
    host.flush_pool("g", pers)
    assert sink.chunk_events[-1] == ((gid, *OID, 0), False) and not sink.chunks


def test_listeners_change_no_outcome() -> None:
    plain, heard = TmemHost(), TmemHost(listeners=[RecordingSink()])
    _workload(plain)
    _workload(heard)
    assert heard.store_stats() == plain.store_stats()
    assert heard.client_stats() == plain.client_stats()
    assert heard.pool_stats() == plain.pool_stats()
    assert heard.audit() == []


def test_a_listener_agrees_with_the_log_under_concurrent_guests() -> None:
    log, sink = FakeLog(), RecordingSink()
    host = TmemHost(log=log, listeners=[sink])
    errors: list[BaseException] = []

    def guest(name: str) -> None:
        try:
            host.add_client(name)
            pool = host.new_pool(name, P)
            for i in range(40):
                host.put(name, pool, OID, i, text_page(i % 7))
                if i % 3 == 0:
                    host.flush_page(name, pool, OID, i // 2)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=guest, args=(f"g{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sink.chunks == log.chunks and sink.pools == log.pools
    assert sink.clients == log.clients
    assert host.audit() == []
