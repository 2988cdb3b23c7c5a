"""KSM steering against its real peers: time to 90 % of the sharing potential, ksmd CPU.

Boots N identical TCG guests from the memd image (plain QEMU, root), attaches them to a
QemuMachine and runs, in the same run and each from a fresh state, five modes
(``benchmarks/_ksm_peers.py``):

* ``memd``: :class:`hypervisor.ksm_steer.KsmSteering` stepping at its own cadence;
* ``advisor``: the kernel's scan-time advisor (``advisor_mode=scan-time``, its defaults;
  null figures where the kernel has none);
* ``ksmtuned``: Debian's ksmtuned with its default config (``ksm.service``'s run=1 at the
  kernel's defaults, plus the ksmtuned loop as a child process; null if not installed);
* ``boost``: a fixed 1250 pages / 10 ms;
* ``ksm_default``: run=1 at the kernel's defaults (100 pages / 20 ms).

Fresh state: ``run=2`` (every KSM page un-merged, ksmd's rmap items freed), then every
knob a mode touches back at the kernel's default, KSM stopped.  Then the potential is
scanned (memd's scanner), the mode applied, and realized sharing (equal pagemap PFNs;
it starts at the guest pages mapping the host's zero page, ~30 % of the potential here)
sampled until the end of a fixed window (``--window``, default 120 s) and, if 90 % is not
reached by then, until ``--cap`` (default 150 s; such a run is reported censored, the
cap a lower bound).  ksmd's CPU (utime+stime of the kernel thread) is taken over
exactly the window: convergence plus the steady state after it.

Two scenarios, on the same guests: ``idle`` (keys ``<mode>_seconds_to_90pct``,
``<mode>_ksmd_cpu_seconds_<window>s``, ``<mode>_censored``) and ``churn`` (the same keys
prefixed ``churn_``): the first guest keeps rewriting ``--churn-fraction`` (20 %) of its
RAM every ``--churn-period`` (3 s) seconds with fresh random pages, written from the
host into a region its kernel keeps off (``memmap=``; every guest boots with it).  There
realized and potential count the stable pages only (the churned gfns are masked out of
the pagemap), and ``churn_<mode>_stable_fraction`` is the mean realized/potential over the
second half of the window.

KSM is host-global: another KSM user on the host (another engineer's test writing the
knobs, or its guests, whose mergeable pages ksmd scans on the same CPU) disturbs a run.
Each run records the knob values it did not set (``foreign_knob_writes``) and the rmap
items of other processes (``foreign_rmap_items_max``), and ``<prefix><mode>_disturbed``
says whether there were any; ``--retries N`` repeats a disturbed run up to N times and
keeps the least disturbed.

Every KSM knob is restored at the end (``knobs_restored`` says whether they read back as
found).  Progress goes to stderr; ``--json`` prints one JSON object on stdout.  A whole
run takes 2 scenarios × 5 modes × (window + a few seconds): ~25 minutes at the
defaults; ``--quick`` (20 s window, short warm-up) is for tests.

Run as root from a checkout: ``python3 benchmarks/ksm_steering.py --json`` (the guests
are booted by the product's launcher, hypervisor/vmlaunch.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))  # benchmarks.*; the repo's product if not installed

from benchmarks._ksm_peers import (  # noqa: E402
    MODES,
    Churn,
    Fixed,
    Mode,
    bare_defaults,
    foreign_knobs,
    foreign_rmap_items,
    knob_state,
    make_modes,
)
from hypervisor import ksm  # noqa: E402
from hypervisor.ksm_steer import ksmd_cpu_seconds  # noqa: E402
from hypervisor.potential import PotentialScanner  # noqa: E402
from hypervisor.qemu_machine import QemuMachine  # noqa: E402
from hypervisor.vmimage import ensure_image  # noqa: E402
from hypervisor.vmlaunch import boot_many  # noqa: E402
from memd.vocab import PAGE_SIZE  # noqa: E402
from sharing.ground_truth import compute  # noqa: E402

TARGET = 0.9
SCENARIOS = ("idle", "churn")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def realized(machine: QemuMachine, churn: Churn | None = None) -> int:
    p2m = {d: machine.p2m(d).copy() for d in machine.domains()}
    if churn is not None:
        churn.mask(p2m[churn.domid])
    return compute(p2m).nr_saved_mfns


def fresh(machine: QemuMachine) -> int:
    """KSM from nothing: ``run=2`` un-merges every KSM page and frees ksmd's rmap items
    (with them smart_scan's per-page ages, which would handicap the next run; the write
    returns when that is done), then every knob a mode touches goes back to the kernel's
    default, KSM stopped.  Returns the guests' ksm_rmap_items afterwards (0 expected)."""
    bare_defaults()
    ksm.set_knob("run", ksm.RUN_UNMERGE)
    bare_defaults()
    total = 0
    for g in machine.guests():
        value = ksm.process_stat(g.pid).get("ksm_rmap_items", 0)
        total += value if isinstance(value, int) else 0
    return total


