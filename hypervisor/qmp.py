"""QEMU monitor access: one small interface, two transports, and sans-I/O parsers.

Layers, top to bottom (an arrow is "uses")::

    query_memdev / qom_set_merge / info_mtree_flat   helpers over any Monitor (sync)
        │
    Monitor (Protocol): execute(cmd, args) -> return value, hmp(cmdline) -> text
        ├── LibvirtMonitor   (hypervisor.libvirt_host)  libvirt owns the QMP socket of its
        │                      guests; commands go through libvirt_qemu.qemuMonitorCommand
        └── QmpMonitor       a QEMU started without libvirt: qemu.qmp.QMPClient on the
               │               guest's -qmp unix socket, driven from a private event-loop
               └── AsyncQmpMonitor   thread so that sync callers (and threads) can use it;
                                     asyncio callers use AsyncQmpMonitor directly
    encode_command, parse_reply,
    Memdev.from_reply, parse_mtree_flat              pure functions: text/JSON in, data out

``execute`` returns the ``return`` member of the reply (a dict for most commands, a list
for ``query-*``/``qom-list``); an ``error`` reply raises :class:`memd.errors.CommandFailed`,
a monitor that cannot be reached or goes away raises :class:`memd.errors.Unavailable`.
HMP reports its own errors as text (``unknown command: ...``): ``hmp`` returns them as is.

A QMP socket accepts one client at a time, and libvirt is always that client for its own
guests: use ``LibvirtHost.monitor(name)`` there, ``QmpMonitor`` only for QEMUs you started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from memd.errors import BackendError, CommandFailed, NotFound, PermissionDenied, Unavailable

T = TypeVar("T")

#: Seconds to wait for a QMP greeting or a command's reply before calling the monitor dead.
DEFAULT_TIMEOUT = 10.0


class Monitor(Protocol):
    """A synchronous handle on one QEMU's monitor.  Not required to be thread-safe."""

    #: What the monitor talks to (domain name or socket path), for error messages.
    target: str

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run a QMP command; return its ``return`` value, raise CommandFailed on ``error``."""
        ...

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (``info mtree -f``); return its text output."""
        ...

    def close(self) -> None:
        """Release the monitor (a no-op where another process owns it)."""
        ...


# --- sans-I/O: replies and parsers --------------------------------------------------------


def parse_reply(command: str, raw: str | Mapping[str, Any], target: str) -> Any:
    """The ``return`` member of a QMP reply, or CommandFailed carrying QEMU's error."""
    try:
        reply = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as err:
        raise Unavailable(
            f"QEMU monitor of {target} sent a reply that is not JSON",
            target=target,
            command=command,
        ) from err
    if not isinstance(reply, Mapping):
        raise Unavailable(
            f"QEMU monitor of {target} sent a reply that is not a JSON object",
            target=target,
            command=command,
        )
    if "error" in reply:
        error = reply["error"] if isinstance(reply["error"], Mapping) else {}
        raise CommandFailed(
            f"QEMU refused {command} on {target}: {error.get('desc', 'no description')}",
            target=target,
            command=command,
            error_class=str(error.get("class", "GenericError")),
        )
    return reply.get("return", {})


