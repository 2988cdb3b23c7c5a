"""Two agents in one process, a real TLS connection between them (127.0.0.1): what moves,
what stays, and every way a transfer can fail leaving the source as it was."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from hypervisor.lmdb_store import LmdbStore
from memd.agent.app import AgentApp
from memd.agent.commands import AuditArgs, StatusArgs
from memd.agent.migration import migration_metrics
from memd.errors import MigrationFailed
from memd.migrate import proto, tls, transport
from memd.migrate.transport import SourceTransfer
from tests.support.tls import make_ca, make_pki
from tmem.migration import STAGING_PREFIX, ChunkPages, Importer
from tmem.types import PoolFlag

OIDS = [(1, 0, 0), (2, 0, 0), (3, 9, 9)]
BOOT = "cd" * 16


def page(seed: int) -> bytes:
    rng = random.Random(seed)
    words = [b"kernel ", b"page ", b"swap ", b"\x00" * 16, seed.to_bytes(8, "little")]
    return b"".join(rng.choice(words) for _ in range(700))[:4096].ljust(4096, b"~")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@asynccontextmanager
async def agent(
    where: Path, name: str, tls: Path, *, listen: bool = False, budget: int = 64 << 20
) -> AsyncIterator[AgentApp]:
    store = LmdbStore(
        where / name, budget_bytes=budget, control_path=f"{where}/{name}.sock", host_boot_id="test"
    )
    app = AgentApp(budget_bytes=budget, store=store, tls_dir=tls)
    await app.start(None)
    if listen:
        await app.migration.listen("127.0.0.1:0")
    try:
        yield app
    finally:
        await app.stop()
        store.close()


def populate(
    app: AgentApp, pages: int = 600, *, noise: bool = False
) -> dict[tuple[int, tuple[int, int, int], int], bytes]:
    tmem = app.tmem
    tmem.open_session(
        "vm1", cap_pages=None, dedup=False, meta={"boot_id": BOOT, "reboots": 2}, reset=False
    )
    tmem.new_pool("vm1", PoolFlag.EPHEMERAL)
    tmem.new_pool("vm1", PoolFlag.PERSISTENT)
    tmem.new_pool_at("vm1", 15, PoolFlag.PERSISTENT)
    tmem.put("vm1", 0, OIDS[0], 0, page(1))
    want = {}
    for i in range(pages):
        pool, oid, index = (1, OIDS[i % 2], i) if i % 3 else (15, OIDS[2], i * 5)
        want[(pool, oid, index)] = os.urandom(4096) if noise else page(i % 400)
        tmem.put("vm1", pool, oid, index, want[(pool, oid, index)])
    return want


def holds(app: AgentApp, want: dict[tuple[int, tuple[int, int, int], int], bytes]) -> bool:
    return all(
        app.tmem.get("vm1", pool, oid, index) == data for (pool, oid, index), data in want.items()
    ) and app.tmem.store_stats().persistent_pages == len(want)


def clean(app: AgentApp) -> bool:
    """What `memd audit` says of the agent."""
    return bool(app.handlers.audit(AuditArgs())["clean"])


def dest_of(app: AgentApp) -> str:
    assert app.migration.listening is not None
    return f"127.0.0.1:{app.migration.listening[1]}"


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_a_guest_moves_by_hand_and_the_source_keeps_nothing(tmp_path: Path, pki: Path) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            result = await src.migration.migrate("vm1", dest_of(dst))
            assert result["outcome"] == "moved" and result["pages"] >= len(want)
            assert holds(dst, want)
            assert not src.tmem.has_client("vm1")
            assert src.tmem.store_stats().pages == 0
            assert dst.tmem.client_meta("vm1")["boot_id"] == BOOT
            assert dst.agent.guests["vm1"].boot_id == bytes.fromhex(BOOT)
            assert dst.agent.guests["vm1"].reboots == 2
            assert clean(src) and clean(dst)
            await asyncio.sleep(0.1)
            migrations = dst.handlers.status(StatusArgs())["migrations"]  # memd status
            assert [m["phase"] for m in migrations["finished"]] == ["done"]
            assert src.migration.status()["finished"][0]["phase"] == "done"
            families = {f.name: f for f in migration_metrics(src.migration.status())}
            assert [
                s.value
                for s in families["memd_migrations"].samples
                if s.name == "memd_migrations_total"
                and s.labels == {"direction": "out", "outcome": "done"}
            ] == [1.0]

    run(main())


def test_changes_during_precopy_and_at_switchover_arrive(tmp_path: Path, pki: Path) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            populate(src, 3000)
            transfer = src.migration._source("vm1", dest_of(dst))
            switch = asyncio.Event()
            stop = threading.Event()

            def guest() -> None:  # a running guest: puts and flushes all through pre-copy
                rng = random.Random(5)
                n = 0
                while not stop.is_set():
                    oid, index = OIDS[rng.randrange(2)], rng.randrange(3000)
                    if rng.random() < 0.3:
                        src.tmem.flush_page("vm1", 1, oid, index)
                    else:
                        src.tmem.put("vm1", 1, oid, index, page(10_000 + n))
                    n += 1

            await transfer.connect()
            writer = threading.Thread(target=guest)
            writer.start()
            precopy = asyncio.ensure_future(transfer.precopy(until=switch))
            await asyncio.sleep(0.5)
            stop.set()  # QEMU paused the guest ...
            await asyncio.to_thread(writer.join)
            switch.set()  # ... and reached pre-switchover
            await precopy
            src_state = {(p, o, i): src.tmem.get("vm1", p, o, i) for p, o, i in _handles(src)}
            await transfer.switchover()
            await transfer.finish()
            src.migration.outgoing.clear()
            assert transfer.progress.rounds >= 2
            assert {
                (p, o, i): dst.tmem.get("vm1", p, o, i) for p, o, i in _handles(dst)
            } == src_state
            assert clean(dst)

    run(main())


def _handles(app: AgentApp) -> list[tuple[int, tuple[int, int, int], int]]:
    from tmem.migration import Exporter

    assert app.feed is not None
    exp = Exporter(app.tmem, app.feed, "vm1")
    _, keys = exp.start()
    out = [(c.pool, c.oid, i) for c in exp.read(keys) for i, _, _ in c.pages]
    exp.close()
    return out


def test_a_destination_that_dies_mid_transfer_leaves_the_source_whole(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "CHUNKS_PER_BATCH", 1)
    applied = threading.Event()
    original = Importer.apply_chunks

    def noted_apply(self: Importer, chunks: list[ChunkPages]) -> None:
        original(self, chunks)
        applied.set()

    monkeypatch.setattr(Importer, "apply_chunks", noted_apply)

    async def main() -> None:
        async with agent(tmp_path, "src", pki) as src:
            want = populate(src, 3000)
            async with agent(tmp_path, "dst", pki, listen=True) as dst:
                dest = dest_of(dst)
                task = asyncio.ensure_future(src.migration.migrate("vm1", dest))
                # Both agents share this loop (the installs run on it): look between
                # its turns, as soon as the first chunks are in, one chunk a send.
                async with asyncio.timeout(30):
                    while not applied.is_set():
                        await asyncio.sleep(0)
                assert dst.tmem.client_names() == [STAGING_PREFIX + "vm1"]
                assert 0 < dst.tmem.store_stats().persistent_pages < len(want)
                await dst.migration.close()  # the destination agent goes away
                assert dst.tmem.client_names() == []
            with pytest.raises(MigrationFailed, match="pages stay here"):
                await task
            assert holds(src, want) and clean(src)
            assert src.migration.status()["finished"][0]["phase"] == "aborted"

    run(main())


def test_a_destination_without_room_aborts_and_the_source_keeps_everything(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True, budget=1 << 20) as dst,
        ):
            want = populate(src, 2000, noise=True)
            with pytest.raises(MigrationFailed, match="cannot take"):
                await src.migration.migrate("vm1", dest_of(dst))
            assert holds(src, want) and clean(src)
            await asyncio.sleep(0.1)
            assert dst.tmem.client_names() == [] and clean(dst)

    run(main())


def test_a_source_whose_certificate_another_ca_signed_is_refused(tmp_path: Path, pki: Path) -> None:
    rogue = make_pki(tmp_path / "rogue", ca=make_ca(tmp_path / "rogue-ca", "rogue"))
    (rogue / "cacert.pem").write_bytes((pki / "cacert.pem").read_bytes())  # trusts dst

    async def main() -> None:
        async with (
            agent(tmp_path, "src", rogue) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src, 50)
            with pytest.raises(MigrationFailed):
                await src.migration.migrate("vm1", dest_of(dst))
            assert holds(src, want)
            assert dst.tmem.client_names() == []

    run(main())


def test_a_destination_with_a_certificate_for_another_address_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", server_addresses=["10.9.9.9"])

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src, 50)
            with pytest.raises(MigrationFailed, match=r"TLS|certificate"):
                await src.migration.migrate("vm1", dest_of(dst))
            assert holds(src, want) and dst.tmem.client_names() == []

    run(main())


def test_plaintext_is_refused_and_stages_nothing(tmp_path: Path, pki: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, "dst", pki, listen=True) as dst:
            assert dst.migration.listening is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", dst.migration.listening[1])
            writer.write(proto.encode(proto.Begin("vm1", {})))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 15) == b""  # hung up on
            writer.close()
            assert dst.tmem.client_names() == []

    run(main())


def test_without_a_client_certificate_the_handshake_fails(tmp_path: Path, pki: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, "dst", pki, listen=True) as dst:
            assert dst.migration.listening is not None
            ctx = ssl.create_default_context(cafile=str(pki / "cacert.pem"))
            with pytest.raises((ssl.SSLError, ConnectionError)):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", dst.migration.listening[1], ssl=ctx, server_hostname="127.0.0.1"
                )
                writer.write(proto.encode(proto.Begin("vm1", {})))
                await writer.drain()
                if not await asyncio.wait_for(reader.read(), 15):
                    raise ConnectionError("closed")
            assert dst.tmem.client_names() == []

    run(main())


def test_missing_certificates_are_named(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"cacert\.pem does not exist"):
        tls.client_context(tmp_path)


def test_a_second_migration_of_the_same_guest_is_refused(tmp_path: Path, pki: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, "src", pki) as src:
            populate(src, 10)
            first = src.migration._source("vm1", "127.0.0.1:1")
            assert isinstance(first, SourceTransfer)
            with pytest.raises(Exception, match="already migrating"):
                src.migration._source("vm1", "127.0.0.1:1")
            src.migration.outgoing.clear()

    run(main())


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield


def test_duplicates_cross_once_and_a_payload_flushed_since_still_arrives_right(
    tmp_path: Path, pki: Path
) -> None:
    """A dedup guest's shared payloads are sent once and referred to after; the guest
    then flushes every page of one shared payload (its blob id is free for another
    payload) and puts it again elsewhere, and the final delta carries all of it."""

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            tmem = src.tmem
            tmem.open_session("vm1", cap_pages=None, dedup=True, meta={}, reset=False)
            tmem.new_pool("vm1", PoolFlag.PERSISTENT)
            oid = OIDS[0]
            for index in range(2000):
                tmem.put("vm1", 0, oid, index, page(index % 8))  # 8 payloads, 250 pages each
            transfer = src.migration._source("vm1", dest_of(dst))
            await transfer.connect()
            await transfer.precopy()
            # 2000 pages of ~3 KiB payload went in well under 8 payloads' worth of frames
            # plus headers and references.
            assert transfer.progress.wire_bytes < 8 * 4096 + 2000 * 16 + 64 * 64
            assert transfer.progress.bytes_sent > 2000 * 1000  # payload bytes: every page
            for index in range(0, 2000, 8):  # every page of payload 0 goes ...
                tmem.flush_page("vm1", 0, oid, index)
            for index in range(2000, 2100):  # ... another shared payload takes its blob ...
                tmem.put("vm1", 0, oid, index, page(100))
            for index in range(3000, 3010):  # ... and payload 0 comes back elsewhere
                tmem.put("vm1", 0, oid, index, page(0))
            src_state = {(p, o, i): tmem.get("vm1", p, o, i) for p, o, i in _handles(src)}
            await transfer.switchover()
            await transfer.finish()
            src.migration.outgoing.clear()
            assert {
                (p, o, i): dst.tmem.get("vm1", p, o, i) for p, o, i in _handles(dst)
            } == src_state
            assert len(src_state) == 2000 - 250 + 100 + 10
            assert clean(dst)

    run(main())
