"""libvirt for the operator: `memd guests --libvirt`, `memd attach`, the serve follower.

The follower subscribes to lifecycle events *before* scanning running domains (events
are not replayed, so the other order leaves a gap), attaches every running domain
that has a memd channel, attaches on ``started``, detaches on ``stopped``/``crashed``,
and, when libvirtd drops the connection, reconnects and rescans — which is also what
makes an agent restart pick every running guest back up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from hypervisor.libvirt_host import LibvirtHost
from memd.agent.commands import CommandArgs, SwapArgs, UnswapArgs
from memd.errors import BackendError, ChannelMissing, NotFound, Unavailable

if TYPE_CHECKING:
    from memd.agent.app import AgentApp

log = logging.getLogger("memd.libvirt")

DEFAULT_URI = "qemu:///system"
#: Runs one control command on the agent (memd.agent.control.request, bound to a socket).
Caller = Callable[[CommandArgs], Any]
RECONNECT_DELAY = 2.0


def list_domains(uri: str) -> list[dict[str, Any]]:
    """Every domain libvirt knows: name, state, channel (socket path or None)."""
    with LibvirtHost(uri, events=False) as host:
        return [g.to_dict() for g in host.domains()]


def channel_path(uri: str | None, domain: str) -> str:
    """The live memd channel socket of a running domain (one-sentence errors)."""
    with LibvirtHost(uri or DEFAULT_URI, events=False) as host:
        return host.channel_path(domain)


def add_channel(uri: str | None, domain: str, *, live: bool = True) -> dict[str, Any]:
    """Give a domain its memd channel: hot-plugged when it runs (``live``), and in its
    saved config so the next start has it too.  → the domain as `guests --libvirt` shows it."""
    with LibvirtHost(uri or DEFAULT_URI, events=False) as host:
        return host.add_channel(domain, live=live).to_dict()


def attach_swap(
    uri: str | None, domain: str, size: int, call: Caller, *, nbd_dir: Path
) -> dict[str, Any]:
    """`memd attach VM --swap SIZE`: the agent serves the disk on a socket only this
    domain's QEMU may use (owned by its uid/gid, mode 0600, its pid checked at accept),
    then libvirt hot-plugs it (live: the disk lives as long as this QEMU)."""
    with LibvirtHost(uri or DEFAULT_URI, events=False) as host:
        pid = host.qemu_pid(domain)
        uid, gid = host.qemu_ids(domain)
        path = str(nbd_dir / f"{quote(domain, safe='')}.swap")
        served = call(SwapArgs(name=domain, path=path, size=size, uid=uid, gid=gid, pid=pid))
        try:
            spec = host.attach_swap_disk(domain, path)
        except BackendError:
            with contextlib.suppress(BackendError):
                call(UnswapArgs(name=domain))
            raise
        if spec.reconnect_delay is None:
            log.warning(
                "libvirt dropped <reconnect delay> from the swap disk of %s (libvirt "
                "before 9.2 does not know it for NBD disks): a memd restart will show "
                "in the guest as I/O errors, not as a pause",
                domain,
            )
        return {**served, "target": spec.target, "reconnect_delay": spec.reconnect_delay}


def detach_swap(uri: str | None, domain: str, call: Caller) -> dict[str, Any]:
    """`memd detach VM --swap`: unplug the disk (run swapoff in the guest first), then stop
    serving it.  Its pages stay with the guest's tmem client until `memd drop`."""
    with LibvirtHost(uri or DEFAULT_URI, events=False) as host:
        spec = host.detach_swap_disk(domain)
    result: dict[str, Any] = call(UnswapArgs(name=domain))
    result["target"] = spec.target if spec else None
    return result


