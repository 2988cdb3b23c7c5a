"""Following a libvirt-driven live migration (source side), through libvirt's public API.

libvirt holds its guests' only QMP socket and drives QEMU's migration itself: it arms
QEMU's ``pause-before-switchover`` and sends ``migrate-continue`` on its own, so memd
cannot hold QEMU's switch-over as it does for a plain QEMU (memd.migrate.qemu).  memd
follows the migration instead, by the domain's lifecycle events and by polling its job
(every POLL_SECONDS, in a worker thread); the destination agent holds the guest's
requests until memd's final delta is installed there (memd.agent.holds), which covers
libvirt resuming the guest on the destination before memd is done.  The ``qemu`` hook
cannot drive this: it runs only on the destination, at prepare time, and blocks
libvirtd while it runs; no hook fires on the source at switch-over or completion.

============= ===================================== =========================================
phase         entered on                            memd
============= ===================================== =========================================
armed         ``memd migrate`` (connected)          pre-copy while the guest runs, then keeps
                                                    the destination up to date
migrating     the domain's job: a migration out     (the same: libvirt copies RAM meanwhile)
paused        SUSPENDED/MIGRATED (the source        final delta + COMMIT, wait for CONFIRM
              stopped the guest for the last phase)
confirmed     CONFIRM                               waits for libvirt's verdict
switched      STOPPED/MIGRATED before CONFIRM       finishes the final delta (the source no
              (libvirt was quicker than memd)       longer changes), then as ``moved``
moved         STOPPED/MIGRATED after CONFIRM        DONE to the destination; the guest is
                                                    dropped here
aborted       RESUMED after SUSPENDED/MIGRATED; the ABORT: the destination drops what it
              job gone with the domain running;     has; the guest keeps everything here
              the domain stopped some other way
aborted       memd's transfer failed before         libvirt's migration is cancelled
(memd)        libvirt switched over                 (``abortJob``), then ABORT
aborted       ``memd migrate VM --cancel`` while    (the same as memd's transfer failing;
(operator)    armed or migrating                    later, libvirt decides)
aborted       armed, and no migration job seen      ABORT (libvirt's migration was refused
(unstarted)   within the arming deadline            or failed before memd could see it)
============= ===================================== =========================================

Why a deadline.  A migration libvirt refuses or fails before QEMU's migration starts (the
destination's ``qemu`` hook refusing at Prepare, an unreachable destination, a failure
inside one job poll) leaves no trace on the source that libvirt 9.0 reports: no lifecycle
event, no JOB_COMPLETED event (libvirt emits it for a completed migration only), and
``jobStats(VIR_DOMAIN_JOB_STATS_COMPLETED)`` says ``type`` NONE (checked on the two-host
test bed).  So an armed transfer that never sees libvirt's job gives up after
``arm_seconds`` (``memd migrate --arm-timeout``); a retried ``virsh migrate`` within that
time is still followed.

:class:`LibvirtFollow` is that table as a sans-I/O state machine: fed events, job looks,
CONFIRM and transfer failures, it answers the actions to take.  :func:`follow` is the
asyncio driver, one task per followed migration on the agent's loop; a
:class:`LibvirtDomain` is its view of the domain (its own libvirt connection, events on).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hypervisor.guests import JobState, LifecycleEvent
from hypervisor.libvirt_host import LibvirtHost
from memd.errors import BackendError, MemdError
from memd.migrate.transport import SourceTransfer

log = logging.getLogger("memd.migrate")

#: How often the domain's job is looked at.
POLL_SECONDS = 0.2
#: How long an armed transfer waits for libvirt's migration job (see the overview).
ARM_SECONDS = 300.0


class Phase(enum.Enum):
    ARMED = "armed"
    MIGRATING = "migrating"
    PAUSED = "paused"
    CONFIRMED = "confirmed"
    SWITCHED = "switched"
    MOVED = "moved"
    ABORTED = "aborted"


#: Phases in which libvirt has not switched the guest over yet (its job can be cancelled).
_BEFORE_SWITCH = frozenset({Phase.ARMED, Phase.MIGRATING, Phase.PAUSED})
_OVER = frozenset({Phase.MOVED, Phase.ABORTED})


class Act(enum.Enum):
    SWITCHOVER = "switchover"  #: final delta + COMMIT, then report CONFIRM
    FINISH = "finish"  #: DONE to the destination, drop the guest here
    CANCEL_LIBVIRT = "cancel-libvirt"  #: ``abortJob``: the guest must not move
    ABORT = "abort"  #: ABORT to the destination; the guest keeps everything here


@dataclass(frozen=True, slots=True)
class Action:
    act: Act
    reason: str = ""


class LibvirtFollow:
    """The module's table as a state machine: no I/O, no clock.  One per migration."""

    def __init__(self, guest: str) -> None:
        self.guest = guest
        self.phase = Phase.ARMED

    @property
    def over(self) -> bool:
        return self.phase in _OVER

    def _to(self, phase: Phase, *actions: Action) -> list[Action]:
        if phase is not self.phase:
            log.info(
                "libvirt migration of %s: %s",
                self.guest,
                phase.value,
                extra={"event": f"migrate-libvirt-{phase.value}", "vm": self.guest},
            )
        self.phase = phase
        return list(actions)

    def _abort(self, reason: str) -> list[Action]:
        return self._to(Phase.ABORTED, Action(Act.ABORT, reason))

    def event(self, kind: str, detail: str) -> list[Action]:
        """A lifecycle event of the domain (hypervisor.guests words)."""
        phase = self.phase
        if self.over:
            return []
        if (kind, detail) == ("suspended", "migrated") and phase in (Phase.ARMED, Phase.MIGRATING):
            return self._to(Phase.PAUSED, Action(Act.SWITCHOVER))
        if (kind, detail) == ("stopped", "migrated"):
            if phase is Phase.CONFIRMED:
                return self._to(Phase.MOVED, Action(Act.FINISH))
            if phase is Phase.PAUSED:
                return self._to(Phase.SWITCHED)  # the final delta under way finishes it
            if phase in (Phase.ARMED, Phase.MIGRATING):  # no pause seen: final delta now
                return self._to(Phase.SWITCHED, Action(Act.SWITCHOVER))
            return []
        if phase is Phase.SWITCHED:
            return []  # the guest runs on the destination: nothing here changes that
        if kind == "resumed" and phase in (Phase.PAUSED, Phase.CONFIRMED):
            return self._abort(f"libvirt resumed {self.guest} here ({detail}): migration failed")
        if kind in ("stopped", "crashed"):
            return self._abort(f"{self.guest} {kind} here ({detail}) while migrating")
        return []

    def job(self, look: JobState) -> list[Action]:
        """One look at the domain's state and job."""
        if self.over or self.phase is Phase.SWITCHED or look.state == "gone":
            return []  # a domain libvirt dropped: its events say why
        if look.migrating:
            return self._to(Phase.MIGRATING) if self.phase is Phase.ARMED else []
        if not look.running:
            return []
        if self.phase is Phase.MIGRATING and look.migrating is False:
            return self._abort("libvirt's migration ended with the guest running here")
        if self.phase in (Phase.PAUSED, Phase.CONFIRMED):
            return self._abort(f"{self.guest} runs here again: libvirt's migration failed")
        return []

    def unstarted(self, seconds: float) -> list[Action]:
        """The arming deadline passed: abort if libvirt's migration was never seen."""
        if self.phase is Phase.ARMED:
            return self._abort(
                f"no libvirt migration of {self.guest} began within {seconds:g} s of memd "
                "arming it (refused or failed before it started: run `memd migrate` again, "
                "then `virsh migrate`)"
            )
        return []

    def cancelled(self) -> list[Action]:
        """The operator cancelled memd's transfer (``memd migrate VM --cancel``): as a
        failed transfer, libvirt's migration must not move the guest without its pages.
        Once libvirt paused the guest for the final delta it is too late: libvirt decides."""
        if self.phase in (Phase.ARMED, Phase.MIGRATING):
            return self.failed("cancelled by the operator (memd migrate --cancel)")
        return []

    def confirmed(self) -> list[Action]:
        """The destination installed the final delta (CONFIRM)."""
        if self.phase is Phase.PAUSED:
            return self._to(Phase.CONFIRMED)
        if self.phase is Phase.SWITCHED:
            return self._to(Phase.MOVED, Action(Act.FINISH))
        return []

    def failed(self, reason: str) -> list[Action]:
        """memd's own transfer failed (destination agent gone, out of room, ...)."""
        if self.phase in _BEFORE_SWITCH:
            return self._to(
                Phase.ABORTED, Action(Act.CANCEL_LIBVIRT, reason), Action(Act.ABORT, reason)
            )
        if self.phase is Phase.SWITCHED:
            log.error(
                "libvirt moved %s before memd's transfer could finish (%s): the guest "
                "runs on the destination without its tmem pages",
                self.guest,
                reason,
                extra={"event": "migrate-lost", "vm": self.guest},
            )
            return self._abort(reason)
        return []


