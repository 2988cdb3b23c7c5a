"""A real TCG guest swaps to a memd swap disk: QEMU's NBD client, virtio-blk, Linux swap.

The guest (vm-images, 128 MiB RAM) gets a 512 MiB virtio disk that QEMU serves from memd
over NBD (``-blockdev driver=nbd,server.type=unix,…,reconnect-delay=…``), runs
``mkswap`` + ``swapon --discard``, then a workload that allocates about 2.5× its RAM in
pages whose content it can re-derive, touches all of them and checks every byte.  The
pages the kernel swapped out must be in the guest's tmem client, compressed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.hypervisor.vm.harness import GuestError, GuestVM
from tests.nbd.conftest import SwapAgent, accepts

RAM_MIB = 128
SWAP_MIB = 512

#: Runs in the guest (python3-minimal): fills WORKLOAD_MIB with pages derived from their
#: index, touches them all again, then verifies every byte; prints one summary line.
WORKLOAD = r"""
import sys
mib = int(sys.argv[1])
n = mib * 256
buf = bytearray(n * 4096)
def page(i):
    word = (i * 2654435761 & 0xFFFFFFFF).to_bytes(4, "little")
    head = i.to_bytes(8, "little") * 64            # 512 bytes naming the page
    return head + word * 640 + bytes(1024)         # compressible, never all zero
for i in range(n):
    buf[i * 4096:(i + 1) * 4096] = page(i)
info = dict(line.split(":") for line in open("/proc/meminfo"))
swapped = int(info["SwapTotal"].split()[0]) - int(info["SwapFree"].split()[0])
bad = 0
for i in range(n):
    if buf[i * 4096:(i + 1) * 4096] != page(i):
        bad += 1
print("WORKLOAD pages=%d bad=%d swapped_kib=%d" % (n, bad, swapped))
"""


def test_guest_swaps_2_5x_its_ram_to_memd(
    boot_guest: Callable[..., GuestVM], tmp_path: Path
) -> None:
    agent = SwapAgent(tmp_path, budget=256 << 20)
    guest: GuestVM | None = None
    try:
        disk = agent.add_disk("swapvm", SWAP_MIB << 20)
        guest = boot_guest(name="swapvm", memory_mib=RAM_MIB, ports=(), nbd_disks=(Path(disk),))
        assert guest.check("cat /sys/block/vda/size").strip() == str(SWAP_MIB << 11)
        guest.check("mkswap /dev/vda && swapon -d /dev/vda")  # busybox: -d is --discard
        assert "/dev/vda" in guest.check("cat /proc/swaps")
        guest.write_file("/tmp/w.py", WORKLOAD.encode())
        workload_mib = RAM_MIB * 5 // 2
        out = guest.check(f"python3 /tmp/w.py {workload_mib}", timeout=1200)
        found = re.search(r"WORKLOAD pages=(\d+) bad=(\d+) swapped_kib=(\d+)", out)
        assert found, out
        pages, bad, swapped_kib = map(int, found.groups())
        assert (pages, bad) == (workload_mib * 256, 0)
        # With all pages touched, the kernel had swapped out more than the RAM it lacked.
        assert swapped_kib > (workload_mib - RAM_MIB) * 1024
        stats = agent.app.swap.disks["swapvm"].describe()
        assert stats["errors"] == 0 and stats["reads"] > 0
        (pool,) = [p for p in agent.app.tmem.pool_stats("swapvm") if p.pool_id == 15]
        assert pool.ops.good_puts * 4 >= swapped_kib  # every swapped page went through memd
        assert stats["trims"] >= 1  # swapon -d discarded the whole disk once (discard=unmap)
        assert stats["ratio"] > 2  # the workload's pages compress
        assert agent.app.tmem.audit() == []
    finally:
        _stop_before_its_disk(guest)
        agent.close()


def _serve(run: Path, disk: Path) -> subprocess.Popen[bytes]:
    """`memd serve --swap` as its own process (so that it can be killed with -9)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(run / "control.sock"),
            "serve",
            "--store",
            str(run / "store"),
            "--budget",
            "256M",
            "--swap",
            f"swapvm={disk}:{SWAP_MIB}M",
        ],
        env={**os.environ, "MEMD_RUN_DIR": str(run)},
        stdout=subprocess.DEVNULL,
        stderr=open(run / "memd.log", "ab"),  # noqa: SIM115 (the process owns it)
    )
    deadline = time.monotonic() + 30
    while not accepts(disk):
        assert proc.poll() is None and time.monotonic() < deadline, (run / "memd.log").read_text()
        time.sleep(0.05)
    return proc


def _stop_before_its_disk(guest: GuestVM | None) -> None:
    """QEMU first: a QEMU whose NBD server went away first waited out its reconnect
    delay at quit (30 s of each test's teardown)."""
    if guest is not None:
        guest.stop()


def _swap_used_kib(guest: GuestVM) -> int:
    info = guest.check("cat /proc/meminfo", timeout=120)
    total = int(re.search(r"SwapTotal:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
    free = int(re.search(r"SwapFree:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
    return total - free


def _disk_row(run: Path) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(run / "control.sock"),
            "guests",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MEMD_RUN_DIR": str(run)},
    ).stdout
    swap: dict[str, object] = json.loads(out)[0]["swap"]
    return swap


def test_kill_9_mid_swap_the_workload_still_verifies_every_page(
    boot_guest: Callable[..., GuestVM], tmp_path: Path
) -> None:
    """memd keeps the swap disk's pages in its crash-safe store: a kill -9 in the middle
    of the swapping is a pause for the guest (QEMU's NBD client reconnects to the
    restarted agent, reconnect-delay), never an I/O error, and every byte comes back."""
    run = tmp_path / "run"
    run.mkdir()
    disk = run / "swapvm.nbd"
    memd = _serve(run, disk)
    guest: GuestVM | None = None
    try:
        guest = boot_guest(name="swapvm", memory_mib=RAM_MIB, ports=(), nbd_disks=(disk,))
        guest.check("mkswap /dev/vda && swapon -d /dev/vda")
        guest.write_file("/tmp/w.py", WORKLOAD.encode())
        workload_mib = RAM_MIB * 5 // 2
        guest.check(f"(python3 /tmp/w.py {workload_mib} > /tmp/out 2>&1; echo rc=$? >> /tmp/out) &")
        deadline = time.monotonic() + 600
        while _swap_used_kib(guest) < 64 * 1024:  # the workload is well into swap
            assert time.monotonic() < deadline
            time.sleep(2)
        memd.kill()  # kill -9, mid-workload
        memd.wait()
        time.sleep(1)
        memd = _serve(run, disk)
        out = ""
        deadline = time.monotonic() + 900
        while "rc=" not in out:
            assert time.monotonic() < deadline, out
            time.sleep(3)
            try:
                out = guest.run("cat /tmp/out", timeout=120).stdout
            except GuestError:
                continue  # the shell itself may be waiting on swap
        assert re.search(r"WORKLOAD pages=(\d+) bad=0 ", out) and "rc=0" in out, out
        assert f"pages={workload_mib * 256} " in out
        dmesg = guest.check("dmesg", timeout=120)
        # The kernel logs "I/O error, dev vda" (block layer) or "Read-error on swap-device"
        # (swap) for a failed swap request: neither may appear.
        assert "I/O error" not in dmesg and "Read-error" not in dmesg, dmesg[-2000:]
        row = _disk_row(run)
        assert int(row["lost_pages"]) == 0 and int(row["errors"]) == 0  # type: ignore[call-overload]
    finally:
        _stop_before_its_disk(guest)
        memd.terminate()
        memd.wait(timeout=30)
