"""Acceptance with a real TCG guest (vm-images): persistent pages put through its memd
channel by a program in the guest, a memd swap disk in active use (the guest holds 1.4×
its RAM), QMP ``migrate`` from a source QEMU to a destination QEMU started with
``-incoming``, each beside its own ``memd serve`` in its own network namespace.  After the
guest resumes on the destination it verifies every persistent page and every swapped
byte; the source agent holds nothing; both audits are clean."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths, qemu_argv
from tests.hypervisor.vm.console import GuestShell
from tests.hypervisor.vm.harness import GuestVM
from tests.migrate.netns import Agent, Net, Qmp, netns_available
from tests.support.tls import make_pki

pytestmark = pytest.mark.skipif(not netns_available(), reason="needs root, ip and openssl")

RAM_MIB = 128
HOLD_MIB = 180
PERSISTENT_PAGES = 3000

PAGE = r"""
def page(i):
    word = (i * 2654435761 & 0xFFFFFFFF).to_bytes(4, "little")
    return i.to_bytes(8, "little") * 64 + word * 640 + bytes(1024)
"""

#: Puts (argv[1] == "put") or verifies ("check POOL") persistent pages via the guest daemon.
PERSIST = (
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
""".replace("__PAGES__", str(PERSISTENT_PAGES))
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


class SourceVM(GuestVM):
    """The harness's guest plus a second QMP monitor for memd."""

    @property
    def memd_qmp(self) -> Path:
        return self.workdir / "memd.qmp"

    def argv(self) -> list[str]:
        return [*super().argv(), "-qmp", f"unix:{self.memd_qmp},server=on,wait=off"]


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(uuid.uuid4().hex[:6], subnet=int(uuid.uuid4().int % 240) + 5)
    try:
        n.create()
        yield n
    finally:
        n.delete()


