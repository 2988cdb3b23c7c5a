"""The peers memd's KSM steering is measured against, and the churning workload.

Each *mode* drives ksmd for one measured run of ``benchmarks/ksm_steering.py``; every
run starts from the bare kernel defaults (:func:`bare_defaults`), then the mode's
``start()`` applies its policy, ``tick()`` is called every sampling period (modes that
step do so there), ``stop()`` ends it (KSM stopped, helper processes gone):

* ``memd``: :class:`hypervisor.ksm_steer.KsmSteering`, stepped at its own cadence;
* ``advisor``: the kernel's scan-time advisor (``advisor_mode=scan-time``, Linux 6.7+,
  its own defaults); unavailable on older kernels;
* ``ksmtuned``: Debian's ``ksmtuned`` with its default config, as the package runs it:
  ``ksm.service`` (``ksmctl start``: run=1 at the kernel's defaults) plus the
  ``/usr/sbin/ksmtuned`` shell loop, started here as a child in a session of its own
  (its systemd unit is never used) and killed by that process group at the end;
* ``boost``: a fixed 1250 pages / 10 ms (ksmtuned's maximum);
* ``ksm_default``: run=1 at the kernel's defaults (100 pages / 20 ms).

:class:`Churn` rewrites a region of one guest's RAM from the host (through
``/proc/<qemu-pid>/mem``) with fresh random pages every few seconds: pages that are
never equal to anything for long, so never stay merged.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor import ksm
from hypervisor.ksm_steer import KsmSteering
from hypervisor.procmem import ProcessMemory
from hypervisor.qemu_machine import QemuMachine
from memd.vocab import PAGE_SIZE

MODES = ("memd", "advisor", "ksmtuned", "boost", "ksm_default")

#: The kernel's defaults for the knobs a mode may touch (mm/ksm.c), written before every
#: run so that no mode inherits another's settings; only knobs this kernel has are set.
KERNEL_DEFAULTS: dict[str, int | str] = {
    "advisor_mode": "none",  # first: with the advisor on, pages_to_scan is read-only
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
    "smart_scan": 1,
    "use_zero_pages": 0,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
}

KSMTUNED = "/usr/sbin/ksmtuned"
TRACED_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode", "smart_scan")


def bare_defaults(root: Path = ksm.KSM_DIR) -> None:
    """KSM stopped, every knob a mode may touch at the kernel's default."""
    ksm.set_knob("run", ksm.RUN_STOP, root)
    for name, value in KERNEL_DEFAULTS.items():
        if (root / name).exists() and ksm.get(name, root) != value:
            ksm.set_knob(name, value, root)


def knob_state(root: Path = ksm.KSM_DIR) -> dict[str, int | str]:
    return {k: ksm.get(k, root) for k in TRACED_KNOBS if (root / k).exists()}


class Mode(abc.ABC):
    """One policy driving ksmd for a run (see the module docstring)."""

    name = "?"

    def available(self) -> str | None:
        """None if the mode can run here, else why not (reported, not raised)."""
        return None

    @abc.abstractmethod
    def start(self) -> None:
        """Set the knobs (or start the daemon) this mode runs ksmd with."""

    def tick(self, now: float) -> None:  # noqa: B027 - by default a mode does nothing per tick
        """Called every sampling period with the run's clock (seconds since start)."""

    def stop(self) -> dict[str, Any]:
        """End the mode (ksmd stopped); returns mode-specific details."""
        ksm.set_knob("run", ksm.RUN_STOP, self.root)
        return {}

    def expected(self) -> dict[str, int | str]:
        """Knob values this mode has set right now: any other value was written by
        someone else (KSM's knobs are host-global; the run is then disturbed)."""
        return {}

    def __init__(self, root: Path = ksm.KSM_DIR) -> None:
        self.root = root


def foreign_knobs(mode: Mode, knobs: dict[str, int | str]) -> dict[str, int | str]:
    """The knobs whose value is not what ``mode`` set."""
    return {k: knobs[k] for k, v in mode.expected().items() if k in knobs and knobs[k] != v}


def foreign_rmap_items(own_pids: set[int], proc: str = "/proc") -> int:
    """ksmd's rmap items of processes other than ``own_pids``: pages of other KSM users
    (another engineer's guests) that ksmd scans too, and bills to the same ksmd CPU."""
    total = 0
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in own_pids:
            continue
        try:
            text = Path(f"{proc}/{entry}/ksm_stat").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("ksm_rmap_items"):
                total += int(line.split()[-1])
    return total


