"""libvirt as a source of guests: discovery, memd channels, QEMU pids, monitors, events.

Overview.  A :class:`LibvirtHost` is one libvirt connection (default ``qemu:///system``).
It answers four questions about domains: *which exist* (:meth:`~LibvirtHost.domains`,
:meth:`~LibvirtHost.guest`), *where is the memd socket* (:meth:`~LibvirtHost.channel_path`:
the ``<channel type='unix'>`` whose target name is ``org.memd.0``; libvirt picks the path
at start, so it is read from the live XML), *how to reach the QEMU* (:meth:`~LibvirtHost.
qemu_pid`, :meth:`~LibvirtHost.monitor`), *is it migrating* (:meth:`~LibvirtHost.job`).
It also follows lifecycle events (:meth:`~LibvirtHost.watch`) so that an agent attaches on
start, detaches on stop or crash, and — because events are not replayed — re-scans
:meth:`~LibvirtHost.attachable` after its own restart or after libvirtd comes back.

Threads.  libvirt delivers events only while someone runs its event loop; the first
``LibvirtHost(events=True)`` in a process registers libvirt's default implementation
(which must happen *before* a connection opens) and runs it in one daemon thread,
``libvirt-events``, for the life of the process.  Watch callbacks run in that thread:
they must be quick and must not block.  An asyncio program hands events to its loop with
``loop.call_soon_threadsafe`` — :meth:`~LibvirtHost.watch_queue` does exactly that — and
calls the blocking query methods through ``asyncio.to_thread``.  A libvirt connection is
thread-safe; this class adds a lock only around its own watch bookkeeping.

Errors.  Every libvirt error is translated at this boundary into memd's BackendError family
with a one-sentence message: NotFound (unknown domain), ChannelMissing (no memd channel),
Unavailable (libvirtd unreachable, domain not running, no QEMU monitor), PermissionDenied.
``libvirt`` is imported lazily so that memd runs without libvirt-python installed.

What a domain's XML says about memd (its channel, its swap disk) is read and written by
the pure functions of :mod:`hypervisor.domain_xml`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from hypervisor.domain_xml import (
    CHANNEL_XML,
    MISSING_HINT,
    SwapDiskSpec,
    find_memd_channel,
    find_swap_disk,
    free_disk_target,
    has_virtio_serial,
    swap_disk_element,
    swap_disk_xml,
)
from hypervisor.guests import (
    CLOSE_REASONS,
    DOMAIN_STATES,
    GuestInfo,
    JobState,
    LifecycleEvent,
    lifecycle_event,
)
from hypervisor.qmp import encode_command, parse_reply
from memd.errors import (
    BackendError,
    ChannelMissing,
    NotFound,
    PermissionDenied,
    Unavailable,
)

log = logging.getLogger("memd.libvirt")

DEFAULT_URI = "qemu:///system"

# --- the libvirt module and its event loop -----------------------------------------------

_event_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def _import_libvirt() -> ModuleType:
    try:
        import libvirt
    except ImportError as err:
        raise Unavailable("libvirt-python is not installed (pip install 'memd[libvirt]')") from err
    # libvirt prints every error to stderr by default; we translate them instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def _ensure_event_loop(libvirt: ModuleType) -> None:
    """Register libvirt's default event loop once per process and run it in a daemon thread."""
    global _event_thread
    with _event_lock:
        if _event_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    log.warning("libvirt event loop iteration failed")

        _event_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_thread.start()


