"""The agent's migration component: a TLS listener for incoming guests, outgoing
transfers (``memd migrate``, by hand, following QEMU or following libvirt), their progress.

Owns the transfers this agent runs, both directions, and what the agent does around
them: refusing a guest whose swap disk has pages outside tmem (spilled or lost), setting
the installed guest's boot id so its next HELLO is not taken for a reboot, and dropping a
guest that moved away (its swap disk first, then its client), and holding an arriving
guest's requests until its transfer installs it (memd.agent.holds: libvirt may resume
the guest here before memd's final delta is in).  It serves the control commands
``migrate``, ``cancel-migration`` (``memd migrate --cancel``: the transfer gives up as
if it failed, and a migration memd follows is cancelled with it) and ``migrations``
(``@handles``) and gives ``memd status`` and the metrics its
:meth:`MigrationService.status`.  A guest libvirt runs that holds nothing here yet moves
as an empty client (:meth:`MigrationService.follow_libvirt`).

State: ``outgoing``, ``incoming`` and ``_cancels`` (guest → the event ``--cancel``
sets, one per outgoing transfer) belong to the loop thread.

Wiring (memd.agent.app, once, at construction): built with the tmem host, the host's
:class:`~tmem.migration.ChangeFeed` (None without a store: migration then refuses), the
guest server (boot ids), the swap disks, the holds, the TLS directory and the libvirt
URI of ``memd serve --libvirt`` (None: no libvirt); it drops, at
construction, clients a transfer that died with this agent left staged.  ``memd serve
--migrate-listen HOST:PORT`` calls :meth:`MigrationService.listen` after start;
``AgentApp.stop`` awaits :meth:`MigrationService.close`.

Thread: the event loop's, for everything here; the tmem work goes to worker threads
inside the sessions (memd.migrate.transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from memd.agent.commands import CancelMigrationArgs, Command, MigrateArgs, MigrationsArgs
from memd.agent.control import handles
from memd.agent.dispatch import GuestState
from memd.agent.holds import IncomingHolds
from memd.agent.server import Agent
from memd.agent.swap_disks import SwapDisks
from memd.errors import InvalidArgument, MemdError, MigrationFailed
from memd.migrate import tls
from memd.migrate.link import Link
from memd.migrate.transport import IncomingTransfer, Progress, SourceTransfer
from tmem.host import TmemHost
from tmem.migration import ChangeFeed, ClientSettings, drop_leftovers

if TYPE_CHECKING:
    from memd.migrate.libvirt import Domain, LibvirtDomain

log = logging.getLogger("memd.migrate")

#: Finished transfers kept for ``memd status``.
KEEP_FINISHED = 16


class MigrationService:
    """Loop thread only (see the module docstring)."""

    def __init__(
        self,
        *,
        tmem: TmemHost,
        feed: ChangeFeed | None,
        agent: Agent,
        swap: SwapDisks,
        holds: IncomingHolds | None = None,
        tls_dir: str | Path | None = None,
        libvirt_uri: str | None = None,
    ) -> None:
        self.tmem = tmem
        self.feed = feed
        self.agent = agent
        self.swap = swap
        #: Arriving guests' requests wait here until installed (shared with the channel
        #: server and the swap disks).
        self.holds = holds if holds is not None else IncomingHolds()
        #: Guests libvirt runs are followed through it (``memd serve --libvirt``).
        self.libvirt_uri = libvirt_uri
        #: Both roles' certificates (None: libvirt's /etc/pki layout).
        self.tls_dir = tls_dir
        self.listening: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        #: guest → the transfer moving it (out) or bringing it (in) now.
        self.outgoing: dict[str, SourceTransfer] = {}
        self.incoming: dict[str, IncomingTransfer] = {}
        #: guest → set by ``memd migrate --cancel``: its outgoing transfer gives up.
        self._cancels: dict[str, asyncio.Event] = {}
        self._finished: list[Progress] = []
        #: Finished transfers by (direction, final phase): done, aborted, revoked.
        self._outcomes: Counter[tuple[str, str]] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        for guest in drop_leftovers(tmem):
            log.warning(
                "dropped the pages of %s that an interrupted incoming migration had left here",
                guest,
                extra={"event": "migrate-leftover", "vm": guest},
            )

    # -- destination -------------------------------------------------------------------------

    async def listen(self, address: str) -> tuple[str, int]:
        """Accept migrations on HOST:PORT (mutual TLS only).  → the bound address."""
        try:
            host, port = tls.parse_address(address, any_port=True)
        except ValueError as err:
            raise InvalidArgument(f"--migrate-listen: {err}", op="migrate") from None
        context = tls.server_context(self.tls_dir)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Link(connected=self._accepted),
            host,
            port,
            ssl=context,
            ssl_handshake_timeout=10,
        )
        bound = self._server.sockets[0].getsockname()
        self.listening = (str(bound[0]), int(bound[1]))
        log.info(
            "accepting guest migrations on %s:%d (TLS, client certificates signed by %s)",
            *self.listening,
            tls.tls_files(self.tls_dir, "server").ca,
            extra={"event": "migrate-listen"},
        )
        return self.listening

    def _accepted(self, link: Link) -> None:
        """A source connected (TLS handshake done): its session runs in a task."""
        session = IncomingTransfer(
            self.tmem,
            link,
            busy=self._arriving,
            installed=self._installed,
            revoked=self._revoked,
        )
        task = asyncio.ensure_future(self._track_incoming(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _track_incoming(self, session: IncomingTransfer) -> None:
        run = asyncio.ensure_future(session.run())
        self._tasks.add(run)  # close() waits for it: it drops what it staged
        run.add_done_callback(self._tasks.discard)
        while not run.done() and session.progress.guest == "?":
            await asyncio.wait({run}, timeout=0.05)
        guest = session.progress.guest
        if guest != "?" and guest not in self.incoming:
            self.incoming[guest] = session
        try:
            await asyncio.shield(run)
        finally:
            if self.incoming.get(guest) is session:
                del self.incoming[guest]
                self.holds.release(guest, f"transfer {session.progress.phase}")
            self._retire(session.progress)

    def _busy(self, guest: str) -> bool:
        return guest in self.incoming or guest in self.outgoing

    def _arriving(self, guest: str) -> bool:
        """An incoming transfer's check at BEGIN: refuse a guest that migrates already;
        else hold the guest's requests from now until the transfer installs or ends."""
        if self._busy(guest):
            return True
        self.holds.hold(guest)
        return False

    async def _installed(self, guest: str, settings: ClientSettings) -> None:
        """The guest is ours now: its next HELLO with the same boot id keeps its pools."""
        meta = settings.meta
        if "boot_id" in meta:
            state = self.agent.guests.setdefault(guest, GuestState(guest))
            state.boot_id = bytes.fromhex(str(meta["boot_id"]))
            state.reboots = int(meta.get("reboots", 0))
        self.holds.release(guest, "installed")

    async def _revoked(self, guest: str) -> None:
        await asyncio.to_thread(self.tmem.remove_client, guest)
        state = self.agent.guests.get(guest)
        if state is not None:
            state.boot_id = None

    # -- source ------------------------------------------------------------------------------

    def _source(self, guest: str, dest: str) -> SourceTransfer:
        if self.feed is None:
            raise InvalidArgument(
                "migration needs the tmem store (memd serve without --store '')", op="migrate"
            )
        if self._busy(guest):
            raise InvalidArgument(f"{guest} is already migrating", op="migrate")
        if not self.tmem.has_client(guest):
            raise InvalidArgument(f"this agent holds nothing of {guest}", op="migrate")
        disk = self.swap.disks.get(guest)
        if disk is not None:
            pages = disk.disk.pages
            outside = (pages.spill.used if pages.spill is not None else 0) + pages.lost_pages
            if outside:
                raise InvalidArgument(
                    f"{guest}'s swap disk has {outside} pages outside tmem (spilled to its "
                    "file or lost); migrating those is not supported",
                    op="migrate",
                )
        try:
            tls.parse_address(dest)
        except ValueError as err:
            raise InvalidArgument(str(err), op="migrate") from None
        transfer = SourceTransfer(
            self.tmem, self.feed, guest, dest, tls.client_context(self.tls_dir)
        )
        self.outgoing[guest] = transfer
        self._cancels[guest] = asyncio.Event()
        return transfer

    def _forget(self, transfer: SourceTransfer) -> None:
        """An outgoing transfer ended (or never began): it is no longer this guest's."""
        if self.outgoing.get(transfer.guest) is transfer:
            del self.outgoing[transfer.guest]
            self._cancels.pop(transfer.guest, None)

    async def migrate(self, guest: str, dest: str) -> dict[str, Any]:
        """By hand: pre-copy, then the final delta at once — for a guest that is paused
        or stopped (nothing drives a switch-over).  → a summary; the guest is gone from
        here when it returns."""
        transfer = self._source(guest, dest)
        cancel = self._cancels[guest]

        async def move() -> None:
            await transfer.connect()
            await transfer.precopy()
            await transfer.switchover()

        try:
            await _unless_cancelled(move(), cancel)
            await transfer.finish()
        except (MemdError, OSError) as err:
            await transfer.abort(str(err))
            raise MigrationFailed(
                f"migration of {guest} to {dest} failed: {err}; its pages stay here", target=guest
            ) from None
        finally:
            self._forget(transfer)
            self._retire(transfer.progress)
        await self._drop_moved(guest)
        return {"outcome": "moved", **transfer.progress.to_dict()}

    async def follow_qemu(self, guest: str, dest: str, qmp_path: str) -> dict[str, Any]:
        """Arm QEMU (pause-before-switchover), connect to the destination and pre-copy,
        and follow the migration the operator starts there; → once connected, the
        transfer runs in the background (memd status)."""
        from hypervisor.qmp import AsyncQmpMonitor
        from memd.migrate import qemu

        transfer = self._source(guest, dest)
        monitor: AsyncQmpMonitor | None = None
        try:
            monitor = await AsyncQmpMonitor.connect(qmp_path)
            listener = await qemu.arm(monitor)
            await transfer.connect()  # a TLS or address problem is the operator's answer
        except (MemdError, OSError) as err:
            self._forget(transfer)
            await transfer.abort(str(err))
            if monitor is not None:
                await monitor.close()
            raise
        log.info(
            "migration of %s armed: QEMU at %s stops at switch-over for memd",
            guest,
            qmp_path,
            extra={"event": "migrate-armed", "vm": guest},
        )
        return await self._in_background(
            transfer,
            qemu.follow(
                monitor,
                listener,
                transfer,
                lambda: self._drop_moved(guest),
                cancel=self._cancels[guest],
            ),
            monitor.close,
        )

    async def libvirt_domain(self, guest: str) -> LibvirtDomain | None:
        """The guest as a running libvirt domain, followed for a migration; None when this
        agent has no libvirt, or libvirt does not run a domain of that name."""
        if self.libvirt_uri is None:
            return None
        from memd.migrate.libvirt import LibvirtDomain

        domain = await LibvirtDomain.open(self.libvirt_uri, guest)
        try:
            look = await domain.job()
        except MemdError:
            await domain.close()
            raise
        if look.running:
            return domain
        await domain.close()
        return None

    async def follow_libvirt(
        self, guest: str, dest: str, domain: Domain, *, arm_seconds: float | None = None
    ) -> dict[str, Any]:
        """Connect to the destination and pre-copy, and follow the migration the operator
        starts with ``virsh migrate`` by the domain's events and job (memd.migrate.libvirt);
        → once the first pass is across, the transfer runs on in the background.

        A guest this agent holds nothing of yet (its memd daemon has not said HELLO) moves
        as an empty client: registered here as its HELLO would (the client then follows
        whatever the guest puts before the switch-over), installed on the destination
        without a boot id (its first HELLO there is a first contact), and unregistered
        here again if the migration is aborted while still empty."""
        from memd.migrate import libvirt

        registered = False
        if not self.tmem.has_client(guest) and not self._busy(guest):
            cap = self.agent.dispatcher.guest_cap_pages
            await asyncio.to_thread(self.tmem.add_client, guest, cap_pages=cap)
            registered = True

        async def close() -> None:
            await domain.close()
            if registered and self.outgoing.get(guest) is None:
                await asyncio.to_thread(self._unregister_if_empty, guest)

        try:
            transfer = self._source(guest, dest)
        except MemdError:
            await close()
            raise
        try:
            await transfer.connect()
        except (MemdError, OSError) as err:
            self._forget(transfer)
            await transfer.abort(str(err))
            await close()
            raise
        log.info(
            "migration of %s armed: following libvirt's migration of the domain%s",
            guest,
            " (it holds nothing yet: an empty client moves)" if registered else "",
            extra={"event": "migrate-armed", "vm": guest},
        )
        return await self._in_background(
            transfer,
            libvirt.follow(
                domain,
                transfer,
                lambda: self._drop_moved(guest),
                cancel=self._cancels[guest],
                arm_seconds=arm_seconds,
            ),
            close,
        )

    def _unregister_if_empty(self, guest: str) -> None:
        """Worker thread: drop the client :meth:`follow_libvirt` registered for a migration
        that did not happen, unless the guest has said HELLO (a boot id) or made pools."""
        if not self.tmem.has_client(guest) or self.tmem.pool_ids(guest):
            return
        if "boot_id" not in self.tmem.client_meta(guest):
            self.tmem.remove_client(guest)

    async def _in_background(
        self,
        transfer: SourceTransfer,
        following: Coroutine[Any, Any, dict[str, Any]],
        close: Callable[[], Awaitable[None]],
    ) -> dict[str, Any]:
        """Run a followed migration as a task; → once memd's first pass is across (the
        hypervisor's migration then finds memd only keeping the destination up to date,
        and the switch-over short), or the transfer failed first."""
        guest = transfer.guest

        async def drive() -> None:
            try:
                summary = await following
                log.info(
                    "migration of %s: %s",
                    guest,
                    summary["outcome"],
                    extra={"event": f"migrate-{summary['outcome']}", "vm": guest},
                )
            finally:
                self._forget(transfer)
                self._retire(transfer.progress)
                await close()

        task = asyncio.ensure_future(drive())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        ready = asyncio.ensure_future(transfer.first_pass.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done() and transfer.progress.phase == "aborted":
            raise MigrationFailed(
                f"migration of {guest} to {transfer.dest} failed: "
                f"{transfer.progress.error}; its pages stay here",
                target=guest,
            )
        return {"outcome": "armed", **transfer.progress.to_dict()}

    async def _drop_moved(self, guest: str) -> None:
        """The destination holds the guest: nothing of it stays here."""
        await self.swap.moved_away(guest)
        if self.tmem.has_client(guest):  # (gone if libvirt's follower forgot it first)
            await asyncio.to_thread(self.tmem.remove_client, guest)
        state = self.agent.guests.get(guest)
        if state is not None:
            state.boot_id = None
        log.info(
            "%s moved away: its pages are dropped here",
            guest,
            extra={"event": "migrate-dropped", "vm": guest},
        )

    # -- operator view -------------------------------------------------------------------------

    def _retire(self, progress: Progress) -> None:
        self._finished = [*self._finished, progress][-KEEP_FINISHED:]
        self._outcomes[(progress.direction, progress.phase)] += 1

    def status(self) -> dict[str, Any]:
        active = [t.progress for t in self.outgoing.values()] + [
            t.progress for t in self.incoming.values()
        ]
        return {
            "listening": None
            if self.listening is None
            else f"{self.listening[0]}:{self.listening[1]}",
            "active": [p.to_dict() for p in active],
            #: Guests whose requests wait for their incoming transfer now.
            "held": self.holds.guests(),
            "finished": [p.to_dict() for p in self._finished],
            "outcomes": [
                {"direction": d, "phase": p, "count": n}
                for (d, p), n in sorted(self._outcomes.items())
            ],
        }

    @handles(Command.MIGRATE)
    async def migrate_command(self, args: MigrateArgs) -> dict[str, Any]:
        """``memd migrate GUEST --to HOST:PORT [--qmp SOCKET]``: following QEMU with
        ``--qmp``, else following libvirt if it runs the guest, else by hand."""
        if args.qmp is not None:
            return await self.follow_qemu(args.guest, args.to, args.qmp)
        domain = await self.libvirt_domain(args.guest)
        if domain is not None:
            return await self.follow_libvirt(
                args.guest, args.to, domain, arm_seconds=args.arm_timeout
            )
        return await self.migrate(args.guest, args.to)

    @handles(Command.CANCEL_MIGRATION)
    async def cancel_command(self, args: CancelMigrationArgs) -> dict[str, Any]:
        """``memd migrate GUEST --cancel``: memd's outgoing transfer gives up (ABORT to the
        destination, the guest keeps everything here), and a migration memd follows is
        cancelled with it, as when the transfer fails.  → the transfer's summary."""
        guest = args.guest
        transfer = self.outgoing.get(guest)
        if transfer is None:
            arriving = guest in self.incoming
            where = " (it is arriving here: cancel it on its source)" if arriving else ""
            raise InvalidArgument(
                f"no outgoing transfer of {guest} runs on this agent{where}", op="migrate"
            )
        if transfer.progress.phase not in CANCELLABLE:
            raise InvalidArgument(
                f"too late to cancel the transfer of {guest}: it is in {transfer.progress.phase} "
                "(the destination has or is installing its final delta)",
                op="migrate",
            )
        self._cancels[guest].set()
        try:
            async with asyncio.timeout(30):
                while self.outgoing.get(guest) is transfer:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise MigrationFailed(
                f"the transfer of {guest} did not stop within 30 s (it is in "
                f"{transfer.progress.phase}: the hypervisor's migration decides)",
                target=guest,
            ) from None
        return {"outcome": transfer.progress.phase, **transfer.progress.to_dict()}

    @handles(Command.MIGRATIONS)
    def migrations(self, args: MigrationsArgs) -> dict[str, Any]:
        return self.status()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()


#: Phases of an outgoing transfer ``memd migrate --cancel`` may stop: before the final delta.
CANCELLABLE = frozenset({"connecting", "precopy", "converged"})


async def _unless_cancelled(work: Coroutine[Any, Any, None], cancel: asyncio.Event) -> None:
    """Run *work*; if *cancel* is set first, stop it and raise MigrationFailed (the work
    is stopped too when the caller is cancelled: the agent stopping)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        stopped = not task.done()
        if stopped:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if stopped:
        raise MigrationFailed("cancelled by the operator (memd migrate --cancel)")
    task.result()


def migration_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    """Prometheus families from :meth:`MigrationService.status` (a scrape's copy)."""
    labels = ["vm", "direction"]
    families = {
        "pages": GaugeMetricFamily(
            "memd_migration_pages",
            "pages a running transfer has sent (out) or received (in), resent ones included",
            labels=labels,
        ),
        "bytes": GaugeMetricFamily(
            "memd_migration_bytes", "their stored (compressed) bytes", labels=labels
        ),
        "chunks_remaining": GaugeMetricFamily(
            "memd_migration_chunks_remaining",
            "radix chunks (64 pages) left in the current pre-copy round",
            labels=labels,
        ),
        "pages_per_s": GaugeMetricFamily(
            "memd_migration_pages_per_second",
            "pages moved per second since the transfer began",
            labels=labels,
        ),
    }
    for row in status.get("active", []):
        for key, family in families.items():
            family.add_metric([row["guest"], row["direction"]], float(row[key] or 0))
    yield from families.values()
    done = CounterMetricFamily(
        "memd_migrations",
        "transfers that ended, by direction and outcome (done, aborted, revoked)",
        labels=["direction", "outcome"],
    )
    for row in status.get("outcomes", []):
        done.add_metric([row["direction"], row["phase"]], row["count"])
    yield done
