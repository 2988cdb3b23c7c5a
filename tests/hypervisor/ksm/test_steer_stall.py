"""Steering's "stalled" mode must not outlive the guests it was about (issue 9, point 2).

Seen: ``stalled: 4 ksmd passes without progress`` while realized sharing climbed from
22 % to 41 % in 90 s, after guests came and went: progress was measured against a
high-water mark of realized sharing left from the earlier guests.  Here KsmSteering
runs its real code on fake guests (p2m arrays), a fake scanner and a fake knob
directory; ksmd's passes are the ``full_scans`` counter file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.ksm_steer import KsmSteering, SteerPolicy
from memd.agent.persistence import AgentStore
from memd.agent.real_guests import RealGuests
from tests.hypervisor.ksm.fakes import (
    FakeMachine,
    FakeScanner,
    as_any,
    fake_knob_dir,
    set_full_scans,
)

P = SteerPolicy()
POTENTIAL = 10_000


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.knobs = fake_knob_dir(tmp)
        self.machine = FakeMachine(pages=POTENTIAL * 2)
        self.machine.attach("a", 1000)
        self.machine.attach("b", 1001)
        self.scanner = FakeScanner(self.machine, POTENTIAL, 4 * POTENTIAL)
        self.full_scans = 10
        self.steering = KsmSteering(
            as_any(self.machine), scanner=as_any(self.scanner), knobs=self.knobs, clock=lambda: 0.0
        )

    def step(self, realized: int, passes: int = 1) -> str:
        """ksmd makes ``passes`` full scans, after which realized sharing is ``realized``."""
        self.full_scans += passes
        set_full_scans(self.knobs, self.full_scans)
        self.machine.realized = realized
        return self.steering.step().mode

    def stall(self) -> None:
        """Boost to 8000 of 10000 frames, then no progress for stall_full_scans passes."""
        assert self.step(8000) == "boost"
        for _ in range(P.stall_full_scans - 1):
            assert self.step(8000) == "boost"
        assert self.step(8000) == "stalled"


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_no_progress_with_the_same_guests_stays_stalled(rig: Rig) -> None:
    rig.stall()
    for _ in range(3):
        assert rig.step(8000 + 10, passes=2) == "stalled"  # noise is not progress


def test_a_guest_replaced_by_another_ends_stalled(rig: Rig) -> None:
    rig.stall()
    scans = rig.scanner.scans
    # b goes, c comes on the same domid (QemuMachine reuses the highest free one).
    rig.machine.detach(2)
    assert rig.machine.attach("c", 2002) == 2
    # The new pair shares a little less, then KSM merges more every pass: progress,
    # although below the old pair's mark.
    modes = [rig.step(r) for r in (7500, 7600, 7700, 7800, 7900, 7950)]
    assert modes == ["boost"] * len(modes)
    assert rig.scanner.scans == scans + 1  # the potential of the new pair was measured


def _real_guests(rig: Rig) -> RealGuests:
    """The agent's real-guests component on the rig's machine and steering."""
    real = RealGuests(
        ledger=rig.knobs.parent / "ledger.json",
        store=AgentStore(None),
        machine_factory=lambda _consent: as_any(rig.machine),
        steering_factory=lambda machine, pending: rig.steering,
    )
    assert real.steering is None and real.machine is None  # both made on demand
    assert real.ensure_steering() is rig.steering  # as `memd ksm --steer on` makes it
    return real


@pytest.mark.parametrize("change", ["attach", "detach"])
def test_guests_coming_or_going_through_the_agent_end_stalled(rig: Rig, change: str) -> None:
    real = _real_guests(rig)
    rig.stall()
    if change == "detach":
        rig.machine.attach("c", 1002)
        rig.stall()  # a, b, c: stalled again
        real.detach("c")
    else:
        assert real.attach("c", 1002, as_any(None)) == 3
    # No growth yet, but the guests changed: ksmd gets its full patience again.
    assert rig.step(8000) == "boost"


def test_a_guest_rebooted_in_place_ends_stalled(rig: Rig) -> None:
    """Same QEMU, same pid: its rewritten memory shows as a fall of realized sharing."""
    rig.stall()
    modes = [rig.step(r) for r in (2000, 3000, 4000, 5000, 6000, 7000)]
    assert modes == ["boost"] * len(modes)


def test_an_operator_step_ends_stalled(rig: Rig) -> None:
    real = _real_guests(rig)
    rig.stall()
    rig.full_scans += 1
    set_full_scans(rig.knobs, rig.full_scans)
    assert real.ksm_report(step=True, looping=True)["last_step"]["mode"] == "boost"
    assert rig.step(8000) == "boost"  # and it stalls again only after the full patience
