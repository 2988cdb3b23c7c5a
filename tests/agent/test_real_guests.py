"""The real-guests component (memd.agent.real_guests) under concurrency, on fake QEMUs.

Before it existed, AgentApp made the QEMU machine and the KSM steering by
check-then-set from worker threads with no lock: two attaches at once (the libvirt
follower attaching two starting domains), or a steering start racing an attach, each
made a machine of its own, and the guests attached to the one that lost were never
seen again (no audit, no KSM steering, no sharing); an operator's `memd ksm --step`
racing `--steer on` made two steerings, one of which nobody closed (KSM's knobs not
restored).  A slow machine or steering factory opens the window wide here.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import memd.agent.real_guests as real_guests
from memd.agent.app import AgentApp
from memd.agent.persistence import AgentStore
from memd.agent.real_guests import RealGuests
from memd.guest.client import GuestClient
from memd.wire import Capability
from tests.hypervisor.ksm.fakes import Block, FakeMachine, as_any
from tests.support.loop_thread import LoopThread


class Machine(FakeMachine):
    """A fake QEMU machine the agent can close (its QMP monitors)."""

    closed = False

    def close(self) -> None:
        self.closed = True


class FakeSteering:
    """What RealGuests uses of a KsmSteering; records the machine it steers."""

    def __init__(self, machine: FakeMachine) -> None:
        self.machine = machine
        self.last = None
        self.pokes = 0
        self.steps = 0
        self.closed = False

    def poke(self) -> None:
        self.pokes += 1

    def step(self) -> None:
        self.steps += 1

    def next_step_seconds(self) -> float:
        return 0.05

    def close(self) -> None:
        self.closed = True

    def status(self) -> dict[str, Any]:
        return {
            "knobs": {},
            "last_step": None,
            "potential": None,
            "vms": {},
            "ksmd_cpu_seconds": 0.0,
        }


class Made:
    """Slow factories that count what they made."""

    def __init__(self, delay: float = 0.1) -> None:
        self.delay = delay
        self.machines: list[Machine] = []
        self.steerings: list[FakeSteering] = []

    def machine(self, consent: Any = None) -> Any:
        time.sleep(self.delay)  # /proc reads: another thread gets in here
        m = Machine()
        self.machines.append(m)
        return as_any(m)

    def steering(self, machine: Any, pending: Callable[[], int]) -> Any:
        time.sleep(self.delay)
        s = FakeSteering(machine)
        self.steerings.append(s)
        return as_any(s)


def _real(tmp: Path, made: Made, store: AgentStore | None = None) -> RealGuests:
    return RealGuests(
        ledger=tmp / "ledger.json",
        store=store or AgentStore(None),
        machine_factory=made.machine,
        steering_factory=made.steering,
    )


def _together(*calls: Callable[[], object]) -> None:
    """Run the calls in threads released at the same instant; re-raise any failure."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as err:  # re-raised in the test thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    if errors:
        raise errors[0]


def test_two_attaches_at_once_land_on_one_machine(tmp_path: Path) -> None:
    made = Made()
    real = _real(tmp_path, made)
    _together(
        lambda: real.attach("vm-a", 1000, as_any(None)),
        lambda: real.attach("vm-b", 1001, as_any(None)),
    )
    assert len(made.machines) == 1
    machine = real.machine
    assert machine is not None
    assert sorted(g.name for g in machine.guests()) == ["vm-a", "vm-b"]
    assert sorted(g.domid for g in machine.guests()) == [1, 2]
    assert real.has_guest("vm-a") and real.has_guest("vm-b")  # both reach KSM sharing


def test_a_steering_start_racing_an_attach_steers_the_attached_guest(tmp_path: Path) -> None:
    made = Made()
    real = _real(tmp_path, made)
    loop = LoopThread()
    try:
        _together(
            lambda: loop.run(real.start_steering()), lambda: real.attach("vm-a", 1000, as_any(None))
        )
        assert len(made.machines) == 1 and len(made.steerings) == 1
        steering = made.steerings[0]
        assert real.machine is as_any(steering.machine)
        assert [g.name for g in made.machines[0].guests()] == ["vm-a"]
        assert loop.run(_mode(real)) in ("starting", "idle", "stalled", "boost")
    finally:
        loop.run(real.close())
        loop.close()
    assert made.steerings[0].closed  # the one steering there was is closed: knobs back