class LibvirtMonitor:
    """:class:`hypervisor.qmp.Monitor` through libvirt (libvirt holds the QMP socket).

    libvirt marks a domain *tainted* ("custom-monitor") in its log the first time this is
    used; that is informational and changes nothing for the guest.
    """

    def __init__(self, host: LibvirtHost, domain: Any, name: str) -> None:
        self.target = f"domain '{name}'"
        self._host = host
        self._domain = domain
        self._name = name

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        raw = self._call(encode_command(command, arguments), 0)
        return parse_reply(command, raw, self.target)

    def hmp(self, command_line: str) -> str:
        import libvirt_qemu

        raw = self._call(command_line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return raw.replace("\r\n", "\n")

    def close(self) -> None:
        """Nothing to release: the monitor belongs to libvirt."""

    def _call(self, text: str, flags: int) -> str:
        import libvirt_qemu

        try:
            return str(libvirt_qemu.qemuMonitorCommand(self._domain, text, flags))
        except self._host._libvirt.libvirtError as err:
            raise self._host._translate(err, domain=self._name) from err


class LibvirtHost:
    """One libvirt connection; see the module docstring.  Use as a context manager."""

    def __init__(self, uri: str = DEFAULT_URI, *, events: bool = True) -> None:
        self.uri = uri
        self._libvirt = _import_libvirt()
        self._events = events
        if events:
            _ensure_event_loop(self._libvirt)
        self._lock = threading.Lock()
        self._watches: dict[int, Callable[[LifecycleEvent], None]] = {}
        self._watch_ids = itertools.count(1)
        self._libvirt_watch: int | None = None
        self._close_callback = False
        try:
            self._conn = self._libvirt.open(uri)
        except self._libvirt.libvirtError as err:
            raise self._translate(err, opening=True) from err
        self._closed = False
        self._driver = self._query(self._conn.getType)
        host = urlsplit(uri).hostname
        self.local = host in (None, "", "localhost", "127.0.0.1", "::1")
        if events and self._driver != "Test":
            # Keepalive makes a dead libvirtd visible (close callback, errors) within ~15 s.
            try:
                self._conn.setKeepAlive(5, 3)
            except self._libvirt.libvirtError:
                log.debug("libvirt connection %s does not support keepalive", uri)

    # -- lifetime --

    def close(self) -> None:
        """Drop watches and the connection.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._watches.clear()
            libvirt_watch, self._libvirt_watch = self._libvirt_watch, None
        if libvirt_watch is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(libvirt_watch)
        try:
            if self._close_callback:
                self._conn.unregisterCloseCallback()
            self._conn.close()
        except self._libvirt.libvirtError:
            pass

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """False once libvirtd has gone away (reconnect by opening a new LibvirtHost)."""
        try:
            return not self._closed and bool(self._conn.isAlive())
        except self._libvirt.libvirtError:
            return False

    # -- discovery --

    def domains(self) -> list[GuestInfo]:
        """Every domain libvirt knows (running, paused, defined but shut off), by name."""
        infos = []
        for dom in self._query(self._conn.listAllDomains, 0):
            try:
                infos.append(self._info(dom))
            except NotFound:
                continue  # undefined between the listing and the lookup
        return sorted(infos, key=lambda g: g.name)

    def attachable(self) -> list[GuestInfo]:
        """Domains the agent can connect to now: alive with a memd socket.  Re-scan on restart."""
        return [g for g in self.domains() if g.attachable]

    def guest(self, name: str) -> GuestInfo:
        """One domain.  NotFound when libvirt has no domain of that name."""
        return self._info(self._lookup(name))

    def channel_path(self, name: str) -> str:
        """Host socket of the domain's memd channel, from the live XML.

        NotFound: unknown domain.  ChannelMissing: no ``org.memd.0`` unix channel.
        Unavailable: the domain is not running (libvirt picks the path at start).
        """
        dom = self._lookup(name)
        spec = find_memd_channel(self._query(dom.XMLDesc, 0, domain=name))
        if spec is None:
            raise ChannelMissing(
                f"domain '{name}' has no memd channel ({MISSING_HINT})", target=name
            )
        if not spec.usable:
            raise ChannelMissing(
                f"domain '{name}' has a memd channel of type '{spec.source_type}' in mode "
                f"'{spec.mode}'; memd needs <channel type='unix'> with <source mode='bind'/>",
                target=name,
            )
        if not self._query(dom.isActive, domain=name):
            raise Unavailable(
                f"domain '{name}' is not running, so its memd channel has no socket yet",
                target=name,
            )
        if spec.path is None:
            raise Unavailable(
                f"libvirt reports no socket path for the memd channel of domain '{name}'",
                target=name,
            )
        return spec.path

    def qemu_pid(self, name: str) -> int:
        """Pid of the domain's QEMU process (local qemu:// connections only)."""
        dom = self._lookup(name)
        self._require_qemu(dom, name)
        pid = self._find_qemu_pid(name, self._query(dom.UUIDString, domain=name))
        if pid is None:
            raise Unavailable(f"cannot find the QEMU process of domain '{name}'", target=name)
        return pid

    def monitor(self, name: str) -> LibvirtMonitor:
        """QMP/HMP access to the domain's QEMU through libvirt."""
        dom = self._lookup(name)
        self._require_qemu(dom, name)
        return LibvirtMonitor(self, dom, name)

    def add_channel(self, name: str, *, live: bool = True, persistent: bool = True) -> GuestInfo:
        """Give a domain a memd channel: hot-plugged (``live``) and/or in its saved config.

        Hot-plug needs a virtio-serial controller in the running domain (libvirt cannot
        hot-plug one); without it, ChannelMissing says to add the channel to the config
        (``live=False``) and restart the domain.  Parts that already exist are skipped.
        """
        lv = self._libvirt
        dom = self._lookup(name)
        flags = 0
        active = self._query(dom.isActive, domain=name)
        if live and active:
            live_xml = self._query(dom.XMLDesc, 0, domain=name)
            if find_memd_channel(live_xml) is None:
                if not has_virtio_serial(live_xml):
                    raise ChannelMissing(
                        f"domain '{name}' has no virtio-serial controller, which libvirt "
                        "cannot hot-plug: add the channel to its config (memd add-channel "
                        "--config-only) and restart it",
                        target=name,
                    )
                flags |= lv.VIR_DOMAIN_AFFECT_LIVE
        if persistent and self._query(dom.isPersistent, domain=name):
            config_xml = self._query(dom.XMLDesc, lv.VIR_DOMAIN_XML_INACTIVE, domain=name)
            if find_memd_channel(config_xml) is None:
                flags |= lv.VIR_DOMAIN_AFFECT_CONFIG
        if flags:
            self._query(dom.attachDeviceFlags, CHANNEL_XML, flags, domain=name)
        return self._info(dom)

    # -- swap disks (memd.nbd) --

    def qemu_ids(self, name: str) -> tuple[int, int]:
        """(uid, gid) the domain's QEMU runs as (``libvirt-qemu`` on Debian), from /proc."""
        pid = self.qemu_pid(name)
        ids: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("Uid", "Gid"):
                    ids[key] = int(value.split()[0])  # the real id
        except (OSError, ValueError) as err:
            raise Unavailable(
                f"cannot read the ids of domain '{name}''s QEMU: {err}", target=name
            ) from err
        return ids["Uid"], ids["Gid"]

    def swap_disk(self, name: str) -> SwapDiskSpec | None:
        """The memd swap disk in the domain's live XML, if it has one."""
        return find_swap_disk(self._query(self._lookup(name).XMLDesc, 0, domain=name))

    def attach_swap_disk(
        self, name: str, socket_path: str, *, reconnect_delay: int = 30
    ) -> SwapDiskSpec:
        """Hot-plug a virtio disk that QEMU reads from memd's NBD socket (live only: the
        disk lives as long as this QEMU).  Idempotent for the same socket."""
        dom = self._lookup(name)
        self._require_qemu(dom, name)
        live = self._query(dom.XMLDesc, 0, domain=name)
        present = find_swap_disk(live)
        if present is not None:
            if present.socket != socket_path:
                raise BackendError(
                    f"domain '{name}' already has a memd swap disk, on {present.socket}",
                    target=name,
                )
            return present
        target = free_disk_target(live)
        if target is None:
            raise BackendError(f"domain '{name}' has no free vdX name for a swap disk", target=name)
        xml = swap_disk_xml(socket_path, target, reconnect_delay)
        self._query(dom.attachDeviceFlags, xml, self._libvirt.VIR_DOMAIN_AFFECT_LIVE, domain=name)
        spec = find_swap_disk(self._query(dom.XMLDesc, 0, domain=name))
        if spec is None:
            raise BackendError(
                f"libvirt accepted the swap disk of '{name}' but its live XML does not show it",
                target=name,
            )
        return spec

    def detach_swap_disk(self, name: str) -> SwapDiskSpec | None:
        """Ask QEMU to unplug the memd swap disk (the guest must have run swapoff); the
        guest finishes the unplug in its own time.  → the disk, or None if it had none."""
        dom = self._lookup(name)
        found = swap_disk_element(self._query(dom.XMLDesc, 0, domain=name))
        if found is None:
            return None
        spec, element = found
        self._query(
            dom.detachDeviceFlags, element, self._libvirt.VIR_DOMAIN_AFFECT_LIVE, domain=name
        )
        return spec

    # -- events --

    def watch(self, callback: Callable[[LifecycleEvent], None]) -> int:
        """Call ``callback(event)`` on every lifecycle event of any domain; returns a watch id.

        The callback runs in the libvirt-events thread (see module docstring); exceptions
        it raises are logged and swallowed so that one bad event cannot stop the stream.
        """
        if not self._events:
            raise Unavailable("this libvirt connection was opened without events=True")
        with self._lock:
            # libvirt takes one lifecycle registration per connection; we fan it out.
            if self._libvirt_watch is None:
                self._libvirt_watch = int(
                    self._query(
                        self._conn.domainEventRegisterAny,
                        None,
                        self._libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                        self._dispatch,
                        None,
                    )
                )
            watch_id = next(self._watch_ids)
            self._watches[watch_id] = callback
        return watch_id

    def watch_queue(
        self, loop: asyncio.AbstractEventLoop, name: str | None = None
    ) -> tuple[int, asyncio.Queue[LifecycleEvent]]:
        """Lifecycle events (of domain ``name`` only, if given) delivered into an asyncio
        queue on ``loop`` (thread-safe handoff)."""
        queue: asyncio.Queue[LifecycleEvent] = asyncio.Queue()

        def handoff(event: LifecycleEvent) -> None:
            if name is None or event.name == name:
                loop.call_soon_threadsafe(queue.put_nowait, event)

        return self.watch(handoff), queue

    def unwatch(self, watch_id: int) -> None:
        """Stop one watch; unknown or already removed ids are ignored."""
        with self._lock:
            self._watches.pop(watch_id, None)

    def _dispatch(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        """libvirt's callback, in the libvirt-events thread."""
        try:
            ev = lifecycle_event(dom.name(), dom.UUIDString(), event, detail)
        except self._libvirt.libvirtError:
            log.exception("cannot decode a libvirt lifecycle event")
            return
        with self._lock:
            callbacks = list(self._watches.values())
        for callback in callbacks:
            try:
                callback(ev)
            except Exception:
                log.exception("lifecycle event callback failed")

    def on_disconnect(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (error, eof, keepalive, client) if libvirtd goes away."""
        if not self._events:
            raise Unavailable("this libvirt connection was opened without events=True")

        def relay(_conn: Any, reason: int, _opaque: Any) -> None:
            try:
                callback(CLOSE_REASONS[reason] if 0 <= reason < 4 else str(reason))
            except Exception:
                log.exception("libvirt disconnect callback failed")

        self._query(self._conn.registerCloseCallback, relay, None)
        self._close_callback = True

    # -- migration jobs (memd.migrate.libvirt) --

    def job(self, name: str) -> JobState:
        """The domain's state and whether an outgoing migration job runs now."""
        lv = self._libvirt
        try:
            dom = self._lookup(name)
        except NotFound:
            return JobState("gone", False)
        state, _reason = self._query(dom.state, domain=name)
        words = DOMAIN_STATES.get(state, str(state))
        try:
            stats = dom.jobStats() if state != lv.VIR_DOMAIN_SHUTOFF else {}
        except lv.libvirtError as err:
            if err.get_error_code() == lv.VIR_ERR_NO_SUPPORT:
                return JobState(words, None)  # libvirt's test driver
            raise self._translate(err, domain=name) from err
        active = stats.get("type") in (lv.VIR_DOMAIN_JOB_BOUNDED, lv.VIR_DOMAIN_JOB_UNBOUNDED)
        out = stats.get("operation") == lv.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
        return JobState(words, active and out)

    def abort_job(self, name: str) -> bool:
        """Cancel the domain's job (its migration); → False if it had none to cancel."""
        try:
            self._lookup(name).abortJob()
        except (self._libvirt.libvirtError, NotFound) as err:
            log.info("libvirt did not cancel the job of %s: %s", name, err)
            return False
        return True

    # -- internals --

    def _info(self, dom: Any) -> GuestInfo:
        name = dom.name()
        state, _reason = self._query(dom.state, domain=name)
        active = bool(self._query(dom.isActive, domain=name))
        spec = find_memd_channel(self._query(dom.XMLDesc, 0, domain=name))
        uuid = self._query(dom.UUIDString, domain=name)
        pid = None
        if active and self._driver == "QEMU" and self.local:
            pid = self._find_qemu_pid(name, uuid)
        return GuestInfo(
            name=name,
            uuid=uuid,
            state=DOMAIN_STATES.get(state, str(state)),
            has_channel=spec is not None,
            channel=spec.path if spec is not None and spec.usable and active else None,
            qemu_pid=pid,
            domain_id=self._query(dom.ID, domain=name) if active else None,
            persistent=bool(self._query(dom.isPersistent, domain=name)),
        )

    def _lookup(self, name: str) -> Any:
        return self._query(self._conn.lookupByName, name, domain=name)

    def _require_qemu(self, dom: Any, name: str) -> None:
        if self._driver != "QEMU":
            raise Unavailable(
                f"domain '{name}' is not a QEMU domain (libvirt driver "
                f"{self._driver}), so it has no QEMU process",
                target=name,
            )
        if not self.local:
            raise Unavailable(
                f"domain '{name}' runs on a remote host ({self.uri}); memd "
                "must run on the hypervisor host itself",
                target=name,
            )
        if not self._query(dom.isActive, domain=name):
            raise Unavailable(f"domain '{name}' is not running", target=name)

    @staticmethod
    def _find_qemu_pid(name: str, uuid: str) -> int | None:
        """libvirt's pid file, checked against ``-uuid`` on the command line; else scan /proc."""
        marker = f"-uuid\0{uuid}\0".encode()
        runtime = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
        for pidfile in (
            Path("/run/libvirt/qemu") / f"{name}.pid",
            Path(runtime) / "libvirt/qemu/run" / f"{name}.pid",
        ):
            try:
                pid = int(pidfile.read_text().strip())
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except (OSError, ValueError):
                continue
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if marker in (proc / "cmdline").read_bytes():
                        return int(proc.name)
                except OSError:
                    continue
        return None

    def _query(self, fn: Callable[..., Any], *args: Any, domain: str | None = None) -> Any:
        try:
            return fn(*args)
        except self._libvirt.libvirtError as err:
            raise self._translate(err, domain=domain) from err

    def _translate(
        self, err: Any, *, domain: str | None = None, opening: bool = False
    ) -> BackendError:
        """One libvirtError → one memd error with an operator sentence."""
        lv = self._libvirt
        code = err.get_error_code()
        detail = err.get_error_message() or str(err)
        fields = {"target": domain or self.uri, "detail": detail, "libvirt_code": code}
        if code == lv.VIR_ERR_NO_DOMAIN:
            return NotFound(f"libvirt domain '{domain}' does not exist", **fields)
        denied = (
            lv.VIR_ERR_AUTH_FAILED,
            lv.VIR_ERR_AUTH_CANCELLED,
            lv.VIR_ERR_AUTH_UNAVAILABLE,
            lv.VIR_ERR_ACCESS_DENIED,
            lv.VIR_ERR_OPERATION_DENIED,
        )
        if code in denied or "Permission denied" in detail:
            return PermissionDenied(
                f"libvirt at {self.uri} denied access: run memd as root "
                "or as a member of the libvirt group",
                **fields,
            )
        if (
            opening
            and os.geteuid() != 0
            and any(word in detail for word in ("system bus", "D-Bus", "polkit", "authenticat"))
        ):
            # A non-root user of qemu:///system is authorised through polkit over D-Bus;
            # without them libvirt reports a D-Bus failure, which is an access problem to
            # the operator, not a libvirtd that is down.
            return PermissionDenied(
                f"libvirt at {self.uri} cannot authorise this user "
                f"(uid {os.geteuid()}): no D-Bus/polkit to ask; run memd "
                "as root",
                **fields,
            )
        if "no virtio-serial controllers are available" in detail:
            return ChannelMissing(
                f"domain '{domain}' has no virtio-serial controller, which "
                "libvirt cannot hot-plug: add the channel to its config "
                "(memd add-channel --config-only) and restart it",
                **fields,
            )
        if code == lv.VIR_ERR_NO_CONNECT and "no connection driver" in detail:
            return Unavailable(f"libvirt has no driver for the URI {self.uri}", **fields)
        if "socket is closed" in detail:
            return Unavailable(
                f"lost the connection to libvirtd at {self.uri}: is libvirtd "
                "running? (open a new connection)",
                **fields,
            )
        if opening or code in (lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC):
            return Unavailable(
                f"cannot reach libvirtd at {self.uri}: is libvirtd running?", **fields
            )
        if domain is not None and "not running" in detail:
            return Unavailable(f"domain '{domain}' is not running", **fields)
        what = f"domain '{domain}'" if domain else self.uri
        return Unavailable(f"libvirt failed on {what}: {detail}", **fields)
