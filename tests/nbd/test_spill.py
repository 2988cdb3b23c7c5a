"""The spill tier: when the store is full the coldest pages of that disk go to a file,
come back on read, and only a full spill file makes writes fail with ENOSPC."""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from memd.nbd.export import SwapDisk
from memd.nbd.pages import DISK_OID, DISK_POOL_ID
from memd.nbd.proto import Cmd, Errno
from memd.nbd.spill import FileSpill
from memd.nbd.transmission import Request
from tmem.host import TmemHost

PAGE = 4096


def page(i: int, salt: int = 0) -> bytes:
    return random.Random(i * 7919 + salt).randbytes(PAGE)  # incompressible: fills memory


def write(disk: SwapDisk, indexes: list[int], salt: int = 0) -> list[bytes]:
    reqs: list[Request] = [Request(Cmd.WRITE, 0, i, i * PAGE, PAGE, page(i, salt)) for i in indexes]
    return disk.execute(list(reqs))


def read(disk: SwapDisk, i: int) -> tuple[int, bytes]:
    (reply,) = disk.execute([Request(Cmd.READ, 0, 1, i * PAGE, PAGE)])
    return int.from_bytes(reply[4:8], "big"), reply[16:]


def spilled_disk(tmp: Path, budget: int, npages: int, capacity: int) -> SwapDisk:
    host = TmemHost(budget)
    spill = FileSpill(tmp / "vm.spill", npages, capacity, restore=False)
    return SwapDisk(host, "vm", npages * PAGE, spill=spill)


def test_writes_beyond_memory_spill_and_read_back(tmp_path: Path) -> None:
    disk = spilled_disk(tmp_path, 1 << 20, 1024, 1024)  # ~150 incompressible pages fit
    n = 800
    for start in range(0, n, 32):  # pipelined batches, as a guest's swap-out comes
        assert all(r[4:8] == bytes(4) for r in write(disk, list(range(start, start + 32))))
    stats = disk.stats("vm")
    assert stats.spilled_pages > 400 and stats.pages + stats.spilled_pages == n
    assert stats.spilled_out >= stats.spilled_pages
    for i in random.Random(1).sample(range(n), n):
        assert read(disk, i) == (0, page(i))
    assert disk.tmem.audit() == []
    assert os.stat(tmp_path / "vm.spill").st_size <= 1024 * PAGE


def test_the_coldest_pages_go_first(tmp_path: Path) -> None:
    disk = spilled_disk(tmp_path, 1 << 20, 1024, 1024)
    write(disk, list(range(100)))
    for _ in range(3):  # pages 0..49 stay hot
        for i in range(50):
            read(disk, i)
    write(disk, list(range(100, 400)))
    for i in range(50):
        read(disk, i)
    spill = disk.pages.spill
    assert spill is not None
    assert sum(spill.has(i) for i in range(50)) < sum(spill.has(i) for i in range(50, 100))


def test_enospc_only_when_spill_is_full_too(tmp_path: Path) -> None:
    disk = spilled_disk(tmp_path, 1 << 20, 1024, 100)
    replies = write(disk, list(range(600)))
    errors = [int.from_bytes(r[4:8], "big") for r in replies]
    assert errors[:200] == [0] * 200 and errors[-1] == Errno.ENOSPC
    assert set(errors) == {0, Errno.ENOSPC}
    ok = [i for i, e in enumerate(errors) if e == 0]
    stats = disk.stats("vm")
    assert stats.spilled_pages == 100 and stats.pages + 100 == len(ok)
    for i in ok[::7]:
        assert read(disk, i) == (0, page(i))
    # discarding spilled pages makes room again
    (trim,) = disk.execute([Request(Cmd.TRIM, 0, 9, 0, 600 * PAGE)])
    assert trim[4:8] == bytes(4) and disk.stats("vm").spilled_pages == 0
    assert write(disk, [599])[0][4:8] == bytes(4)


def test_rewrite_of_a_spilled_page_never_returns_the_old_copy(tmp_path: Path) -> None:
    disk = spilled_disk(tmp_path, 1 << 20, 1024, 1024)
    write(disk, list(range(500)))
    spill = disk.pages.spill
    assert spill is not None
    victim = next(i for i in range(500) if spill.has(i))
    write(disk, [victim], salt=1)
    assert read(disk, victim) == (0, page(victim, 1))
    assert not spill.has(victim) or spill.get(victim) == page(victim, 1)
    # a partial write of a spilled page reads its old bytes from the spill file
    other = next(i for i in range(500) if spill.has(i) and i != victim)
    (reply,) = disk.execute([Request(Cmd.WRITE, 0, 3, other * PAGE + 10, 5, b"hello")])
    assert reply[4:8] == bytes(4)
    want = page(other)[:10] + b"hello" + page(other)[15:]
    assert read(disk, other) == (0, want)


def test_spill_map_survives_a_graceful_stop(tmp_path: Path) -> None:
    from tests.tmem.fake_log import FakeLog

    log = FakeLog()
    host = TmemHost(1 << 20, log=log)
    disk = SwapDisk(
        host, "vm", 1024 * PAGE, spill=FileSpill(tmp_path / "vm.spill", 1024, 1024, restore=False)
    )
    write(disk, list(range(400)))
    spill = disk.pages.spill
    assert isinstance(spill, FileSpill) and spill.used > 0
    spill.close(keep=True)
    stored = log.crashed()  # the store as the next agent opens it
    host = TmemHost(1 << 20, log=stored)
    assert host.restore(stored.load()) == []
    again = SwapDisk(
        host, "vm", 1024 * PAGE, spill=FileSpill(tmp_path / "vm.spill", 1024, 1024, restore=True)
    )
    for i in range(0, 400, 13):
        assert read(again, i) == (0, page(i))
    assert host.get("vm", DISK_POOL_ID, DISK_OID, 399) in (None, page(399))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("wrt"), st.integers(0, 255)), max_size=120))
def test_spilling_disk_is_a_byte_array(
    tmp_path_factory: object, ops: list[tuple[str, int]]
) -> None:
    tmp = Path(str(tmp_path_factory.mktemp("spill")))  # type: ignore[attr-defined]
    disk = spilled_disk(tmp, 160 << 10, 256, 256)  # ~30 pages fit in memory
    model: dict[int, bytes] = {}
    for n, (op, i) in enumerate(ops):
        if op == "w":
            assert write(disk, [i], salt=n)[0][4:8] == bytes(4)
            model[i] = page(i, n)
        elif op == "t":
            disk.execute([Request(Cmd.TRIM, 0, 1, i * PAGE, PAGE)])
            model.pop(i, None)
        else:
            assert read(disk, i) == (0, model.get(i, bytes(PAGE)))
    for i in range(256):
        assert read(disk, i) == (0, model.get(i, bytes(PAGE)))
    assert disk.tmem.audit() == []
