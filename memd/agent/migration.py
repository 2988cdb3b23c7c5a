"""The agent's migration component: a TLS listener for incoming guests, outgoing
transfers (``memd migrate``, by hand or following QEMU), their progress.

Owns the transfers this agent runs, both directions, and what the agent does around
them: refusing a guest whose swap disk has pages outside tmem (spilled or lost), setting
the installed guest's boot id so its next HELLO is not taken for a reboot, and dropping a
guest that moved away (its swap disk first, then its client).  Everything here runs on
the agent's event loop thread; the tmem work goes to worker threads inside the sessions.

Wiring (one call each in ``memd.agent.app``): ``MigrationService(app)`` after the store
was reopened (it drops clients a transfer that died with this agent left staged),
``service.commands()`` merged into the control commands, ``service.status()`` in
``memd status``, ``await service.close()`` at stop.  ``memd serve --migrate-listen
HOST:PORT --tls-dir DIR`` calls :meth:`listen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from memd.agent.dispatch import GuestState
from memd.errors import InvalidArgument, MemdError, MigrationFailed
from memd.migrate import transport
from memd.migrate.transport import IncomingTransfer, Link, Progress, SourceTransfer
from tmem.migration import ChangeFeed, ClientSettings, drop_leftovers

if TYPE_CHECKING:
    from memd.agent.app import AgentApp

log = logging.getLogger("memd.migrate")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
#: Finished transfers kept for ``memd status``.
KEEP_FINISHED = 16


class MigrationService:
    """Loop thread only."""

    def __init__(self, app: AgentApp, feed: ChangeFeed | None, *,
                 tls_dir: str | Path | None = None) -> None:
        self.app = app
        self.feed = feed
        self.tls_dir = tls_dir
        self.listening: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        #: guest → the transfer moving it (out) or bringing it (in) now.
        self.outgoing: dict[str, SourceTransfer] = {}
        self.incoming: dict[str, IncomingTransfer] = {}
        self._finished: list[Progress] = []
        #: Finished transfers by (direction, final phase): done, aborted, revoked.
        self._outcomes: Counter[tuple[str, str]] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        for guest in drop_leftovers(app.tmem):
            log.warning("dropped the pages of %s that an interrupted incoming migration "
                        "had left here", guest, extra={"event": "migrate-leftover",
                                                       "vm": guest})

    # -- destination -------------------------------------------------------------------------

    async def listen(self, address: str) -> tuple[str, int]:
        """Accept migrations on HOST:PORT (mutual TLS only).  → the bound address."""
        try:
            host, port = transport.parse_address(address, any_port=True)
        except ValueError as err:
            raise InvalidArgument(f"--migrate-listen: {err}", op="migrate") from None
        context = transport.server_context(self.tls_dir)
        self._server = await asyncio.start_server(self._accept, host, port, ssl=context,
                                                  ssl_handshake_timeout=10)
        bound = self._server.sockets[0].getsockname()
        self.listening = (str(bound[0]), int(bound[1]))
        log.info("accepting guest migrations on %s:%d (TLS, client certificates signed by "
                 "%s)", *self.listening, transport.tls_files(self.tls_dir, "server").ca,
                 extra={"event": "migrate-listen"})
        return self.listening

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        session = IncomingTransfer(self.app.tmem, Link(reader, writer, who),
                                   busy=self._busy, installed=self._installed,
                                   revoked=self._revoked)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._track_incoming(session)
        finally:
            if task is not None:
                self._tasks.discard(task)

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
            self._retire(session.progress)

    def _busy(self, guest: str) -> bool:
        return guest in self.incoming or guest in self.outgoing

    async def _installed(self, guest: str, settings: ClientSettings) -> None:
        """The guest is ours now: its next HELLO with the same boot id keeps its pools."""
        meta = settings.meta
        if "boot_id" in meta:
            state = self.app.agent.guests.setdefault(guest, GuestState(guest))
            state.boot_id = bytes.fromhex(str(meta["boot_id"]))
            state.reboots = int(meta.get("reboots", 0))

    async def _revoked(self, guest: str) -> None:
        await asyncio.to_thread(self.app.tmem.remove_client, guest)
        state = self.app.agent.guests.get(guest)
        if state is not None:
            state.boot_id = None

    # -- source ------------------------------------------------------------------------------

    def _source(self, guest: str, dest: str) -> SourceTransfer:
        if self.feed is None:
            raise InvalidArgument("migration needs the tmem store (memd serve without "
                                  "--store '')", op="migrate")
        if self._busy(guest):
            raise InvalidArgument(f"{guest} is already migrating", op="migrate")
        if not self.app.tmem.has_client(guest):
            raise InvalidArgument(f"this agent holds nothing of {guest}", op="migrate")
        disk = self.app.disks.get(guest)
        if disk is not None:
            pages = disk.disk.pages
            outside = (pages.spill.used if pages.spill is not None else 0) + pages.lost_pages
            if outside:
                raise InvalidArgument(
                    f"{guest}'s swap disk has {outside} pages outside tmem (spilled to its "
                    "file or lost); migrating those is not supported", op="migrate")
        try:
            transport.parse_address(dest)
        except ValueError as err:
            raise InvalidArgument(str(err), op="migrate") from None
        transfer = SourceTransfer(self.app.tmem, self.feed, guest, dest,
                                  transport.client_context(self.tls_dir))
        self.outgoing[guest] = transfer
        return transfer

    async def migrate(self, guest: str, dest: str) -> dict[str, Any]:
        """By hand: pre-copy, then the final delta at once — for a guest that is paused
        or stopped (nothing drives a switch-over).  → a summary; the guest is gone from
        here when it returns."""
        transfer = self._source(guest, dest)
        try:
            await transfer.connect()
            await transfer.precopy()
            await transfer.switchover()
            await transfer.finish()
        except (MemdError, OSError) as err:
            await transfer.abort(str(err))
            raise MigrationFailed(f"migration of {guest} to {dest} failed: {err}; its "
                                  "pages stay here", target=guest) from None
        finally:
            self.outgoing.pop(guest, None)
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
            self.outgoing.pop(guest, None)
            await transfer.abort(str(err))
            if monitor is not None:
                await monitor.close()
            raise

        async def drive() -> None:
            try:
                summary = await qemu.follow(monitor, listener, transfer,
                                            lambda: self._drop_moved(guest))
                log.info("migration of %s: %s", guest, summary["outcome"],
                         extra={"event": f"migrate-{summary['outcome']}", "vm": guest})
            finally:
                self.outgoing.pop(guest, None)
                self._retire(transfer.progress)
                await monitor.close()

        task = asyncio.ensure_future(drive())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("migration of %s armed: QEMU at %s stops at switch-over for memd",
                 guest, qmp_path, extra={"event": "migrate-armed", "vm": guest})
        # Answer once the bulk is across: the operator's `migrate` then finds memd only
        # keeping the destination up to date, and the switch-over short.
        ready = asyncio.ensure_future(transfer.first_pass.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done() and transfer.progress.phase == "aborted":
            raise MigrationFailed(f"migration of {guest} to {dest} failed: "
                                  f"{transfer.progress.error}; its pages stay here",
                                  target=guest)
        return {"outcome": "armed", **transfer.progress.to_dict()}

    async def _drop_moved(self, guest: str) -> None:
        """The destination holds the guest: nothing of it stays here."""
        if guest in self.app.disks:
            await self.app.remove_swap(guest)
        # Its disk's marker goes too: the guest took the disk's pages along, none were lost
        # here (a later disk for the same name, e.g. migrating back, starts clean).
        marker = self.app.swap_markers / f"{urllib.parse.quote(guest, safe='')}.served"
        marker.unlink(missing_ok=True)
        self.app.dispatcher.disk_pools.pop(guest, None)
        await asyncio.to_thread(self.app.tmem.remove_client, guest)
        state = self.app.agent.guests.get(guest)
        if state is not None:
            state.boot_id = None
        log.info("%s moved away: its pages are dropped here", guest,
                 extra={"event": "migrate-dropped", "vm": guest})

    # -- operator view -------------------------------------------------------------------------

    def _retire(self, progress: Progress) -> None:
        self._finished = [*self._finished, progress][-KEEP_FINISHED:]
        self._outcomes[(progress.direction, progress.phase)] += 1

    def status(self) -> dict[str, Any]:
        active = [t.progress for t in self.outgoing.values()] + [
            t.progress for t in self.incoming.values()]
        return {"listening": None if self.listening is None else
                f"{self.listening[0]}:{self.listening[1]}",
                "active": [p.to_dict() for p in active],
                "finished": [p.to_dict() for p in self._finished],
                "outcomes": [{"direction": d, "phase": p, "count": n}
                             for (d, p), n in sorted(self._outcomes.items())]}

    def commands(self) -> dict[str, Handler]:
        async def migrate(args: dict[str, Any]) -> dict[str, Any]:
            guest, dest = args.get("guest"), args.get("to")
            if not isinstance(guest, str) or not isinstance(dest, str):
                raise InvalidArgument("migrate needs a guest and a destination", op="migrate")
            qmp = args.get("qmp")
            if isinstance(qmp, str) and qmp:
                return await self.follow_qemu(guest, dest, qmp)
            return await self.migrate(guest, dest)

        async def migrations(args: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        return {"migrate": migrate, "migrations": migrations}

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


def migration_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    """Prometheus families from :meth:`MigrationService.status` (a scrape's copy)."""
    labels = ["vm", "direction"]
    families = {
        "pages": GaugeMetricFamily("memd_migration_pages", "pages a running transfer has "
                                   "sent (out) or received (in), resent ones included",
                                   labels=labels),
        "bytes": GaugeMetricFamily("memd_migration_bytes", "their stored (compressed) bytes",
                                   labels=labels),
        "chunks_remaining": GaugeMetricFamily(
            "memd_migration_chunks_remaining", "radix chunks (64 pages) left in the current "
            "pre-copy round", labels=labels),
        "pages_per_s": GaugeMetricFamily("memd_migration_pages_per_second",
                                         "pages moved per second since the transfer began",
                                         labels=labels),
    }
    for row in status.get("active", []):
        for key, family in families.items():
            family.add_metric([row["guest"], row["direction"]], float(row[key] or 0))
    yield from families.values()
    done = CounterMetricFamily("memd_migrations", "transfers that ended, by direction and "
                               "outcome (done, aborted, revoked)",
                               labels=["direction", "outcome"])
    for row in status.get("outcomes", []):
        done.add_metric([row["direction"], row["phase"]], row["count"])
    yield done
