"""The guests' swap disks: one NBD server per guest, backed by a pool of its tmem client.

Owns which guest has a disk (``disks``: guest → its :class:`~memd.nbd.server.NbdServer`),
the markers that tell a disk lost with an agent that kept no store from a new one, and
where disks spill.  A guest's channel and its disk are one tmem client under one cap
and budget; the dispatcher learns the disk's pool (``Dispatcher.disk_pools``) so that
the guest's channel cannot name it, and a reboot keeps it.

Thread: the event loop's.  ``add``/``remove`` run on it (the NBD servers are asyncio
servers), and ``disks`` is read there (control commands, the metrics' loop snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from pathlib import Path
from typing import Any

from memd.agent.dispatch import Dispatcher
from memd.agent.holds import IncomingHolds
from memd.errors import InvalidArgument, MemdError, NotFound
from memd.nbd.export import DISK_POOL_ID, MAX_DISK_SIZE, SwapDisk
from memd.nbd.server import NbdServer
from memd.nbd.spill import FileSpill
from memd.vocab import PAGE_SIZE
from tmem.host import TmemHost

log = logging.getLogger("memd.agent")

#: What `memd status` shows of each disk.
STATUS_FIELDS = ("name", "size", "pages", "spilled_pages", "lost_pages", "connections")


class SwapDisks:
    """Every swap disk this agent serves (see the module docstring)."""

    def __init__(
        self,
        tmem: TmemHost,
        dispatcher: Dispatcher,
        *,
        markers: Path,
        spill_dir: Path | None,
        holds: IncomingHolds | None = None,
    ) -> None:
        self.tmem = tmem
        self.dispatcher = dispatcher
        #: A disk's requests wait while its guest's pages are arriving (memd.agent.holds).
        self.holds = holds if holds is not None else IncomingHolds()
        #: guest → the NBD server of its swap disk (``serve --swap``, ``memd attach --swap``).
        self.disks: dict[str, NbdServer] = {}
        #: One file per guest whose disk an agent served since the host booted (in the run
        #: directory, a tmpfs): a disk found there with no pages restored was lost.
        self.markers = markers
        #: Where disks spill their coldest pages when memory runs out (None: they do not
        #: spill; a full store answers ENOSPC at once).
        self.spill_dir = spill_dir

    async def add(
        self,
        name: str,
        path: str,
        size: int,
        *,
        owner: tuple[int, int] | None = None,
        peer_pid: int | None = None,
    ) -> NbdServer:
        """Serve ``name`` a swap disk of ``size`` bytes over NBD on the unix socket
        ``path``, backed by a persistent pool of its own tmem client (memd.nbd.export)."""
        if name in self.disks:
            raise InvalidArgument(
                f"{name} already has a swap disk on {self.disks[name].path}", op="swap"
            )
        quoted = urllib.parse.quote(name, safe="")
        marker = self.markers / f"{quoted}.served"
        restored = self.tmem.has_client(name) and DISK_POOL_ID in dict(self.tmem.pool_ids(name))
        lost = marker.exists() and not restored
        if size <= 0 or size % PAGE_SIZE or size > MAX_DISK_SIZE:
            raise InvalidArgument(
                f"{name}: a disk size is a positive multiple of 4096 bytes up to {MAX_DISK_SIZE}",
                op="swap",
            )
        spill = None
        if self.spill_dir is not None:
            # As large as the disk (the file is sparse: it takes only what is spilled).
            spill = FileSpill(
                self.spill_dir / f"{quoted}.spill",
                size // PAGE_SIZE,
                size // PAGE_SIZE,
                restore=restored,
            )
        cap = self.dispatcher.guest_cap_pages
        try:
            disk = SwapDisk(self.tmem, name, size, cap_pages=cap, contents_lost=lost, spill=spill)
        except ValueError as err:
            if spill is not None:
                spill.close(keep=False)
            raise InvalidArgument(f"{name}: {err}", op="swap") from None
        if lost:
            log.error(
                "the swap disk of %s was served by an agent that kept no store "
                "(--store ''): its pages are lost; reads of pages not written "
                "since fail with EIO (restart the guest)",
                name,
                extra={"event": "swap-lost", "vm": name},
            )
        if cap is not None:
            # The cap bounds raw pages; the operator sized the disk, so the disk's pages come
            # on top of what the guest may put over its channel (the budget still bounds
            # the bytes all of it takes).
            self.tmem.set_cap(name, cap + size // PAGE_SIZE)
        self.dispatcher.disk_pools[name] = DISK_POOL_ID
        server = NbdServer(
            disk, name, path, owner=owner, peer_pid=peer_pid, hold=self.holds.for_guest(name)
        )
        try:
            await server.start()
        except (OSError, MemdError):
            self.dispatcher.disk_pools.pop(name, None)
            if spill is not None:
                spill.close(keep=False)
            raise
        self.disks[name] = server
        self.markers.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker.write_text(f"{path}\n")
        return server

    async def remove(self, name: str) -> None:
        """Stop serving the disk; its pages stay in the store (a later ``add`` of the
        same guest finds them) until the client is dropped."""
        server = self.disks.pop(name, None)
        if server is None:
            raise NotFound(f"{name} has no swap disk", target=name)
        await server.close()
        await asyncio.to_thread(server.disk.quiesce)  # a batch in a worker thread ends first
        log.info(
            "stopped serving the swap disk of %s (%s)",
            name,
            server.path,
            extra={"event": "swap-detached", "vm": name},
        )
        spill = server.disk.pages.spill
        if isinstance(spill, FileSpill):
            # The slot map goes beside the file; the store holds the rest of the disk, and
            # the next agent takes both.
            spill.close(keep=True)

    async def moved_away(self, name: str) -> None:
        """The guest migrated to another agent, its disk's pages with it (memd.agent.
        migration): stop serving its disk, and forget the disk's pool and marker — no
        page was lost here, so a later disk of the same name (the guest migrating back)
        starts clean rather than as a lost one."""
        if name in self.disks:
            await self.remove(name)
        (self.markers / f"{urllib.parse.quote(name, safe='')}.served").unlink(missing_ok=True)
        self.dispatcher.disk_pools.pop(name, None)

    async def close(self) -> None:
        """Stop serving every disk (agent shutdown)."""
        for name in list(self.disks):
            await self.remove(name)

    def summary(self) -> list[dict[str, Any]]:
        """Each disk as `memd status` shows it, by guest name."""
        return [
            {k: d[k] for k in STATUS_FIELDS}
            for d in (s.describe() for _, s in sorted(self.disks.items()))
        ]
