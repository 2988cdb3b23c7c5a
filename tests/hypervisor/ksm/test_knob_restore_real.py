"""The host's KSM knobs come back after any stop of a real `memd serve` (issue 9, point 1).

Each test runs ``python3 -m memd.cli serve`` as a separate process on the real
``/sys/kernel/mm/ksm``, with its run and state directories and control socket in a
temporary directory.  The "host's originals" are set to values steering never writes
(run=1 pages_to_scan=123 sleep_millisecs=77): with no guest, steering switches ksmd off
(run=0 pages_to_scan=100 sleep_millisecs=200); with one, it boosts.  The true host
values are put back at teardown, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from hypervisor import ksm
from tests.support.bare_qemu import QEMU, start_bare_qemu, stop_bare_qemu

ROOT = Path(__file__).resolve().parents[3]
HOST_SETTING: dict[str, int | str] = {"pages_to_scan": 123, "sleep_millisecs": 77, "run": 1}
OFF = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 200}

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="KSM sysfs needs root"),
    pytest.mark.skipif(not ksm.available(), reason="kernel without KSM"),
]


@pytest.fixture
def originals() -> Iterator[dict[str, int | str]]:
    """Every writable knob as "the host" has it for this test (then the truth back)."""
    truth = ksm.snapshot()
    try:
        for name, value in HOST_SETTING.items():
            ksm.set_knob(name, value)
        yield ksm.snapshot()
    finally:
        ksm.restore(truth)


class Serve:
    """One `memd serve` process; its log lines are collected as they come."""

    def __init__(self, tmp: Path, *args: str) -> None:
        env = dict(
            os.environ,
            MEMD_RUN_DIR=str(tmp / "run"),
            MEMD_STATE_DIR=str(tmp / "state"),
            MEMD_SOCKET=str(tmp / "run" / "memd.sock"),
            PYTHONPATH=str(ROOT),
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memd.cli",
                "serve",
                "--store",
                "",
                "--log-level",
                "info",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_log(self, text: str, timeout: float = 30) -> int:
        """Index of the first log line containing ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self.lines):
                    if text in line:
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line with {text!r}:\n" + self.log())
                self._cond.wait(min(left, 0.2))

    def running(self, timeout: float = 30) -> None:
        """Wait until the agent runs and handles SIGTERM (before that, SIGTERM kills it
        as SIGKILL would: the crash case, not the one under test)."""
        self.wait_log("memd agent running", timeout)
        deadline = time.monotonic() + timeout
        while True:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            caught = int(status.split("SigCgt:")[1].split()[0], 16)
            if caught & (1 << (signal.SIGTERM - 1)):
                return
            assert time.monotonic() < deadline, "the agent never handled SIGTERM"
            time.sleep(0.005)

    def index(self, text: str) -> int | None:
        with self._cond:
            return next((i for i, line in enumerate(self.lines) if text in line), None)

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return rc


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for a in started:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(10)


def knobs(names: Mapping[str, object]) -> dict[str, int | str]:
    return {k: ksm.get(k) for k in names}


def crashed_steering_agent(tmp: Path, agents: list[Serve], originals: dict[str, int | str]) -> Path:
    """An agent that steered (ksmd off: no guests) and was killed with SIGKILL."""
    first = Serve(tmp, "--ksm-steer")
    agents.append(first)
    first.wait_log("ksm steering: off")
    assert knobs(OFF) == OFF
    ledger = tmp / "run" / "ksm-originals.json"
    assert ledger.stat().st_mode & 0o777 == 0o600
    recorded = json.loads(ledger.read_text())
    assert recorded["pid"] == first.proc.pid and recorded["knobs"] == originals
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    assert knobs(OFF) == OFF  # what a crash leaves
    return ledger


def test_sigkill_then_a_steering_agent_then_sigterm_gives_the_host_its_knobs(
    tmp_path: Path, originals: dict[str, int | str], agents: list[Serve]
) -> None:
    ledger = crashed_steering_agent(tmp_path, agents, originals)
    second = Serve(tmp_path, "--ksm-steer")
    agents.append(second)
    second.wait_log("did not stop cleanly")  # it took the crashed agent's ledger
    second.running()
    assert second.signal(signal.SIGTERM) == 0, second.log()
    assert ksm.snapshot() == originals, second.log()
    assert not ledger.exists()


def test_sigkill_then_an_agent_without_steering_restores_at_start(
    tmp_path: Path, originals: dict[str, int | str], agents: list[Serve]
) -> None:
    ledger = crashed_steering_agent(tmp_path, agents, originals)
    second = Serve(tmp_path)
    agents.append(second)
    second.wait_log("restored the KSM knobs an earlier agent left changed")
    assert ksm.snapshot() == originals  # at once, while the agent runs
    assert not ledger.exists()
    second.running()
    assert second.signal(signal.SIGTERM) == 0, second.log()
    assert ksm.snapshot() == originals


def test_sigkill_then_restore_originals_without_an_agent(
    tmp_path: Path, originals: dict[str, int | str], agents: list[Serve]
) -> None:
    """What `memd ksm-restore` (the unit's ExecStopPost=) runs after a crash."""
    ledger = crashed_steering_agent(tmp_path, agents, originals)
    assert ksm.restore_originals(ledger) == originals
    assert ksm.snapshot() == originals and not ledger.exists()
    assert ksm.restore_originals(ledger) is None


@pytest.mark.vm
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_sigterm_during_a_steering_step_leaves_the_hosts_knobs(
    tmp_path: Path, originals: dict[str, int | str], agents: list[Serve]
) -> None:
    """The issue's log: "shutting down", then "ksm steering: boost" from the step that was
    still running.  A QEMU with 1 GiB of preallocated RAM (no guest OS: SeaBIOS idles)
    makes the first step's potential scan last about a second; SIGTERM lands in it."""
    assert QEMU is not None
    qmp = tmp_path / "qmp.sock"
    qemu = start_bare_qemu(
        [qmp], "-nographic", "-m", "1024", "-mem-prealloc", log=tmp_path / "qemu.log", timeout=30
    )
    try:
        agent = Serve(tmp_path, "--ksm-steer", "--qmp", f"vm={qmp}")
        agents.append(agent)
        agent.running()
        assert agent.signal(signal.SIGTERM) == 0, agent.log()
    finally:
        stop_bare_qemu(qemu)
    shutdown = agent.index("shutting down")
    boost = agent.index("ksm steering: boost")
    # The step was in flight at SIGTERM: it decided (and wrote) after "shutting down".
    assert shutdown is not None and boost is not None and boost > shutdown, agent.log()
    assert ksm.snapshot() == originals, agent.log()
    assert not (tmp_path / "run" / "ksm-originals.json").exists()
