"""memd.migrate.link on a real (plain TCP) connection: messages in order whatever the
reads, reading paused while the session does not take them, EOF and bad frames."""

from __future__ import annotations

import asyncio

import pytest

from memd.errors import FrameError, MigrationFailed
from memd.migrate import link as link_module
from memd.migrate import proto
from memd.migrate.link import Link


async def _pair() -> tuple[Link, asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]:
    """A Link accepting one connection, and the other end as asyncio streams."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Link] = loop.create_future()
    server = await loop.create_server(lambda: Link(connected=accepted.set_result), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await accepted, reader, writer, server


def _chunk(n: int) -> proto.Chunk:
    payload = n.to_bytes(4, "big") * 1000
    return proto.Chunk(0, 1, (n, 0, 0), 0, ((0, n, payload), (5, 0, b"")))


def test_reading_pauses_until_the_session_takes_what_arrived(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(link_module, "READ_AHEAD", 64 << 10)

    async def main() -> None:
        link, _, writer, server = await _pair()
        sent = [_chunk(n) for n in range(200)]  # ~800 KiB of frames
        writer.write(proto.encode_many(sent))
        await asyncio.sleep(0.3)  # the session is busy: nothing taken
        assert link._paused_reading
        assert link.bytes_received < 800_000  # the rest waits in the socket
        got: list[proto.Message] = []
        while len(got) < len(sent):
            got += await link.recv_some(timeout=5)
        assert got == sent and not link._paused_reading
        writer.close()
        with pytest.raises(MigrationFailed, match="closed the connection"):
            await link.recv_some(timeout=5)
        await link.close()
        server.close()

    asyncio.run(main())


def test_messages_before_a_bad_frame_arrive_then_the_frame_error() -> None:
    async def main() -> None:
        link, _, writer, server = await _pair()
        writer.write(proto.encode(proto.Commit(3)))
        await asyncio.sleep(0.1)
        writer.write(b"\x7f\xff\xff\xff\x04")  # a length over the limit
        assert await link.recv_some(timeout=5) == [proto.Commit(3)]
        with pytest.raises(FrameError):
            await link.recv_some(timeout=5)
        writer.close()
        await link.close()
        server.close()

    asyncio.run(main())


def test_a_silent_peer_times_out_and_sends_reach_it() -> None:
    async def main() -> None:
        link, reader, writer, server = await _pair()
        with pytest.raises(MigrationFailed, match="said nothing"):
            await link.recv_some(timeout=0.2)
        ready = proto.Ready("migrating:vm1")
        await link.send([ready])
        data = await asyncio.wait_for(reader.readexactly(len(proto.encode(ready))), 5)
        assert proto.Decoder().feed(data) == [ready]
        assert link.bytes_sent == len(data)
        writer.close()
        await link.close()
        server.close()

    asyncio.run(main())