def wait(what: Any, timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {message}"
        time.sleep(0.5)


def verify(shell: GuestShell | GuestVM, pool: int) -> None:
    """Let the guest's workload check its memory, then check the persistent pages."""
    shell.check("touch /tmp/go")
    out = wait(
        lambda: "rc=" in (o := shell.run("cat /tmp/hold.out", timeout=300).stdout) and o,
        1800,
        "the guest verified its memory",
    )
    assert f"HOLD pages={HOLD_MIB * 256} bad=0" in out and "rc=0" in out, out
    out = shell.check(f"python3 /tmp/p.py check {pool}", timeout=600)
    assert f"PERSIST pages={PERSISTENT_PAGES} bad=0" in out, out
    dmesg = shell.check("dmesg", timeout=120)
    assert "I/O error" not in dmesg and "Read-error" not in dmesg, dmesg[-2000:]


@pytest.mark.parametrize("scenario", ["moved", "cancelled", "destination-killed"])
def test_a_real_guest_migrates_with_its_persistent_pages_and_swap(
    vm_image: ImagePaths, net: Net, tmp_path_factory: pytest.TempPathFactory, scenario: str
) -> None:
    root = Path(tmp_path_factory.mktemp("mg", numbered=True))
    tls = make_pki(root / "pki", server_addresses=[net.addr_a, net.addr_b])
    a = Agent(net.ns_a, net.addr_a, root / "a", tls)
    b = Agent(net.ns_b, net.addr_b, root / "b", tls)
    qa, qb = root / "qa", root / "qb"
    src = SourceVM(
        vm_image, qa, name="vm1", memory_mib=RAM_MIB, ports=(CHANNEL_NAME,), nbd_disks=(a.swap,)
    )
    dst: subprocess.Popen[bytes] | None = None
    dst_qmp: Qmp | None = None
    shell: GuestShell | None = None
    try:
        a.start(qemu_channel=src.channel_sockets[CHANNEL_NAME], swap_mib=512)
        qb.mkdir()
        b_channel = qb / f"vm1.{CHANNEL_NAME}.sock"
        b.start(qemu_channel=b_channel, swap_mib=512)
        src.start(timeout=300)
        src.check("mkswap /dev/vda && swapon -d /dev/vda")
        src.write_file("/tmp/p.py", PERSIST.encode())
        src.write_file("/tmp/h.py", HOLD.encode())
        out = src.check("python3 /tmp/p.py put", timeout=600)
        pool = int(re.search(r"POOL=(\d+)", out).group(1))  # type: ignore[union-attr]
        src.check(
            f"(python3 /tmp/h.py {HOLD_MIB} > /tmp/hold.out 2>&1; echo rc=$? >> /tmp/hold.out) &"
        )
        wait(
            lambda: "FILLED" in src.run("cat /tmp/hold.out", timeout=300).stdout,
            1200,
            "the guest filled its memory",
        )
        swapped = a.cli("guests")[0]["swap"]["pages"]
        assert swapped > (HOLD_MIB - RAM_MIB) * 256 // 2, swapped  # the disk is in use

        argv = qemu_argv(
            vm_image,
            name="vm1",
            memory_mib=RAM_MIB,
            console_socket=qb / "console.sock",
            qmp_socket=qb / "qmp.sock",
            channels={CHANNEL_NAME: b_channel},
            nbd_disks=(b.swap,),
        )
        mig = root / "mig.sock"
        with open(qb / "qemu.log", "wb") as log:
            dst = subprocess.Popen(
                [*argv, "-incoming", f"unix:{mig}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait(
            lambda: (qb / "qmp.sock").exists() and (qb / "console.sock").exists(),
            30,
            "destination QEMU",
        )
        dst_qmp = Qmp(qb / "qmp.sock", 30)
        shell = GuestShell(qb / "console.sock", qb / "console.log")

        armed = a.cli("migrate", "vm1", "--to", b.address, "--qmp", str(src.memd_qmp))
        assert armed["outcome"] == "armed"
        if scenario != "moved":  # QEMU crawls: memd is done long before, and waits
            src.qmp("migrate-set-parameters", **{"max-bandwidth": 64 << 10})
        src.qmp("migrate", uri=f"unix:{mig}")
        if scenario == "moved":
            done = wait(lambda: a.cli("status")["migrations"]["finished"], 900, "memd's transfer")
            assert done[-1]["phase"] == "done", (done, a.tail(), b.tail())
            wait(
                lambda: dst_qmp.execute("query-status")["status"] == "running",
                120,
                "the guest runs on the destination",
            )
            assert a.cli("status")["tmem"]["persistent_pages"] == 0
            assert "vm1" not in {c["client"] for c in a.cli("clients")}
            shell.attach(timeout=120)
            verify(shell, pool)
            assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
            print("migration", done[-1])
            return
        wait(
            lambda: b.cli("status")["tmem"]["persistent_pages"] >= PERSISTENT_PAGES,
            300,
            "the destination staged the guest's pages",
        )
        time.sleep(1)  # half way: QEMU is still copying RAM
        assert src.qmp("query-migrate")["status"] == "active"
        if scenario == "cancelled":
            src.qmp("migrate_cancel")
        else:
            b.kill()
        done = wait(lambda: a.cli("status")["migrations"]["finished"], 300, "memd gave up")
        assert done[-1]["phase"] == "aborted", done
        wait(
            lambda: src.qmp("query-migrate")["status"] == "cancelled",
            120,
            "QEMU's migration cancelled",
        )
        assert src.qmp("query-status")["status"] == "running"
        verify(src, pool)
        if scenario == "destination-killed":
            b.start(qemu_channel=b_channel, swap_mib=512)  # back: nothing of vm1 there
        wait(
            lambda: b.cli("status")["tmem"]["persistent_pages"] == 0,
            60,
            "the destination holds nothing",
        )
        assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
    finally:
        if shell is not None:
            shell.close()
        if dst_qmp is not None:
            with contextlib.suppress(Exception):
                dst_qmp.execute("quit")
            dst_qmp.close()
        if dst is not None:
            try:
                dst.wait(10)
            except subprocess.TimeoutExpired:
                dst.kill()
        src.stop()
        a.stop()
        b.stop()
