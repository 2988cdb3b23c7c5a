"""Following a plain QEMU's live migration on its QMP monitor (asyncio, source side).

Owns the order of memd's transfer relative to QEMU's: memd switches on the migration
capabilities ``pause-before-switchover`` (and ``events``) before the operator runs
``migrate``, so QEMU stops the guest in state ``pre-switchover`` and waits for
``migrate-continue``.  Then:

=================== ===================================================================
MIGRATION status    memd
=================== ===================================================================
(armed)             connected to the destination agent, pre-copy while the guest runs,
                    then keeps the destination up to date (every 0.2 s)
setup / active      (the same: QEMU copies RAM meanwhile)
pre-switchover      guest paused: final delta + COMMIT, wait for CONFIRM, then
                    ``migrate-continue`` (memd's share of the downtime is this step)
completed           DONE to the destination; the caller drops the guest here
failed / cancelled  ABORT: the destination drops what it staged; the guest keeps
                    everything here
=================== ===================================================================

If memd's own transfer fails first (the destination agent died, ran out of room), memd
cancels QEMU's migration with ``migrate_cancel``: a guest must never run on a host whose
agent does not hold its pages.  QEMU broadcasts events to every monitor, so the operator
runs ``migrate`` on a QMP socket of their own (a QEMU may have several ``-qmp``); memd
holds the one it was given.  One task per followed migration, on the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hypervisor.qmp import AsyncQmpMonitor
from memd.errors import MemdError, MigrationFailed
from memd.migrate.transport import SourceTransfer

log = logging.getLogger("memd.migrate")

#: QEMU states that end a migration without the guest moving.
FAILED = frozenset({"failed", "cancelled"})
#: QEMU states of a migration still under way.
BUSY = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active", "wait-unplug"}
)


async def arm(monitor: AsyncQmpMonitor) -> Any:
    """Make QEMU wait for us at switch-over; → the MIGRATION event listener."""
    listener = monitor.event_listener("MIGRATION")
    # QEMU sends MIGRATION events only with the "events" capability on.
    await monitor.execute(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "events", "state": True},
                {"capability": "pause-before-switchover", "state": True},
            ]
        },
    )
    return listener


async def follow(
    monitor: AsyncQmpMonitor,
    listener: Any,
    transfer: SourceTransfer,
    drop_guest: Callable[[], Awaitable[None]],
    *,
    cancel: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Drive *transfer* (connected) by QEMU's MIGRATION events until QEMU completes or
    gives up; pre-copy starts at once, so that memd is done with the bulk before QEMU
    pauses the guest.  *cancel* set (``memd migrate --cancel``): as a failed transfer,
    QEMU's migration is cancelled too.  → a summary (``outcome``: ``moved`` |
    ``aborted``, figures)."""
    switch = asyncio.Event()
    precopy: asyncio.Task[None] | None = asyncio.ensure_future(transfer.precopy(until=switch))
    qemu_paused_at: float | None = None
    event: asyncio.Task[Any] | None = None
    #: Waits for ``--cancel``; None once the switch-over began (too late: QEMU decides).
    cancelling: asyncio.Task[Any] | None = asyncio.ensure_future((cancel or asyncio.Event()).wait())
    try:
        while True:
            event = asyncio.ensure_future(listener.get())
            waiting: set[asyncio.Future[Any]] = {event}
            if cancelling is not None:
                waiting.add(cancelling)
            if precopy is not None and not precopy.done():
                waiting.add(precopy)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if cancelling is not None and cancelling.done():
                raise MigrationFailed(
                    "cancelled by the operator (memd migrate --cancel)", target=transfer.guest
                )
            if precopy is not None and precopy.done() and precopy.exception() is not None:
                raise precopy.exception()  # type: ignore[misc]
            if not event.done():
                continue
            status = str(event.result()["data"]["status"])
            event = None
            log.debug("QEMU migration of %s: %s", transfer.guest, status)
            if status == "pre-switchover":
                qemu_paused_at = time.monotonic()
                if cancelling is not None:
                    cancelling.cancel()
                    cancelling = None
                switch.set()
                assert precopy is not None
                await precopy
                await transfer.switchover()
                await monitor.execute("migrate-continue", {"state": "pre-switchover"})
                transfer.progress.switchover_ms = round(
                    (time.monotonic() - qemu_paused_at) * 1000, 2
                )
            elif status == "completed":
                if qemu_paused_at is None:
                    raise MigrationFailed(
                        "QEMU completed without stopping at "
                        "pre-switchover: the guest's pages stay here",
                        target=transfer.guest,
                    )
                await transfer.finish()
                await drop_guest()
                return {"outcome": "moved", **transfer.progress.to_dict()}
            elif status in FAILED:
                await transfer.abort(f"QEMU's migration {status}")
                return {"outcome": "aborted", **transfer.progress.to_dict()}
    except (MemdError, OSError) as err:
        with contextlib.suppress(MemdError):
            await monitor.execute("migrate_cancel")
        await transfer.abort(str(err))
        log.error(
            "migration of %s: memd's transfer failed (%s); QEMU's migration was "
            "cancelled, the guest stays here",
            transfer.guest,
            err,
            extra={"event": "migrate-cancelled", "vm": transfer.guest},
        )
        return {"outcome": "aborted", **transfer.progress.to_dict()}
    except asyncio.CancelledError:  # the agent is stopping: the pages cannot follow
        with contextlib.suppress(MemdError):
            await monitor.execute("migrate_cancel")
        raise
    finally:
        for task in (precopy, event, cancelling):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await _disarm(monitor)


async def _disarm(monitor: AsyncQmpMonitor) -> None:
    """Switch pause-before-switchover off again once QEMU's migration is over, so that a
    later migration without memd does not wait at pre-switchover for nobody (best effort:
    QEMU refuses capability changes while a migration runs)."""
    with contextlib.suppress(MemdError, OSError):
        async with asyncio.timeout(10):
            while True:
                state = await monitor.execute("query-migrate")
                if str(state.get("status", "none")) not in BUSY:
                    break
                await asyncio.sleep(0.1)
            await monitor.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "pause-before-switchover", "state": False}]},
            )