def encode_command(command: str, arguments: Mapping[str, Any] | None = None) -> str:
    """The QMP request text for ``command`` (what qemuMonitorCommand sends verbatim)."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = dict(arguments)
    return json.dumps(msg)


@dataclass(frozen=True, slots=True)
class Memdev:
    """One memory backend object (``query-memdev``).  Plain ``-m`` RAM is ``pc.ram``."""

    id: str
    size: int
    merge: bool
    share: bool
    dump: bool
    prealloc: bool
    policy: str

    @property
    def path(self) -> str:
        """QOM path, the ``path`` argument of qom-get/qom-set."""
        return f"/objects/{self.id}"

    @classmethod
    def from_reply(cls, reply: Any) -> list[Memdev]:
        if not isinstance(reply, list):
            raise Unavailable("query-memdev did not return a list", command="query-memdev")
        return [
            cls(
                id=str(d.get("id", "")),
                size=int(d["size"]),
                merge=bool(d["merge"]),
                share=bool(d.get("share", False)),
                dump=bool(d.get("dump", True)),
                prealloc=bool(d.get("prealloc", False)),
                policy=str(d.get("policy", "")),
            )
            for d in reply
        ]


@dataclass(frozen=True, slots=True)
class FlatRange:
    """One line of ``info mtree -f``: guest physical [start, last] maps to region@offset.

    ``kind`` is QEMU's: ``ram``, ``rom`` (RAM in read-only mode, e.g. the PAM-shadowed
    BIOS area of ``pc.ram``), ``romd``, ``i/o``.  ``offset`` is the offset of ``start``
    inside ``region`` (the RAM block when kind is ram/rom) — what gpa→host-address needs.
    """

    start: int
    last: int
    priority: int
    kind: str
    region: str
    offset: int

    @property
    def size(self) -> int:
        return self.last - self.start + 1


_RANGE = re.compile(
    r"^\s+(?P<start>[0-9a-f]+)-(?P<last>[0-9a-f]+) \(prio (?P<prio>-?\d+), (?P<kind>[^)]+)\): "
    r"(?P<rest>.*)$"
)
_OFFSET = re.compile(r" @(?P<off>[0-9a-f]+)")
# Annotations QEMU may append after the region name (owner, accelerator, read-only marks).
_TRAILER = re.compile(r"(?:\s+(?:\[[^\]]*\]|owner:.*|KVM|HVF|WHPX|NVMM|TCG))+$")
_ADDRESS_SPACE = re.compile(r'^\s*AS "(?P<name>[^"]*)"')


def parse_mtree_flat(text: str) -> dict[str, list[FlatRange]]:
    """Address-space name ("memory", "I/O", "cpu-memory-0", ...) → its flat ranges.

    Address spaces that share a FlatView share one list.  Lines that fit no known shape
    are skipped, so an HMP error text yields an empty dict rather than an exception.
    """
    views: dict[str, list[FlatRange]] = {}
    names: list[str] = []
    ranges: list[FlatRange] = []
    in_header = False
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith("FlatView #"):
            names, ranges, in_header = [], [], True
            continue
        as_match = _ADDRESS_SPACE.match(line)
        if as_match:
            if not in_header:  # an AS line after ranges starts a new view
                names, ranges, in_header = [], [], True
            names.append(as_match["name"])
            views[as_match["name"]] = ranges
            continue
        m = _RANGE.match(line)
        if m is None:
            continue
        in_header = False
        rest = m["rest"]
        offset = 0
        off_match = _OFFSET.search(rest)
        if off_match:
            offset = int(off_match["off"], 16)
            rest = rest[: off_match.start()]
        region = _TRAILER.sub("", rest).strip()
        ranges.append(
            FlatRange(
                start=int(m["start"], 16),
                last=int(m["last"], 16),
                priority=int(m["prio"]),
                kind=m["kind"],
                region=region,
                offset=offset,
            )
        )
    return views


# --- helpers over any Monitor -------------------------------------------------------------

_QOM_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")


def _memdev_path(memdev: str) -> str:
    ident = memdev.removeprefix("/objects/")
    if not _QOM_ID.match(ident):
        raise CommandFailed(
            f"'{memdev}' is not a memory backend id (like pc.ram)",
            command="qom-set",
            error_class="InvalidId",
        )
    return f"/objects/{ident}"


def query_memdev(monitor: Monitor) -> list[Memdev]:
    """Every memory backend of the guest, with its current ``merge`` (KSM) setting."""
    return Memdev.from_reply(monitor.execute("query-memdev"))


def qom_set_merge(monitor: Monitor, memdev: str, merge: bool) -> None:
    """Switch KSM merging of one memory backend (``pc.ram`` or ``/objects/pc.ram``).

    Turning merge off makes the kernel un-merge every page of the backend at once: the
    host needs that much free memory.  Raises NotFound when the backend does not exist.
    """
    path = _memdev_path(memdev)
    try:
        monitor.execute("qom-set", {"path": path, "property": "merge", "value": bool(merge)})
    except CommandFailed as err:
        if err.error_class == "DeviceNotFound":
            raise NotFound(
                f"guest {monitor.target} has no memory backend '{path}'", target=monitor.target
            ) from err
        raise


def info_mtree_flat(monitor: Monitor, address_space: str = "memory") -> list[FlatRange]:
    """The flat view of one address space (default: guest physical memory)."""
    views = parse_mtree_flat(monitor.hmp("info mtree -f"))
    if address_space not in views:
        raise CommandFailed(
            f"'info mtree -f' of {monitor.target} shows no address space '{address_space}'",
            target=monitor.target,
            command="info mtree -f",
            error_class="NoAddressSpace",
        )
    return views[address_space]


# --- qemu.qmp transport -------------------------------------------------------------------


class AsyncQmpMonitor:
    """qemu.qmp's QMPClient on a unix socket, errors translated to memd's.  asyncio only."""

    def __init__(
        self, path: str, *, client_name: str = "memd", timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        from qemu.qmp import QMPClient

        self.target = path
        self.timeout = timeout
        self._client = QMPClient(client_name)

    @classmethod
    async def connect(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> AsyncQmpMonitor:
        """Connect and negotiate.  Unavailable when nothing answers, PermissionDenied on EACCES."""
        from qemu.qmp import ConnectError

        monitor = cls(path, timeout=timeout)
        try:
            await asyncio.wait_for(monitor._client.connect(path), timeout)
        except ConnectError as err:
            cause = err.exc
            if isinstance(cause, PermissionError):
                raise PermissionDenied(
                    f"no permission to open the QMP socket {path}", target=path
                ) from err
            raise Unavailable(
                f"cannot connect to the QMP monitor at {path}: is QEMU running "
                "with -qmp unix:PATH,server=on?",
                target=path,
            ) from err
        except TimeoutError as err:
            await monitor.close()
            raise Unavailable(
                f"the QMP monitor at {path} did not greet within {timeout:g} s "
                "(another client, e.g. libvirt, may hold it)",
                target=path,
            ) from err
        return monitor

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        from qemu.qmp import ExecuteError, QMPError

        try:
            return await asyncio.wait_for(
                self._client.execute(command, dict(arguments) if arguments else None), self.timeout
            )
        except ExecuteError as err:
            raise CommandFailed(
                f"QEMU refused {command} on {self.target}: {err}",
                target=self.target,
                command=command,
                error_class=err.error_class,
            ) from err
        except (QMPError, OSError, EOFError, TimeoutError) as err:
            if command == "quit":  # QEMU may close the socket before the reply is read
                return {}
            raise Unavailable(
                f"the QMP monitor at {self.target} went away during {command}",
                target=self.target,
                command=command,
            ) from err

    async def hmp(self, command_line: str) -> str:
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(out).replace("\r\n", "\n")

    def event_listener(self, *names: str) -> Any:
        """A qemu.qmp ``EventListener`` for these events (``await listener.get()`` gives
        each event as a dict with ``event`` and ``data``), registered from now on."""
        from qemu.qmp import EventListener

        listener = EventListener(names)
        self._client.register_listener(listener)
        return listener

    async def close(self) -> None:
        # disconnect() re-raises whatever killed the connection; a dying peer is not news.
        with contextlib.suppress(Exception):
            await self._client.disconnect()


class QmpMonitor:
    """Synchronous :class:`Monitor` over :class:`AsyncQmpMonitor`.

    The QMP client lives on a private event loop in a daemon thread, so this works from
    plain threads and from code that is itself inside another event loop's thread
    (it blocks that thread while waiting: asyncio code should prefer AsyncQmpMonitor).
    """

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.target = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name=f"qmp:{path}"
        )
        self._thread.start()
        try:
            self._async = self._run(AsyncQmpMonitor.connect(path, timeout=timeout))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def connect(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> QmpMonitor:
        return cls(path, timeout=timeout)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise Unavailable(f"the QMP monitor at {self.target} is closed", target=self.target)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        # The coroutine enforces self.timeout itself; the margin only guards a wedged loop.
        return future.result(self.timeout + 5.0)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        return self._run(self._async.execute(command, arguments))

    def hmp(self, command_line: str) -> str:
        return self._run(self._async.hmp(command_line))

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(BackendError, TimeoutError):
                self._run(self._async.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> QmpMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