def run_mode(
    machine: QemuMachine,
    scanner: PotentialScanner,
    mode: Mode,
    *,
    window: float,
    cap: float,
    churn: Churn | None = None,
) -> dict[str, Any]:
    """One measured run of ``mode`` from a fresh state (see the module docstring)."""
    why_not = mode.available()
    if why_not is not None:
        return {"mode": mode.name, "available": False, "reason": why_not}
    rmap_left = fresh(machine)
    pot = scanner.scan()
    potential = pot.potential_saved_frames
    goal = TARGET * potential
    scanned0 = int(ksm.counters().get("pages_scanned", 0))
    cpu0 = ksmd_cpu_seconds()
    t0 = time.monotonic()
    reached_at: float | None = None
    cpu_window: float | None = None
    scanned_window = 0
    got = 0
    samples: list[tuple[float, int]] = []
    trace: list[tuple[float, dict[str, int | str]]] = []
    own_pids = {g.pid for g in machine.guests()}
    foreign_rmap = foreign_rmap_items(own_pids)
    foreign_writes: list[tuple[float, dict[str, int | str]]] = []
    next_foreign_check = 0.0
    details: dict[str, Any] = {}
    try:
        mode.start()
        while True:
            now = time.monotonic() - t0
            if cpu_window is None and now >= window:
                cpu_window = ksmd_cpu_seconds() - cpu0
                scanned_window = int(ksm.counters().get("pages_scanned", 0)) - scanned0
            if now >= window and (reached_at is not None or now >= cap):
                break
            mode.tick(now)
            got = realized(machine, churn)
            samples.append((round(now, 2), got))
            if reached_at is None and got >= goal:
                reached_at = now
            knobs = knob_state()
            if not trace or trace[-1][1] != knobs:
                trace.append((round(now, 2), knobs))
            foreign = foreign_knobs(mode, knobs)
            if foreign and (not foreign_writes or foreign_writes[-1][1] != foreign):
                foreign_writes.append((round(now, 2), foreign))
            if now >= next_foreign_check:
                foreign_rmap = max(foreign_rmap, foreign_rmap_items(own_pids))
                next_foreign_check = now + 5.0
            step = 0.25 if reached_at is None else 1.0
            next_at = min(now + step, window if now < window else math.inf)
            time.sleep(max(0.0, next_at - (time.monotonic() - t0)))
    finally:
        details = mode.stop()
    assert cpu_window is not None
    observed = samples[-1][0] if samples else 0.0
    steady = [n for t, n in samples if t >= window / 2 and t <= window]
    seconds = reached_at if reached_at is not None else observed
    return {
        "mode": mode.name,
        "available": True,
        "potential_saved_frames": potential,
        "present_pages": pot.present_pages,
        "realized_saved_frames_at_start": samples[0][1] if samples else None,
        "rmap_items_at_start": rmap_left,
        "reached": reached_at is not None,
        "censored": reached_at is None,
        "seconds_to_90pct": round(seconds, 2),
        "realized_saved_frames_at_end": got,
        "ksmd_cpu_seconds_window": round(cpu_window, 2),
        "pages_scanned_window": scanned_window,
        "ksm_scan_gb_per_s_window": round(scanned_window * PAGE_SIZE / window / 1e9, 3),
        "realized_fraction_steady": (
            round(sum(steady) / len(steady) / potential, 4) if steady and potential else None
        ),
        # Another KSM user on the host disturbs the figures: knobs it wrote (seen as
        # values the mode did not set) and its pages, which ksmd scans on the same CPU.
        "foreign_knob_writes": foreign_writes[:10],
        "foreign_rmap_items_max": foreign_rmap,
        "disturbed": bool(foreign_writes) or foreign_rmap > 0,
        "knob_trace": trace[:40],
        **details,
    }


def disturbance(r: dict[str, Any]) -> tuple[int, int]:
    """How badly another KSM user disturbed a run: (foreign knob writes, its pages)."""
    return (len(r.get("foreign_knob_writes", [])), int(r.get("foreign_rmap_items_max", 0)))


