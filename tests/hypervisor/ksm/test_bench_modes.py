"""benchmarks/ksm_steering.py against its peers (issue 13): the mode plumbing on a fake
knob directory, and one short real run.

The unit tests load ``benchmarks/_ksm_peers.py`` and the benchmark itself by path (the
benchmarks are scripts, not a package) and drive the modes over a fake
``/sys/kernel/mm/ksm``: the bare defaults, the advisor's availability, ksmtuned's
process group (a stand-in script that forks a loop the way ksmtuned does), the result
keys and the goals.  The real run boots two TCG guests and runs ``--quick`` for two modes
in both scenarios: every key is there and every KSM knob reads back as it was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from hypervisor import ksm
from tests.hypervisor.ksm.conftest import needs_vm_root

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _load(name: str) -> ModuleType:
    saved = list(sys.path)
    try:
        path = BENCHMARKS / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(BENCHMARKS))
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return _load("_ksm_peers")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("ksm_steering")


@pytest.fixture
def knobs(tmp_path: Path) -> Path:
    """A fake KSM directory as a 6.7+ kernel has it, every knob off its default."""
    root = tmp_path / "ksm"
    root.mkdir()
    values: dict[str, int | str] = {
        "run": 1,
        "pages_to_scan": 1250,
        "sleep_millisecs": 10,
        "smart_scan": 0,
        "use_zero_pages": 1,
        "advisor_mode": "scan-time",
        "advisor_max_cpu": 30,
        "advisor_min_pages_to_scan": 10,
        "advisor_max_pages_to_scan": 9,
        "advisor_target_scan_time": 5,
        "full_scans": 7,
    }
    for name, value in values.items():
        (root / name).write_text(f"{value}\n")
    return root


def test_bare_defaults_sets_only_the_knobs_the_kernel_has(peers: ModuleType, knobs: Path) -> None:
    (knobs / "advisor_max_cpu").unlink()  # an older kernel without the advisor's knobs
    peers.bare_defaults(knobs)
    assert ksm.get("run", knobs) == 0
    for name, value in peers.KERNEL_DEFAULTS.items():
        if name != "advisor_max_cpu":
            assert ksm.get(name, knobs) == value, name
    assert not (knobs / "advisor_max_cpu").exists()
    assert ksm.get("full_scans", knobs) == 7


def test_fixed_and_advisor_modes_write_their_knobs(peers: ModuleType, knobs: Path) -> None:
    peers.bare_defaults(knobs)
    boost = peers.Fixed("boost", 1250, 10, knobs)
    boost.start()
    assert (
        ksm.get("run", knobs),
        ksm.get("pages_to_scan", knobs),
        ksm.get("sleep_millisecs", knobs),
    ) == (1, 1250, 10)
    assert boost.stop() == {}
    assert ksm.get("run", knobs) == 0

    peers.bare_defaults(knobs)
    advisor = peers.Advisor(knobs)
    assert advisor.available() is None
    advisor.start()
    assert (ksm.get("advisor_mode", knobs), ksm.get("run", knobs)) == ("scan-time", 1)
    assert advisor.stop() == {"advisor_pages_to_scan_at_end": 100}
    assert (ksm.get("advisor_mode", knobs), ksm.get("run", knobs)) == ("none", 0)


def test_advisor_is_unavailable_without_advisor_mode(
    peers: ModuleType, bench: ModuleType, knobs: Path
) -> None:
    (knobs / "advisor_mode").unlink()
    advisor = peers.Advisor(knobs)
    reason = advisor.available()
    assert reason is not None and "advisor_mode" in reason
    # run_mode reports it without touching the guests (machine and scanner are not used).
    run = bench.run_mode(None, None, advisor, window=1.0, cap=1.0)
    assert run == {"mode": "advisor", "available": False, "reason": reason}
    flat = bench.flatten({"idle": {"advisor": run}, "churn": {"advisor": run}}, 120.0)
    assert flat["advisor_seconds_to_90pct"] is None
    assert flat["advisor_ksmd_cpu_seconds_120s"] is None
    assert flat["churn_advisor_ksmd_cpu_seconds_120s"] is None
    assert flat["advisor_unavailable"] == reason


FAKE_KSMTUNED = r"""#!/bin/bash
# Like /usr/sbin/ksmtuned: fork the monitoring loop, write its pid, return at once.
debug() { [ -n "$DEBUG" ] && echo "`date`: $*" >> "$LOGFILE"; }
loop() { while true; do sleep 30 & wait $!; debug tick; done; }
debug started
loop &
echo $! > "$PIDFILE"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped yet: its parent is init) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_ksmtuned_runs_as_a_child_group_and_is_killed_with_it(
    peers: ModuleType, knobs: Path, tmp_path: Path
) -> None:
    script = tmp_path / "ksmtuned"
    script.write_text(FAKE_KSMTUNED)
    peers.bare_defaults(knobs)
    mode = peers.Ksmtuned(tmp_path / "work", script=str(script), root=knobs)
    assert mode.available() is None
    mode.start()
    try:
        assert ksm.get("run", knobs) == 1  # ksm.service's `ksmctl start`
        loop_pid = int((tmp_path / "work" / "ksmtuned.pid").read_text())
        assert _alive(loop_pid) and os.getpgid(loop_pid) != os.getpgid(0)
    finally:
        details = mode.stop()
    deadline = time.monotonic() + 5
    while _alive(loop_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(loop_pid)
    assert details == {"ksmtuned_log": ["started"]}
    assert ksm.get("run", knobs) == 0


def test_ksmtuned_command_keeps_the_default_config(peers: ModuleType, tmp_path: Path) -> None:
    argv, env = peers.ksmtuned_command(tmp_path)
    assert argv == ["/bin/bash", "/usr/sbin/ksmtuned"]
    # Only logging and the pid file: nothing of ksmtuned's policy (KSM_*) is overridden.
    assert sorted(env) == ["DEBUG", "LOGFILE", "PATH", "PIDFILE"]
    assert Path(env["PIDFILE"]).parent == Path(env["LOGFILE"]).parent == tmp_path
    assert peers.Ksmtuned(tmp_path, script=str(tmp_path / "none")).available() is not None


def test_unknown_modes_are_refused(peers: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        peers.make_modes(["memd", "ksmtuned2"], None, tmp_path)
    made = peers.make_modes(["boost", "ksm_default", "advisor"], None, tmp_path)
    assert [m.name for m in made] == ["boost", "ksm_default", "advisor"]


def test_foreign_knob_writes_and_ksm_users_are_seen(
    peers: ModuleType, knobs: Path, tmp_path: Path
) -> None:
    peers.bare_defaults(knobs)
    boost = peers.Fixed("boost", 1250, 10, knobs)
    boost.start()
    assert peers.foreign_knobs(boost, peers.knob_state(knobs)) == {}
    ksm.set_knob("pages_to_scan", 20000, knobs)  # another engineer's test
    assert peers.foreign_knobs(boost, peers.knob_state(knobs)) == {"pages_to_scan": 20000}
    proc = tmp_path / "proc"
    for pid, items in ((10, 500), (11, 7), (12, 0)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "ksm_stat").write_text(f"ksm_rmap_items {items}\nksm_merging_pages 3\n")
    (proc / "self").mkdir()
    assert peers.foreign_rmap_items({10}, str(proc)) == 7
    assert peers.foreign_rmap_items(set(), str(proc)) == 507


def _run(name: str, seconds: float, cpu: float, censored: bool = False) -> dict[str, object]:
    return {
        "mode": name,
        "available": True,
        "seconds_to_90pct": seconds,
        "ksmd_cpu_seconds_window": cpu,
        "censored": censored,
        "disturbed": False,
        "realized_fraction_steady": 0.99,
        "memd_cpu_seconds": 0.5,
    }


def test_goals_count_a_censored_advisor_as_a_lower_bound(bench: ModuleType) -> None:
    runs = {
        "memd": _run("memd", 2.0, 0.5),
        "advisor": _run("advisor", 150.0, 1.0, True),
        "boost": _run("boost", 2.2, 0.4),
    }
    flat = bench.flatten({"idle": runs, "churn": runs}, 120.0)
    for p in ("", "churn_"):
        for m in ("memd", "advisor", "boost"):
            assert {
                f"{p}{m}_seconds_to_90pct",
                f"{p}{m}_ksmd_cpu_seconds_120s",
                f"{p}{m}_censored",
            } <= flat.keys()
    assert flat["churn_memd_stable_fraction"] == 0.99
    assert "memd_stable_fraction" not in flat
    goals = bench.targets(flat, 120.0, ["", "churn_"])
    assert goals["memd_2x_sooner_than_advisor"] is True
    assert goals["memd_less_ksmd_cpu_than_advisor"] is True
    assert goals["memd_less_ksmd_cpu_than_boost"] is False
    runs["memd"] = _run("memd", 120.0, 0.5, censored=True)
    flat = bench.flatten({"idle": runs}, 120.0)
    assert bench.targets(flat, 120.0, [""])["memd_2x_sooner_than_advisor"] is False


# --- one short real run ------------------------------------------------------------------


@pytest.fixture
def real_knobs() -> Iterator[dict[str, int | str]]:
    saved = ksm.snapshot()
    try:
        yield saved
    finally:
        ksm.restore(saved)


def _needs_vm_root(test: Callable[..., None]) -> Callable[..., None]:
    """The marks of tests/hypervisor/ksm/conftest.py's ``needs_vm_root`` on one test."""
    for mark in needs_vm_root:
        test = mark(test)
    return test


@_needs_vm_root
def test_quick_run_reports_every_key_and_restores_the_knobs(
    real_knobs: dict[str, int | str],
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "ksm_steering.py"),
            "--quick",
            "--window",
            "4",
            "--modes",
            "memd,ksm_default",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    for p in ("", "churn_"):
        for m in ("memd", "ksm_default"):
            for key in ("seconds_to_90pct", "ksmd_cpu_seconds_4s", "censored"):
                assert f"{p}{m}_{key}" in out, f"{p}{m}_{key}"
            assert out["runs"]["idle" if not p else "churn"][m]["rmap_items_at_start"] == 0
        assert f"{p}advisor_seconds_to_90pct" not in out  # only the modes asked for
    # How far a 4 s run gets depends on the host's load (and on other KSM users, whose
    # pages ksmd scans too): the figures are checked for shape, not for speed.
    for key in (
        "memd_seconds_to_90pct",
        "churn_memd_ksmd_cpu_seconds_4s",
        "churn_memd_stable_fraction",
    ):
        assert isinstance(out[key], float) and out[key] >= 0, key
    assert isinstance(out["memd_disturbed"], bool)
    assert out["churn"]["rounds"] >= 2
    assert out["knobs_restored"] is True
    assert ksm.snapshot() == real_knobs
