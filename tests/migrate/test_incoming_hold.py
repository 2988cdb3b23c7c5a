"""The destination holds a guest's requests while its pages are still arriving.

Two real agents in one process (an asyncio loop in a thread, TLS on 127.0.0.1), a real
guest client on a real channel socket, and QEMU's own NBD client (qemu-io) on the swap
disk: the destination's guest is resumed before memd's final delta is in (as libvirt's
Finish phase may do); its HELLO, its gets and its disk reads wait, another guest on the
same agent is answered meanwhile, and once the transfer installs the guest every request
sees its pages.  Plus the hold's own rules (release, abort, time bound)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.guests import JobState
from hypervisor.lmdb_store import LmdbStore
from memd.agent.app import AgentApp
from memd.agent.holds import IncomingHolds
from memd.guest.client import GuestClient
from memd.migrate import libvirt
from tests.migrate.test_libvirt_driver import ScriptedDomain
from tests.support.loop_thread import LoopThread, shut_down
from tests.support.tls import make_pki

PAGES = 64
DISK = 4 << 20


def page(i: int) -> bytes:
    return (i.to_bytes(4, "little") + b"held page ") * 292 + bytes(8)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Pair:
    """A source and a destination agent on one loop thread."""

    def __init__(self, tmp: Path, pki: Path) -> None:
        self.tmp = tmp
        self.loop = LoopThread()
        self.stores: list[LmdbStore] = []
        self.src = self._app("src", pki)
        self.dst = self._app("dst", pki)
        _host, port = self.loop.run(self.dst.migration.listen("127.0.0.1:0"))
        self.dest = f"127.0.0.1:{port}"

    def _app(self, name: str, pki: Path) -> AgentApp:
        store = LmdbStore(
            self.tmp / name,
            budget_bytes=64 << 20,
            control_path=f"{self.tmp}/{name}.sock",
            host_boot_id="test",
        )
        self.stores.append(store)
        app = AgentApp(
            budget_bytes=64 << 20,
            store=store,
            tls_dir=pki,
            swap_markers=self.tmp / f"{name}-markers",
        )
        self.loop.run(app.start(None))
        return app

    def channel(self, app: AgentApp, guest: str) -> str:
        path = str(self.tmp / f"{id(app)}-{guest}.chan")
        self.loop.run(app.agent.add_channel(guest, path, mode="listen"))
        return path

    def disk(self, app: AgentApp, guest: str) -> str:
        path = str(self.tmp / f"{id(app)}-{guest}.nbd")
        self.loop.run(app.swap.add(guest, path, DISK))
        return path

    def emit(self, domain: ScriptedDomain, kind: str, detail: str) -> None:
        self.loop.loop.call_soon_threadsafe(domain.emit, kind, detail)

    def until(self, cond: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    def close(self) -> None:
        shut_down(self.loop, (self.src, self.dst), self.stores)


@pytest.fixture
def pair(tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    monkeypatch.setattr(libvirt, "POLL_SECONDS", 0.02)
    running = Pair(tmp_path, pki)
    try:
        yield running
    finally:
        running.close()


def client(path: str, boot_id: bytes) -> GuestClient:
    return GuestClient.for_unix_socket(path, boot_id=boot_id, timeout=30, reconnect_timeout=30)


def qemu_io(path: str, *commands: str) -> subprocess.Popen[str]:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return subprocess.Popen(
        [*args, f"nbd+unix:///?socket={path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    assert "Pattern verification failed" not in out, out
    return out


class GuestThread(threading.Thread):
    """A guest on the destination: HELLO, then every page back (records when)."""

    def __init__(self, path: str, boot_id: bytes, pool: int) -> None:
        super().__init__(daemon=True)
        self.path, self.boot_id, self.pool = path, boot_id, pool
        self.pages: list[bytes | None] = []
        self.error: BaseException | None = None
        self.done_at = 0.0

    def run(self) -> None:
        try:
            with client(self.path, self.boot_id) as c:
                c.connect()
                self.pages = [c.get(self.pool, 7, i) for i in range(PAGES)]
        except BaseException as err:  # reported by the test
            self.error = err
        self.done_at = time.monotonic()


def test_a_resumed_guest_waits_for_its_pages_and_others_do_not(pair: Pair) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    boot = os.urandom(16)
    # The guest on the source: persistent pages through its channel, and its swap disk.
    with client(pair.channel(pair.src, "vm1"), boot) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        for i in range(PAGES):
            c.put(pool, 7, i, page(i))
    finished(qemu_io(pair.disk(pair.src, "vm1"), "write -P 0x5a 0 256k"))
    # The destination serves vm1's channel and disk before the guest arrives, and vm2.
    vm1_chan, vm1_disk = pair.channel(pair.dst, "vm1"), pair.disk(pair.dst, "vm1")
    vm2_chan, vm2_disk = pair.channel(pair.dst, "vm2"), pair.disk(pair.dst, "vm2")
    domain = ScriptedDomain()
    armed = pair.loop.run(pair.src.migration.follow_libvirt("vm1", pair.dest, domain))
    assert armed["outcome"] == "armed"
    assert pair.dst.holds.guests() == ["vm1"]
    # libvirt resumes the guest on the destination before memd's final delta is in.
    guest = GuestThread(vm1_chan, boot, pool)
    guest.start()
    disk_read = qemu_io(vm1_disk, "read -P 0x5a 0 256k", "read -P 0 256k 64k")
    started = time.monotonic()
    # Another guest of the destination is answered at once meanwhile.
    with client(vm2_chan, os.urandom(16)) as other:
        other.connect()
        p2 = other.new_pool(persistent=True)
        other.put(p2, 1, 1, page(99))
        assert other.get(p2, 1, 1) == page(99)
    finished(qemu_io(vm2_disk, "write -P 0x33 0 64k", "read -P 0x33 0 64k"))
    time.sleep(0.5)
    assert guest.is_alive() and disk_read.poll() is None  # vm1 still waits
    assert pair.dst.migration.status()["held"] == ["vm1"]  # memd status shows it
    domain.look = JobState("paused", True)
    pair.emit(domain, "suspended", "migrated")  # memd's final delta + COMMIT
    guest.join(20)
    assert guest.error is None and not guest.is_alive()
    assert guest.pages == [page(i) for i in range(PAGES)]  # what it had on the source
    assert guest.done_at - started > 0.5
    finished(disk_read)
    assert pair.dst.holds.guests() == []
    domain.look = JobState("shut off", False)
    pair.emit(domain, "stopped", "migrated")
    pair.until(lambda: "vm1" not in pair.src.migration.outgoing)
    assert not pair.src.tmem.has_client("vm1")
    assert pair.src.tmem.audit() == [] and pair.dst.tmem.audit() == []


def test_a_qemu_starting_with_incoming_opens_a_held_disk_at_once(pair: Pair) -> None:
    """QEMU reads sector 0 while it creates the virtio disk, its main loop stopped until
    the answer comes: held, libvirt's migration waited for the hold to expire (60 s)."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-io") is None:
        pytest.skip("QEMU is not installed")
    from hypervisor.qmp import QmpMonitor

    disk = pair.disk(pair.dst, "vm1")

    async def hold() -> None:
        pair.dst.holds.hold("vm1")

    pair.loop.run(hold())
    qmp = pair.tmp / "incoming.qmp"
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",
            "-incoming",
            "defer",
            "-display",
            "none",
            "-nodefaults",
            "-machine",
            "pc,accel=tcg",
            "-blockdev",
            f"driver=nbd,server.type=unix,server.path={disk},node-name=swap0",
            "-blockdev",
            "driver=raw,file=swap0,node-name=swap",
            "-device",
            "virtio-blk-pci,drive=swap",
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        pair.until(qmp.exists, 10)
        started = time.monotonic()
        monitor = QmpMonitor.connect(str(qmp), timeout=10)
        try:
            assert monitor.execute("query-status")["status"] == "inmigrate"
        finally:
            monitor.close()
        assert time.monotonic() - started < 5
        held = qemu_io(disk, "read -P 0 4k 4k")  # anything else still waits
        time.sleep(0.3)
        assert held.poll() is None
        pair.loop.run(release(pair.dst))
        finished(held)
    finally:
        qemu.kill()
        qemu.wait()


