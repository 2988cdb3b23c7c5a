"""The KSM originals ledger and KsmSteering's knob hygiene, on a fake knob directory.

The host's own knobs must come back after any stop of the agent: recorded before the
first write, taken from a crashed agent's ledger rather than from the knobs it left,
ignored after a host reboot, and never overwritten by a step that was still running
when close() restored them.
"""

from __future__ import annotations

import json
import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest

from hypervisor import ksm
from hypervisor.ksm_steer import KsmSteering
from memd.errors import BackendError
from tests.hypervisor.ksm.fakes import FakeMachine, FakeScanner, as_any, fake_knob_dir

ORIGINALS: dict[str, int | str] = {
    "advisor_mode": "none",
    "merge_across_nodes": 1,
    "pages_to_scan": 123,
    "run": 1,
    "sleep_millisecs": 77,
    "smart_scan": 1,
    "use_zero_pages": 0,
}
#: What steering writes with no opted-in guest ("off").
OFF = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 200}


@pytest.fixture
def knobs(tmp_path: Path) -> Path:
    root = fake_knob_dir(tmp_path)
    assert ksm.snapshot(root) == ORIGINALS
    return root


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "run" / "memd" / "ksm-originals.json"


def steering(
    knobs: Path,
    ledger: Path | None,
    machine: FakeMachine | None = None,
    scanner: FakeScanner | None = None,
) -> KsmSteering:
    machine = machine or FakeMachine()
    return KsmSteering(
        as_any(machine),
        ledger=ledger,
        knobs=knobs,
        scanner=as_any(scanner or FakeScanner(machine, 1000, 4096)),
        clock=lambda: 0.0,
    )


def agent_changes(knobs: Path) -> None:
    """What an agent's boost leaves in the knobs."""
    for name, value in [
        ("pages_to_scan", 1372),
        ("sleep_millisecs", 10),
        ("smart_scan", 0),
        ("run", 1),
    ]:
        ksm.set_knob(name, value, knobs)


