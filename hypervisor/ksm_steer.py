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
periodically from a worker thread): it refreshes the potential when stale, recomputes
the realized sharing from pagemap each step, tracks progress against ksmd's
``full_scans`` counter, writes only knobs that differ, and restores the host's knobs on
:meth:`KsmSteering.close`.  Progress is counted afresh (which ends "stalled") when the
opted-in guests change (attach, detach, a restarted QEMU), when realized sharing falls
well below its mark (a guest rebooted in place), and on :meth:`KsmSteering.poke`.  The
host's knobs are recorded in a ledger file before the first write (``hypervisor.ksm``:
``record_originals``), so they come back after a crash too.

Per-VM opt-in/out is QEMU's ``merge`` property (``qom-set``); opting out un-merges the
VM's pages at once, and :meth:`opt_out` says by how many pages its memory is about to
grow.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hypervisor import ksm
from hypervisor.potential import Potential, PotentialScanner
from hypervisor.qemu_machine import QemuGuest, QemuMachine
from memd.errors import BackendError
from memd.vocab import PAGE_SIZE
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
        return (
            0.0
            if self.run != ksm.RUN_MERGE
            else (self.pages_to_scan * 1000.0 / max(1, self.sleep_millisecs))
        )


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
    #: A fall of realized sharing below its high-water mark by more than this fraction of
    #: the mark (a guest rebooted in place, or rewrote its memory) restarts the progress
    #: count, as a change of the opted-in guests does.
    restart_drop_fraction: float = 0.1
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
        return Decision(
            "off",
            KsmSetting(ksm.RUN_STOP, p.idle.pages_to_scan, p.idle.sleep_millisecs),
            "no attached guest has merging on",
            p.step_idle_seconds,
        )
    gap = i.potential_saved - i.realized_saved
    work = gap >= p.min_gap_frames and i.realized_saved < p.done_fraction * i.potential_saved
    if not work and i.pending_nominated == 0:
        return Decision(
            "idle",
            p.idle,
            f"realized {i.realized_saved} of {i.potential_saved} "
            f"potential frames (gap {max(gap, 0)})",
            p.step_idle_seconds,
        )
    patience = p.stall_full_scans_nominated if i.pending_nominated else p.stall_full_scans
    if i.progress_full_scans is not None and i.full_scans - i.progress_full_scans >= patience:
        return Decision(
            "stalled",
            p.idle,
            f"{i.full_scans - i.progress_full_scans} ksmd "
            f"passes without progress: the remaining {gap} frames change too "
            "often to merge",
            p.step_idle_seconds,
        )
    per_batch = i.mergeable_pages * p.boost_sleep_millisecs / 1000.0 / p.target_pass_seconds
    pages = int(min(p.max_pages_to_scan, max(p.min_pages_to_scan, per_batch)))
    # smart_scan skips pages that long failed to merge, for up to 8 passes, each on its
    # own phase: two such pages newly made equal may never be scanned in the same pass
    # (the unstable tree lives one pass), so a boost with it on can plateau.  Off while
    # boosting (bounded in time), back as found when idle.
    return Decision(
        "boost",
        KsmSetting(ksm.RUN_MERGE, pages, p.boost_sleep_millisecs, 0),
        f"gap of {gap} frames ({i.realized_saved} of {i.potential_saved} realized)",
        p.step_boost_seconds,
    )


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
    rest = stat[stat.rindex(")") + 2 :].split()
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
        d["realized_fraction"] = (
            round(self.realized_saved_frames / self.potential_saved_frames, 4)
            if self.potential_saved_frames
            else 1.0
        )
        return d