async def release(app: AgentApp) -> None:
    app.holds.release("vm1", "test")


def test_an_aborted_transfer_releases_the_held_guest(pair: Pair) -> None:
    boot = os.urandom(16)
    with client(pair.channel(pair.src, "vm1"), boot) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        c.put(pool, 7, 0, page(0))
    vm1_chan = pair.channel(pair.dst, "vm1")
    domain = ScriptedDomain()
    pair.loop.run(pair.src.migration.follow_libvirt("vm1", pair.dest, domain))
    guest = GuestThread(vm1_chan, boot, pool)
    guest.start()
    time.sleep(0.3)
    assert guest.is_alive()
    domain.look = JobState("running", True)
    time.sleep(0.1)
    domain.look = JobState("running", False)  # libvirt's migration failed: ABORT
    guest.join(20)
    assert not guest.is_alive()
    # Answered without the pages (nothing arrived here: the guest runs on the source).
    assert guest.error is not None or guest.pages == [None] * PAGES
    assert pair.dst.holds.guests() == []
    assert pair.src.tmem.get("vm1", pool, (7, 0, 0), 0) == page(0)


def test_holds_release_expire_and_never_block_another_guest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        holds = IncomingHolds(timeout=0.3)
        holds.hold("vm1")
        assert holds.held("vm1") and not holds.held("vm2")
        t0 = time.monotonic()
        await holds.wait("vm2")  # not held: at once
        assert time.monotonic() - t0 < 0.05
        waiter = asyncio.ensure_future(holds.wait("vm1"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        holds.release("vm1", "installed")
        await asyncio.wait_for(waiter, 1)
        assert not holds.held("vm1")
        # A hold nobody releases ends HOLD timeout after the first request waited.
        holds.hold("vm3")
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, "memd.migrate"):
            await holds.wait("vm3")
        assert 0.25 < time.monotonic() - t0 < 1.0
        assert not holds.held("vm3") and "waited" in caplog.text
        await holds.wait("vm3")  # expired: no second wait
        # A connection that ends stops the wait, and is not cancelled by it.
        holds.hold("vm4")
        gone = asyncio.get_running_loop().create_future()
        waiter = asyncio.ensure_future(holds.wait("vm4", gone))
        await asyncio.sleep(0.02)
        gone.set_result(None)
        await asyncio.wait_for(waiter, 1)
        assert not gone.cancelled() and holds.held("vm4")

    asyncio.run(main())
