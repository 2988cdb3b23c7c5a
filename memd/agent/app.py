"""Wiring: TmemHost + sharing + Agent + control commands, as `memd serve` runs them.

The embedded default is an in-process :class:`~hypervisor.simmachine.SimMachine`
holding the memory of simulated guests; real guests come in through channels added
by the operator (``attach``) or by the libvirt follower.

With a store (:class:`~hypervisor.lmdb_store.LmdbStore`, always for ``memd serve``) the
tmem host writes its persistent state through it and is rebuilt from it at start: guests'
boot ids and reboot counts come back from their client records, opted-out VMs from the
store's meta records.  There is no other restart mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.simmachine import SimMachine
from memd import paths
from memd.agent.control import ControlServer, Handler
from memd.agent.dispatch import Dispatcher, GuestState
from memd.agent.migration import MigrationService
from memd.agent.server import Agent
from memd.agent.sharing_service import SharingRouter, SharingService
from memd.errors import InvalidArgument, MemdError, NotFound
from memd.nbd.export import DISK_POOL_ID, MAX_DISK_SIZE, SwapDisk
from memd.nbd.server import NbdServer
from memd.nbd.spill import FileSpill
from sharing.manager import SharingManager
from tmem.host import TmemHost
from tmem.migration import ChangeFeed

if TYPE_CHECKING:
    from hypervisor.ksm_steer import KsmSteering
    from hypervisor.lmdb_store import LmdbStore
    from hypervisor.qemu_machine import QemuMachine
    from hypervisor.qmp import Monitor
    from hypervisor.real_sharing import QemuSharing
    from memd.agent.metrics import MetricsServer

log = logging.getLogger("memd.agent")

#: `memd budget` refuses less: a smaller budget holds nothing useful and is a typo.
MIN_BUDGET_BYTES = 1 << 20
#: How long an operator's `memd attach` waits for the guest's socket to answer.
ATTACH_CONNECT_SECONDS = 5.0


class AgentApp:
    """Everything one `memd serve` process owns."""

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
    ) -> None:
        self.started = time.time()
        #: Where persistent tmem state lives (None: in memory only, lost with the process).
        self.store = store
        #: The store as TmemHost writes it, telling migrations which chunks changed.
        self.feed = ChangeFeed(store) if store is not None else None
        self.tmem = TmemHost(budget_bytes=budget_bytes, log=self.feed)
        self.machine: SimMachine | None = SimMachine(sim_frames) if sim_frames else None
        self.sharing: SharingService | None = (
            SharingService(SharingManager(self.machine)) if self.machine else None)
        # Default per-guest cap: half the budget, counted in raw pages.
        cap = budget_bytes // 2 if guest_cap_bytes is None else guest_cap_bytes
        #: Guest sharing requests: sim guests to ``sharing``, real QEMU guests to KSM.
        self.router = SharingRouter(self.sharing)
        self.dispatcher = Dispatcher(self.tmem, self.router if self.sharing else None,
                                     guest_cap_pages=cap // 4096)
        self.agent = Agent(self.dispatcher)
        self.control = ControlServer(self._commands())
        #: Real QEMU guests whose RAM memd reads (pagemap ground truth); made on demand.
        self.qemu: QemuMachine | None = None
        self.qemu_sharing: QemuSharing | None = None
        #: KSM steering (``serve --ksm-steer`` or the ``ksm`` command); None until started.
        self.steering: KsmSteering | None = None
        self._steer_task: asyncio.Task[None] | None = None
        #: Where steering records the host's KSM knobs before changing them (survives a
        #: crash of this agent; see hypervisor.ksm.record_originals).
        self.ksm_ledger = ksm_ledger or paths.ksm_originals()
        #: VMs the operator opted out of merging (a guest's nominate cannot undo it).
        self.opted_out: set[str] = set()
        #: guest → the NBD server of its swap disk (``serve --swap``, ``add_swap``).
        self.disks: dict[str, NbdServer] = {}
        #: One file per guest whose disk an agent served since the host booted (in the run
        #: directory, a tmpfs): a disk found there with no pages restored was lost.
        self.swap_markers = swap_markers or paths.run_dir() / "swap"
        #: Where swap disks spill their coldest pages when memory runs out (None: they do
        #: not spill; a full store answers ENOSPC at once).
        self.spill_dir = spill_dir
        #: The /metrics endpoint (``serve --metrics``); None without one.  Loop thread.
        self.metrics: MetricsServer | None = None
        #: Set by SIGINT/SIGTERM once catch_signals() ran (event loop thread only).
        self._stop_requested: asyncio.Event | None = None
        if store is not None:
            self._reopen(store)
        #: Guests moving to or from other agents (issue 14); registers its commands.
        self.migration = MigrationService(self, self.feed)
        self.control.commands.update(self.migration.commands())

    def _reopen(self, store: LmdbStore) -> None:
        """Rebuild tmem from the store and the guests' boot ids from their records."""
        t0 = time.monotonic()
        state = store.load()
        findings = self.tmem.restore(state)
        for finding in findings:
            log.error("tmem store: %s", finding, extra={"event": "store-repair"})
        for name in self.tmem.client_names():
            meta = self.tmem.client_meta(name)
            if "boot_id" in meta:
                guest = self.agent.guests.setdefault(name, GuestState(name))
                guest.boot_id = bytes.fromhex(str(meta["boot_id"]))
                guest.reboots = int(meta.get("reboots", 0))
        self.opted_out.update(str(vm) for vm in state.meta.get("opted_out", []))
        stats = self.tmem.store_stats()
        log.info("tmem store %s: %d guests, %d persistent pages back in %.2f s",
                 store.path, len(self.tmem.client_names()), stats.persistent_pages,
                 time.monotonic() - t0, extra={"event": "store-reopened"})

    def _save_opted_out(self) -> None:
        if self.store is not None:
            self.store.put_meta("opted_out", sorted(self.opted_out))

    async def start(self, control_path: str | None, *,
                    metrics: tuple[str, int] | None = None) -> None:
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
        await self.migration.close()
        await self.stop_steering()
        for name in list(self.disks):
            await self.remove_swap(name)
        await self.agent.stop()
        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            await asyncio.to_thread(metrics.close)  # waits for a scrape in progress
        if self.qemu is not None:
            await asyncio.to_thread(self.qemu.close)  # its QMP monitors, politely

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

    def attach_qemu(self, name: str, pid: int, monitor: Monitor) -> int:
        """Start reading a running QEMU's RAM for the audit (blocking: /proc, QMP)."""

        qemu = self._qemu_machine()
        self.detach_qemu(name)
        domid = qemu.attach(name, pid, monitor)
        if name in self.opted_out:
            qemu.set_merge(domid, False)
        elif not all(block.merge for block in qemu.guest(domid).blocks):
            # Merging is off in QEMU itself (mem-merge=off, or an opt-out from before an
            # agent crash): that is the operator's choice, and a guest's NOMINATE must
            # not undo it.  `memd optin` turns it on.
            self.opted_out.add(name)
            self._save_opted_out()
        self._poke_steering()
        return domid

    def _qemu_machine(self) -> QemuMachine:
        from hypervisor.qemu_machine import QemuMachine
        from hypervisor.real_sharing import QemuSharing

        if self.qemu is None:
            self.qemu = QemuMachine()
            self.qemu_sharing = QemuSharing(self.qemu, on_nominate=self._poke_steering,
                                            opted_out=self.opted_out.__contains__)
            self.router.real = self.qemu_sharing
            self.dispatcher.sharing = self.router
        return self.qemu

    def _poke_steering(self) -> None:
        if self.steering is not None:
            self.steering.poke()

    def detach_qemu(self, name: str) -> None:
        if self.qemu is None:
            return
        for guest in self.qemu.guests():
            if guest.name == name:
                if self.qemu_sharing is not None:
                    self.qemu_sharing.forget(guest.domid)
                self.qemu.detach(guest.domid)
                self._poke_steering()

    # -- swap disks (NBD) ----------------------------------------------------------------

    async def add_swap(self, name: str, path: str, size: int, *,
                       owner: tuple[int, int] | None = None,
                       peer_pid: int | None = None) -> NbdServer:
        """Serve ``name`` a swap disk of ``size`` bytes over NBD on the unix socket
        ``path``, backed by a persistent pool of its own tmem client (memd.nbd.export):
        the guest's channel and its disk are one client, under one cap and budget."""
        if name in self.disks:
            raise InvalidArgument(f"{name} already has a swap disk on {self.disks[name].path}",
                                  op="swap")
        marker = self.swap_markers / f"{urllib.parse.quote(name, safe='')}.served"
        restored = (self.tmem.has_client(name)
                    and DISK_POOL_ID in dict(self.tmem.pool_ids(name)))
        lost = marker.exists() and not restored
        if size <= 0 or size % 4096 or size > MAX_DISK_SIZE:
            raise InvalidArgument(f"{name}: a disk size is a positive multiple of 4096 bytes "
                                  f"up to {MAX_DISK_SIZE}", op="swap")
        spill = None
        if self.spill_dir is not None:
            # As large as the disk (the file is sparse: it takes only what is spilled).
            spill = FileSpill(self.spill_dir / f"{urllib.parse.quote(name, safe='')}.spill",
                              size // 4096, size // 4096, restore=restored)
        try:
            disk = SwapDisk(self.tmem, name, size, cap_pages=self.dispatcher.guest_cap_pages,
                            contents_lost=lost, spill=spill)
        except ValueError as err:
            if spill is not None:
                spill.close(keep=False)
            raise InvalidArgument(f"{name}: {err}", op="swap") from None
        if lost:
            log.error("the swap disk of %s was served by an agent that kept no store "
                      "(--store ''): its pages are lost; reads of pages not written "
                      "since fail with EIO (restart the guest)", name,
                      extra={"event": "swap-lost", "vm": name})
        if self.dispatcher.guest_cap_pages is not None:
            # The cap bounds raw pages; the operator sized the disk, so the disk's pages come
            # on top of what the guest may put over its channel (the budget still bounds
            # the bytes all of it takes).
            self.tmem.set_cap(name, self.dispatcher.guest_cap_pages + size // 4096)
        self.dispatcher.disk_pools[name] = DISK_POOL_ID
        server = NbdServer(disk, name, path, owner=owner, peer_pid=peer_pid)
        try:
            await server.start()
        except (OSError, MemdError):
            self.dispatcher.disk_pools.pop(name, None)
            if spill is not None:
                spill.close(keep=False)
            raise
        self.disks[name] = server
        self.swap_markers.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker.write_text(f"{path}\n")
        return server

    async def remove_swap(self, name: str) -> None:
        """Stop serving the disk; its pages stay in the store (a later add_swap of the
        same guest finds them) until the client is dropped."""
        server = self.disks.pop(name, None)
        if server is None:
            raise NotFound(f"{name} has no swap disk", target=name)
        await server.close()
        await asyncio.to_thread(server.disk.quiesce)  # a batch in a worker thread ends first
        log.info("stopped serving the swap disk of %s (%s)", name, server.path,
                 extra={"event": "swap-detached", "vm": name})
        spill = server.disk.pages.spill
        if isinstance(spill, FileSpill):
            # The slot map goes beside the file; the store holds the rest of the disk, and
            # the next agent takes both.
            spill.close(keep=True)

    # -- KSM steering -----------------------------------------------------------------------

    async def start_steering(self) -> None:
        """Run the KSM steering loop (hypervisor.ksm_steer) until stop_steering()."""

        if self._steer_task is not None:
            return
        if self.steering is None:
            self.steering = await asyncio.to_thread(self._new_steering)
        self._steer_task = asyncio.create_task(self._steer_loop(self.steering))

    def _new_steering(self) -> KsmSteering:
        from hypervisor.ksm_steer import KsmSteering

        qemu = self._qemu_machine()
        return KsmSteering(
            qemu,
            ledger=self.ksm_ledger,
            pending=self.qemu_sharing.pending if self.qemu_sharing else None,
        )

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
        host had them."""
        task, self._steer_task = self._steer_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.steering is not None:
            steering, self.steering = self.steering, None
            try:
                await asyncio.to_thread(steering.close)
            except MemdError as err:  # the rest of the shutdown must still happen
                log.error("%s; `memd ksm-restore` retries from %s", err, self.ksm_ledger)

    def _ksm(self, args: dict[str, Any]) -> dict[str, Any]:
        from hypervisor.ksm_steer import ksmd_cpu_seconds

        steering = self.steering
        if args.get("step"):
            steering = steering or self._new_steering()
            self.steering = steering
            steering.poke()  # the operator asks for a fresh look: it also ends "stalled"
            steering.step()
        if steering is None:
            from hypervisor import ksm

            knobs = {k: ksm.get(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
            return {
                "steering": False,
                "knobs": knobs,
                "last_step": None,
                "potential": None,
                "vms": {
                    g.name: {"merge": all(b.merge for b in g.blocks)}
                    for g in (self.qemu.guests() if self.qemu else [])
                },
                "ksmd_cpu_seconds": round(ksmd_cpu_seconds(), 2),
            }
        return {"steering": self._steer_task is not None, **steering.status()}

    async def _steer(self, args: dict[str, Any]) -> dict[str, Any]:
        on = args.get("on")
        if on is True:
            await self.start_steering()
        elif on is False:
            await self.stop_steering()
        else:
            raise InvalidArgument("argument 'on' must be true or false", op="steer")
        return await asyncio.to_thread(self._ksm, {})

    def _opt(self, args: dict[str, Any], merge: bool) -> dict[str, Any]:
        from hypervisor.ksm_steer import KsmSteering

        vm = _str(args, "vm")
        if self.qemu is None or not any(g.name == vm for g in self.qemu.guests()):
            raise NotFound(f"no QEMU guest named {vm!r} is attached", target=vm)
        steering = self.steering or KsmSteering(self.qemu)
        if merge:
            self.opted_out.discard(vm)
            self._save_opted_out()
            return steering.opt_in(vm)
        self.opted_out.add(vm)
        self._save_opted_out()
        return steering.opt_out(vm)

    # -- control commands ------------------------------------------------------------------

    def _commands(self) -> dict[str, Handler]:
        def sync(fn: Callable[[dict[str, Any]], Any]) -> Handler:
            async def run(args: dict[str, Any]) -> Any:
                return fn(args)
            return run

        def threaded(fn: Callable[[dict[str, Any]], Any]) -> Handler:
            async def run(args: dict[str, Any]) -> Any:
                return await asyncio.to_thread(fn, args)
            return run

        return {
            "status": sync(lambda a: self.status()),
            "guests": sync(lambda a: self.guests()),
            "pools": sync(lambda a: [p.to_dict() for p in self.tmem.pool_stats(a.get("guest"))]),
            "stats": sync(self._stats),
            "audit": threaded(lambda a: self.audit()),
            "explain": threaded(self._explain),
            "scan": threaded(lambda a: self._sharing_or_fail().scan()),
            "ksm": threaded(self._ksm),
            "steer": self._steer,
            "optout": threaded(lambda a: self._opt(a, False)),
            "optin": threaded(lambda a: self._opt(a, True)),
            "attach": self._attach,
            "detach": self._detach,
            "swap": self._swap,
            "unswap": self._unswap,
            "budget": sync(self._budget),
            "clients": sync(lambda a: self.clients()),
            "drop": sync(self._drop),
            "authorize": sync(self._authorize),
            "freeze": sync(lambda a: self.tmem.freeze(_str(a, "guest"))),
            "thaw": sync(lambda a: self.tmem.thaw(_str(a, "guest"))),
        }

    def status(self) -> dict[str, Any]:
        guests = self.agent.channels.values()
        return {
            "runstate": self.agent.runstate.value,
            "uptime_s": round(time.time() - self.started, 1),
            "guests": len(self.agent.channels),
            "connected": sum(1 for c in guests if c.guest.connected),
            "tmem": self.tmem.store_stats().to_dict(),
            "unattached_clients": [n for n in self.tmem.client_names()
                                   if n not in self.agent.channels and n not in self.disks],
            "swap_disks": [{k: d[k] for k in ("name", "size", "pages", "spilled_pages",
                                               "lost_pages", "connections")}
                           for d in (s.describe() for _, s in sorted(self.disks.items()))],
            "store": None if self.store is None else {
                "path": str(self.store.path), "durable": self.store.durable,
                "bytes_used": self.store.bytes_used(), "file_bytes": self.store.file_bytes()},
            #: Simulated guests' sharing manager (memd demo / memd scan); None without one.
            "sharing": self.sharing.stats() if self.sharing else None,
            #: KSM, which merges real guests' pages (host-wide counters).
            "ksm": self._ksm_summary(),
            #: Where Prometheus scrapes this agent (serve --metrics); None: nowhere.
            "metrics": self.metrics.url if self.metrics is not None else None,
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
        return {"run": run, "pages_sharing": counters.get("pages_sharing", 0),
                "pages_shared": counters.get("pages_shared", 0),
                "steering": self.steering_mode()}

    def steering_mode(self) -> str:
        """off | starting | idle | stalled | boost (event loop thread)."""
        steering = self.steering
        if steering is None or self._steer_task is None:
            return "off"
        return steering.last.mode if steering.last else "starting"

    def clients(self) -> list[dict[str, Any]]:
        """Every tmem client, attached or not (reopened from the store, a detached guest)."""
        out = []
        for c in self.tmem.client_stats(None):
            row = c.to_dict()
            channel = self.agent.channels.get(c.client)
            row["attached"] = channel is not None
            row["connected"] = bool(channel and channel.guest.connected)
            out.append(row)
        return out

    def _drop(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "guest")
        if args.get("confirm") is not True:
            raise InvalidArgument("drop removes every page of the client: it needs "
                                  "confirm=true", op="drop")
        if name in self.agent.channels:
            raise InvalidArgument(f"{name} is attached: detach it first (memd detach {name}); "
                                  "a connected guest's pages are still in use", op="drop")
        if name in self.disks:
            raise InvalidArgument(f"{name} has a swap disk on {self.disks[name].path}: its "
                                  "pages are the guest's swapped-out memory", op="drop")
        if not self.tmem.has_client(name):
            raise NotFound(f"the agent holds nothing for {name!r}", target=name)
        stats = self.tmem.client_stats(name)[0]
        self.tmem.remove_client(name)
        self.agent.guests.pop(name, None)
        log.warning("dropped client %s (%d pages) at the operator's request", name,
                    stats.ephemeral_pages + stats.persistent_pages,
                    extra={"event": "drop", "vm": name})
        return {"dropped": name, "pools": stats.pools,
                "pages": stats.ephemeral_pages + stats.persistent_pages}

    def _budget(self, args: dict[str, Any]) -> dict[str, Any]:
        size = _int(args, "bytes")
        if size < MIN_BUDGET_BYTES:
            raise InvalidArgument(f"a budget of {size} bytes is too small: the least is "
                                  f"{MIN_BUDGET_BYTES >> 20} MiB", op="budget")
        previous = self.tmem.store_stats().budget_bytes
        evicted = self.tmem.set_budget(size)
        used = self.tmem.store_stats().used_bytes
        log.info("budget %d -> %d bytes, %d pages evicted", previous, size, evicted,
                 extra={"event": "budget"})
        return {"budget_bytes": size, "previous_bytes": previous, "evicted": evicted,
                "used_bytes": used}

    def guests(self) -> list[dict[str, Any]]:
        """One row per guest with a channel or a swap disk (``swap``: its figures)."""
        out = []
        for name in sorted(set(self.agent.channels) | set(self.disks)):
            channel = self.agent.channels.get(name)
            row: dict[str, Any] = (channel.describe() if channel else
                                   {"name": name, "path": None, "mode": "swap only",
                                    "connected": None})
            stats = (self.tmem.client_stats(name)[0].to_dict()
                     if self.tmem.has_client(name) else None)
            disk = self.disks.get(name)
            row["swap"] = disk.describe() if disk else None
            # tmem_pages and pools: what the guest's channel stored (the disk apart)
            disk_pages = row["swap"]["pages"] if disk else 0
            row["tmem_pages"] = (stats["ephemeral_pages"] + stats["persistent_pages"]
                                 - disk_pages if stats else 0)
            row["pools"] = (stats["pools"] - (1 if disk else 0)) if stats else 0
            out.append(row)
        return out

    def audit(self) -> dict[str, Any]:
        tmem_issues = self.tmem.audit()
        result: dict[str, Any] = {
            "tmem": {"clean": not tmem_issues, "errors": len(tmem_issues),
                     "findings": tmem_issues},
            "sharing": self.sharing.audit() if self.sharing else None,
        }
        sharing_errors = result["sharing"]["errors"] if result["sharing"] else 0
        realized_errors = 0
        if self.qemu is not None and self.qemu.guests():
            from hypervisor.potential import PotentialScanner
            from hypervisor.qemu_audit import audit_report

            result["realized"] = audit_report(self.qemu)
            scanner = self.steering.scanner if self.steering else PotentialScanner(
                self.qemu, batch_pages=2048)
            result["realized"]["potential"] = scanner.scan().to_dict()
            if self.qemu_sharing is not None:
                result["realized"]["nominated"] = self.qemu_sharing.ledger_report()
            realized_errors = len(result["realized"]["discrepancies"])
        result["errors"] = len(tmem_issues) + sharing_errors + realized_errors
        result["clean"] = result["errors"] == 0
        return result

    def _explain(self, args: dict[str, Any]) -> dict[str, Any]:
        from hypervisor.qemu_audit import explain_gfn, parse_vm_gfn

        try:
            vm, gfn = parse_vm_gfn(_str(args, "page"))
        except ValueError as err:
            raise InvalidArgument(str(err), op="explain") from None
        if self.qemu is None or not any(g.name == vm for g in self.qemu.guests()):
            raise NotFound(f"no QEMU guest named {vm!r} is attached for auditing", target=vm)
        return explain_gfn(self.qemu, vm, gfn)

    def _sharing_or_fail(self) -> SharingService:
        if self.sharing is None:
            raise NotFound("memd scan merges the pages of simulated guests (the embedded "
                           "default of memd demo), and this agent has none; real QEMU guests' "
                           "pages are merged by KSM: see memd ksm and memd audit")
        return self.sharing

    def _stats(self, args: dict[str, Any]) -> dict[str, Any]:
        guest = args.get("guest")
        return {
            "store": self.tmem.store_stats().to_dict(),
            "clients": [c.to_dict() for c in self.tmem.client_stats(guest)],
            #: Each guest's last MEM_REPORT (the guest daemon sends one every few seconds).
            "guest_memory": {n: g.memory_dict() for n, g in sorted(self.agent.guests.items())
                             if (guest is None or n == guest) and g.memory is not None},
            "swap_disks": [d.describe() for n, d in sorted(self.disks.items())
                           if guest is None or n == guest],
        }

    def _authorize(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            key = uuid.UUID(_str(args, "uuid"))
        except ValueError:
            raise InvalidArgument("uuid must look like 1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                                  op="authorize") from None
        self.tmem.add_client(_str(args, "guest"))
        self.tmem.authorize_shared(_str(args, "guest"), key)
        return {"guest": args["guest"], "uuid": str(key)}

    async def _attach(self, args: dict[str, Any]) -> dict[str, Any]:
        # An operator's attach fails loudly when nothing listens on the path (the
        # follower's attach keeps retrying instead: a starting QEMU may not listen yet).
        channel = await self.agent.add_channel(_str(args, "name"), _str(args, "path"),
                                               str(args.get("mode", "connect")),
                                               require_peer=ATTACH_CONNECT_SECONDS)
        return channel.describe()

    async def _swap(self, args: dict[str, Any]) -> dict[str, Any]:
        """Serve a swap disk (`memd attach VM --swap SIZE`)."""
        owner = None
        if args.get("uid") is not None or args.get("gid") is not None:
            owner = (_int(args, "uid"), _int(args, "gid"))
        pid = _int(args, "pid") if args.get("pid") is not None else None
        path = _str(args, "path")
        if not os.path.isabs(path):
            raise InvalidArgument("the swap socket path must be absolute", op="swap")
        os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
        server = await self.add_swap(_str(args, "name"), path, _int(args, "size"),
                                     owner=owner, peer_pid=pid)
        return server.describe()

    async def _unswap(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        await self.remove_swap(name)
        return {"detached": name}

    async def _detach(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        await self.agent.remove_channel(name)
        return {"detached": name}


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"missing argument {key!r}", op="control")
    return value


def _int(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"argument {key!r} must be an integer", op="control")
    return value

