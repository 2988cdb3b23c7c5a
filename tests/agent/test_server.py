"""The agent's channel server over real unix sockets: the stall rule, memory per connection.

Each test runs one :class:`memd.agent.server.Agent` on an event loop in the test's own
thread (``asyncio.run``) and speaks raw protocol bytes to it through asyncio streams, so
the bytes on the socket are exactly the ones a guest would send, cuts included.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from memd import wire
from memd.agent.connection import READ_CHUNK
from memd.agent.dispatch import Dispatcher, GuestState
from memd.agent.server import Agent
from memd.vocab import MAX_BATCH, PAGE_SIZE
from memd.wire import Op
from tmem.host import TmemHost


@asynccontextmanager
async def running_agent(**kw: Any) -> AsyncIterator[Agent]:
    agent = Agent(Dispatcher(TmemHost(budget_bytes=64 << 20)), **kw)
    agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


def cut_put_batch() -> bytes:
    """The first part of a full 128-page PUT_BATCH (~516 KiB declared), as a guest that
    died mid-write leaves it on the host's end of the port."""
    handles = [((1, 2, 3), i) for i in range(MAX_BATCH)]
    pages = [os.urandom(PAGE_SIZE)] * MAX_BATCH
    frame = wire.encode_request(77, wire.PutBatchRequest(0, handles, pages))
    return frame[: len(frame) // 3]


def resync(nonce: int, request_id: int) -> bytes:
    """What a reopening guest sends (docs/protocol.md, Resync): FF×8 + SYNC(nonce)."""
    return wire.RESYNC_MARKER + wire.encode_request(request_id, wire.SyncRequest(nonce))


async def sync_reply(reader: asyncio.StreamReader, nonce: int) -> None:
    """Return when the SYNC reply carrying ``nonce`` has arrived."""
    decoder = wire.FrameDecoder()
    while True:
        data = await reader.read(65536)
        assert data, "the agent closed the connection"
        for item in decoder.feed(data):
            if isinstance(item, wire.Frame) and item.op == Op.SYNC:
                reply = wire.decode_reply(item)
                if isinstance(reply, wire.SyncReply) and reply.nonce == nonce:
                    return


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_a_guest_cut_mid_frame_resyncs_within_the_stall_timeout(tmp_path: Path) -> None:
    """Regression: the 1 s stall timer used to restart at every arriving byte, so a guest
    resyncing every 0.5 s (each resend shorter than the dead frame's declared length)
    never got its SYNC answered — it waited for its resends to fill ~516 KiB."""
    path = str(tmp_path / "g.sock")
    nonce = 0x5EED_0F_CAFE

    async def test() -> None:
        async with running_agent() as agent:
            await agent.add_channel("g", path, mode="listen")
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(cut_put_batch())  # the old guest's last bytes
            await writer.drain()
            cut_at = time.monotonic()

            async def resend_every_half_second() -> None:
                for attempt in range(1, 1000):
                    writer.write(resync(nonce, attempt))
                    await writer.drain()
                    await asyncio.sleep(wire.SYNC_RETRY_INTERVAL)

            resender = asyncio.create_task(resend_every_half_second())
            try:
                await asyncio.wait_for(sync_reply(reader, nonce), timeout=6.0)
            finally:
                resender.cancel()
            elapsed = time.monotonic() - cut_at
            assert elapsed < wire.PARTIAL_FRAME_TIMEOUT + 0.5, elapsed
            assert agent.guests["g"].bad_frames >= 1  # the abandoned frame was counted
            writer.close()

    run(test)


def test_a_frame_in_progress_is_not_abandoned_while_bytes_complete_it(tmp_path: Path) -> None:
    """The stall rule dates the incomplete frame by its first byte, but a frame that
    completes in time is served: here a SYNC sent in two halves 0.6 s apart, twice."""
    path = str(tmp_path / "g.sock")

    async def test() -> None:
        async with running_agent() as agent:
            await agent.add_channel("g", path, mode="listen")
            reader, writer = await asyncio.open_unix_connection(path)
            for nonce in (1, 2):
                frame = resync(nonce, nonce)
                writer.write(frame[:20])
                await writer.drain()
                await asyncio.sleep(0.6)
                writer.write(frame[20:])
                await writer.drain()
                await asyncio.wait_for(sync_reply(reader, nonce), timeout=2.0)
            assert agent.guests["g"].bad_frames == 0
            writer.close()

    run(test)


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_many_connections_holding_half_frames_stay_within_the_cap(tmp_path: Path) -> None:
    """Regression: each connection cost a 512 KiB receive buffer from its accept, plus the
    half frame it sent; 300 such guests took ~190 MiB.  Now an idle connection holds no
    receive buffer and the incomplete frames of all connections share one cap."""
    channels = 300
    cap = 8 << 20
    half = cut_put_batch()[: 160 * 1024]  # 160 KiB of a frame: 300 of them are ~47 MiB

    async def test() -> None:
        async with running_agent(max_partial_bytes=cap) as agent:
            paths = [str(tmp_path / f"g{i}.sock") for i in range(channels)]
            for i, path in enumerate(paths):
                await agent.add_channel(f"g{i}", path, mode="listen")
            before = _rss_bytes()
            writers = []
            for path in paths:
                _, writer = await asyncio.open_unix_connection(path)
                writer.write(half)
                await writer.drain()
                writers.append(writer)
            await asyncio.sleep(0.2)  # the agent reads what was sent
            grown = _rss_bytes() - before
            assert grown < 40 << 20, f"RSS grew by {grown >> 20} MiB"
            assert agent.partials.total <= cap
            assert agent.partials.high_water <= cap + READ_CHUNK
            assert agent.partials.shed > 0  # the cap was what bounded it
            for writer in writers:
                writer.close()
            await asyncio.sleep(0.1)
            assert agent.partials.total == 0  # closed connections hold nothing

    run(test)


def test_connection_churn_on_one_channel_does_not_accumulate(tmp_path: Path) -> None:
    """A guest that reopens its port again and again (each time sending half a frame):
    the newest connection replaces the old one, and nothing of the old ones stays."""
    path = str(tmp_path / "g.sock")
    half = cut_put_batch()[: 160 * 1024]

    async def test() -> None:
        async with running_agent() as agent:
            await agent.add_channel("g", path, mode="listen")
            before = _rss_bytes()
            writers = []
            for _ in range(300):
                _, writer = await asyncio.open_unix_connection(path)
                writer.write(half)
                writers.append(writer)
            await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
            await asyncio.sleep(0.3)
            grown = _rss_bytes() - before
            assert grown < 40 << 20, f"RSS grew by {grown >> 20} MiB"
            assert agent.partials.total <= len(half) + READ_CHUNK
            for writer in writers:
                writer.close()

    run(test)


def test_time_spent_not_reading_does_not_count_against_a_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame that arrives whole behind a request the agent is slow to handle: reading
    is paused meanwhile (the guest could not send), so that time is not the frame's."""
    path = str(tmp_path / "g.sock")

    async def test() -> None:
        async with running_agent() as agent:
            handle = agent.dispatcher.handle

            def slow_first(guest: GuestState, frame: wire.Frame) -> bytes:
                if frame.request_id == 1:
                    time.sleep(wire.PARTIAL_FRAME_TIMEOUT + 0.3)  # blocks the loop
                return handle(guest, frame)

            monkeypatch.setattr(agent.dispatcher, "handle", slow_first)
            await agent.add_channel("g", path, mode="listen")
            reader, writer = await asyncio.open_unix_connection(path)
            second = resync(2, 2)
            writer.write(resync(1, 1) + second[:20])  # SYNC 1 whole, SYNC 2 begun
            await writer.drain()
            await asyncio.wait_for(sync_reply(reader, 1), timeout=3.0)
            # SYNC 2 began more than the timeout ago, but the agent read for 0.3 s only.
            await asyncio.sleep(0.3)
            writer.write(second[20:])
            await writer.drain()
            await asyncio.wait_for(sync_reply(reader, 2), timeout=3.0)
            assert agent.guests["g"].bad_frames == 0
            writer.close()

    run(test)


def test_over_the_cap_the_oldest_incomplete_frame_goes_first(tmp_path: Path) -> None:
    """Two guests each hold part of a frame and together pass the cap: the one that has
    waited longer is abandoned, and the newer one completes and is answered."""
    frame = wire.encode_request(
        9,
        wire.PutBatchRequest(0, [((1, 2, 3), i) for i in range(64)], [os.urandom(PAGE_SIZE)] * 64),
    )
    part = 200 * 1024

    async def test() -> None:
        async with running_agent(max_partial_bytes=300 * 1024) as agent:
            paths = [str(tmp_path / f"g{i}.sock") for i in range(2)]
            for i, path in enumerate(paths):
                await agent.add_channel(f"g{i}", path, mode="listen")
            _, old = await asyncio.open_unix_connection(paths[0])
            old.write(frame[:part])  # and then nothing: a dead writer
            await old.drain()
            await asyncio.sleep(0.1)
            reader, new = await asyncio.open_unix_connection(paths[1])
            new.write(frame[:part])
            await new.drain()
            await asyncio.sleep(0.1)
            assert agent.partials.shed == 1 and agent.partials.total <= 300 * 1024
            assert (agent.guests["g0"].bad_frames, agent.guests["g1"].bad_frames) == (1, 0)
            new.write(frame[part:])
            await new.drain()
            (reply,) = wire.FrameDecoder().feed(await reader.read(65536))
            assert isinstance(reply, wire.Frame)
            assert (reply.request_id, reply.status) == (9, wire.Status.NEED_HELLO)
            old.close()
            new.close()

    run(test)