def test_first_record_writes_the_ledger_with_its_writer(knobs: Path, ledger: Path) -> None:
    assert ksm.record_originals(ledger, knobs) == ORIGINALS
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.parent.stat().st_mode) == 0o750
    data = json.loads(ledger.read_text())
    assert data["knobs"] == ORIGINALS and data["knob_dir"] == str(knobs)
    assert data["pid"] == os.getpid() and abs(data["written_at"] - time.time()) < 60
    assert data["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert [p.name for p in ledger.parent.iterdir()] == [ledger.name]  # no temp file left


def test_a_crashed_agents_ledger_holds_the_originals_not_the_knobs(
    knobs: Path, ledger: Path
) -> None:
    crashed = steering(knobs, ledger)
    crashed.step()  # "off": run=0 ...
    assert {k: ksm.get(k, knobs) for k in OFF} == OFF
    written = ledger.read_text()
    del crashed  # kill -9: no close()
    agent_changes(knobs)

    # The next agent records nothing new: the ledger's values are the host's.
    assert ksm.record_originals(ledger, knobs) == ORIGINALS
    assert ledger.read_text() == written
    nxt = steering(knobs, ledger)
    nxt.step()
    nxt.close()
    assert ksm.snapshot(knobs) == ORIGINALS
    assert not ledger.exists()


def test_close_restores_a_crashed_agents_knobs_even_without_a_step(
    knobs: Path, ledger: Path
) -> None:
    ksm.record_originals(ledger, knobs)
    agent_changes(knobs)
    steering(knobs, ledger).close()
    assert ksm.snapshot(knobs) == ORIGINALS and not ledger.exists()


def test_restore_originals_without_an_agent(knobs: Path, ledger: Path) -> None:
    assert ksm.restore_originals(ledger, knobs) is None  # nothing recorded
    ksm.record_originals(ledger, knobs)
    agent_changes(knobs)
    assert ksm.restore_originals(ledger, knobs) == ORIGINALS
    assert ksm.snapshot(knobs) == ORIGINALS and not ledger.exists()
    assert ksm.restore_originals(ledger, knobs) is None


def test_a_ledger_from_before_a_host_reboot_is_discarded(knobs: Path, ledger: Path) -> None:
    ksm.record_originals(ledger, knobs)
    data = json.loads(ledger.read_text())
    data["boot_id"] = "00000000-0000-0000-0000-000000000000"
    ledger.write_text(json.dumps(data))
    ksm.set_knob("pages_to_scan", 555, knobs)  # the host's setting on this boot
    assert ksm.restore_originals(ledger, knobs) is None
    assert not ledger.exists() and ksm.get("pages_to_scan", knobs) == 555
    ledger.write_text(json.dumps(data))
    assert ksm.record_originals(ledger, knobs)["pages_to_scan"] == 555
    assert json.loads(ledger.read_text())["boot_id"] != data["boot_id"]


def test_unreadable_or_foreign_ledgers_are_refused_in_one_sentence(
    knobs: Path, ledger: Path, tmp_path: Path
) -> None:
    ledger.parent.mkdir(parents=True)
    ledger.write_text("{not json")
    with pytest.raises(BackendError) as err:
        ksm.restore_originals(ledger, knobs)
    assert "is not a memd KSM ledger" in str(err.value) and "\n" not in str(err.value)
    assert ledger.exists()  # the operator decides, memd does not guess
    ledger.unlink()
    ksm.record_originals(ledger, knobs)
    (tmp_path / "other").mkdir()
    other = fake_knob_dir(tmp_path / "other")
    with pytest.raises(BackendError, match="records the knobs of"):
        ksm.record_originals(ledger, other)


def test_a_failed_restore_keeps_the_ledger(knobs: Path, ledger: Path) -> None:
    ksm.record_originals(ledger, knobs)
    agent_changes(knobs)
    (knobs / "smart_scan").unlink()
    with pytest.raises(BackendError, match="could not restore KSM settings"):
        ksm.restore_originals(ledger, knobs)
    assert ledger.exists()
    assert ksm.get("pages_to_scan", knobs) == 123  # the others were put back


def test_close_after_the_ledger_was_restored_by_hand_uses_its_own_copy(
    knobs: Path, ledger: Path
) -> None:
    s = steering(knobs, ledger)
    s.step()
    ledger.unlink()  # e.g. `memd ksm-restore` ran while this agent lived
    s.close()
    assert ksm.snapshot(knobs) == ORIGINALS


def test_no_ledger_means_in_memory_originals(knobs: Path, ledger: Path) -> None:
    s = steering(knobs, None)
    s.step()
    assert not ledger.parent.exists()
    s.close()
    assert ksm.snapshot(knobs) == ORIGINALS


def test_a_step_held_in_its_scan_writes_nothing_after_close(knobs: Path, ledger: Path) -> None:
    """The issue's SIGTERM: close() runs while a step is in its worker thread."""
    machine = FakeMachine()
    machine.attach("a", 100)
    machine.attach("b", 101)
    scanner = FakeScanner(machine, potential=1000, mergeable=8192)
    scanner.release = threading.Event()
    s = steering(knobs, ledger, machine, scanner)
    reports = []
    t = threading.Thread(target=lambda: reports.append(s.step()))
    t.start()
    assert scanner.entered.wait(10)
    s.close()
    scanner.release.set()
    t.join(10)
    assert reports and reports[0].mode == "boost" and reports[0].applied == {}
    assert ksm.snapshot(knobs) == ORIGINALS
    assert not ledger.exists()


def test_steps_racing_close_never_write_after_it(
    knobs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many rounds of a step thread against close() at random moments: every knob write
    happens before close() returns, and the knobs end as the host had them."""
    late: list[str] = []
    closed = threading.Event()
    real_set = ksm.set_knob

    def watched_set(name: str, value: int | str, root: Path = ksm.KSM_DIR) -> None:
        if closed.is_set():
            late.append(f"{name}={value}")
        real_set(name, value, root)

    monkeypatch.setattr(ksm, "set_knob", watched_set)
    rng = random.Random(9)
    rounds = 300
    wrote = 0
    for i in range(rounds):
        closed.clear()
        ledger = tmp_path / f"ledger-{i}.json"
        s = steering(knobs, ledger)
        go = threading.Event()
        delays = (rng.random() * 0.002, rng.random() * 0.002)
        reports: list[dict[str, int]] = []

        def run(
            s: KsmSteering = s,
            go: threading.Event = go,
            d: float = delays[0],
            reports: list[dict[str, int]] = reports,
        ) -> None:
            go.wait()
            time.sleep(d)
            reports.append(s.step().applied)

        t = threading.Thread(target=run)
        t.start()
        go.set()
        time.sleep(delays[1])
        s.close()
        closed.set()
        t.join(10)
        wrote += bool(reports and reports[0])
        assert ksm.snapshot(knobs) == ORIGINALS, f"round {i}"
        assert not ledger.exists(), f"round {i}"
    assert late == []
    # Both orders happened: steps that wrote before close, and steps that came too late.
    assert 0 < wrote < rounds


def test_two_agents_recording_at_once_keep_the_first_ledger(
    knobs: Path, ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second agent looked before the first wrote: its write must not replace the
    first one's originals (which are the host's), and it must use them."""
    ksm.record_originals(ledger, knobs)
    first = ledger.read_text()
    agent_changes(knobs)  # the first agent's boost, before the second one writes
    real_load = ksm.load_originals
    looks: list[Path] = []

    def late_look(path: Path, root: Path = ksm.KSM_DIR) -> ksm.Originals | None:
        looks.append(path)
        return None if len(looks) == 1 else real_load(path, root)

    monkeypatch.setattr(ksm, "load_originals", late_look)
    assert ksm.record_originals(ledger, knobs) == ORIGINALS
    assert ledger.read_text() == first and len(looks) == 2
    assert [p.name for p in ledger.parent.iterdir()] == [ledger.name]