class Domain(Protocol):
    """What :func:`follow` needs of the domain (a :class:`LibvirtDomain`, or a fake)."""

    events: asyncio.Queue[LifecycleEvent]

    async def job(self) -> JobState: ...

    async def abort_job(self) -> bool: ...

    async def close(self) -> None: ...


class LibvirtDomain:
    """One domain through a libvirt connection of its own (lifecycle events on), opened
    for one followed migration.  Loop thread; the libvirt calls go to worker threads."""

    def __init__(self, host: LibvirtHost, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.host, self.name = host, name
        # Subscribed before anything is asked: events are not replayed.
        _watch, self.events = host.watch_queue(loop, name)

    @classmethod
    async def open(cls, uri: str, name: str) -> LibvirtDomain:
        host = await asyncio.to_thread(LibvirtHost, uri)
        try:
            return cls(host, name, asyncio.get_running_loop())
        except BackendError:
            host.close()
            raise

    async def job(self) -> JobState:
        return await asyncio.to_thread(self.host.job, self.name)

    async def abort_job(self) -> bool:
        return await asyncio.to_thread(self.host.abort_job, self.name)

    async def close(self) -> None:
        await asyncio.to_thread(self.host.close)


async def _next_look(domain: Domain, events_seen: Callable[[], int]) -> tuple[int, JobState | None]:
    """The domain after POLL_SECONDS, with how many events had been taken into account
    when the look began: a look older than the last event is stale (the look before a
    pause, answered after it, would say "running" and abort the migration)."""
    await asyncio.sleep(POLL_SECONDS)
    seen = events_seen()
    try:
        return seen, await domain.job()
    except MemdError as err:  # libvirtd restarting: the next look, or an event, tells
        log.debug("cannot look at the job of a migrating domain: %s", err)
        return seen, None


async def _switchover(precopy: asyncio.Task[None], transfer: SourceTransfer) -> None:
    await precopy  # it stops at once: the switch is set
    await transfer.switchover()


async def _deadline(transfer: SourceTransfer, seconds: float) -> None:
    """Ends *seconds* after memd's first pass is across (when ``memd migrate`` answers)."""
    await transfer.first_pass.wait()
    await asyncio.sleep(seconds)


async def follow(
    domain: Domain,
    transfer: SourceTransfer,
    drop_guest: Callable[[], Awaitable[None]],
    *,
    cancel: asyncio.Event | None = None,
    arm_seconds: float | None = None,
) -> dict[str, Any]:
    """Drive *transfer* (connected) by the domain's events and job until libvirt moved the
    guest or gave up; pre-copy starts at once.  *cancel* set: the operator cancels memd's
    transfer.  *arm_seconds* (default ARM_SECONDS): the arming deadline.  → a summary
    (``outcome``: ``moved`` | ``aborted``, figures)."""
    machine = LibvirtFollow(transfer.guest)
    seconds = ARM_SECONDS if arm_seconds is None else arm_seconds
    deadline: asyncio.Task[None] | None = asyncio.ensure_future(_deadline(transfer, seconds))
    cancelling: asyncio.Task[Any] | None = asyncio.ensure_future((cancel or asyncio.Event()).wait())
    switch = asyncio.Event()
    work: asyncio.Task[None] = asyncio.ensure_future(transfer.precopy(until=switch))
    work_is_switchover = False
    #: ``work`` until its end has been taken into account (then None: not waited on).
    watched: asyncio.Task[None] | None = work
    event: asyncio.Task[LifecycleEvent] = asyncio.ensure_future(domain.events.get())
    events = 0  #: lifecycle events taken into account so far

    def events_seen() -> int:
        return events

    look: asyncio.Task[tuple[int, JobState | None]]
    look = asyncio.ensure_future(_next_look(domain, events_seen))
    try:
        while not machine.over:
            waiting: set[asyncio.Future[Any]] = {event, look}
            if watched is not None:
                waiting.add(watched)
            waiting |= {t for t in (deadline, cancelling) if t is not None}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            actions: list[Action] = []
            if cancelling is not None and cancelling.done():
                cancelling = None
                actions += machine.cancelled()
            if deadline is not None and deadline.done():
                deadline = None
                actions += machine.unstarted(seconds)
            if event.done():
                ev = event.result()
                log.debug("libvirt event of %s: %s/%s", transfer.guest, ev.kind, ev.detail)
                actions += machine.event(ev.kind, ev.detail)
                events += 1
                event = asyncio.ensure_future(domain.events.get())
            if look.done():
                seen, state = look.result()
                if state is not None and seen == events:
                    actions += machine.job(state)
                look = asyncio.ensure_future(_next_look(domain, events_seen))
            if watched is not None and watched.done() and not actions:
                watched = None
                error = work.exception()
                if error is not None:
                    actions += machine.failed(str(error))
                elif work_is_switchover:
                    work_is_switchover = False
                    actions += machine.confirmed()
            for action in actions:
                if action.act is Act.SWITCHOVER:
                    switch.set()
                    work = watched = asyncio.ensure_future(_switchover(work, transfer))
                    work_is_switchover = True
                elif action.act is Act.CANCEL_LIBVIRT:
                    cancelled = await domain.abort_job()
                    log.error(
                        "migration of %s: memd's transfer gave up (%s); %s",
                        transfer.guest,
                        action.reason,
                        "libvirt's migration was cancelled, the guest stays here"
                        if cancelled
                        else "libvirt had no migration job to cancel",
                        extra={"event": "migrate-cancelled", "vm": transfer.guest},
                    )
                elif action.act is Act.ABORT:
                    await _stop(work)
                    await transfer.abort(action.reason)
                elif action.act is Act.FINISH:
                    with contextlib.suppress(MemdError, OSError):  # it keeps what it confirmed
                        await transfer.finish()
                    await drop_guest()
        outcome = "moved" if machine.phase is Phase.MOVED else "aborted"
        return {"outcome": outcome, **transfer.progress.to_dict()}
    except asyncio.CancelledError:  # the agent is stopping: the pages cannot follow
        if machine.phase in _BEFORE_SWITCH:
            with contextlib.suppress(BackendError):
                await domain.abort_job()
        raise
    finally:
        for task in (work, event, look, deadline, cancelling):
            if task is not None:
                await _stop(task)


async def _stop(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task