class Fixed(Mode):
    """Fixed knobs, run=1 (``boost``, ``ksm_default``)."""

    def __init__(
        self, name: str, pages_to_scan: int, sleep_millisecs: int, root: Path = ksm.KSM_DIR
    ) -> None:
        super().__init__(root)
        self.name = name
        self.pages_to_scan = pages_to_scan
        self.sleep_millisecs = sleep_millisecs

    def expected(self) -> dict[str, int | str]:
        return {
            "run": ksm.RUN_MERGE,
            "pages_to_scan": self.pages_to_scan,
            "sleep_millisecs": self.sleep_millisecs,
        }

    def start(self) -> None:
        ksm.set_knob("pages_to_scan", self.pages_to_scan, self.root)
        ksm.set_knob("sleep_millisecs", self.sleep_millisecs, self.root)
        ksm.set_knob("run", ksm.RUN_MERGE, self.root)


class Advisor(Mode):
    """The kernel's scan-time advisor with its defaults (it retunes pages_to_scan after
    every full scan so that one scan takes ``advisor_target_scan_time`` seconds)."""

    name = "advisor"

    def available(self) -> str | None:
        if not (self.root / "advisor_mode").exists():
            return f"{self.root}/advisor_mode does not exist (kernel older than 6.7)"
        return None

    def expected(self) -> dict[str, int | str]:
        return {"run": ksm.RUN_MERGE, "advisor_mode": "scan-time", "sleep_millisecs": 20}

    def start(self) -> None:
        ksm.set_knob("advisor_mode", "scan-time", self.root)
        ksm.set_knob("run", ksm.RUN_MERGE, self.root)

    def stop(self) -> dict[str, Any]:
        ksm.set_knob("run", ksm.RUN_STOP, self.root)
        chosen = ksm.get("pages_to_scan", self.root)
        ksm.set_knob("advisor_mode", "none", self.root)
        return {"advisor_pages_to_scan_at_end": chosen}


def ksmtuned_command(workdir: Path, script: str = KSMTUNED) -> tuple[list[str], dict[str, str]]:
    """argv and environment for ksmtuned: its default config (/etc/ksmtuned.conf sets
    nothing), with its own debug log and a pid file in ``workdir`` (the script reads
    DEBUG, LOGFILE and PIDFILE from the environment when the config leaves them unset;
    logging does not change its policy)."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBUG": "1",
        "LOGFILE": str(workdir / "ksmtuned.log"),
        "PIDFILE": str(workdir / "ksmtuned.pid"),
    }
    return ["/bin/bash", script], env


class Ksmtuned(Mode):
    """``ksm.service`` + ``ksmtuned`` as Debian runs them, without systemd.

    The script forks its loop into the background and exits; it runs here in a new
    session, so the loop and its ``sleep`` stay in the process group whose id is the pid
    this benchmark started, and :meth:`stop` ends exactly that group.
    """

    name = "ksmtuned"

    def __init__(self, workdir: Path, script: str = KSMTUNED, root: Path = ksm.KSM_DIR) -> None:
        super().__init__(root)
        self.workdir = workdir
        self.script = script
        self._pgid: int | None = None

    def expected(self) -> dict[str, int | str]:
        return {"advisor_mode": "none", "smart_scan": 1}

    def available(self) -> str | None:
        if not Path(self.script).exists() or shutil.which("bash") is None:
            return f"{self.script} is not installed (apt-get install ksmtuned)"
        return None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "ksmtuned.log").unlink(missing_ok=True)
        ksm.set_knob("run", ksm.RUN_MERGE, self.root)  # ksm.service: `ksmctl start`
        argv, env = ksmtuned_command(self.workdir, self.script)
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._pgid = proc.pid
        proc.wait(timeout=10)  # the script itself returns at once; its loop stays

    def stop(self) -> dict[str, Any]:
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._pgid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _group_alive(self._pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(self._pgid):
                os.killpg(self._pgid, signal.SIGKILL)
            self._pgid = None
        ksm.set_knob("run", ksm.RUN_STOP, self.root)
        log = self.workdir / "ksmtuned.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return {"ksmtuned_log": [line.split(": ", 1)[-1] for line in lines][-12:]}


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group is left."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


class Memd(Mode):
    """memd's steering, stepped whenever its next step is due."""

    name = "memd"

    def __init__(self, machine: QemuMachine, root: Path = ksm.KSM_DIR) -> None:
        super().__init__(root)
        self.machine = machine
        self.steering: KsmSteering | None = None
        self._due = 0.0
        self.cpu = 0.0
        self.modes: list[tuple[float, str]] = []

    def expected(self) -> dict[str, int | str]:
        last = self.steering.last if self.steering is not None else None
        if last is None:
            return {}
        out: dict[str, int | str] = {
            "run": last.setting.run,
            "pages_to_scan": last.setting.pages_to_scan,
            "sleep_millisecs": last.setting.sleep_millisecs,
        }
        if last.setting.smart_scan is not None:
            out["smart_scan"] = last.setting.smart_scan
        return out

    def start(self) -> None:
        self.steering = KsmSteering(self.machine, knobs=self.root)
        self._due = 0.0
        self.tick(0.0)

    def tick(self, now: float) -> None:
        if self.steering is None or now < self._due:
            return
        c0 = time.thread_time()
        step = self.steering.step()
        self.cpu += time.thread_time() - c0
        if not self.modes or self.modes[-1][1] != step.mode:
            self.modes.append((round(now, 2), step.mode))
        self._due = now + self.steering.next_step_seconds()

    def stop(self) -> dict[str, Any]:
        last = None
        if self.steering is not None:
            last = self.steering.last
            self.steering.close()
            self.steering = None
        ksm.set_knob("run", ksm.RUN_STOP, self.root)
        return {
            "memd_cpu_seconds": round(self.cpu, 2),
            "steering_modes": self.modes,
            "setting_at_end": vars(last.setting) if last else None,
        }