class LibvirtFollower:
    """Keeps the agent's channels in step with libvirt's running domains."""

    def __init__(self, app: AgentApp, uri: str, *, match: str = "*") -> None:
        self.app = app
        self.uri = uri
        #: Only domains whose name matches this glob are attached (others are left alone,
        #: e.g. VMs another tool drives through their channel).
        self.match = match
        self._task: asyncio.Task[None] | None = None
        self._host: LibvirtHost | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="libvirt-follower")

    async def stop(self) -> None:
        """Cancel the follower and wait until it has let go of everything."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._host is not None:
            with contextlib.suppress(BackendError):
                self._host.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except BackendError as err:
                log.warning("libvirt: %s; retrying in %.0f s", err, RECONNECT_DELAY)
            await asyncio.sleep(RECONNECT_DELAY)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        host = await asyncio.to_thread(LibvirtHost, self.uri)
        self._host = host
        lost = asyncio.Event()

        def on_lost(_reason: str) -> None:
            loop.call_soon_threadsafe(lost.set)

        host.on_disconnect(on_lost)
        _watch, queue = host.watch_queue(loop)  # subscribe first, then scan: no gap
        for guest in await asyncio.to_thread(host.attachable):
            if self._wanted(guest.name):
                await self._attach(host, guest.name, guest.channel)
        log.info("following libvirt domains at %s", self.uri)
        lost_wait = asyncio.create_task(lost.wait())
        get: asyncio.Task[Any] | None = None
        try:
            while not lost.is_set():
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    break
                event = get.result()
                if not self._wanted(event.name):
                    continue
                if event.starts_guest:
                    try:
                        path = await asyncio.to_thread(host.channel_path, event.name)
                    except (ChannelMissing, NotFound, Unavailable) as err:
                        log.info("%s", err)  # a domain without memd: nothing to do
                        continue
                    await self._attach(host, event.name, path)
                elif event.ends_guest:
                    # A guest migrating away with memd is dropped by the migration, once
                    # the destination has its pages (memd.migrate.libvirt), not here.
                    outgoing = self.app.migration.outgoing
                    moving = event.detail == "migrated" and event.name in outgoing
                    await self._detach(event.name, forget=event.kind == "stopped" and not moving)
        finally:
            for task in (lost_wait, get):  # never leave a task pending (also on cancel)
                if task is not None and not task.done():
                    task.cancel()
            with contextlib.suppress(BackendError):
                host.close()
            self._host = None
        raise Unavailable(f"lost the connection to libvirtd at {self.uri}", target=self.uri)

    def _wanted(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)

    async def _attach(self, host: LibvirtHost, name: str, path: str | None) -> None:
        if not path:
            return
        # Its RAM first (the audit, KSM; needs root: /proc/<pid>/pagemap), then its channel:
        # a HELLO is granted SHARING only once the QEMU's RAM is read, and the guest's
        # daemon says HELLO as soon as the channel connects.
        try:
            pid = await asyncio.to_thread(host.qemu_pid, name)
            monitor = await asyncio.to_thread(host.monitor, name)
            await asyncio.to_thread(self.app.real.attach, name, pid, monitor)
        except BackendError as err:
            log.warning("guest %s: no RAM audit: %s", name, err)
        await self.app.agent.add_channel(name, path, mode="connect")

    async def _detach(self, name: str, *, forget: bool) -> None:
        with contextlib.suppress(NotFound):
            await self.app.agent.remove_channel(name)
        disk = self.app.swap.disks.get(name)
        if disk is not None and disk.peer_pid is not None:
            # A hot-plugged swap disk lived as long as that QEMU: stop serving it (a new
            # start of the domain gets a new one with `memd attach --swap`).
            await self.app.swap.remove(name)
        await asyncio.to_thread(self.app.real.detach, name)
        if forget and name not in self.app.swap.disks:
            # The domain is gone: its RAM and every page it stored are meaningless now.
            # (Not while the operator's `--swap` disk is still served: its pool is the
            # client's, and the domain's next start uses the disk again; its HELLO then
            # drops the channel's pools, as after any reboot.)
            self.app.agent.forget_guest(name)
