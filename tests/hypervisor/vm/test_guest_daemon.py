"""The guest daemon in a real TCG guest: started at boot by the image, it owns org.memd.0;
two programs use memd at the same time through it, and the host sees the guest's memory
state (MemAvailable, SwapFree, PSI) in its GuestState, `memd guests` and `memd stats`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hypervisor.vmimage import CHANNEL_NAME
from memd.agent.app import AgentApp
from memd.wire import MAX_PSI, MemReportFlag
from tests.support.loop_thread import LoopThread

from .harness import GuestVM

pytestmark = pytest.mark.vm

RAM_MIB = 256

#: A guest program (python3-minimal): its own pool, pages derived from its tag, every byte
#: checked on the way back; through the daemon (memd.guest.cli.daemon_client) only.
PROGRAM = r"""
import sys
from memd.guest.cli import daemon_client
tag, n = int(sys.argv[1]), int(sys.argv[2])
client = daemon_client(timeout=30, reconnect_timeout=30)
if client is None:
    sys.exit("PROGRAM %d: no daemon socket" % tag)
def page(i):
    return (bytes([tag, i & 255]) * 64 + i.to_bytes(4, "little") * 992)[:4096]
bad = 0
with client:
    pool = client.new_pool(persistent=True)
    for i in range(n):
        client.put(pool, tag, i, page(i))
        if client.get(pool, tag, i) != page(i):
            bad += 1
    got = client.get_batch(pool, [(tag, i) for i in range(n)])
    bad += sum(1 for i, p in enumerate(got) if p != page(i))
print("PROGRAM tag=%d pool=%d pages=%d bad=%d" % (tag, pool, n, bad))
"""


class _Agent:
    """An in-process agent (asyncio loop in a thread) with a control socket."""

    def __init__(self, tmp: Path) -> None:
        self.control = tmp / "control.sock"
        self.app = AgentApp(budget_bytes=64 << 20)
        self.loop = LoopThread()
        self.loop.run(self.app.start(str(self.control)))

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "memd.cli", "--socket", str(self.control), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def close(self) -> None:
        self.loop.run(self.app.stop())
        self.loop.close()


def test_two_programs_share_the_daemon_and_the_host_sees_memory(
    boot_guest: Callable[..., GuestVM], tmp_path: Path
) -> None:
    agent = _Agent(tmp_path)
    try:
        guest = boot_guest(name="daemonvm", memory_mib=RAM_MIB)
        agent.loop.run(
            agent.app.agent.add_channel(
                "daemonvm", str(guest.channel_sockets[CHANNEL_NAME]), "connect"
            )
        )
        # The image started the daemon at boot (inittab, respawned); wait for its socket.
        guest.check(
            "i=0; until [ -S /run/memd-guest.sock ]; do i=$((i+1)); "
            "[ $i -gt 300 ] && exit 1; sleep 0.1; done",
            timeout=60,
        )
        assert "via=daemon:/run/memd-guest.sock" in guest.check("memd-guest hello", timeout=60)
        # The port is the daemon's: opening it directly fails while the daemon runs.
        direct = guest.run("memd-guest --direct --reconnect-timeout 1 hello", timeout=60)
        assert direct.status == 2, direct

        guest.write_file("/tmp/prog.py", PROGRAM.encode())
        out = guest.check(
            "cd /tmp; python3 prog.py 1 150 > p1.out 2>&1 & a=$!; "
            "python3 prog.py 2 150 > p2.out 2>&1 & b=$!; "
            "wait $a; ra=$?; wait $b; rb=$?; cat p1.out p2.out; echo rc=$ra,$rb; "
            "memd-guest pools",
            timeout=120,
        )
        assert "rc=0,0" in out, out
        found = re.findall(r"PROGRAM tag=(\d) pool=(\d+) pages=(\d+) bad=(\d+)", out)
        assert sorted((t, n, b) for t, _, n, b in found) == [
            ("1", "150", "0"),
            ("2", "150", "0"),
        ], out
        pools = {p for _, p, _, _ in found}
        assert len(pools) == 2  # each program its own pool, in the one guest's pool table
        for pool in pools:  # `memd-guest pools` (through the daemon) sees both, 150 pages each
            assert re.search(rf"^{pool} persistent - 150$", out, re.MULTILINE), out
        channel = agent.app.agent.channels["daemonvm"]
        assert channel.sessions == 1, "both programs and the CLI went through one session"

        # A process's own pages by virtual address: the daemon (root in the guest) resolves
        # them through /proc/PID/pagemap and asks the host, which has no page sharing for this
        # guest here — so the answer is the host's refusal, after a successful resolution.
        ranged = guest.run(
            "sleep 30 & p=$!; sleep 0.3; e=$(grep '\\[stack\\]' /proc/$p/maps | cut -d' ' -f1);"
            " e=${e#*-}; memd-guest query --pid $p --range $((0x$e - 4096)):0x1000; r=$?;"
            " kill $p; exit $r",
            timeout=60,
        )
        assert ranged.status == 2 and "sharing is not enabled" in ranged.stderr, ranged

        # The host has the guest's memory report, and it is the guest's /proc/meminfo.
        state = agent.app.agent.guests["daemonvm"]
        deadline = time.monotonic() + 30
        while state.mem_reports < 2:
            assert time.monotonic() < deadline, "no memory report from the guest daemon"
            time.sleep(0.2)
        report = state.memory
        assert report is not None
        meminfo = guest.check("cat /proc/meminfo")
        total = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
        assert report.mem_total_kib == total <= RAM_MIB * 1024
        assert 0 < report.mem_available_kib <= report.mem_total_kib
        assert report.swap_total_kib == report.swap_free_kib == 0  # no swap in this guest
        assert not report.flags & MemReportFlag.NO_PSI, "Debian's kernel has PSI on"
        assert 0 <= report.psi_full_avg10 <= report.psi_some_avg10 <= MAX_PSI
        assert guest.check("test -r /proc/pressure/memory && echo psi") == "psi\n"

        # ... and shows it to operators.
        (row,) = json.loads(agent.cli("guests", "--json"))
        assert row["memory"]["mem_available_kib"] > 0
        assert row["memory"]["psi_some_avg10"] is not None
        head, line = agent.cli("guests").splitlines()[:2]
        assert "MEM_AVAIL" in head and "PSI_SOME" in head
        cells = dict(zip(head.split(), line.split(), strict=False))
        assert cells["MEM_AVAIL"] != "-" and cells["PSI_SOME"].endswith("%"), (head, line)
        stats = json.loads(agent.cli("stats", "--json"))
        assert stats["guest_memory"]["daemonvm"]["mem_total_kib"] == total
    finally:
        agent.close()
