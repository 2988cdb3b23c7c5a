"""Pure parts of KSM steering and guest-sharing routing (no VM, no root)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from hypervisor import ksm
from hypervisor.ksm_steer import KsmSetting, SteerInputs, SteerPolicy, decide, ksmd_cpu_seconds
from memd.agent.sharing_service import SharingRouter
from memd.errors import MemdError, SharingDenied
from sharing.guest import UNMAPPED, PageSharing

P = SteerPolicy()


def inputs(**kw: int | None) -> SteerInputs:
    base: dict[str, int | None] = dict(
        opted_in=2,
        mergeable_pages=68_000,
        potential_saved=46_000,
        realized_saved=0,
        full_scans=10,
        progress_full_scans=10,
        pending_nominated=0,
    )
    base.update(kw)
    return SteerInputs(**base)  # type: ignore[arg-type]


def test_no_opted_in_guest_stops_ksmd() -> None:
    d = decide(inputs(opted_in=0), P)
    assert d.mode == "off" and d.setting.run == ksm.RUN_STOP


def test_large_gap_boosts_to_one_pass_per_target_time() -> None:
    d = decide(inputs(), P)
    assert d.mode == "boost" and d.setting.run == ksm.RUN_MERGE
    assert d.setting.sleep_millisecs == P.boost_sleep_millisecs
    # 68k pages per target_pass_seconds
    assert d.setting.pages_per_second == pytest.approx(68_000 / P.target_pass_seconds, rel=0.01)
    assert d.next_step_seconds == P.step_boost_seconds


def test_boost_rate_is_clamped() -> None:
    assert decide(inputs(mergeable_pages=10), P).setting.pages_to_scan == P.min_pages_to_scan
    huge = decide(inputs(mergeable_pages=10**9, potential_saved=10**8), P)
    assert huge.setting.pages_to_scan == P.max_pages_to_scan


@pytest.mark.parametrize("realized", [46_000 - 100, int(46_000 * 0.98), 50_000])
def test_closed_gap_goes_idle(realized: int) -> None:
    d = decide(inputs(realized_saved=realized), P)
    assert d.mode == "idle" and d.setting == P.idle


def test_no_potential_is_idle_not_boost() -> None:
    assert decide(inputs(potential_saved=0, mergeable_pages=0), P).mode == "idle"


def test_pending_nominations_boost_even_with_a_small_gap() -> None:
    assert decide(inputs(realized_saved=45_990, pending_nominated=0), P).mode == "idle"
    d = decide(inputs(realized_saved=45_990, pending_nominated=32), P)
    assert d.mode == "boost" and d.setting.smart_scan == 0  # see docs/real-guests.md
    assert decide(inputs(realized_saved=45_990), P).setting.smart_scan is None  # as found


def test_no_progress_for_several_passes_is_stalled() -> None:
    d = decide(inputs(full_scans=10 + P.stall_full_scans, progress_full_scans=10), P)
    assert d.mode == "stalled" and d.setting == P.idle
    assert decide(inputs(full_scans=10 + P.stall_full_scans - 1), P).mode == "boost"
    # Guests waiting for nominated pages get more patience.
    assert (
        decide(inputs(full_scans=10 + P.stall_full_scans, pending_nominated=1), P).mode == "boost"
    )


def test_setting_rate() -> None:
    assert KsmSetting(1, 100, 20).pages_per_second == 5000
    assert KsmSetting(0, 100, 20).pages_per_second == 0


def test_ksmd_cpu_from_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "comm").write_text("systemd\n")
    (tmp_path / "37").mkdir()
    (tmp_path / "37" / "comm").write_text("ksmd\n")
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    (tmp_path / "37" / "stat").write_text("37 (ksmd) " + " ".join(fields) + "\n")
    assert ksmd_cpu_seconds(str(tmp_path)) == pytest.approx(400 / os.sysconf("SC_CLK_TCK"))
    (tmp_path / "37" / "comm").write_text("kthreadd\n")
    assert ksmd_cpu_seconds(str(tmp_path)) == 0.0


class FakeReal:
    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.calls: list[tuple[str, str]] = []

    def has_guest(self, name: str) -> bool:
        return name in self.names

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[int | MemdError]:
        self.calls.append(("nominate", guest))
        return [7] * len(gfns)

    def query(self, guest: str, gfns: Sequence[int]) -> list[PageSharing]:
        self.calls.append(("query", guest))
        return [PageSharing(True, count=2)] * len(gfns)

    def about_to_write(self, guest: str, gfn: int) -> None:
        self.calls.append(("about_to_write", guest))


def test_router_sends_qemu_guests_to_the_real_backend_only() -> None:
    real = FakeReal({"vm1"})
    router = SharingRouter(None, real)
    assert router.nominate("vm1", [1, 2]) == [7, 7]
    assert router.query("vm1", [1]) == [PageSharing(True, count=2)]
    router.about_to_write("vm1", 1)
    assert [c for c, _ in real.calls] == ["nominate", "query", "about_to_write"]
    # A guest without attached QEMU and no simulated machine: denied, never routed.
    [denied] = router.nominate("other", [1])
    assert isinstance(denied, SharingDenied)
    assert router.query("other", [1]) == [UNMAPPED]
    with pytest.raises(SharingDenied):
        router.about_to_write("other", 1)
    assert all(g == "vm1" for _, g in real.calls)
