"""GuestConnection's byte plumbing on a real socket pair: the vectored reply send.

``GuestConnection.send`` writes reply parts straight to the socket while the transport
holds nothing, and hands the transport only what the kernel did not take.  These tests
make the kernel take part of a send (more bytes than any socket buffer, a peer that
reads late) and check the peer gets every byte once, in order, across sends.
"""

from __future__ import annotations

import asyncio
import os
import socket

from memd.agent.connection import (
    MAX_PARTIAL_BYTES,
    READ_CHUNK,
    GuestConnection,
    PartialFrames,
    ScratchBuffer,
)


def _parts(seed: int, total: int) -> list[bytes | memoryview]:
    """Parts of odd sizes (some empty, some views) adding up to ``total`` bytes."""
    data = os.urandom(total)
    parts: list[bytes | memoryview] = []
    at, size = 0, 1 + seed
    while at < total:
        size = (size * 7919 + 13) % 300_000
        chunk = data[at:at + size]
        parts.append(memoryview(chunk) if len(parts) % 3 == 1 else chunk)
        if len(parts) % 5 == 0:
            parts.append(b"")
        at += len(chunk)
    return parts


async def _send_and_collect(batches: list[list[bytes | memoryview]]) -> bytes:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    _, conn = await loop.connect_accepted_socket(
        lambda: GuestConnection(None, ScratchBuffer(READ_CHUNK),
                                PartialFrames(MAX_PARTIAL_BYTES)), ours)
    try:
        for parts in batches:  # the later sends find the transport still holding bytes
            conn.send(parts)
        want = sum(len(p) for parts in batches for p in parts)
        got = bytearray()
        while len(got) < want:
            chunk = await loop.sock_recv(theirs, 1 << 20)
            assert chunk, "the connection closed early"
            got += chunk
        return bytes(got)
    finally:
        assert conn.transport is not None
        conn.transport.close()
        theirs.close()


def test_send_delivers_every_part_in_order_past_the_socket_buffer() -> None:
    batches = [_parts(seed, 9 << 20 if seed == 0 else 700_000) for seed in range(4)]
    got = asyncio.run(_send_and_collect(batches))
    assert got == b"".join(bytes(p) for parts in batches for p in parts)


def test_send_of_more_parts_than_one_writev_takes() -> None:
    many: list[bytes | memoryview] = [bytes([i % 251]) * (1 + i % 7) for i in range(5000)]
    got = asyncio.run(_send_and_collect([many, [b"tail"]]))
    assert got == b"".join(bytes(p) for p in many) + b"tail"
