"""A real TCG guest swaps to a memd swap disk: QEMU's NBD client, virtio-blk, Linux swap.

The guest (vm-images, 128 MiB RAM) gets a 512 MiB virtio disk that QEMU serves from memd
over NBD (``-blockdev driver=nbd,server.type=unix,…,reconnect-delay=…``), runs
``mkswap`` + ``swapon --discard``, then a workload that allocates about 2.5× its RAM in
pages whose content it can re-derive, touches all of them and checks every byte.  The
pages the kernel swapped out must be in the guest's tmem client, compressed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.nbd.conftest import SwapAgent
from tests.vm.harness import GuestVM

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


def test_guest_swaps_2_5x_its_ram_to_memd(boot_guest: Callable[..., GuestVM],
                                          tmp_path: Path) -> None:
    agent = SwapAgent(tmp_path, budget=256 << 20)
    try:
        disk = agent.add_disk("swapvm", SWAP_MIB << 20)
        guest = boot_guest(name="swapvm", memory_mib=RAM_MIB, ports=(),
                           nbd_disks=(Path(disk),))
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
        stats = agent.app.disks["swapvm"].describe()
        assert stats["errors"] == 0 and stats["reads"] > 0
        (pool,) = [p for p in agent.app.tmem.pool_stats("swapvm") if p.pool_id == 15]
        assert pool.ops.good_puts * 4 >= swapped_kib  # every swapped page went through memd
        # The workload exited: the kernel freed its swap slots and discarded them (TRIM).
        assert stats["trims"] > 0 and stats["pages"] * 4 <= swapped_kib
        assert agent.app.tmem.audit() == []
    finally:
        agent.close()
