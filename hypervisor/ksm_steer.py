"""KSM steering: drive ksmd by the gap between potential and realized sharing.

KSM's defaults (100 pages every 20 ms ≈ 5,000 pages/s) take minutes to find the
duplicates of a few guests; a fixed boost (ksmtuned) burns a core whether or not there
is anything left to merge.  memd knows both sides: the *potential*
(:mod:`hypervisor.potential`, every present page hashed) and the *realized* sharing
(equal PFNs in pagemap).  So it can run ksmd fast exactly while there is work:

    decide(inputs, policy) -> Decision          pure: no I/O, unit-tested
        off     no guest has merging on                  run=0
        idle    gap small, or realized ≥ done_fraction   policy.idle (run=1, slow)
        stalled no progress for stall_full_scans passes  policy.idle (the rest is
                                                         volatile: guests rewrite it)
        boost   otherwise, or while guests'           run=1, pages_to_scan sized so
                nominated pages are not merged yet
                                                         one pass over the mergeable
                                                         pages takes target_pass_seconds;
                                                         smart_scan off

KSM merges a page only on a pass after the one that saw it unchanged, so time to merge
is a few passes: the pass time is the lever.

:class:`KsmSteering` is the loop around it (the agent calls :meth:`KsmSteering.step`
periodically, from one thread at a time): it refreshes the potential when stale,
recomputes the realized sharing from pagemap each step, tracks progress against
ksmd's ``full_scans`` counter, writes only knobs that differ, and restores every knob
it found on :meth:`KsmSteering.close`.  Per-VM opt-in/out is QEMU's ``merge`` property
(``qom-set``); opting out un-merges the VM's pages at once, and :meth:`opt_out` says by
how many pages its memory is about to grow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hypervisor import ksm
from hypervisor.potential import Potential, PotentialScanner
from hypervisor.procmem import PAGE_SIZE
from hypervisor.qemu_machine import QemuGuest, QemuMachine
from memd.errors import BackendError
from sharing.ground_truth import compute

log = logging.getLogger("memd.ksm")


@dataclass(frozen=True)
class KsmSetting:
    """The three knobs steering writes (``/sys/kernel/mm/ksm``)."""

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    #: 0 turns ksmd's smart_scan off; None leaves it as steering found it.
    smart_scan: int | None = None

    @property
    def pages_per_second(self) -> float:
        return 0.0 if self.run != ksm.RUN_MERGE else (
            self.pages_to_scan * 1000.0 / max(1, self.sleep_millisecs))


@dataclass(frozen=True)
class SteerPolicy:
    """Tunables of :func:`decide`."""

    #: Slow background rate once the work is done: new duplicates are still found.
    idle: KsmSetting = KsmSetting(ksm.RUN_MERGE, 100, 200)
    #: ksmd's sleep between batches while boosting.
    boost_sleep_millisecs: int = 10
    #: Wanted duration of one ksmd pass over the mergeable pages while boosting.
    target_pass_seconds: float = 0.5
    min_pages_to_scan: int = 500
    #: Upper bound per batch (bounds ksmd's CPU and each batch's latency).
    max_pages_to_scan: int = 20000
    #: Realized / potential at which the work counts as done.
    done_fraction: float = 0.97
    #: A gap below this many frames is not worth a boost.
    min_gap_frames: int = 256
    #: ksmd passes without progress after which the remaining gap is called volatile.
    stall_full_scans: int = 4
    #: The same while guests wait for nominated pages: ksmd's smart_scan skips pages that
    #: failed to merge before for up to several passes, so a fresh twin takes longer.
    stall_full_scans_nominated: int = 24
    #: Seconds between potential rescans while boosting / otherwise.
    rescan_boost_seconds: float = 5.0
    rescan_idle_seconds: float = 30.0
    #: Seconds between steps while boosting / otherwise.
    step_boost_seconds: float = 0.5
    step_idle_seconds: float = 5.0


@dataclass(frozen=True)
class SteerInputs:
    """Everything :func:`decide` looks at."""

    opted_in: int
    mergeable_pages: int
    potential_saved: int
    realized_saved: int
    full_scans: int
    #: ksmd's ``full_scans`` when realized sharing last grew (None: no boost yet).
    progress_full_scans: int | None
    #: gfns guests nominated that are not merged yet (an explicit request: boost).
    pending_nominated: int = 0


@dataclass(frozen=True)
class Decision:
    mode: str  # off | idle | stalled | boost
    setting: KsmSetting
    reason: str
    next_step_seconds: float


def decide(i: SteerInputs, p: SteerPolicy) -> Decision:
    """The knob setting for these inputs (see the module docstring)."""
    if i.opted_in == 0:
        return Decision("off", KsmSetting(ksm.RUN_STOP, p.idle.pages_to_scan,
                                          p.idle.sleep_millisecs),
                        "no attached guest has merging on", p.step_idle_seconds)
    gap = i.potential_saved - i.realized_saved
    work = gap >= p.min_gap_frames and i.realized_saved < p.done_fraction * i.potential_saved
    if not work and i.pending_nominated == 0:
        return Decision("idle", p.idle, f"realized {i.realized_saved} of {i.potential_saved} "
                        f"potential frames (gap {max(gap, 0)})", p.step_idle_seconds)
    patience = p.stall_full_scans_nominated if i.pending_nominated else p.stall_full_scans
    if (i.progress_full_scans is not None
            and i.full_scans - i.progress_full_scans >= patience):
        return Decision("stalled", p.idle, f"{i.full_scans - i.progress_full_scans} ksmd "
                        f"passes without progress: the remaining {gap} frames change too "
                        "often to merge", p.step_idle_seconds)
    per_batch = i.mergeable_pages * p.boost_sleep_millisecs / 1000.0 / p.target_pass_seconds
    pages = int(min(p.max_pages_to_scan, max(p.min_pages_to_scan, per_batch)))
    # smart_scan skips pages that long failed to merge, for up to 8 passes, each on its
    # own phase: two such pages newly made equal may never be scanned in the same pass
    # (the unstable tree lives one pass), so a boost with it on can plateau.  Off while
    # boosting (bounded in time), back as found when idle.
    return Decision("boost", KsmSetting(ksm.RUN_MERGE, pages, p.boost_sleep_millisecs, 0),
                    f"gap of {gap} frames ({i.realized_saved} of {i.potential_saved} realized)",
                    p.step_boost_seconds)


def ksmd_cpu_seconds(proc: str = "/proc") -> float:
    """CPU time (user + system) of the ksmd kernel thread so far; 0.0 if none is found."""
    pid = ksmd_pid(proc)
    if pid is None:
        return 0.0
    try:
        stat = Path(f"{proc}/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    rest = stat[stat.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def ksmd_pid(proc: str = "/proc") -> int | None:
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                if Path(f"{proc}/{entry}/comm").read_text().strip() == "ksmd":
                    return int(entry)
            except OSError:
                continue
    return None


@dataclass
class StepReport:
    """What one step saw and did (JSON-ready through :meth:`to_dict`)."""

    mode: str
    reason: str
    setting: KsmSetting
    applied: dict[str, int] = field(default_factory=dict)
    potential_saved_frames: int = 0
    realized_saved_frames: int = 0
    mergeable_pages: int = 0
    full_scans: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["realized_fraction"] = round(self.realized_saved_frames / self.potential_saved_frames,
                                       4) if self.potential_saved_frames else 1.0
        return d


class KsmSteering:
    """The steering loop over a QemuMachine (see the module docstring)."""

    def __init__(self, machine: QemuMachine, *, policy: SteerPolicy | None = None,
                 scanner: PotentialScanner | None = None, knobs: Path = ksm.KSM_DIR,
                 pending: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.machine = machine
        self.policy = policy or SteerPolicy()
        self.scanner = scanner or PotentialScanner(machine)
        self.knobs = knobs
        self._clock = clock
        self._pending = pending or (lambda: 0)
        self._saved = ksm.snapshot(knobs)
        self._best_realized = -1
        self._progress_full_scans: int | None = None
        self._potential: Potential | None = None
        self._potential_domids: tuple[int, ...] = ()
        self._stale = True
        self.last: StepReport | None = None

    # --- per-VM opt-in / opt-out -------------------------------------------------------

    @staticmethod
    def opted_in(g: QemuGuest) -> bool:
        return all(b.merge and not b.share for b in g.blocks)

    def opt_in(self, vm: int | str) -> dict[str, Any]:
        g = self.machine.guest(vm)
        self.machine.set_merge(g.domid, True)
        self.poke()
        return {"vm": g.name, "merge": True}

    def opt_out(self, vm: int | str) -> dict[str, Any]:
        """Switch merging off for one VM; returns the warning about its memory spike."""
        g = self.machine.guest(vm)
        try:
            merged = ksm.process_merging_pages(g.pid)
        except BackendError:
            merged = 0
        self.machine.set_merge(g.domid, False)
        message = (f"un-merging {g.name} re-expands its memory by {merged} pages "
                   f"({merged * PAGE_SIZE / 2**20:.1f} MiB) at once")
        log.warning("%s", message)
        self.poke()
        return {"vm": g.name, "merge": False, "unmerged_pages": merged, "warning": message}

    def poke(self) -> None:
        """Something changed (opt-in/out, a guest nominated pages): rescan next step."""
        self._stale = True
        self._progress_full_scans = None
        self._best_realized = -1

    # --- the loop --------------------------------------------------------------------------

    def step(self) -> StepReport:
        t0 = time.perf_counter()
        domids = tuple(g.domid for g in self.machine.guests() if self.opted_in(g))
        counters = ksm.counters(self.knobs)
        full_scans = int(counters.get("full_scans", 0))
        mode = self.last.mode if self.last else "boost"
        rescan = (self.policy.rescan_boost_seconds if mode == "boost"
                  else self.policy.rescan_idle_seconds)
        pot = self._potential
        if domids and (self._stale or pot is None or domids != self._potential_domids
                       or self._clock() - pot.taken_at >= rescan):
            pot = self._potential = self.scanner.scan(domids)
            self._potential_domids, self._stale = domids, False
            realized = pot.realized_saved_frames
        else:
            realized = compute({d: self.machine.p2m(d) for d in domids}).nr_saved_mfns
        potential = pot.potential_saved_frames if pot is not None and domids else 0
        mergeable = pot.present_pages if pot is not None and domids else 0
        if realized > self._best_realized + max(16, (potential - realized) // 100):
            self._best_realized = realized
            self._progress_full_scans = full_scans
        elif self._progress_full_scans is None:
            self._progress_full_scans = full_scans
        d = decide(SteerInputs(len(domids), mergeable, potential, realized, full_scans,
                               self._progress_full_scans, self._pending() if domids else 0),
                   self.policy)
        applied = self._apply(d.setting)
        if self.last is None or self.last.mode != d.mode:
            log.info("ksm steering: %s (%s)", d.mode, d.reason)
        self.last = StepReport(d.mode, d.reason, d.setting, applied, potential, realized,
                               mergeable, full_scans, round(time.perf_counter() - t0, 4))
        return self.last

    def next_step_seconds(self) -> float:
        if self.last is None or self.last.mode == "boost":
            return self.policy.step_boost_seconds
        return self.policy.step_idle_seconds

    def _apply(self, s: KsmSetting) -> dict[str, int]:
        """Write the knobs that differ (``run`` last); returns what was written."""
        written: dict[str, int] = {}
        if "advisor_mode" in self._saved and ksm.get("advisor_mode", self.knobs) != "none":
            ksm.set_knob("advisor_mode", "none", self.knobs)  # it would retune pages_to_scan
        knobs: list[tuple[str, int | str]] = [("pages_to_scan", s.pages_to_scan),
                                              ("sleep_millisecs", s.sleep_millisecs)]
        if "smart_scan" in self._saved:
            knobs.append(("smart_scan", self._saved["smart_scan"] if s.smart_scan is None
                          else s.smart_scan))
        for name, value in [*knobs, ("run", s.run)]:
            if ksm.get(name, self.knobs) != value:
                ksm.set_knob(name, value, self.knobs)
                written[name] = int(value)
        return written

    def status(self) -> dict[str, Any]:
        knobs = {k: ksm.get(k, self.knobs) for k in ("run", "pages_to_scan", "sleep_millisecs")}
        return {
            "knobs": knobs,
            "last_step": self.last.to_dict() if self.last else None,
            "potential": self._potential.to_dict() if self._potential else None,
            "vms": {g.name: {"merge": self.opted_in(g)} for g in self.machine.guests()},
            "ksmd_cpu_seconds": round(ksmd_cpu_seconds(), 2),
        }

    def close(self) -> None:
        """Put every KSM knob back as steering found it."""
        ksm.restore(self._saved, self.knobs)
