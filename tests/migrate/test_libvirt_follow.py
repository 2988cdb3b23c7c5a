"""memd.migrate.libvirt's state machine, fed libvirt's events and job looks by hand: what
memd does at each step of a libvirt migration, and that no order of inputs makes it
drop a guest libvirt did not move or let libvirt move a guest memd failed to copy."""

from __future__ import annotations

from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.guests import JobState
from memd.migrate.libvirt import Act, Action, LibvirtFollow, Phase

RUNNING_IDLE = JobState("running", False)
RUNNING_MIGRATING = JobState("running", True)
PAUSED_MIGRATING = JobState("paused", True)


def phase(machine: LibvirtFollow) -> Phase:
    return machine.phase  # (a call: mypy would narrow the attribute between steps)


def acts(actions: list[Action]) -> list[Act]:
    return [a.act for a in actions]


def test_happy_path_final_delta_at_the_pause_and_drop_after_libvirt_confirms() -> None:
    m = LibvirtFollow("vm1")
    assert m.job(RUNNING_IDLE) == []  # the operator has not run virsh migrate yet
    assert m.job(RUNNING_MIGRATING) == [] and phase(m) is Phase.MIGRATING
    assert acts(m.event("suspended", "migrated")) == [Act.SWITCHOVER]
    assert m.job(PAUSED_MIGRATING) == []
    assert m.confirmed() == [] and phase(m) is Phase.CONFIRMED
    assert acts(m.event("stopped", "migrated")) == [Act.FINISH]
    assert m.over and phase(m) is Phase.MOVED
    assert m.event("undefined", "removed") == [] and m.job(JobState("gone", False)) == []


def test_libvirt_switching_over_before_memd_confirmed_finishes_after_confirm() -> None:
    m = LibvirtFollow("vm1")
    m.job(RUNNING_MIGRATING)
    assert acts(m.event("suspended", "migrated")) == [Act.SWITCHOVER]
    assert m.event("stopped", "migrated") == [] and phase(m) is Phase.SWITCHED
    assert m.job(JobState("shut off", False)) == []
    assert acts(m.confirmed()) == [Act.FINISH] and phase(m) is Phase.MOVED


def test_a_missed_pause_takes_the_final_delta_when_libvirt_reports_the_move() -> None:
    m = LibvirtFollow("vm1")
    assert acts(m.event("stopped", "migrated")) == [Act.SWITCHOVER]
    assert acts(m.confirmed()) == [Act.FINISH]


def test_a_cancelled_or_failed_migration_before_switch_over_aborts() -> None:
    m = LibvirtFollow("vm1")
    m.job(RUNNING_MIGRATING)
    actions = m.job(RUNNING_IDLE)  # virsh migrate failed, or domjobabort
    assert acts(actions) == [Act.ABORT] and phase(m) is Phase.ABORTED
    assert "running here" in actions[0].reason


def test_resumed_after_the_pause_aborts_before_and_after_confirm() -> None:
    for confirm in (False, True):
        m = LibvirtFollow("vm1")
        m.event("suspended", "migrated")
        if confirm:
            m.confirmed()
        assert acts(m.event("resumed", "migrated")) == [Act.ABORT]
        assert m.over and m.event("stopped", "migrated") == []


def test_running_again_without_a_resume_event_aborts_too() -> None:
    m = LibvirtFollow("vm1")
    m.event("suspended", "migrated")
    assert m.job(PAUSED_MIGRATING) == []
    assert acts(m.job(RUNNING_IDLE)) == [Act.ABORT]


def test_memds_failure_cancels_libvirts_migration_until_libvirt_switched() -> None:
    for setup in ([], ["job"], ["pause"]):
        m = LibvirtFollow("vm1")
        if "job" in setup:
            m.job(RUNNING_MIGRATING)
        if "pause" in setup:
            m.event("suspended", "migrated")
        actions = m.failed("the destination agent went away")
        assert acts(actions) == [Act.CANCEL_LIBVIRT, Act.ABORT], setup
        assert all(a.reason == "the destination agent went away" for a in actions)
    m = LibvirtFollow("vm1")
    m.event("suspended", "migrated")
    m.event("stopped", "migrated")
    assert acts(m.failed("cut")) == [Act.ABORT]  # too late to cancel: said in the log


