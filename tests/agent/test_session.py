"""A session's requests and replies over a real unix socket: order, commit, backpressure.

Frames read while a session waits are dispatched in the read's own callback
(``GuestConnection.deliver``), their replies held for the loop turn's store commit
(``Agent._flush``).  These tests pin what that must keep: replies in request order, none
written before the commit that covers its request, no reading from a guest that does not
read its replies, and the hang-up after too many corrupt frames (replies to the frames
before them still written).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from memd import wire
from memd.agent import connection as connection_module
from memd.agent import server as server_module
from memd.agent.dispatch import Dispatcher, GuestState
from memd.agent.server import MAX_BAD_FRAMES, Agent
from memd.errors import FrameError
from memd.vocab import MAX_BATCH, PAGE_SIZE
from memd.wire import Op
from tmem.host import TmemHost

Handles = list[tuple[tuple[int, int, int], int]]


@asynccontextmanager
async def agent_on(
    path: str,
) -> AsyncIterator[tuple[Agent, asyncio.StreamReader, asyncio.StreamWriter]]:
    agent = Agent(Dispatcher(TmemHost(budget_bytes=256 << 20)))
    agent.start()
    try:
        await agent.add_channel("g", path, mode="listen")
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            yield agent, reader, writer
        finally:
            writer.transport.abort()  # close() would wait for a peer that may not read
    finally:
        await agent.stop()


def request(request_id: int, msg: wire.Request) -> bytes:
    return wire.encode_request(request_id, msg)


def hello(request_id: int = 1) -> bytes:
    return request(
        request_id, wire.HelloRequest(wire.MIN_VERSION, wire.MAX_VERSION, 0, os.urandom(16))
    )


async def replies(reader: asyncio.StreamReader, count: int) -> list[wire.Frame]:
    decoder = wire.FrameDecoder()
    out: list[wire.Frame] = []
    while len(out) < count:
        data = await asyncio.wait_for(reader.read(1 << 20), timeout=20)
        assert data, f"the agent closed the connection after {len(out)} replies"
        for item in decoder.feed(data):
            assert isinstance(item, wire.Frame), item
            out.append(item)
    return out


def test_replies_come_in_order_and_each_after_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many frames per read, frames cut across reads: every reply in request order, and
    at every send, every frame dispatched so far has been committed."""
    handled = committed = 0
    sends = 0

    real_handle_all = Dispatcher.handle_all
    real_send = connection_module.GuestConnection.send

    def handle_all(
        self: Dispatcher, guest: GuestState, items: Sequence[wire.Frame | FrameError]
    ) -> list[wire.Buffer]:
        nonlocal handled
        handled += len(items)
        return real_handle_all(self, guest, items)

    def send(self: connection_module.GuestConnection, parts: Sequence[wire.Buffer]) -> None:
        nonlocal sends
        sends += 1
        assert committed == handled, "a reply left before its frame's commit"
        real_send(self, parts)

    monkeypatch.setattr(Dispatcher, "handle_all", handle_all)
    monkeypatch.setattr(connection_module.GuestConnection, "send", send)

    async def test() -> None:
        nonlocal committed
        async with agent_on(str(tmp_path / "g.sock")) as (agent, reader, writer):
            tmem = agent.dispatcher.tmem
            real_release = tmem.release_commits

            def release_commits() -> None:
                nonlocal committed
                real_release()
                committed = handled

            monkeypatch.setattr(tmem, "release_commits", release_commits)
            writer.write(
                hello(1) + request(2, wire.NewPoolRequest(int(wire.PoolFlag.PERSISTENT), bytes(16)))
            )
            await writer.drain()
            assert [f.status for f in await replies(reader, 2)] == [0, 0]
            puts = b"".join(
                request(10 + i, wire.PutRequest(0, (1, 2, 3), i, bytes([i]) * PAGE_SIZE))
                for i in range(60)
            )
            writer.write(puts[: len(puts) // 2])  # many whole frames and a cut one
            await writer.drain()
            await asyncio.sleep(0.05)
            for at in range(len(puts) // 2, len(puts), 5000):  # the rest, in pieces
                writer.write(puts[at : at + 5000])
                await writer.drain()
            got = await replies(reader, 60)
            assert [f.request_id for f in got] == list(range(10, 70))
            assert all(f.op == Op.PUT and f.status == 0 for f in got)
            assert sends >= 2 and committed == handled
            assert tmem.get("g", 0, (1, 2, 3), 59) == bytes([59]) * PAGE_SIZE

    asyncio.run(test())


def test_a_guest_that_does_not_read_its_replies_is_not_read_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure: replies of ~516 KiB each that the guest leaves unread stop the agent
    reading its requests (well before all are dispatched); once it reads, every reply
    comes, in order.  Reads of 16 KiB (a few requests each) make "well before" visible:
    what one read dispatches is written whole, however large."""
    monkeypatch.setattr(server_module, "READ_CHUNK", 16 << 10)
    count = 200

    async def test() -> None:
        async with agent_on(str(tmp_path / "g.sock")) as (agent, reader, writer):
            handles: Handles = [((1, 2, 3), i) for i in range(MAX_BATCH)]
            pages = [os.urandom(PAGE_SIZE) for _ in range(MAX_BATCH)]
            persistent = int(wire.PoolFlag.PERSISTENT)
            writer.write(
                hello(1)
                + request(2, wire.NewPoolRequest(persistent, bytes(16)))
                + request(3, wire.PutBatchRequest(0, handles, pages))
            )
            await writer.drain()
            assert [f.status for f in await replies(reader, 3)] == [0, 0, 0]
            for i in range(count):  # ~800 KiB of requests, ~100 MiB of replies
                writer.write(request(100 + i, wire.GetBatchRequest(0, handles)))
            await asyncio.sleep(1.0)
            dispatched = agent.guests["g"].requests - 3
            assert 0 < dispatched < count // 2, dispatched
            got = await replies(reader, count)
            assert [f.request_id for f in got] == list(range(100, 100 + count))
            last = wire.decode_reply(got[-1])
            assert isinstance(last, wire.GetBatchReply) and last.pages[5] == pages[5]

    asyncio.run(test())


def test_too_many_corrupt_frames_hang_up_after_the_replies_before_them(tmp_path: Path) -> None:
    async def test() -> None:
        async with agent_on(str(tmp_path / "g.sock")) as (agent, reader, writer):
            writer.write(hello(1))
            await writer.drain()
            await replies(reader, 1)
            # A SYNC, then frames a guest must never send (replies), in one write.
            bad = b"".join(
                wire.encode_frame(Op.SYNC, 1000 + i, b"", flags=int(wire.FrameFlag.REPLY))
                for i in range(MAX_BAD_FRAMES + 5)
            )
            writer.write(request(2, wire.SyncRequest(77)) + bad)
            await writer.drain()
            got = await replies(reader, 1)
            reply = wire.decode_reply(got[0])
            assert isinstance(reply, wire.SyncReply) and reply.nonce == 77
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # hung up
            assert agent.channels["g"].last_error == "too many corrupt frames"

    asyncio.run(test())