def make_modes(
    names: list[str], machine: QemuMachine, workdir: Path, root: Path = ksm.KSM_DIR
) -> list[Mode]:
    known: dict[str, Callable[[], Mode]] = {
        "memd": lambda: Memd(machine, root),
        "advisor": lambda: Advisor(root),
        "ksmtuned": lambda: Ksmtuned(workdir / "ksmtuned", root=root),
        "boost": lambda: Fixed("boost", 1250, 10, root),
        "ksm_default": lambda: Fixed("ksm_default", 100, 20, root),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown modes {unknown}: choose from {', '.join(MODES)}")
    return [known[n]() for n in names]


class Churn:
    """Rewrites ``npages`` guest pages from ``gfn`` on, all of them every ``period``
    seconds, with fresh random content (a workload rewriting part of its memory: pages
    that never stay equal to anything, so ksmd cannot keep them merged).

    The region must be RAM the guest does not use (the benchmark boots its guests with
    ``memmap=<size>$<start>``, which reserves it): the writes come from the host, through
    ``/proc/<qemu-pid>/mem``, so they are exact and cost no guest CPU.
    """

    def __init__(
        self, machine: QemuMachine, domid: int, gfn: int, npages: int, period: float
    ) -> None:
        g = machine.guest(domid)
        vaddrs = g.gfn_vaddr[gfn : gfn + npages]
        if len(vaddrs) != npages or (vaddrs < 0).any():
            raise ValueError(f"gfns {gfn:#x}+{npages} are not all RAM of {g.name}")
        if (np.diff(vaddrs) != PAGE_SIZE).any():
            raise ValueError(f"gfns {gfn:#x}+{npages} of {g.name} are not contiguous on the host")
        self.pid = g.pid
        self.domid = domid
        self.gfn = gfn
        self.npages = npages
        self.period = period
        self.addr = int(vaddrs[0])
        self.rounds = 0
        self.write_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = np.random.default_rng(13)

    def write_round(self) -> None:
        t0 = time.monotonic()
        chunk = 1024  # pages per write: 4 MiB
        with ProcessMemory(self.pid, writable=True) as mem:
            for first in range(0, self.npages, chunk):
                n = min(chunk, self.npages - first)
                data = self._rng.integers(0, 256, n * PAGE_SIZE, dtype=np.uint8).tobytes()
                mem.write(self.addr + first * PAGE_SIZE, data)
        self.rounds += 1
        self.write_seconds += time.monotonic() - t0

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.write_round()
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def start(self) -> None:
        self.write_round()  # the region is present (and random) before any run starts
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def mask(self, p2m: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        """Drop the churned gfns from a p2m of the churning guest (in place)."""
        p2m[self.gfn : self.gfn + self.npages] = -1
