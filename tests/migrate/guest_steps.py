"""What a real TCG guest does in the migration acceptance tests, one place for all of them
(QMP migration between namespaces, libvirt migration between two libvirt hosts, libvirt's
hook): put persistent pages through its memd channel, hold more memory than its RAM so the
kernel swaps to memd's disk, and verify both after the move (or after a cancelled one).

The guest runs two small programs written into it: ``/tmp/p.py`` (persistent pages) and
``/tmp/h.py`` (the memory it holds); both derive every page from its index, so either end
can check any page without a copy.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

from tests.hypervisor.vm.console import GuestShell
from tests.hypervisor.vm.harness import GuestVM

T = TypeVar("T")

#: A page's bytes from its index (in the guest's programs).
PAGE = r"""
def page(i):
    word = (i * 2654435761 & 0xFFFFFFFF).to_bytes(4, "little")
    return i.to_bytes(8, "little") * 64 + word * 640 + bytes(1024)
"""

#: Puts (argv[1] == "put") or verifies ("check POOL") persistent pages via the guest daemon.
_PERSIST = (
    "import sys\nsys.path.insert(0, '/usr/lib/memd')\n"
    + PAGE
    + r"""
from memd.guest.cli import daemon_client
n = __PAGES__
c = daemon_client()
with c:
    if sys.argv[1] == "put":
        pool = c.new_pool(persistent=True)
        for s in range(0, n, 64):
            c.put_batch(pool, [(5, i, page(i)) for i in range(s, min(n, s + 64))])
        print("POOL=%d" % pool)
    else:
        pool = int(sys.argv[2])
        bad = 0
        for s in range(0, n, 64):
            got = c.get_batch(pool, [(5, i) for i in range(s, min(n, s + 64))])
            bad += sum(1 for i, g in zip(range(s, n), got) if g != page(i))
        print("PERSIST pages=%d bad=%d" % (n, bad))
"""
)

#: Fills HOLD_MIB (the kernel swaps the excess to memd), waits for /tmp/go, verifies.
HOLD = (
    "import os, sys, time\n"
    + PAGE
    + r"""
n = int(sys.argv[1]) * 256
buf = bytearray(n * 4096)
for i in range(n):
    buf[i * 4096:(i + 1) * 4096] = page(i)
print("FILLED", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.5)
bad = sum(1 for i in range(n) if buf[i * 4096:(i + 1) * 4096] != page(i))
print("HOLD pages=%d bad=%d" % (n, bad), flush=True)
"""
)


def persist_script(pages: int) -> str:
    """The text of ``/tmp/p.py`` for ``pages`` persistent pages."""
    return _PERSIST.replace("__PAGES__", str(pages))


#: A guest's console as the tests drive it.
Shell = GuestShell | GuestVM


def wait(what: Callable[[], T], timeout: float, message: str) -> T:
    """``what()`` every half second until it is true; its value.  Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {message}"
        time.sleep(0.5)


def swap_on_memd_disk(shell: Shell) -> None:
    """The guest's /dev/vda (memd's NBD swap disk) becomes its swap (discarding freed pages)."""
    shell.check("mkswap /dev/vda && swapon -d /dev/vda")


def put_persistent_pages(shell: Shell, pages: int) -> int:
    """Write both programs into the guest and put ``pages`` persistent pages; the pool id."""
    shell.write_file("/tmp/p.py", persist_script(pages).encode())
    shell.write_file("/tmp/h.py", HOLD.encode())
    return pool_of(shell.check("python3 /tmp/p.py put", timeout=600))


def pool_of(output: str) -> int:
    """The pool id ``/tmp/p.py put`` printed."""
    found = re.search(r"POOL=(\d+)", output)
    assert found is not None, output
    return int(found.group(1))


def fill_memory(shell: Shell, hold_mib: int) -> None:
    """Start the guest holding ``hold_mib`` in the background; return once it is filled."""
    shell.check(
        f"(python3 /tmp/h.py {hold_mib} > /tmp/hold.out 2>&1; echo rc=$? >> /tmp/hold.out) &"
    )
    wait(
        lambda: "FILLED" in shell.run("cat /tmp/hold.out", timeout=300).stdout,
        1200,
        "the guest filled its memory",
    )


def assert_swap_in_use(swapped_pages: int, hold_mib: int, ram_mib: int) -> None:
    """memd's disk holds at least half of what the guest holds beyond its RAM."""
    assert swapped_pages > (hold_mib - ram_mib) * 256 // 2, swapped_pages


def check_pages(shell: Shell, pool: int, pages: int) -> None:
    """Every persistent page reads back as it was put."""
    out = shell.check(f"python3 /tmp/p.py check {pool}", timeout=600)
    assert f"PERSIST pages={pages} bad=0" in out, out


def verify(shell: Shell, pool: int, *, hold_mib: int, pages: int) -> None:
    """Let the guest's workload check its memory (swapped in from memd), then check the
    persistent pages and that the kernel saw no I/O error on the swap disk."""
    shell.check("touch /tmp/go")

    def finished() -> str:
        out = shell.run("cat /tmp/hold.out", timeout=300).stdout
        return out if "rc=" in out else ""

    out = wait(finished, 1800, "the guest verified its memory")
    assert f"HOLD pages={hold_mib * 256} bad=0" in out and "rc=0" in out, out
    check_pages(shell, pool, pages)
    dmesg = shell.check("dmesg", timeout=120)
    assert "I/O error" not in dmesg and "Read-error" not in dmesg, dmesg[-2000:]
