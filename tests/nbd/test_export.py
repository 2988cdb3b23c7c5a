"""SwapDisk on a real TmemHost: byte ranges against a bytearray model, batching,
errors, and the disk pool's place in the guest's client (hidden from its channel, kept
across its reboot, and a restart through the store)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd.nbd.export import DISK_OID, DISK_POOL_ID, SwapDisk
from memd.nbd.proto import Cmd, Errno
from memd.nbd.transmission import Rejected, Request
from tests.tmem.fake_log import FakeLog
from tmem.host import TmemHost
from tmem.types import PoolFlag

PAGE = 4096
SIZE = 64 * PAGE


def ok(cookie: int) -> bytes:
    return b"\x67\x44\x66\x98" + bytes(4) + cookie.to_bytes(8, "big")


def err(cookie: int, errno: int) -> bytes:
    return b"\x67\x44\x66\x98" + errno.to_bytes(4, "big") + cookie.to_bytes(8, "big")


def req(
    cmd: Cmd, offset: int = 0, length: int = 0, data: bytes = b"", cookie: int = 1, flags: int = 0
) -> Request:
    return Request(cmd, flags, cookie, offset, len(data) if cmd == Cmd.WRITE else length, data)


def read(disk: SwapDisk, offset: int, length: int) -> bytes:
    (reply,) = disk.execute([req(Cmd.READ, offset, length, cookie=9)])
    assert reply[:16] == ok(9)
    return reply[16:]


_OPS = st.one_of(
    st.tuples(
        st.just(Cmd.WRITE),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * PAGE),
        st.sampled_from([0, 0x41, None]),
    ),
    st.tuples(st.just(Cmd.TRIM), st.integers(0, SIZE - 1), st.integers(0, 5 * PAGE), st.none()),
    st.tuples(
        st.just(Cmd.WRITE_ZEROES), st.integers(0, SIZE - 1), st.integers(0, 5 * PAGE), st.none()
    ),
    st.tuples(st.just(Cmd.READ), st.integers(0, SIZE - 1), st.integers(0, 3 * PAGE), st.none()),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_OPS, max_size=25), st.booleans())
def test_disk_behaves_like_a_byte_array(
    ops: list[tuple[Cmd, int, int, int | None]], pipelined: bool
) -> None:
    """Whatever the mix of aligned, partial and spanning requests, in one batch or one
    at a time, reads see the last write; trimmed pages read as zeros or as before."""
    disk = SwapDisk(TmemHost(64 << 20), "vm", SIZE)
    model = bytearray(SIZE)
    trimmed: set[int] = set()  # pages whose content a TRIM made undefined
    batch: list[Request | Rejected] = []
    expect: list[bytes | None] = []
    for n, (cmd, offset, length, fill) in enumerate(ops):
        length = min(length, SIZE - offset)
        if cmd == Cmd.WRITE:
            data = os.urandom(length) if fill is None else bytes([fill]) * length
            model[offset : offset + length] = data
            trimmed -= set(range(offset // PAGE, (offset + length - 1) // PAGE + 1))
            batch.append(req(cmd, offset, data=data, cookie=n))
            expect.append(ok(n))
        elif cmd == Cmd.READ:
            batch.append(req(cmd, offset, length, cookie=n))
            expect.append(None if trimmed else ok(n) + bytes(model[offset : offset + length]))
        else:
            full = range(-(-offset // PAGE), (offset + length) // PAGE)
            for page in full:
                model[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
            if cmd == Cmd.TRIM:
                trimmed |= set(full)  # reads may see zeros or the old bytes: both are fine
            else:
                model[offset : offset + length] = bytes(length)
                trimmed -= set(range(offset // PAGE, (offset + max(length, 1) - 1) // PAGE + 1))
            batch.append(req(cmd, offset, length, cookie=n))
            expect.append(ok(n))
        if not pipelined:
            (got,) = disk.execute(batch[-1:])
            assert expect[-1] is None or got == expect[-1]
    if pipelined:
        for got, want in zip(disk.execute(batch), expect, strict=True):
            assert want is None or got == want
    # memd flushes trimmed pages, so the model with zeros there is exact at the end
    assert read(disk, 0, SIZE) == bytes(model)
    assert disk.tmem.audit() == []


def test_pipelined_single_page_writes_become_one_batch_and_repeat_in_order() -> None:
    host = TmemHost(64 << 20)
    disk = SwapDisk(host, "vm", SIZE)
    pages = [bytes([i]) * PAGE for i in range(1, 6)]
    reqs: list[Request | Rejected] = [
        req(Cmd.WRITE, i * PAGE, data=p, cookie=i) for i, p in enumerate(pages)
    ]
    reqs.append(req(Cmd.WRITE, 0, data=b"\x77" * PAGE, cookie=10))  # same page again
    reqs.append(req(Cmd.READ, 0, 2 * PAGE, cookie=11))
    replies = disk.execute(reqs)
    assert replies[:6] == [ok(i) for i in range(5)] + [ok(10)]
    assert replies[6] == ok(11) + b"\x77" * PAGE + pages[1]
    assert disk.stats("vm").pages == 5


def test_rejected_requests_answer_their_errno() -> None:
    disk = SwapDisk(TmemHost(64 << 20), "vm", SIZE)
    assert disk.execute([Rejected(5, Errno.EINVAL, "x", 0)]) == [err(5, Errno.EINVAL)]
    assert disk.stats("vm").errors == 1


def test_store_full_is_enospc_and_reads_never_see_stale_bytes() -> None:
    host = TmemHost(1 << 20)
    disk = SwapDisk(host, "vm", 1024 * PAGE)
    replies = disk.execute(
        [req(Cmd.WRITE, i * PAGE, data=os.urandom(PAGE), cookie=i) for i in range(400)]
    )
    assert err(399, Errno.ENOSPC) in replies and replies[0] == ok(0)
    (single,) = disk.execute([req(Cmd.WRITE, 500 * PAGE, data=os.urandom(3 * PAGE), cookie=7)])
    assert single == err(7, Errno.ENOSPC)
    host.set_budget(64 << 20)
    assert host.audit() == []


def test_whole_disk_trim_is_one_flush_object() -> None:
    host = TmemHost(64 << 20)
    disk = SwapDisk(host, "vm", SIZE)
    disk.execute([req(Cmd.WRITE, 0, data=os.urandom(SIZE))])
    assert disk.stats("vm").pages == 64
    assert disk.execute([req(Cmd.TRIM, 0, SIZE, cookie=3)]) == [ok(3)]
    assert disk.stats("vm").pages == 0 and read(disk, 0, SIZE) == bytes(SIZE)


def test_flush_waits_for_the_commit() -> None:
    commits: list[int] = []
    disk = SwapDisk(TmemHost(64 << 20), "vm", SIZE, commit=lambda: commits.append(1))
    assert disk.execute([req(Cmd.FLUSH, cookie=4)]) == [ok(4)] and commits == [1]


def test_sizes_are_checked() -> None:
    for size in (0, 4095, 1 << 45):
        with pytest.raises(ValueError):
            SwapDisk(TmemHost(), "vm", size)


def test_disk_pool_is_the_guests_persistent_pool_15_and_survives_a_crash() -> None:
    log = FakeLog()
    host = TmemHost(64 << 20, log=log)
    disk = SwapDisk(host, "vm", SIZE)
    assert (DISK_POOL_ID, int(PoolFlag.PERSISTENT)) in host.pool_ids("vm")
    disk.execute([req(Cmd.WRITE, PAGE, data=b"\x5a" * PAGE)])
    crashed = log.crashed()  # what the store holds if the agent died right now
    other = TmemHost(64 << 20, log=crashed)
    assert other.restore(crashed.load()) == []
    again = SwapDisk(other, "vm", SIZE)  # finds the pool the store restored
    assert read(again, PAGE, PAGE) == b"\x5a" * PAGE
    assert other.get("vm", DISK_POOL_ID, DISK_OID, 1) == b"\x5a" * PAGE


def test_two_guests_disks_never_meet() -> None:
    host = TmemHost(64 << 20)
    a, b = SwapDisk(host, "a", SIZE), SwapDisk(host, "b", SIZE)
    a.execute([req(Cmd.WRITE, 0, data=b"A" * PAGE)])
    b.execute([req(Cmd.WRITE, 0, data=b"B" * PAGE)])
    assert read(a, 0, PAGE) == b"A" * PAGE and read(b, 0, PAGE) == b"B" * PAGE
    b.execute([req(Cmd.TRIM, 0, SIZE)])
    assert read(a, 0, PAGE) == b"A" * PAGE


def test_lost_contents_read_as_eio_until_written_or_trimmed() -> None:
    """A disk whose agent died: no page it held may come back as other bytes."""
    host = TmemHost(64 << 20)
    disk = SwapDisk(host, "vm", SIZE, contents_lost=True)
    assert disk.stats("vm").lost_pages == 64
    assert disk.execute([req(Cmd.READ, 0, PAGE, cookie=1)]) == [err(1, Errno.EIO)]
    assert disk.execute([req(Cmd.READ, 3 * PAGE, 10, cookie=2)]) == [err(2, Errno.EIO)]
    # a partial write needs the old bytes of the page: EIO as well
    assert disk.execute([req(Cmd.WRITE, 100, data=b"x", cookie=3)]) == [err(3, Errno.EIO)]
    replies = disk.execute(
        [
            req(Cmd.WRITE, 0, data=b"a" * PAGE, cookie=4),
            req(Cmd.WRITE, 5 * PAGE, data=b"b" * PAGE, cookie=5),
            req(Cmd.READ, 0, PAGE, cookie=6),
            req(Cmd.READ, PAGE, PAGE, cookie=7),
        ]
    )
    assert replies == [ok(4), ok(5), ok(6) + b"a" * PAGE, err(7, Errno.EIO)]
    assert disk.execute([req(Cmd.TRIM, PAGE, 2 * PAGE + 1, cookie=8)]) == [ok(8)]
    assert read(disk, PAGE, 2 * PAGE) == bytes(2 * PAGE)  # trimmed whole: zeros are fine
    assert disk.stats("vm").lost_pages == 64 - 4
    assert disk.execute([req(Cmd.TRIM, 0, SIZE, cookie=9)]) == [ok(9)]  # swapon --discard
    assert disk.stats("vm").lost_pages == 0 and read(disk, 0, SIZE) == bytes(SIZE)
