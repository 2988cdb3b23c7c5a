"""Sharing metrics on real QEMU processes: two guests hold the same pages, KSM steering
merges them, and `/metrics` shows each guest's potential and realized saved frames, the
kernel's per-process merged pages and the steering mode."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.procmem import ProcessMemory
from memd.agent.app import AgentApp
from tests.hypervisor.qemu.conftest import PlainQemu, needs_qemu_root
from tests.support.loop_thread import LoopThread

pytestmark = needs_qemu_root

BASE_GFN = 0x2000
NPAGES = 256


def _scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, s.labels.get("vm", s.labels.get("mode", ""))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_potential_and_realized_saved_frames_per_guest(
    start_qemu: Callable[..., PlainQemu], ksm_restored: dict[str, int | str], tmp_path: Path
) -> None:
    loop = LoopThread()
    app = AgentApp(budget_bytes=16 << 20, ksm_ledger=tmp_path / "ksm-originals.json")
    loop.run(app.start(None, metrics=("127.0.0.1", 0)))
    try:
        assert app.metrics is not None
        port = app.metrics.port
        a, b = start_qemu("vm-a", "-m", "64"), start_qemu("vm-b", "-m", "64")
        for q in (a, b):
            app.real.attach(q.name, q.pid, q.monitor)
        assert app.real.machine is not None
        data = np.random.default_rng(13).integers(0, 256, NPAGES * 4096, dtype=np.uint8).tobytes()
        for guest in app.real.machine.guests():
            with ProcessMemory(guest.pid, writable=True) as mem:
                mem.write(int(guest.gfn_vaddr[BASE_GFN]), data)
        assert _scrape(port)[("memd_ksm_steering_mode", "off")] == 1
        loop.run(app.real.start_steering())

        deadline = time.monotonic() + 90
        while True:
            m = _scrape(port)
            realized = [
                m.get(("memd_sharing_realized_saved_frames", v), 0.0) for v in ("vm-a", "vm-b")
            ]
            merging = [m.get(("memd_ksm_merging_pages", v), 0.0) for v in ("vm-a", "vm-b")]
            if sum(realized) >= NPAGES and min(merging) >= NPAGES:
                break
            assert time.monotonic() < deadline, f"not merged: {realized} {merging}"
            time.sleep(0.5)

        potential = [m[("memd_sharing_potential_saved_frames", v)] for v in ("vm-a", "vm-b")]
        # The planted pages: each of the pair is credited half of the frame they save.
        assert min(potential) >= NPAGES / 2
        assert sum(potential) >= sum(realized) - 16
        # The guests' shares add up to the host's figures of the same scan.
        scan = app.real.steering.potential if app.real.steering else None
        assert scan is not None
        assert sum(v.potential_saved for v in scan.vms) == pytest.approx(
            scan.potential_saved_frames
        )
        assert sum(v.realized_saved for v in scan.vms) == pytest.approx(scan.realized_saved_frames)
        assert m[("memd_ksm_steering_potential_saved_frames", "")] >= NPAGES
        assert m[("memd_ksm_steering_realized_saved_frames", "")] >= NPAGES
        modes = {
            mode
            for mode in ("starting", "idle", "stalled", "boost", "off")
            if m[("memd_ksm_steering_mode", mode)] == 1
        }
        assert len(modes) == 1 and modes <= {"boost", "idle", "stalled"}
        assert m[("memd_ksm_run", "")] == 1
        assert m[("memd_ksm_pages_sharing", "")] >= NPAGES
    finally:
        loop.run(app.stop())
        loop.close()
        if app.real.machine is not None:
            app.real.machine.close()