def test_an_operator_step_racing_a_steering_start_makes_one_steering(tmp_path: Path) -> None:
    made = Made()
    real = _real(tmp_path, made)
    loop = LoopThread()
    try:
        _together(
            lambda: loop.run(real.start_steering()),
            lambda: real.ksm_report(step=True, looping=False),
        )
        assert len(made.steerings) == 1 and made.steerings[0].steps >= 1
        loop.run(real.start_steering())  # again: still one loop, one steering
        assert len(made.steerings) == 1
    finally:
        loop.run(real.close())
        loop.close()
    assert made.steerings[0].closed and real.steering is None


async def _mode(real: RealGuests) -> str:
    return real.steering_mode()


def test_two_steering_starts_on_the_loop_make_one_loop(tmp_path: Path) -> None:
    made = Made(delay=0.05)
    real = _real(tmp_path, made)

    async def both() -> None:
        await asyncio.gather(real.start_steering(), real.start_steering())
        tasks = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_steer_loop"]  # type: ignore[union-attr]
        assert len(tasks) == 1
        await real.close()

    asyncio.run(both())
    assert len(made.steerings) == 1 and made.steerings[0].closed


def test_opt_outs_persist_and_survive_a_restart(tmp_path: Path) -> None:
    from hypervisor.lmdb_store import LmdbStore

    store = LmdbStore(
        tmp_path / "store", budget_bytes=8 << 20, control_path=str(tmp_path / "c.sock")
    )
    try:
        made = Made(delay=0)
        real = _real(tmp_path, made, AgentStore(store))
        real.attach("vm-a", 1000, as_any(None))
        assert real.opted_out() == frozenset()
        # A QEMU whose merging is off (mem-merge=off, or a crashed agent's opt-out) is
        # recorded as opted out, so that its guest's NOMINATE cannot undo it.
        machine = made.machines[0]
        machine.attach("vm-b", 1001)
        machine.detach(2)

        def merge_off(name: str, pid: int, monitor: object = None, **kw: Any) -> int:
            domid = FakeMachine.attach(machine, name, pid, monitor, **kw)
            machine.guest(domid).blocks = [Block(merge=False)]
            return domid

        machine.attach = merge_off  # type: ignore[method-assign]
        real.attach("vm-b", 1001, as_any(None))
        assert real.opted_out() == {"vm-b"}
        assert store.meta()["opted_out"] == ["vm-b"]
        assert AgentStore(store).reopen(_tmem(store)).opted_out == {"vm-b"}
    finally:
        store.close()


def _tmem(store: Any) -> Any:
    from tmem.host import TmemHost

    return TmemHost(budget_bytes=8 << 20, log=store)


def test_sharing_is_offered_to_guests_once_a_qemu_is_attached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent of real guests (no simulated machine) grants SHARING in HELLO only once a
    QEMU's RAM is read, as before its sharing router was wired at construction."""
    monkeypatch.setattr(real_guests, "_qemu_machine", lambda _consent: as_any(Machine()))
    app = AgentApp(budget_bytes=8 << 20)
    loop = LoopThread()
    path = str(tmp_path / "g.sock")
    try:
        loop.run(app.start(None))
        loop.run(app.agent.add_channel("g", path, mode="listen"))

        def granted() -> int:
            client = GuestClient.for_unix_socket(path, boot_id=os.urandom(16), timeout=5.0)
            with client:
                client.connect()
                assert client.server is not None
                return client.server.capabilities & Capability.SHARING

        assert not granted()
        app.real.attach("g", 4242, as_any(None))
        assert granted()
        assert app.router.real is app.real and app.dispatcher.sharing is app.router
    finally:
        loop.run(app.stop())
        loop.close()