def measure(
    machine: QemuMachine,
    scanner: PotentialScanner,
    name: str,
    work: Path,
    scenario: str,
    window: float,
    cap: float,
    churn: Churn | None,
    retries: int,
) -> dict[str, Any]:
    """Run one mode; a disturbed run is repeated up to ``retries`` times and the least
    disturbed one kept (``attempts`` says how many there were)."""
    best: dict[str, Any] | None = None
    for attempt in range(1, retries + 2):
        mode = make_modes([name], machine, work)[0]
        progress(f"{scenario}: {name} (window {window:g} s, cap {cap:g} s, attempt {attempt})")
        r = run_mode(machine, scanner, mode, window=window, cap=cap, churn=churn)
        if not r["available"]:
            progress(f"{scenario}: {name} unavailable: {r['reason']}")
            return r
        progress(
            f"{scenario}: {name}: 90% {'not reached, ≥' if r['censored'] else 'in'} "
            f"{r['seconds_to_90pct']} s, ksmd {r['ksmd_cpu_seconds_window']} CPU s over "
            f"{window:g} s"
            + (
                f"; DISTURBED (foreign knob writes {r['foreign_knob_writes'][:2]}, foreign "
                f"rmap items {r['foreign_rmap_items_max']})"
                if r["disturbed"]
                else ""
            )
        )
        if best is None or disturbance(r) < disturbance(best):
            best = r
        best["attempts"] = attempt
        if not best["disturbed"]:
            break
    assert best is not None
    return best


def warm_up(machine: QemuMachine, scanner: PotentialScanner, cap: float) -> float:
    """Unmeasured: ksmd's first pass over fresh guests also splits their transparent huge
    pages, a one-off cost no later run would pay.  Returns the seconds it took."""
    fresh(machine)
    goal = TARGET * scanner.scan().potential_saved_frames
    boost = Fixed("warmup", 1250, 10)
    t0 = time.monotonic()
    boost.start()
    try:
        while time.monotonic() - t0 < cap and realized(machine) < goal:
            time.sleep(0.5)
    finally:
        boost.stop()
    return time.monotonic() - t0


def flatten(scenario_runs: dict[str, dict[str, dict[str, Any]]], window: float) -> dict[str, Any]:
    """The figures under their stable keys (``churn_`` prefix for the churn scenario)."""
    out: dict[str, Any] = {}
    w = f"{window:g}"
    for scenario, runs in scenario_runs.items():
        p = "" if scenario == "idle" else f"{scenario}_"
        for name, r in runs.items():
            ok = r["available"]
            out[f"{p}{name}_seconds_to_90pct"] = r["seconds_to_90pct"] if ok else None
            out[f"{p}{name}_ksmd_cpu_seconds_{w}s"] = r["ksmd_cpu_seconds_window"] if ok else None
            out[f"{p}{name}_censored"] = r["censored"] if ok else None
            out[f"{p}{name}_disturbed"] = r["disturbed"] if ok else None
            if scenario == "churn":
                out[f"{p}{name}_stable_fraction"] = r["realized_fraction_steady"] if ok else None
            if not ok:
                out[f"{p}{name}_unavailable"] = r["reason"]
            if name == "memd" and ok:
                out[f"{p}memd_agent_cpu_seconds"] = r["memd_cpu_seconds"]
    return out


