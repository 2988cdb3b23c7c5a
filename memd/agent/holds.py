"""Holding a guest's requests while its pages are still on their way to this agent.

Why: a migration's destination may let the guest run before memd's transfer has
installed the guest here.  libvirt resumes the destination QEMU in its Finish phase,
which does not wait for memd (memd cannot hold libvirt's switch-over); a guest that
asked for a page then would miss it, a swap-in would read zeros.  So while an incoming
transfer for a guest is not installed, that guest's channel frames (its HELLO too) and
its swap disk's NBD requests wait; the NBD handshake of a QEMU starting with
``-incoming`` does not (QEMU must open its disk to start).  Installing or aborting
the transfer releases them: the requests then see the installed pages, or (aborted)
nothing, which is right since the guest does not run here then.

A hold is time-bound: HOLD_SECONDS after a request first waited on it, it expires and
requests are answered as if there were no hold (logged: a guest that waits that long
has a problem no waiting will fix).  Each guest has its own hold; a held guest never
blocks another.

Owner: :class:`IncomingHolds` is the agent's one book of holds, made by
memd.agent.app and shared by the channel server (memd.agent.server), the swap disks
(memd.agent.swap_disks, for their NBD servers) and the migration service, which alone
calls :meth:`~IncomingHolds.hold` and :meth:`~IncomingHolds.release`.  Event loop thread
only: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

log = logging.getLogger("memd.migrate")

#: How long requests of a guest wait at most for its incoming transfer.
HOLD_SECONDS = 60.0


class _Hold:
    """One guest's hold: released once (installed or aborted) or expired."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        #: time.monotonic() when a request first waited (None: none waited yet).
        self.first_wait: float | None = None
        self.expired = False
        self.waited = 0  #: requests (frames' reads, NBD batches) that waited


class IncomingHolds:
    """Guest name → its hold while an incoming transfer is not installed (see the module
    docstring).  Loop thread only."""

    def __init__(self, timeout: float = HOLD_SECONDS) -> None:
        self.timeout = timeout
        self._holds: dict[str, _Hold] = {}

    def hold(self, guest: str) -> None:
        """An incoming transfer for *guest* began: hold its requests from now on."""
        if guest not in self._holds:
            self._holds[guest] = _Hold()
            log.debug("holding the requests of %s until its transfer installs", guest)

    def release(self, guest: str, why: str) -> None:
        """The transfer installed the guest or ended without it: let its requests go."""
        hold = self._holds.pop(guest, None)
        if hold is None:
            return
        hold.released.set()
        if hold.first_wait is not None and not hold.expired:
            log.info(
                "released the requests of %s (%s) after %.0f ms",
                guest,
                why,
                (time.monotonic() - hold.first_wait) * 1000,
                extra={"event": "migrate-hold-released", "vm": guest},
            )

    def held(self, guest: str) -> bool:
        """Whether a request of *guest* must wait now."""
        hold = self._holds.get(guest)
        return hold is not None and not hold.expired

    def guests(self) -> list[str]:
        """The guests held now (for status and tests)."""
        return sorted(g for g, h in self._holds.items() if not h.expired)

    async def wait(self, guest: str, also: asyncio.Future[Any] | None = None) -> None:
        """Return once *guest* is not held (released, or the hold expired), or *also*
        (e.g. the connection's end) is done."""
        hold = self._holds.get(guest)
        if hold is None or hold.expired:
            return
        now = time.monotonic()
        if hold.first_wait is None:
            hold.first_wait = now
            log.info(
                "holding the requests of %s: its pages are still arriving",
                guest,
                extra={"event": "migrate-hold", "vm": guest},
            )
        hold.waited += 1
        left = hold.first_wait + self.timeout - now
        released = asyncio.ensure_future(hold.released.wait())
        waiters: set[asyncio.Future[Any]] = {released}
        if also is not None:
            waiters.add(also)  # not ours: waited on, never cancelled
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not released.done():
                released.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await released
        if not done and not hold.released.is_set() and not hold.expired:
            hold.expired = True
            log.warning(
                "the requests of %s waited %.0f s for its incoming transfer: answering "
                "them without its pages",
                guest,
                self.timeout,
                extra={"event": "migrate-hold-expired", "vm": guest},
            )

    def for_guest(self, guest: str) -> GuestHold:
        """*guest*'s view of the holds, for a component that serves only that guest."""
        return GuestHold(self, guest)


class GuestHold:
    """One guest's side of :class:`IncomingHolds` (an NBD server's ``hold``)."""

    def __init__(self, holds: IncomingHolds, guest: str) -> None:
        self._holds = holds
        self.guest = guest

    def held(self) -> bool:
        return self._holds.held(self.guest)

    async def wait(self, also: asyncio.Future[Any] | None = None) -> None:
        await self._holds.wait(self.guest, also)