class KsmSteering:
    """The steering loop over a QemuMachine (see the module docstring).

    Threads and state.  :meth:`step` runs in worker threads (the agent's loop, an
    operator's ``memd ksm --step``), :meth:`poke` and :meth:`close` in any thread:

    * ``_step_lock`` makes steps one at a time; it owns the scanner (one shared read
      buffer), ``_potential``, ``_scanned_generation`` and ``last``.  Held for a whole
      step, potential scan included: only another step waits for it.
    * ``_lock`` owns every knob write and what decides about them: ``_saved`` (the
      host's originals), ``_closed``, the progress mark (``_best_realized``,
      ``_progress_full_scans``), ``_members`` and ``_generation`` (bumped by a poke:
      the potential is stale).  Held only for bookkeeping and the few sysfs writes of
      one step, never for a scan, so a poke from the event loop never waits long.
      :meth:`close` takes it, restores and sets ``_closed``: a step that is still running
      in its worker thread finds ``_closed`` when it comes to write, and writes nothing.

    The host's originals are recorded in ``ledger`` (:func:`hypervisor.ksm.
    record_originals`) before the first knob write, so that they survive a crash of the
    agent; ``ledger=None`` keeps them in memory only (benchmarks, tests that restore the
    knobs themselves).
    """

    def __init__(
        self,
        machine: QemuMachine,
        *,
        ledger: Path | None = None,
        policy: SteerPolicy | None = None,
        scanner: PotentialScanner | None = None,
        knobs: Path = ksm.KSM_DIR,
        pending: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine = machine
        self.ledger = ledger
        self.policy = policy or SteerPolicy()
        self.scanner = scanner or PotentialScanner(machine)
        self.knobs = knobs
        self._clock = clock
        self._pending = pending or (lambda: 0)
        self._step_lock = threading.Lock()
        self._potential: Potential | None = None
        self._scanned_generation = -1
        self.last: StepReport | None = None
        self._lock = threading.Lock()
        #: The knobs as the host had them; None until the first step records them.
        self._saved: dict[str, int | str] | None = None
        self._closed = False
        self._best_realized = -1
        self._progress_full_scans: int | None = None
        #: (domid, pid) of the opted-in guests at the last step; None before the first.
        self._members: tuple[tuple[int, int], ...] | None = None
        self._generation = 0

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
        message = (
            f"un-merging {g.name} re-expands its memory by {merged} pages "
            f"({merged * PAGE_SIZE / 2**20:.1f} MiB) at once"
        )
        log.warning("%s", message)
        self.poke()
        return {"vm": g.name, "merge": False, "unmerged_pages": merged, "warning": message}

    def poke(self) -> None:
        """Something changed (opt-in/out, a guest nominated pages, attached or detached,
        an operator asked for a step): rescan at the next step and count progress
        afresh, which also ends "stalled"."""
        with self._lock:
            self._restart_locked()

    def _restart_locked(self) -> None:
        self._generation += 1
        self._best_realized = -1
        self._progress_full_scans = None

    # --- the loop --------------------------------------------------------------------------

    def step(self) -> StepReport:
        """Look at the guests and ksmd, decide, write the knobs that differ."""
        with self._step_lock:
            return self._step()

    def _step(self) -> StepReport:
        t0 = time.perf_counter()
        guests = [g for g in self.machine.guests() if self.opted_in(g)]
        domids = tuple(g.domid for g in guests)
        # A guest that came or went, or was restarted (a new QEMU: a new pid, maybe on a
        # reused domid), changes the sharing there is to be had: the progress mark of the
        # old set means nothing for the new one.
        members = tuple((g.domid, g.pid) for g in guests)
        counters = ksm.counters(self.knobs)
        full_scans = int(counters.get("full_scans", 0))
        pending = self._pending() if domids else 0
        with self._lock:
            if members != self._members:
                self._members = members
                self._restart_locked()
            generation = self._generation
        mode = self.last.mode if self.last else "boost"
        rescan = (
            self.policy.rescan_boost_seconds if mode == "boost" else self.policy.rescan_idle_seconds
        )
        pot = self._potential
        if domids and (
            generation != self._scanned_generation
            or pot is None
            or self._clock() - pot.taken_at >= rescan
        ):
            pot = self._potential = self.scanner.scan(domids)
            self._scanned_generation = generation
            realized = pot.realized_saved_frames
        else:
            realized = compute({d: self.machine.p2m(d) for d in domids}).nr_saved_mfns
        potential = pot.potential_saved_frames if pot is not None and domids else 0
        mergeable = pot.present_pages if pot is not None and domids else 0
        with self._lock:
            progress = self._progress_locked(realized, potential, full_scans)
            d = decide(
                SteerInputs(
                    len(domids), mergeable, potential, realized, full_scans, progress, pending
                ),
                self.policy,
            )
            if self._closed:  # close() has put the host's knobs back: they stay so
                applied: dict[str, int] = {}
                log.debug("ksm steering is closed: %s not applied", d.mode)
            else:
                if self._saved is None:
                    self._saved = (
                        ksm.record_originals(self.ledger, self.knobs)
                        if self.ledger is not None
                        else ksm.snapshot(self.knobs)
                    )
                applied = self._apply(d.setting, self._saved)
        if self.last is None or self.last.mode != d.mode:
            log.info("ksm steering: %s (%s)", d.mode, d.reason)
        self.last = StepReport(
            d.mode,
            d.reason,
            d.setting,
            applied,
            potential,
            realized,
            mergeable,
            full_scans,
            round(time.perf_counter() - t0, 4),
        )
        return self.last

    def _progress_locked(self, realized: int, potential: int, full_scans: int) -> int:
        """ksmd's ``full_scans`` when realized sharing last grew by more than noise."""
        noise = max(16, (potential - realized) // 100)
        drop = max(noise, int(self._best_realized * self.policy.restart_drop_fraction))
        if self._best_realized >= 0 and realized < self._best_realized - drop:
            # Same guests, but much of their merged memory is gone: one rebooted in place
            # or rewrote it.  Growth from here is progress, not a climb back to the mark.
            log.info(
                "ksm steering: realized sharing fell from %d to %d frames; counting "
                "progress afresh",
                self._best_realized,
                realized,
            )
            self._restart_locked()
        if realized > self._best_realized + noise:
            self._best_realized = realized
            self._progress_full_scans = full_scans
        elif self._progress_full_scans is None:
            self._progress_full_scans = full_scans
        return self._progress_full_scans

    @property
    def potential(self) -> Potential | None:
        """The last potential scan (None before the first).  Any thread may read it: a
        step replaces the reference whole, and a Potential is frozen."""
        return self._potential

    def next_step_seconds(self) -> float:
        if self.last is None or self.last.mode == "boost":
            return self.policy.step_boost_seconds
        return self.policy.step_idle_seconds

    def _apply(self, s: KsmSetting, saved: dict[str, int | str]) -> dict[str, int]:
        """Write the knobs that differ (``run`` last); returns what was written.  Called
        with ``_lock`` held."""
        written: dict[str, int] = {}
        if "advisor_mode" in saved and ksm.get("advisor_mode", self.knobs) != "none":
            ksm.set_knob("advisor_mode", "none", self.knobs)  # it would retune pages_to_scan
        knobs: list[tuple[str, int | str]] = [
            ("pages_to_scan", s.pages_to_scan),
            ("sleep_millisecs", s.sleep_millisecs),
        ]
        if "smart_scan" in saved:
            knobs.append(
                ("smart_scan", saved["smart_scan"] if s.smart_scan is None else s.smart_scan)
            )
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
        """Put every KSM knob back as the host had it and delete the ledger.  No knob is
        written after this returns, also not by a step still running in another thread.
        If a knob cannot be written back, BackendError is raised and the ledger stays
        (``memd ksm-restore`` or the next agent finishes the job).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            restored = None
            if self.ledger is not None:
                # Also when this steering never wrote: a ledger of this boot is knobs a
                # crashed agent left changed, and this agent is the one stopping now.
                restored = ksm.restore_originals(self.ledger, self.knobs)
            if restored is None and self._saved is not None:
                ksm.restore(self._saved, self.knobs)  # the ledger went (memd ksm-restore)
