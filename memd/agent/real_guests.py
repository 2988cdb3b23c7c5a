"""Real guests: the QEMUs whose RAM the agent reads, their KSM merging, and KSM steering.

Owns, for guests that are real QEMU processes (not the simulated machine's):

* the :class:`~hypervisor.qemu_machine.QemuMachine` (pagemap ground truth, QMP), made on
  the first attach or the first steering and kept until the agent stops;
* the :class:`~hypervisor.real_sharing.QemuSharing` over it, which serves guests'
  NOMINATE / SHARE_QUERY / ABOUT_TO_WRITE (this component is the router's real
  backend, a :class:`~sharing.guest.GuestSharing`);
* KSM steering (:class:`~hypervisor.ksm_steer.KsmSteering`) and its loop;
* the VMs the operator opted out of merging (persisted through
  :class:`~memd.agent.persistence.AgentStore`; a guest's NOMINATE cannot undo them), and
  the :class:`~sharing.consent.ConsentBook` that reads them: the agent's one book of
  consent to cross-guest merging (the dispatcher, tmem and the simulated guests' sharing
  take it from here; opt-outs live here because the operator's word is about real VMs).

Threads and locks.  Attach, detach, opt-in/out and audits block (QMP, /proc) and run in
worker threads; guests' sharing requests and the steering loop's bookkeeping run on the
event loop.  So:

* ``_lock`` guards the references ``_machine``, ``_sharing``, ``_steering`` and the set
  ``_opted_out``.  It is held only to read or replace them (and to make the machine or
  the steering, which is cheap), never across QMP, /proc or a steering step, so the
  event loop may take it.  Making the machine and the steering under it is what makes
  two attaches, or a steering start and an attach, land on one machine.
* ``_changes`` serialises whole changes of the attached guests and of their merge
  setting (attach, detach, opt-in/out: QMP calls, seconds at worst), and the writes of
  the opted-out record, which thus reach the store in the order of the changes.  Only
  worker threads take it, and always before ``_lock``.
* ``_steer_task`` belongs to the event loop thread.

The machine, the sharing and the steering each lock their own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memd.agent.persistence import AgentStore
from memd.errors import InvalidArgument, MemdError, NotFound, SharingError
from sharing.consent import ConsentBook
from sharing.guest import PageSharing

if TYPE_CHECKING:
    from hypervisor.ksm_steer import KsmSteering
    from hypervisor.qemu_machine import QemuMachine
    from hypervisor.qmp import Monitor
    from hypervisor.real_sharing import QemuSharing

log = logging.getLogger("memd.agent")

#: Makes the steering of a machine; ``pending`` counts nominated pages not merged yet.
SteeringFactory = Callable[["QemuMachine", Callable[[], int]], "KsmSteering"]


class RealGuests:
    """The real guests' component (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger: Path,
        store: AgentStore,
        opted_out: set[str] | None = None,
        machine_factory: Callable[[ConsentBook], QemuMachine] | None = None,
        steering_factory: SteeringFactory | None = None,
    ) -> None:
        #: Where steering records the host's KSM knobs before changing them (survives a
        #: crash of this agent; see hypervisor.ksm.record_originals).
        self.ledger = ledger
        self._store = store
        self._machine_factory = machine_factory or _qemu_machine
        self._steering_factory = steering_factory or self._default_steering
        self._lock = threading.Lock()
        self._changes = threading.Lock()
        self._machine: QemuMachine | None = None
        self._sharing: QemuSharing | None = None
        self._steering: KsmSteering | None = None
        self._opted_out: set[str] = set(opted_out or ())
        self._steer_task: asyncio.Task[None] | None = None
        #: Consent to cross-guest merging (sharing.consent); reads ``_opted_out``.
        self.consent = ConsentBook(self._is_opted_out)

    def _default_steering(self, machine: QemuMachine, pending: Callable[[], int]) -> KsmSteering:
        from hypervisor.ksm_steer import KsmSteering

        return KsmSteering(machine, ledger=self.ledger, pending=pending)

    # -- state, for readers in any thread ------------------------------------------------

    @property
    def machine(self) -> QemuMachine | None:
        """The QEMUs' machine; None until the first attach or steering."""
        with self._lock:
            return self._machine

    @property
    def steering(self) -> KsmSteering | None:
        with self._lock:
            return self._steering

    def opted_out(self) -> frozenset[str]:
        """The VMs the operator opted out of merging."""
        with self._lock:
            return frozenset(self._opted_out)

    def offered(self) -> bool:
        """Whether guests are offered page sharing through KSM: once a QEMU was attached
        (or steering made the machine), as the agent has always done."""
        return self.machine is not None

    def qemu_pids(self) -> dict[str, int]:
        """Attached guests: name → its QEMU's pid."""
        machine = self.machine
        return {g.name: g.pid for g in machine.guests()} if machine is not None else {}

    def _ensure_machine(self) -> tuple[QemuMachine, QemuSharing]:
        """The machine and its sharing, made on first use (``_lock`` held)."""
        if self._machine is None or self._sharing is None:
            from hypervisor.real_sharing import QemuSharing

            machine = self._machine_factory(self.consent)
            self._sharing = QemuSharing(
                machine, on_nominate=self._poke_steering, consent=self.consent
            )
            self._machine = machine
        return self._machine, self._sharing

    def _is_opted_out(self, name: str) -> bool:
        with self._lock:
            return name in self._opted_out

    def _poke_steering(self) -> None:
        steering = self.steering
        if steering is not None:
            steering.poke()

    # -- attach / detach (worker threads: QMP, /proc) ----------------------------------

    def attach(self, name: str, pid: int, monitor: Monitor) -> int:
        """Start reading a running QEMU's RAM (pagemap; the audit, KSM); → its domid."""
        with self._changes:
            with self._lock:
                machine, sharing = self._ensure_machine()
            self._detach_locked(name)
            domid = machine.attach(name, pid, monitor)
            with self._lock:
                opted_out = name in self._opted_out
            if opted_out:
                machine.set_merge(domid, False)
            elif not all(block.merge for block in machine.guest(domid).blocks):
                # Merging is off in QEMU itself (mem-merge=off, or an opt-out from before an
                # agent crash): that is the operator's choice, and a guest's NOMINATE must
                # not undo it.  `memd optin` turns it on.
                self._record_opt(name, merge=False)
            sharing.enforce(name)  # a guest that declined in HELLO: merging off
        self._poke_steering()
        return domid

    def detach(self, name: str) -> None:
        """Stop reading the guest's RAM (its QEMU stopped, or the operator detached it)."""
        with self._changes:
            detached = self._detach_locked(name)
        if detached:
            self._poke_steering()

    def _detach_locked(self, name: str) -> bool:
        with self._lock:
            machine, sharing = self._machine, self._sharing
        if machine is None:
            return False
        gone = [g.domid for g in machine.guests() if g.name == name]
        for domid in gone:
            if sharing is not None:
                sharing.forget(domid)
            machine.detach(domid)
        return bool(gone)

    def _record_opt(self, vm: str, *, merge: bool) -> None:
        """Change and persist the opted-out set (``_changes`` held)."""
        with self._lock:
            if merge:
                self._opted_out.discard(vm)
            else:
                self._opted_out.add(vm)
            vms = sorted(self._opted_out)
        self._store.save_opted_out(vms)

    def set_merge(self, vm: str, merge: bool) -> dict[str, Any]:
        """`memd optin` / `memd optout` (worker thread: QMP)."""
        from hypervisor.ksm_steer import KsmSteering

        with self._changes:
            machine = self.machine
            if machine is None or not any(g.name == vm for g in machine.guests()):
                raise NotFound(f"no QEMU guest named {vm!r} is attached", target=vm)
            steering = self.steering or KsmSteering(machine)
            self._record_opt(vm, merge=merge)
            if merge:  # consent first: QemuMachine refuses merging that consent forbids
                self.consent.operator_changed(vm)
                return steering.opt_in(vm)
            result = steering.opt_out(vm)
            self.consent.operator_changed(vm)
            return result

    # -- guests' sharing requests (GuestSharing; the event loop) ----------------------

    def has_guest(self, name: str) -> bool:
        with self._lock:
            sharing = self._sharing
        return sharing is not None and sharing.has_guest(name)

    def _sharing_of(self, guest: str) -> QemuSharing:
        with self._lock:
            sharing = self._sharing
        if sharing is None:  # the router asks has_guest first: not reached
            raise SharingError("no QEMU guest is attached", domain=guest)
        return sharing

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[int | MemdError]:
        return self._sharing_of(guest).nominate(guest, gfns)

    def query(self, guest: str, gfns: Sequence[int]) -> list[PageSharing]:
        return self._sharing_of(guest).query(guest, gfns)

    def about_to_write(self, guest: str, gfn: int) -> None:
        self._sharing_of(guest).about_to_write(guest, gfn)

    # -- KSM steering --------------------------------------------------------------------

    def ensure_steering(self) -> KsmSteering:
        """The steering, made (with the machine, if need be) on first use (any thread)."""
        with self._lock:
            if self._steering is None:
                machine, sharing = self._ensure_machine()
                self._steering = self._steering_factory(machine, sharing.pending)
            return self._steering

    @property
    def looping(self) -> bool:
        """Whether the steering loop runs (event loop thread)."""
        return self._steer_task is not None

    async def start_steering(self) -> None:
        """Run the KSM steering loop until :meth:`stop_steering` (event loop thread)."""
        if self._steer_task is not None:
            return
        steering = await asyncio.to_thread(self.ensure_steering)
        if self._steer_task is None:  # another start may have won while we waited
            self._steer_task = asyncio.create_task(self._steer_loop(steering))

    async def _steer_loop(self, steering: KsmSteering) -> None:
        while True:
            # A worker thread cannot be cancelled: on stop, the step already running must
            # be waited for (shielded from the cancel), so that close() comes after it.
            step = asyncio.ensure_future(asyncio.to_thread(steering.step))
            try:
                await asyncio.shield(step)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await step
                raise
            except MemdError as err:  # a guest went away mid-step: next step sees it
                log.warning("ksm steering step failed: %s", err)
            await asyncio.sleep(steering.next_step_seconds())

    async def stop_steering(self) -> None:
        """Stop the loop (after the step in flight ends) and put KSM's knobs back as the
        host had them (event loop thread)."""
        task, self._steer_task = self._steer_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with self._lock:
            steering, self._steering = self._steering, None
        if steering is not None:
            try:
                await asyncio.to_thread(steering.close)
            except MemdError as err:  # the rest of the shutdown must still happen
                log.error("%s; `memd ksm-restore` retries from %s", err, self.ledger)

    def steering_mode(self) -> str:
        """off | starting | idle | stalled | boost (event loop thread)."""
        steering = self.steering
        if steering is None or self._steer_task is None:
            return "off"
        return steering.last.mode if steering.last else "starting"

    def ksm_report(self, *, step: bool, looping: bool) -> dict[str, Any]:
        """`memd ksm`: knobs, last step, potential, VMs' merge setting; with *step* one
        steering step first (worker thread).  *looping*: whether the loop runs."""
        from hypervisor.ksm_steer import ksmd_cpu_seconds

        steering = self.steering
        if step:
            steering = self.ensure_steering()
            steering.poke()  # the operator asks for a fresh look: it also ends "stalled"
            steering.step()
        if steering is None:
            from hypervisor import ksm

            machine = self.machine
            knobs = {k: ksm.get(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
            return {
                "steering": False,
                "knobs": knobs,
                "last_step": None,
                "potential": None,
                "vms": {
                    g.name: {"merge": all(b.merge for b in g.blocks)}
                    for g in (machine.guests() if machine else [])
                },
                "ksmd_cpu_seconds": round(ksmd_cpu_seconds(), 2),
            }
        return {"steering": looping, **steering.status()}

    # -- audit (worker threads) ----------------------------------------------------------

    def audit(self) -> dict[str, Any] | None:
        """The attached guests' RAM as pagemap shows it, the potential of merging and the
        guests' nominations; None when no QEMU is attached."""
        machine = self.machine
        if machine is None or not machine.guests():
            return None
        from hypervisor.potential import PotentialScanner
        from hypervisor.qemu_audit import audit_report

        with self._lock:
            steering, sharing = self._steering, self._sharing
        result = audit_report(machine)
        scanner = steering.scanner if steering else PotentialScanner(machine, batch_pages=2048)
        result["potential"] = scanner.scan().to_dict()
        if sharing is not None:
            result["nominated"] = sharing.ledger_report()
        return result

    def explain(self, page: str) -> dict[str, Any]:
        """One guest page, ``VM:GFN`` (`memd audit --gfn`)."""
        from hypervisor.qemu_audit import explain_gfn, parse_vm_gfn

        try:
            vm, gfn = parse_vm_gfn(page)
        except ValueError as err:
            raise InvalidArgument(str(err), op="explain") from None
        machine = self.machine
        if machine is None or not any(g.name == vm for g in machine.guests()):
            raise NotFound(f"no QEMU guest named {vm!r} is attached for auditing", target=vm)
        return explain_gfn(machine, vm, gfn)

    async def close(self) -> None:
        """Stop steering (knobs back) and let go of the QEMUs' monitors (event loop)."""
        await self.stop_steering()
        machine = self.machine
        if machine is not None:
            await asyncio.to_thread(machine.close)  # its QMP monitors, politely


def _qemu_machine(consent: ConsentBook) -> QemuMachine:
    from hypervisor.qemu_machine import QemuMachine

    # Attaching a QEMU is the operator's yes; QemuMachine refuses merging beyond it.
    return QemuMachine(may_merge=lambda vm: consent.allows(vm, attached=True))