def targets(flat: dict[str, Any], window: float, prefixes: list[str]) -> dict[str, bool | None]:
    """The issue's goals, per scenario: memd ≥ 2× sooner than the advisor (a censored
    advisor's cap is a lower bound, so it still counts), less ksmd CPU than the advisor
    and the fixed boost over the window."""
    out: dict[str, bool | None] = {}
    w = f"{window:g}"
    for p in prefixes:
        memd_s = flat.get(f"{p}memd_seconds_to_90pct")
        memd_cpu = flat.get(f"{p}memd_ksmd_cpu_seconds_{w}s")
        memd_ok = memd_s is not None and not flat.get(f"{p}memd_censored")
        adv_s = flat.get(f"{p}advisor_seconds_to_90pct")
        out[f"{p}memd_2x_sooner_than_advisor"] = (
            None if adv_s is None or memd_s is None else bool(memd_ok and 2 * memd_s <= adv_s)
        )
        for peer in ("advisor", "boost"):
            cpu = flat.get(f"{p}{peer}_ksmd_cpu_seconds_{w}s")
            out[f"{p}memd_less_ksmd_cpu_than_{peer}"] = (
                None if cpu is None or memd_cpu is None else bool(memd_cpu < cpu)
            )
    return out


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument(
        "--window", type=float, default=None, help="seconds of ksmd CPU per run (120; quick: 20)"
    )
    ap.add_argument(
        "--cap", type=float, default=None, help="give up on 90%% after this (150; quick: window)"
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, in run order")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--churn-fraction", type=float, default=0.2, help="of the guest's RAM")
    ap.add_argument("--churn-period", type=float, default=3.0, help="seconds per rewrite")
    ap.add_argument("--quick", action="store_true", help="short window and warm-up (tests)")
    ap.add_argument(
        "--retries",
        type=int,
        default=0,
        help="repeat a run another KSM user disturbed (knob writes, its own pages) "
        "up to this many times, keeping the least disturbed",
    )
    args = ap.parse_args()
    window = args.window if args.window is not None else (20.0 if args.quick else 120.0)
    cap = max(window, args.cap if args.cap is not None else (window if args.quick else 150.0))
    modes = [m for m in args.modes.split(",") if m]
    scenarios = [s for s in args.scenarios.split(",") if s]
    if any(s not in SCENARIOS for s in scenarios):
        ap.error(f"scenarios are {', '.join(SCENARIOS)}")
    if any(m not in MODES for m in modes):
        ap.error(f"modes are {', '.join(MODES)}")
    if os.geteuid() != 0 or not ksm.available():
        print("ksm_steering: needs root and a kernel with KSM", file=sys.stderr)
        return 1
    # The churned region: the guest's kernel keeps it off (memmap=size$start), half-way
    # up its RAM (clear of the kernel at 16 MiB and the initrd and ACPI tables at the top).
    churn_pages = int(args.memory_mib * 2**20 * args.churn_fraction) // PAGE_SIZE
    churn_mib = -(-churn_pages * PAGE_SIZE // 2**20)
    churn_start_mib = args.memory_mib // 2
    append = f"memmap={churn_mib}M${churn_start_mib}M" if "churn" in scenarios else ""

    # SIGTERM/SIGINT (a background run ignores SIGINT) end the run through the finally
    # below: knobs restored, guests stopped.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    saved = ksm.snapshot()
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ksmb", dir="/tmp"))
    progress(f"booting {args.guests} guests ({args.memory_mib} MiB, {append or 'no memmap'})")
    vms = boot_many(
        ensure_image(),
        work,
        [f"kb{i}" for i in range(args.guests)],
        memory_mib=args.memory_mib,
        append=append,
    )
    machine = QemuMachine()
    scenario_runs: dict[str, dict[str, dict[str, Any]]] = {}
    result: dict[str, Any] = {}
    try:
        ksm.set_knob("run", ksm.RUN_STOP)
        for vm in vms:
            machine.attach(vm.name, vm.pid, vm.monitor)
        time.sleep(2 if args.quick else 5)  # let the guests settle after boot
        scanner = PotentialScanner(machine)
        scans = [scanner.scan() for _ in range(3)]
        best = max(scans, key=lambda s: s.scan_gb_per_s)
        warm = warm_up(machine, scanner, 10.0 if args.quick else 60.0)
        progress(f"warm-up done in {warm:.1f} s; potential {best.potential_saved_frames} frames")
        for scenario in scenarios:
            churn = None
            if scenario == "churn":
                domid = machine.domains()[0]
                churn = Churn(machine, domid, churn_start_mib * 256, churn_pages, args.churn_period)
                churn.start()
            runs: dict[str, dict[str, Any]] = {}
            try:
                for name in modes:
                    runs[name] = measure(
                        machine, scanner, name, work, scenario, window, cap, churn, args.retries
                    )
            finally:
                if churn is not None:
                    churn.stop()
            scenario_runs[scenario] = runs
            if churn is not None:
                runs_info = {"rounds": churn.rounds, "write_seconds": round(churn.write_seconds, 1)}
                result["churn"] = {
                    "guest": machine.guest(churn.domid).name,
                    "pages": churn.npages,
                    "period_seconds": churn.period,
                    "region": f"memmap={churn_mib}M${churn_start_mib}M",
                    **runs_info,
                }
        flat = flatten(scenario_runs, window)
        result = {
            **flat,
            "window_seconds": window,
            "cap_seconds": cap,
            "targets": targets(flat, window, ["" if s == "idle" else f"{s}_" for s in scenarios]),
            "guests": args.guests,
            "memory_mib": args.memory_mib,
            "present_pages": best.present_pages,
            "distinct_contents": best.distinct_contents,
            "zero_pages": best.zero_pages,
            "potential_saved_frames": best.potential_saved_frames,
            "scan_gb_per_s": round(best.scan_gb_per_s, 3),
            "scan_end_to_end_gb_per_s": round(best.bytes_read / best.seconds / 1e9, 3),
            "scan_seconds": round(best.seconds, 3),
            "warmup_seconds": round(warm, 1),
            **({"churn": result["churn"]} if "churn" in result else {}),
            "runs": scenario_runs,
        }
    finally:
        try:
            ksm.restore(saved)
        finally:
            machine.close()
            for vm in vms:
                vm.stop()
            shutil.rmtree(work, ignore_errors=True)
    result["knobs_restored"] = ksm.snapshot() == saved
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    progress(f"done in {result['total_seconds']} s; knobs restored: {result['knobs_restored']}")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
