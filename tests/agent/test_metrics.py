"""`/metrics` of a real agent (in process, real guest sockets, a real LMDB store), scraped
over HTTP and parsed with prometheus-client's own parser: every figure is what the
guests did."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hypervisor import ksm
from hypervisor.lmdb_store import LmdbStore
from memd.agent.app import AgentApp
from memd.agent.commands import StatusArgs
from memd.agent.latency import BUCKETS, LatencyHistograms
from memd.agent.metrics import AgentCollector, parse_address
from memd.errors import InvalidArgument, NoSpace
from memd.guest.client import GuestClient
from tests.support.loop_thread import LoopThread

CAP_PAGES = 16
ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsAgent:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = LmdbStore(
            tmp / "store", budget_bytes=32 << 20, control_path=str(tmp / "control.sock")
        )
        self.app = AgentApp(
            budget_bytes=32 << 20, guest_cap_bytes=CAP_PAGES * 4096, store=self.store
        )
        self.loop = LoopThread()
        self.loop.run(self.app.start(None, metrics=("127.0.0.1", 0)))
        assert self.app.metrics is not None
        self.port = self.app.metrics.port

    def add_guest(self, name: str) -> GuestClient:
        path = str(self.tmp / f"{name}.sock")
        self.loop.run(self.app.agent.add_channel(name, path, mode="listen"))
        return GuestClient.for_unix_socket(
            path, boot_id=os.urandom(16), timeout=5.0, reconnect_timeout=5.0
        )

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def close(self) -> None:
        self.loop.run(self.app.stop())
        self.loop.close()
        self.store.close()


@pytest.fixture
def magent(tmp_path: Path) -> Iterator[MetricsAgent]:
    running = MetricsAgent(tmp_path)
    try:
        yield running
    finally:
        running.close()


def _page(seed: int) -> bytes:
    return (seed.to_bytes(4, "little") + b"memd metrics " * 400)[:4096]


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_scrape_reports_what_the_guests_did(magent: MetricsAgent) -> None:
    a = magent.add_guest("vm-a")
    b = magent.add_guest("vm-b")
    eph = a.new_pool()
    for i in range(10):
        a.put(eph, 1, i, _page(i))
    assert a.get(eph, 1, 0) == _page(0)  # a hit (and the page leaves: exclusive get)
    assert a.get(eph, 1, 0) is None  # a miss
    assert a.get(eph, 1, 99) is None  # a miss
    a.flush_page(eph, 1, 1)
    per = b.new_pool(persistent=True)
    refused = 0
    for i in range(CAP_PAGES + 4):
        try:
            b.put(per, 7, i, _page(100 + i))
        except NoSpace:
            refused += 1
    assert refused == 4
    assert b.get(per, 7, 3) == _page(103)

    before = ksm.counters() if ksm.available() else {}
    m = magent.scrape()
    after = ksm.counters() if ksm.available() else {}
    va, vb = (("vm", "vm-a"),), (("vm", "vm-b"),)
    if before:  # KSM's own counters, read around the scrape (ksmd may be running)
        assert before["full_scans"] <= m[("memd_ksm_full_scans_total", ())] <= after["full_scans"]
        assert ("memd_ksm_pages_sharing", ()) in m and ("memd_ksmd_cpu_seconds_total", ()) in m
    assert m[("memd_tmem_puts_total", va)] == 10
    assert m[("memd_tmem_stored_puts_total", va)] == 10
    assert m[("memd_tmem_gets_total", va)] == 3
    assert m[("memd_tmem_get_hits_total", va)] == 1
    assert m[("memd_tmem_get_misses_total", va)] == 2
    assert m[("memd_tmem_flushes_total", va)] == 1
    assert m[("memd_tmem_no_space_total", va)] == 0
    assert m[("memd_tmem_pages", (("pool_kind", "ephemeral"), ("vm", "vm-a")))] == 8
    assert m[("memd_tmem_bytes", (("pool_kind", "ephemeral"), ("vm", "vm-a")))] == 8 * 4096
    assert (
        0 < m[("memd_tmem_stored_bytes", (("pool_kind", "ephemeral"), ("vm", "vm-a")))] < 8 * 4096
    )  # lz4 compresses the repeated text
    assert m[("memd_tmem_puts_total", vb)] == CAP_PAGES + 4
    assert m[("memd_tmem_no_space_total", vb)] == 4
    assert m[("memd_tmem_pages", (("pool_kind", "persistent"), ("vm", "vm-b")))] == CAP_PAGES
    assert m[("memd_tmem_cap_bytes", vb)] == CAP_PAGES * 4096
    assert m[("memd_tmem_charged_bytes", vb)] == CAP_PAGES * 4096
    assert m[("memd_tmem_budget_bytes", ())] == 32 << 20
    assert m[("memd_agent_guests", ())] == 2
    assert m[("memd_agent_connected_guests", ())] == 2
    assert m[("memd_agent_guest_connected", va)] == 1
    # a: SYNC, HELLO (the client opens with both), NEW_POOL, 10 PUT, 3 GET, FLUSH_PAGE
    assert m[("memd_agent_requests_total", va)] == 17
    assert m[("memd_agent_request_errors_total", vb)] == 4  # the NO_SPACE replies
    assert m[("memd_agent_bad_frames_total", va)] == 0
    assert m[("memd_agent_request_duration_seconds_count", (("op", "put"),))] == 10 + 20
    assert m[("memd_agent_request_duration_seconds_count", (("op", "get"),))] == 4
    assert m[("memd_agent_request_duration_seconds_bucket", (("le", "+Inf"), ("op", "put")))] == 30
    assert m[("memd_agent_request_duration_seconds_sum", (("op", "put"),))] > 0
    assert m[("memd_ksm_steering_mode", (("mode", "off"),))] == 1
    assert m[("memd_ksm_steering_mode", (("mode", "boost"),))] == 0
    assert m[("memd_agent_loop_responsive", ())] == 1

    a.close()
    _wait(lambda: magent.scrape()[("memd_agent_guest_connected", va)] == 0)
    m = magent.scrape()
    assert m[("memd_agent_disconnects_total", va)] == 1
    assert m[("memd_agent_connected_guests", ())] == 1
    b.close()


def test_a_wedged_event_loop_still_gets_an_answer(magent: MetricsAgent) -> None:
    a = magent.add_guest("vm-a")
    a.put(a.new_pool(), 1, 0, _page(1))
    collector = AgentCollector(magent.app, magent.loop.loop, loop_timeout=0.2)

    async def wedge() -> None:
        time.sleep(1.0)  # blocks the loop, as a bug would

    future = asyncio.run_coroutine_threadsafe(wedge(), magent.loop.loop)
    time.sleep(0.05)
    names = {s.name: s.value for f in collector.collect() for s in f.samples}
    future.result(5)
    assert names["memd_agent_loop_responsive"] == 0
    assert names["memd_tmem_puts_total"] == 1  # tmem figures do not need the loop
    assert "memd_agent_guests" not in names
    a.close()


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = LatencyHistograms()
    for seconds in (BUCKETS[0], BUCKETS[0] * 1.5, 5.0):
        h.observe("put", seconds)
    snap = h.snapshot()["put"]
    assert snap.count == 3
    assert snap.counts[0] == 1 and snap.counts[1] == 1 and snap.counts[-1] == 1
    assert snap.total_seconds == pytest.approx(BUCKETS[0] * 2.5 + 5.0)


def test_the_endpoint_stops_with_the_agent(tmp_path: Path) -> None:
    running = MetricsAgent(tmp_path)
    port = running.port
    running.scrape()
    assert (
        running.app.handlers.status(StatusArgs())["metrics"] == f"http://127.0.0.1:{port}/metrics"
    )
    running.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


@pytest.mark.parametrize(
    "text", ["9643", "localhost", ":9643", "host:0", "host:99999", "host:port"]
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        parse_address(text)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:9643") == ("127.0.0.1", 9643)
    assert parse_address("[::1]:9643") == ("::1", 9643)


def _serve(tmp: Path, metrics: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(tmp / "c.sock"),
            "serve",
            "--store",
            "",
            "--metrics",
            metrics,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )


def test_operator_mistakes_are_one_sentence(tmp_path: Path) -> None:
    bad = _serve(tmp_path, "localhost")
    assert bad.returncode == 2
    assert "HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = _serve(tmp_path, f"127.0.0.1:{taken.getsockname()[1]}")
    assert busy.returncode != 0
    assert "cannot serve metrics on 127.0.0.1:" in busy.stderr
    assert "Traceback" not in busy.stderr


@pytest.mark.skipif(
    shutil.which("nbdcopy") is None, reason="nbdcopy is not installed (scripts/setup.sh --all)"
)
def test_swap_disk_figures(magent: MetricsAgent) -> None:
    """A real NBD client writes 8 pages to a guest's swap disk: the disk's series and the
    guest's ``pool_kind="swap_disk"`` pages say so."""
    path = str(magent.tmp / "vm-s.nbd")
    magent.loop.run(magent.app.swap.add("vm-s", path, 1 << 20))
    data = magent.tmp / "pages"
    data.write_bytes(b"".join(_page(i) for i in range(8)))
    subprocess.run(
        ["nbdcopy", str(data), f"nbd+unix:///?socket={path}"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    m = magent.scrape()
    vs = (("vm", "vm-s"),)
    assert m[("memd_swap_disk_size_bytes", vs)] == 1 << 20
    assert m[("memd_swap_disk_pages", vs)] == 8
    assert m[("memd_swap_disk_writes_total", vs)] >= 1
    assert m[("memd_swap_disk_lost_pages", vs)] == 0
    assert m[("memd_tmem_pages", (("pool_kind", "swap_disk"), ("vm", "vm-s")))] == 8
    assert ("memd_tmem_pages", (("pool_kind", "persistent"), ("vm", "vm-s"))) not in m


def test_every_exported_metric_is_documented(magent: MetricsAgent) -> None:
    """docs/operators.md §8 lists every series a scrape carries (with guests and a disk)."""
    a = magent.add_guest("vm-a")
    a.put(a.new_pool(), 1, 0, _page(0))
    magent.loop.run(magent.app.swap.add("vm-a", str(magent.tmp / "vm-a.nbd"), 1 << 20))
    exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in magent.scrape()}
    text = (ROOT / "docs" / "operators.md").read_text()
    documented = set(re.findall(r"^\| `(memd_[a-z_]+)`", text, re.MULTILINE))
    assert len(exported) >= 40
    assert exported <= documented, exported - documented
    a.close()


def test_a_guests_memory_report_is_exported(magent: MetricsAgent) -> None:
    """The guest daemon's MEM_REPORT (what the guest says of its memory) as gauges."""
    from memd.wire import ALL_CAPABILITIES, Capability, MemReportFlag, MemReportRequest

    def reporter(name: str) -> GuestClient:  # as the daemon connects: proposing MEM_REPORT
        client = magent.add_guest(name)
        client.capabilities = ALL_CAPABILITIES | int(Capability.MEM_REPORT)
        client.connect()
        return client

    a = reporter("vm-m")
    a.pipeline([MemReportRequest(262144, 200000, 1024, 512, 1234, 56, 0)])
    b = reporter("vm-n")  # a kernel without PSI
    b.pipeline([MemReportRequest(4096, 100, 0, 0, 0, 0, int(MemReportFlag.NO_PSI))])
    m = magent.scrape()
    vm = (("vm", "vm-m"),)
    assert m[("memd_guest_memory_total_bytes", vm)] == 262144 * 1024
    assert m[("memd_guest_memory_available_bytes", vm)] == 200000 * 1024
    assert m[("memd_guest_swap_free_bytes", vm)] == 512 * 1024
    assert m[("memd_guest_memory_pressure_ratio", (("kind", "some"), ("vm", "vm-m")))] == (
        pytest.approx(0.1234)
    )
    assert m[("memd_guest_memory_pressure_ratio", (("kind", "full"), ("vm", "vm-m")))] == (
        pytest.approx(0.0056)
    )
    assert 0 <= m[("memd_guest_memory_report_age_seconds", vm)] < 60
    assert m[("memd_guest_memory_available_bytes", (("vm", "vm-n"),))] == 100 * 1024
    assert not any(
        name == "memd_guest_memory_pressure_ratio" and ("vm", "vm-n") in labels
        for name, labels in m
    )
    a.close()
    b.close()