def test_operator_pause_and_resume_while_armed_change_nothing() -> None:
    m = LibvirtFollow("vm1")
    assert m.event("suspended", "paused") == []
    assert m.job(JobState("paused", False)) == []
    assert m.event("resumed", "unpaused") == []
    assert m.job(RUNNING_IDLE) == [] and phase(m) is Phase.ARMED


def test_a_driver_that_cannot_tell_jobs_relies_on_events() -> None:
    m = LibvirtFollow("vm1")
    assert m.job(JobState("running", None)) == [] and phase(m) is Phase.ARMED
    m.event("suspended", "migrated")
    assert m.job(JobState("paused", None)) == []
    assert acts(m.job(JobState("running", None))) == [Act.ABORT]


def test_the_guest_dying_here_aborts() -> None:
    m = LibvirtFollow("vm1")
    m.job(RUNNING_MIGRATING)
    assert acts(m.event("stopped", "destroyed")) == [Act.ABORT]
    m = LibvirtFollow("vm1")
    assert acts(m.event("crashed", "panicked")) == [Act.ABORT]


EVENTS = st.sampled_from(
    [
        ("event", ("suspended", "migrated")),
        ("event", ("suspended", "paused")),
        ("event", ("resumed", "unpaused")),
        ("event", ("resumed", "migrated")),
        ("event", ("stopped", "migrated")),
        ("event", ("stopped", "destroyed")),
        ("job", JobState("running", True)),
        ("job", JobState("running", False)),
        ("job", JobState("paused", True)),
        ("job", JobState("paused", False)),
        ("job", JobState("shut off", False)),
        ("job", JobState("gone", False)),
        ("confirmed", None),
        ("failed", "boom"),
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(EVENTS, max_size=12))
def test_no_order_of_inputs_drops_a_guest_that_did_not_move(
    steps: list[tuple[str, object]],
) -> None:
    m = LibvirtFollow("vm1")
    seen: list[Act] = []
    moved = confirmed = switching = False
    for what, arg in steps:
        if what == "event":
            kind, detail = cast(tuple[str, str], arg)
            out = m.event(kind, detail)
            moved = moved or (kind, detail) == ("stopped", "migrated")
        elif what == "job":
            assert isinstance(arg, JobState)
            out = m.job(arg)
        elif what == "confirmed":
            if not switching:
                continue  # CONFIRM answers a switch-over only
            out = m.confirmed()
            confirmed = True
            switching = False
        else:
            out = m.failed(str(arg))
            switching = False
        for act in acts(out):
            if act is Act.FINISH:
                # Only once libvirt moved the guest and the destination confirmed.
                assert moved and confirmed
            if act is Act.CANCEL_LIBVIRT:
                assert not moved  # libvirt's job is cancelled only before it switched
            if act is Act.SWITCHOVER:
                switching = True
        seen += acts(out)
    assert seen.count(Act.FINISH) + seen.count(Act.ABORT) <= 1  # one ending at most
    assert seen.count(Act.SWITCHOVER) <= 1
    if Act.FINISH in seen:
        assert phase(m) is Phase.MOVED
    if Act.ABORT in seen:
        assert phase(m) is Phase.ABORTED and Act.FINISH not in seen


def test_a_cancel_stops_libvirt_before_the_pause_and_is_ignored_after_it() -> None:
    from memd.migrate.libvirt import Act, LibvirtFollow, Phase

    early = LibvirtFollow("vm1")
    acts = [a.act for a in early.cancelled()]
    assert acts == [Act.CANCEL_LIBVIRT, Act.ABORT] and early.phase is Phase.ABORTED
    for events in ([("suspended", "migrated")], [("stopped", "migrated")]):
        late = LibvirtFollow("vm1")
        for kind, detail in events:
            late.event(kind, detail)
        phase = late.phase
        assert late.cancelled() == [] and late.phase is phase  # libvirt decides now
