"""Wiring: the components of one `memd serve` process, built once, and their lifecycle.

:class:`AgentApp` is the composition root and nothing else: it builds every component
with what it needs, at construction, starts and stops them in order, and holds no
state beyond their references (which never change after ``__init__``, but ``metrics``:
made by :meth:`AgentApp.start`, as the port is the operator's to give then).

    tmem        TmemHost (writing through ``store``, when there is one)   tmem.host
    persistence the agent's own records in the store; reopening it        .persistence
    machine     the simulated guests' SimMachine (embedded default)       hypervisor.simmachine
    sharing     SharingService over it; None without one                  .sharing_service
    real        real QEMU guests: RAM, KSM sharing, steering, opt-outs    .real_guests
    router      guests' sharing requests: to ``sharing`` or to ``real``   .sharing_service
    dispatcher  guest requests → tmem and the router (sans-I/O)           .dispatch
    holds       guests whose requests wait for an incoming migration       .holds
    agent       the guests' channels (asyncio)                            .server
    swap        the guests' NBD swap disks                                .swap_disks
    migration   guests moving to and from other agents (TLS), following   .migration
                QEMU or libvirt (``libvirt_uri``); its own control commands
    handlers    the control commands, bound to the components above       .handlers
    control     the control socket that serves them                       .control
    metrics     /metrics (``serve --metrics``); None without one          .metrics

With a store (:class:`~hypervisor.lmdb_store.LmdbStore`, always for ``memd serve``) the
tmem host is rebuilt from it at start (memd.agent.persistence); there is no other
restart mechanism.  With a store the tmem host also has a
:class:`~tmem.migration.ChangeFeed` listener, which tells migrations what a guest changes
while it is copied (without a store the agent cannot migrate, and puts skip the
change tracking).  Threads: construction, start and stop happen on the thread that
runs the event loop (or before it runs); each component says who owns what in it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hypervisor.simmachine import SimMachine
from memd import paths
from memd.agent.control import ControlServer, handler_table
from memd.agent.dispatch import Dispatcher
from memd.agent.handlers import ControlHandlers
from memd.agent.holds import IncomingHolds
from memd.agent.migration import MigrationService
from memd.agent.persistence import AgentStore
from memd.agent.real_guests import RealGuests
from memd.agent.server import Agent
from memd.agent.sharing_service import SharingRouter, SharingService
from memd.agent.swap_disks import SwapDisks
from memd.vocab import PAGE_SIZE
from sharing.manager import SharingManager
from tmem.host import TmemHost
from tmem.migration import ChangeFeed

if TYPE_CHECKING:
    from hypervisor.lmdb_store import LmdbStore
    from memd.agent.metrics import MetricsServer

log = logging.getLogger("memd.agent")


class AgentApp:
    """Everything one `memd serve` process owns (see the module docstring)."""

    def __init__(
        self,
        *,
        budget_bytes: int = 256 << 20,
        sim_frames: int = 0,
        guest_cap_bytes: int | None = None,
        ksm_ledger: Path | None = None,
        store: LmdbStore | None = None,
        swap_markers: Path | None = None,
        spill_dir: Path | None = None,
        tls_dir: Path | str | None = None,
        libvirt_uri: str | None = None,
    ) -> None:
        self.started = time.time()
        #: What migrations watch to learn which chunks a guest changed (with a store).
        self.feed = ChangeFeed() if store is not None else None
        self.tmem = TmemHost(
            budget_bytes=budget_bytes,
            log=store,
            listeners=[self.feed] if self.feed is not None else [],
        )
        #: The crash-safe store (None: in memory only, lost with the process).
        self.store = store
        self.persistence = AgentStore(store)
        reopened = self.persistence.reopen(self.tmem)
        self.real = RealGuests(
            ledger=ksm_ledger or paths.ksm_originals(),
            store=self.persistence,
            opted_out=reopened.opted_out,
        )
        #: Consent to cross-guest merging (sharing.consent): tmem, sim and KSM obey it.
        self.consent = self.real.consent
        self.machine: SimMachine | None = SimMachine(sim_frames) if sim_frames else None
        self.sharing: SharingService | None = (
            SharingService(SharingManager(self.machine), consent=self.consent)
            if self.machine
            else None
        )
        self.router = SharingRouter(self.sharing, self.real)
        # Default per-guest cap: half the budget, counted in raw pages.
        cap = budget_bytes // 2 if guest_cap_bytes is None else guest_cap_bytes
        self.dispatcher = Dispatcher(
            self.tmem,
            self.router,
            guest_cap_pages=cap // PAGE_SIZE,
            consent=self.consent,
            sharing_offered=self._sharing_offered,
        )
        #: Guests whose requests wait for an incoming migration (channel and swap disk).
        self.holds = IncomingHolds()
        self.agent = Agent(self.dispatcher, holds=self.holds)
        self.agent.guests.update(reopened.guests)
        self.swap = SwapDisks(
            self.tmem,
            self.dispatcher,
            markers=swap_markers or paths.run_dir() / "swap",
            spill_dir=spill_dir,
            holds=self.holds,
        )
        self.migration = MigrationService(
            tmem=self.tmem,
            feed=self.feed,
            agent=self.agent,
            swap=self.swap,
            holds=self.holds,
            tls_dir=tls_dir,
            libvirt_uri=libvirt_uri,
        )
        self.handlers = ControlHandlers(
            tmem=self.tmem,
            agent=self.agent,
            swap=self.swap,
            real=self.real,
            sharing=self.sharing,
            persistence=self.persistence,
            migration=self.migration,
            started=self.started,
            metrics_url=self._metrics_url,
        )
        self.control = ControlServer(handler_table(self.handlers, self.migration))
        #: The /metrics endpoint (``serve --metrics``); None without one.  Loop thread.
        self.metrics: MetricsServer | None = None
        #: Set by SIGINT/SIGTERM once catch_signals() ran (event loop thread only).
        self._stop_requested: asyncio.Event | None = None

    def _sharing_offered(self) -> bool:
        """Whether HELLO grants SHARING: with simulated guests, or once a QEMU's RAM is
        read (before that, a real guest's nominations could go nowhere)."""
        return self.sharing is not None or self.real.offered()

    def _metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics is not None else None

    async def start(
        self, control_path: str | None, *, metrics: tuple[str, int] | None = None
    ) -> None:
        """Start the agent; ``metrics``: (host, port) to serve ``/metrics`` on
        (memd.agent.metrics; port 0 picks a free one, see ``self.metrics.port``)."""
        if metrics is not None:
            from memd.agent.metrics import MetricsServer

            # First: a port in use is an operator's mistake, reported before anything runs.
            self.metrics = MetricsServer(self, *metrics)
        self.agent.start()
        if control_path:
            await self.control.start(control_path)
            log.info("control socket %s", control_path)

    async def stop(self) -> None:
        # The control socket first: a `memd ksm --step` arriving later would make a
        # steering object that nobody closes.
        await self.control.close()
        await self.migration.close()  # before the swap disks: a transfer may drop one
        await self.real.stop_steering()
        await self.swap.close()
        await self.agent.stop()
        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            await asyncio.to_thread(metrics.close)  # waits for a scrape in progress
        await self.real.close()

    def catch_signals(self) -> asyncio.Event:
        """From now on SIGINT/SIGTERM ask for a graceful stop.  `memd serve` calls this
        before anything else, so a signal during start-up is never the default kill."""
        if self._stop_requested is None:
            loop = asyncio.get_running_loop()
            self._stop_requested = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop_requested.set)
        return self._stop_requested

    async def run_until_signalled(self) -> None:
        await self.catch_signals().wait()
        log.info("shutting down", extra={"event": "shutdown"})
        await self.stop()
