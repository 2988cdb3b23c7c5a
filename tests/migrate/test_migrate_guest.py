"""Acceptance with a real TCG guest (vm-images): persistent pages put through its memd
channel by a program in the guest, a memd swap disk in active use (the guest holds 1.4×
its RAM), QMP ``migrate`` from a source QEMU to a destination QEMU started with
``-incoming``, each beside its own ``memd serve`` in its own network namespace.  After the
guest resumes on the destination it verifies every persistent page and every swapped
byte; the source agent holds nothing; both audits are clean."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths, qemu_argv
from tests.hypervisor.vm.console import GuestShell
from tests.hypervisor.vm.harness import GuestVM
from tests.migrate import guest_steps
from tests.migrate.guest_steps import Shell, wait
from tests.migrate.netns import Agent, Net, Qmp, netns_available
from tests.support.tls import make_pki

pytestmark = pytest.mark.skipif(not netns_available(), reason="needs root, ip and openssl")

RAM_MIB = 128
HOLD_MIB = 180
PERSISTENT_PAGES = 3000


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


def verify(shell: Shell, pool: int) -> None:
    guest_steps.verify(shell, pool, hold_mib=HOLD_MIB, pages=PERSISTENT_PAGES)


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
        guest_steps.swap_on_memd_disk(src)
        pool = guest_steps.put_persistent_pages(src, PERSISTENT_PAGES)
        guest_steps.fill_memory(src, HOLD_MIB)
        guest_steps.assert_swap_in_use(a.cli("guests")[0]["swap"]["pages"], HOLD_MIB, RAM_MIB)

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
