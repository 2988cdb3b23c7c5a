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

import pytest

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
        chunk = data[at : at + size]
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
        lambda: GuestConnection(None, ScratchBuffer(READ_CHUNK), PartialFrames(MAX_PARTIAL_BYTES)),
        ours,
    )
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


class _DrainedTransport:
    """A transport whose peer reads as fast as it is written to: every write is sent
    whole, so it never holds bytes (what made part-by-part writes one syscall each)."""

    def __init__(self, wire_log: list[bytes]) -> None:
        self.wire_log = wire_log  # every byte that reached the peer, in order
        self.writes = 0

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | memoryview) -> None:
        self.writes += 1
        self.wire_log.append(bytes(data))


def test_send_resumes_writev_when_the_kernel_drains_not_one_write_per_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: after the kernel took only part of a reply, every remaining page went
    to transport.write on its own; with a peer reading fast the transport stayed empty
    and each page became one send() (27,845 sends for 781 GET_BATCH replies)."""
    sent: list[bytes] = []

    def writev(fd: int, buffers: list[bytes | memoryview]) -> int:
        # The kernel takes 10,000 bytes per call (as a socket buffer the peer drains).
        room, took = 10_000, 0
        for buf in buffers:
            piece = bytes(buf)[: room - took]
            sent.append(piece)
            took += len(piece)
            if took == room:
                break
        return took

    monkeypatch.setattr(os, "writev", writev)  # connection.py calls os.writev
    parts: list[bytes | memoryview] = [bytes([i]) * 4096 for i in range(200)]

    async def test() -> _DrainedTransport:
        conn = GuestConnection(None, ScratchBuffer(16), PartialFrames(MAX_PARTIAL_BYTES))
        transport = _DrainedTransport(sent)
        conn.transport = transport  # type: ignore[assignment]
        conn._fd = 99  # writev is the fake above
        conn.send(parts)
        return transport

    transport = asyncio.run(test())
    assert b"".join(sent) == b"".join(parts)  # writev's and the transport's, in order
    assert transport.writes <= len(parts) * 4096 // 10_000 + 1  # one per kernel-full
