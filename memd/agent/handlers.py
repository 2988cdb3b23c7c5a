"""The control commands' handlers, bound to the components that do the work.

Owns no state: each handler turns one command's typed arguments
(memd.agent.commands) into calls on the tmem host, the guest server
(:class:`~memd.agent.server.Agent`), the swap disks, the real guests or the simulated
machine's sharing, and their results into the JSON the CLI prints (the migration
component serves its own two commands: memd.agent.migration).  Which thread a
handler runs in is part of its mark (memd.agent.control.handles): plain handlers run
on the event loop and must not block; ``thread=True`` ones (QMP, /proc, a scan) run in
a worker thread and touch only what locks itself (TmemHost, the sharing service, the
real guests component), never the loop's channels or guest table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from memd.agent.commands import (
    AttachArgs,
    AuditArgs,
    AuthorizeArgs,
    BudgetArgs,
    ClientsArgs,
    Command,
    DetachArgs,
    DropArgs,
    ExplainArgs,
    FreezeArgs,
    GuestsArgs,
    KsmArgs,
    OptInArgs,
    OptOutArgs,
    PoolsArgs,
    ScanArgs,
    StatsArgs,
    StatusArgs,
    SteerArgs,
    SwapArgs,
    ThawArgs,
    UnswapArgs,
)
from memd.agent.control import handles
from memd.agent.migration import MigrationService
from memd.agent.persistence import AgentStore
from memd.agent.real_guests import RealGuests
from memd.agent.server import Agent
from memd.agent.sharing_service import SharingService
from memd.agent.swap_disks import SwapDisks
from memd.errors import InvalidArgument, MemdError, NotFound
from tmem.host import TmemHost

log = logging.getLogger("memd.agent")

#: `memd budget` refuses less: a smaller budget holds nothing useful and is a typo.
MIN_BUDGET_BYTES = 1 << 20
#: How long an operator's `memd attach` waits for the guest's socket to answer.
ATTACH_CONNECT_SECONDS = 5.0


class ControlHandlers:
    """One handler per control command (see the module docstring)."""

    def __init__(
        self,
        *,
        tmem: TmemHost,
        agent: Agent,
        swap: SwapDisks,
        real: RealGuests,
        sharing: SharingService | None,
        persistence: AgentStore,
        migration: MigrationService,
        started: float,
        metrics_url: Callable[[], str | None],
    ) -> None:
        self.tmem = tmem
        self.agent = agent
        self.swap = swap
        self.migration = migration
        self.real = real
        self.sharing = sharing
        self.persistence = persistence
        self.started = started
        self.metrics_url = metrics_url

    # -- reports (event loop) ------------------------------------------------------------

    @handles(Command.STATUS)
    def status(self, args: StatusArgs) -> dict[str, Any]:
        channels = self.agent.channels
        return {
            "runstate": self.agent.runstate.value,
            "uptime_s": round(time.time() - self.started, 1),
            "guests": len(channels),
            "connected": sum(1 for c in channels.values() if c.guest.connected),
            "tmem": self.tmem.store_stats().to_dict(),
            "unattached_clients": [
                n
                for n in self.tmem.client_names()
                if n not in channels and n not in self.swap.disks
            ],
            "swap_disks": self.swap.summary(),
            "store": self.persistence.describe(),
            #: Simulated guests' sharing manager (memd demo / memd scan); None without one.
            "sharing": self.sharing.stats() if self.sharing else None,
            #: KSM, which merges real guests' pages (host-wide counters).
            "ksm": self._ksm_summary(),
            #: Where Prometheus scrapes this agent (serve --metrics); None: nowhere.
            "metrics": self.metrics_url(),
            #: Transfers to and from other agents (memd migrate), and the TLS listener.
            "migrations": self.migration.status(),
        }

    def _ksm_summary(self) -> dict[str, Any] | None:
        from hypervisor import ksm

        if not ksm.available():
            return None
        try:
            counters = ksm.counters()
            run = ksm.get("run")
        except MemdError:
            return None
        return {
            "run": run,
            "pages_sharing": counters.get("pages_sharing", 0),
            "pages_shared": counters.get("pages_shared", 0),
            "steering": self.real.steering_mode(),
        }

    @handles(Command.GUESTS)
    def guests(self, args: GuestsArgs) -> list[dict[str, Any]]:
        """One row per guest with a channel or a swap disk (``swap``: its figures)."""
        out = []
        disks = self.swap.disks
        for name in sorted(set(self.agent.channels) | set(disks)):
            channel = self.agent.channels.get(name)
            row: dict[str, Any] = (
                channel.describe()
                if channel
                else {"name": name, "path": None, "mode": "swap only", "connected": None}
            )
            stats = (
                self.tmem.client_stats(name)[0].to_dict() if self.tmem.has_client(name) else None
            )
            disk = disks.get(name)
            row["swap"] = disk.describe() if disk else None
            # tmem_pages and pools: what the guest's channel stored (the disk apart)
            disk_pages = row["swap"]["pages"] if disk else 0
            row["tmem_pages"] = (
                stats["ephemeral_pages"] + stats["persistent_pages"] - disk_pages if stats else 0
            )
            row["pools"] = (stats["pools"] - (1 if disk else 0)) if stats else 0
            out.append(row)
        return out

    @handles(Command.POOLS)
    def pools(self, args: PoolsArgs) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.tmem.pool_stats(args.guest)]

    @handles(Command.STATS)
    def stats(self, args: StatsArgs) -> dict[str, Any]:
        guest = args.guest
        return {
            "store": self.tmem.store_stats().to_dict(),
            "clients": [c.to_dict() for c in self.tmem.client_stats(guest)],
            #: Each guest's last MEM_REPORT (the guest daemon sends one every few seconds).
            "guest_memory": {
                n: g.memory_dict()
                for n, g in sorted(self.agent.guests.items())
                if (guest is None or n == guest) and g.memory is not None
            },
            "swap_disks": [
                d.describe()
                for n, d in sorted(self.swap.disks.items())
                if guest is None or n == guest
            ],
        }

    @handles(Command.CLIENTS)
    def clients(self, args: ClientsArgs) -> list[dict[str, Any]]:
        """Every tmem client, attached or not (reopened from the store, a detached guest)."""
        out = []
        for c in self.tmem.client_stats(None):
            row = c.to_dict()
            channel = self.agent.channels.get(c.client)
            row["attached"] = channel is not None
            row["connected"] = bool(channel and channel.guest.connected)
            out.append(row)
        return out

    # -- audits and scans (worker threads) -----------------------------------------------

    @handles(Command.AUDIT, thread=True)
    def audit(self, args: AuditArgs) -> dict[str, Any]:
        tmem_issues = self.tmem.audit()
        result: dict[str, Any] = {
            "tmem": {"clean": not tmem_issues, "errors": len(tmem_issues), "findings": tmem_issues},
            "sharing": self.sharing.audit() if self.sharing else None,
        }
        sharing_errors = result["sharing"]["errors"] if result["sharing"] else 0
        realized = self.real.audit()
        if realized is not None:
            result["realized"] = realized
        realized_errors = len(realized["discrepancies"]) if realized is not None else 0
        result["errors"] = len(tmem_issues) + sharing_errors + realized_errors
        result["clean"] = result["errors"] == 0
        return result

    @handles(Command.EXPLAIN, thread=True)
    def explain(self, args: ExplainArgs) -> dict[str, Any]:
        return self.real.explain(args.page)

    @handles(Command.SCAN, thread=True)
    def scan(self, args: ScanArgs) -> dict[str, Any]:
        if self.sharing is None:
            raise NotFound(
                "memd scan merges the pages of simulated guests (the embedded "
                "default of memd demo), and this agent has none; real QEMU guests' "
                "pages are merged by KSM: see memd ksm and memd audit"
            )
        return self.sharing.scan()

    # -- KSM -------------------------------------------------------------------------------

    @handles(Command.KSM)
    async def ksm(self, args: KsmArgs) -> dict[str, Any]:
        looping = self.real.looping  # the loop's to read, before the worker runs
        return await asyncio.to_thread(self.real.ksm_report, step=args.step, looping=looping)

    @handles(Command.STEER)
    async def steer(self, args: SteerArgs) -> dict[str, Any]:
        if args.on:
            await self.real.start_steering()
        else:
            await self.real.stop_steering()
        return await self.ksm(KsmArgs())

    @handles(Command.OPTOUT, thread=True)
    def optout(self, args: OptOutArgs) -> dict[str, Any]:
        return self.real.set_merge(args.vm, False)

    @handles(Command.OPTIN, thread=True)
    def optin(self, args: OptInArgs) -> dict[str, Any]:
        return self.real.set_merge(args.vm, True)

    # -- channels and swap disks (event loop) ----------------------------------------------

    @handles(Command.ATTACH)
    async def attach(self, args: AttachArgs) -> dict[str, Any]:
        # An operator's attach fails loudly when nothing listens on the path (the
        # follower's attach keeps retrying instead: a starting QEMU may not listen yet).
        channel = await self.agent.add_channel(
            args.name, args.path, args.mode, require_peer=ATTACH_CONNECT_SECONDS
        )
        return channel.describe()

    @handles(Command.DETACH)
    async def detach(self, args: DetachArgs) -> dict[str, Any]:
        await self.agent.remove_channel(args.name)
        return {"detached": args.name}

    @handles(Command.SWAP)
    async def swap_disk(self, args: SwapArgs) -> dict[str, Any]:
        """Serve a swap disk (`memd attach VM --swap SIZE`)."""
        owner = None
        if args.uid is not None or args.gid is not None:
            if args.uid is None or args.gid is None:
                raise InvalidArgument("a swap socket's owner needs both uid and gid", op="swap")
            owner = (args.uid, args.gid)
        if not os.path.isabs(args.path):
            raise InvalidArgument("the swap socket path must be absolute", op="swap")
        os.makedirs(os.path.dirname(args.path), mode=0o711, exist_ok=True)
        server = await self.swap.add(
            args.name, args.path, args.size, owner=owner, peer_pid=args.pid
        )
        return server.describe()

    @handles(Command.UNSWAP)
    async def unswap(self, args: UnswapArgs) -> dict[str, Any]:
        await self.swap.remove(args.name)
        return {"detached": args.name}

    # -- tmem clients (event loop) ---------------------------------------------------------

    @handles(Command.BUDGET)
    def budget(self, args: BudgetArgs) -> dict[str, Any]:
        size = args.bytes
        if size < MIN_BUDGET_BYTES:
            raise InvalidArgument(
                f"a budget of {size} bytes is too small: the least is {MIN_BUDGET_BYTES >> 20} MiB",
                op="budget",
            )
        previous = self.tmem.store_stats().budget_bytes
        evicted = self.tmem.set_budget(size)
        used = self.tmem.store_stats().used_bytes
        log.info(
            "budget %d -> %d bytes, %d pages evicted",
            previous,
            size,
            evicted,
            extra={"event": "budget"},
        )
        return {
            "budget_bytes": size,
            "previous_bytes": previous,
            "evicted": evicted,
            "used_bytes": used,
        }

    @handles(Command.DROP)
    def drop(self, args: DropArgs) -> dict[str, Any]:
        name = args.guest
        if not args.confirm:
            raise InvalidArgument(
                "drop removes every page of the client: it needs confirm=true", op="drop"
            )
        if name in self.agent.channels:
            raise InvalidArgument(
                f"{name} is attached: detach it first (memd detach {name}); "
                "a connected guest's pages are still in use",
                op="drop",
            )
        if name in self.swap.disks:
            raise InvalidArgument(
                f"{name} has a swap disk on {self.swap.disks[name].path}: "
                "its pages are the guest's swapped-out memory",
                op="drop",
            )
        if not self.tmem.has_client(name):
            raise NotFound(f"the agent holds nothing for {name!r}", target=name)
        stats = self.tmem.client_stats(name)[0]
        self.tmem.remove_client(name)
        self.agent.guests.pop(name, None)
        log.warning(
            "dropped client %s (%d pages) at the operator's request",
            name,
            stats.ephemeral_pages + stats.persistent_pages,
            extra={"event": "drop", "vm": name},
        )
        return {
            "dropped": name,
            "pools": stats.pools,
            "pages": stats.ephemeral_pages + stats.persistent_pages,
        }

    @handles(Command.AUTHORIZE)
    def authorize(self, args: AuthorizeArgs) -> dict[str, Any]:
        try:
            key = uuid.UUID(args.uuid)
        except ValueError:
            raise InvalidArgument(
                "uuid must look like 1b4e28ba-2fa1-11d2-883f-0016d3cca427", op="authorize"
            ) from None
        self.tmem.add_client(args.guest)
        self.tmem.authorize_shared(args.guest, key)
        return {"guest": args.guest, "uuid": str(key)}

    @handles(Command.FREEZE)
    def freeze(self, args: FreezeArgs) -> Any:
        return self.tmem.freeze(args.guest)

    @handles(Command.THAW)
    def thaw(self, args: ThawArgs) -> Any:
        return self.tmem.thaw(args.guest)
