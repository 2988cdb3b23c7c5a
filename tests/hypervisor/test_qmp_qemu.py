"""QmpMonitor / AsyncQmpMonitor against a real QEMU (TCG, no disk: SeaBIOS idles)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.qmp import (
    AsyncQmpMonitor,
    QmpMonitor,
    info_mtree_flat,
    parse_mtree_flat,
    qom_set_merge,
    query_memdev,
)
from memd.errors import CommandFailed, NotFound, Unavailable
from tests.support.bare_qemu import QEMU, start_bare_qemu, stop_bare_qemu

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


class Qemu:
    def __init__(self, proc: subprocess.Popen[bytes], qmp: str) -> None:
        self.proc = proc
        self.qmp = qmp


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    sock = tmp_path / "qmp.sock"
    proc = start_bare_qemu([sock], "-m", "64", "-nographic", log=tmp_path / "qemu.log", timeout=10)
    try:
        yield Qemu(proc, str(sock))
    finally:
        stop_bare_qemu(proc)


def test_sync_monitor_queries_qom_and_hmp(qemu: Qemu) -> None:
    with QmpMonitor.connect(qemu.qmp) as mon:
        assert mon.execute("query-status")["status"] == "running"
        objects = {o["name"]: o["type"] for o in mon.execute("qom-list", {"path": "/objects"})}
        assert objects["pc.ram"] == "child<memory-backend-ram>"
        assert mon.execute("qom-get", {"path": "/objects/pc.ram", "property": "merge"}) is True

        [ram] = query_memdev(mon)
        assert (ram.id, ram.size, ram.merge) == ("pc.ram", 64 << 20, True)
        qom_set_merge(mon, "pc.ram", False)
        assert not query_memdev(mon)[0].merge
        qom_set_merge(mon, "/objects/pc.ram", True)
        assert query_memdev(mon)[0].merge

        ram_ranges = [r for r in info_mtree_flat(mon) if r.region == "pc.ram"]
        assert sum(r.size for r in ram_ranges) == 64 << 20  # below 4 GiB, all of it
        assert ram_ranges[0].start == 0 and ram_ranges[-1].last == (64 << 20) - 1

        with pytest.raises(CommandFailed) as info:
            mon.execute("qom-get", {"path": "/objects/nope", "property": "merge"})
        assert info.value.error_class == "DeviceNotFound"
        with pytest.raises(NotFound):
            qom_set_merge(mon, "nope", True)
        assert "unknown command" in mon.hmp("no-such-hmp-command")

        assert mon.execute("quit") == {}
    assert qemu.proc.wait(10) == 0


def test_async_monitor(qemu: Qemu) -> None:
    async def main() -> None:
        mon = await AsyncQmpMonitor.connect(qemu.qmp)
        try:
            assert (await mon.execute("query-status"))["running"] is True
            views = parse_mtree_flat(await mon.hmp("info mtree -f"))
            assert any(r.region == "pc.ram" for r in views["memory"])
            await mon.execute("quit")
        finally:
            await mon.close()

    asyncio.run(main())
    assert qemu.proc.wait(10) == 0


def test_monitor_that_dies_is_unavailable(qemu: Qemu) -> None:
    mon = QmpMonitor.connect(qemu.qmp)
    try:
        qemu.proc.kill()
        qemu.proc.wait(10)
        with pytest.raises(Unavailable, match="went away"):
            mon.execute("query-status")
    finally:
        mon.close()


def test_nothing_listening_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="cannot connect to the QMP monitor"):
        QmpMonitor.connect(str(tmp_path / "absent.sock"), timeout=2)
