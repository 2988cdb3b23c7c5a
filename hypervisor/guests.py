"""Backend-neutral descriptions of guests and their lifecycle: plain data, no I/O.

:class:`GuestInfo` is what discovery returns (libvirt today, a bare QEMU tomorrow) and what
``memd guests --json`` prints; :class:`LifecycleEvent` is what event following delivers
(:func:`lifecycle_event` translates libvirt's event integers into one).
Neither holds a live connection or monitor: those are fetched on demand from the backend
(``LibvirtHost.monitor(name)``), so these objects can be logged, compared and serialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Target name of the virtio-serial port memd talks over (guest: /dev/virtio-ports/org.memd.0).
MEMD_CHANNEL = "org.memd.0"


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """One guest as the hypervisor sees it at the moment of the query.

    ``channel`` is the host-side unix socket of the memd port, and is set only while the
    guest runs (libvirt picks the path at start); ``has_channel`` says whether the guest's
    definition has a memd channel at all, so an operator can tell "not running" from
    "never configured".  ``qemu_pid`` is None for non-QEMU drivers and stopped guests.
    """

    name: str
    uuid: str
    #: virsh-style state: running, paused, shut off, crashed, shutting down, ...
    state: str
    has_channel: bool
    channel: str | None
    qemu_pid: int | None = None
    #: libvirt's numeric domain id while running (None when inactive).
    domain_id: int | None = None
    #: Persistent domains survive a stop; transient ones vanish with it.
    persistent: bool = True

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def attachable(self) -> bool:
        """The agent can connect now: the guest is alive and its memd socket exists."""
        return self.channel is not None and self.state in ("running", "paused", "blocked")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``name``, ``state``, ``channel`` are the keys ``memd guests`` promises."""
        return {
            "name": self.name,
            "state": self.state,
            "channel": self.channel,
            "uuid": self.uuid,
            "has_channel": self.has_channel,
            "qemu_pid": self.qemu_pid,
            "id": self.domain_id,
            "persistent": self.persistent,
        }


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A guest changed state.  ``kind`` and ``detail`` use libvirt's vocabulary in lower case.

    kind: defined, undefined, started, suspended, resumed, stopped, shutdown, pmsuspended,
    crashed.  detail refines it, e.g. stopped/destroyed, stopped/failed (QEMU died),
    stopped/crashed, started/booted, started/restored.
    """

    name: str
    uuid: str
    kind: str
    detail: str

    @property
    def starts_guest(self) -> bool:
        """A QEMU process now runs for this guest: (re-)attach to its channel."""
        return self.kind == "started"

    @property
    def ends_guest(self) -> bool:
        """The guest is gone or dead (shut down, destroyed, crashed, QEMU died): detach."""
        return self.kind in ("stopped", "crashed")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "uuid": self.uuid, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class JobState:
    """One look at a domain during a migration: its state (virsh's words; ``gone`` when
    libvirt no longer knows it) and whether an outgoing migration job runs (None: the
    driver cannot tell, e.g. libvirt's test driver)."""

    state: str
    migrating: bool | None

    @property
    def running(self) -> bool:
        return self.state == "running"


#: virDomainState → virsh's words.
DOMAIN_STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}

# virDomainEventType → kind, and per kind its detail enum → detail (libvirt-domain.h):
# libvirt's integers, translated here so that events are plain data everywhere else.
_EVENT_KINDS = {
    0: "defined",
    1: "undefined",
    2: "started",
    3: "suspended",
    4: "resumed",
    5: "stopped",
    6: "shutdown",
    7: "pmsuspended",
    8: "crashed",
}
_EVENT_DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from_snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from_snapshot", "wakeup"),
    "suspended": (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from_snapshot",
        "api_error",
        "postcopy",
        "postcopy_failed",
    ),
    "resumed": ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot"),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}
#: virConnectCloseReason → word.
CLOSE_REASONS = ("error", "eof", "keepalive", "client")


def lifecycle_event(name: str, uuid: str, event: int, detail: int) -> LifecycleEvent:
    """Translate libvirt's (event, detail) integers; unknown values keep their number."""
    kind = _EVENT_KINDS.get(event, str(event))
    details = _EVENT_DETAILS.get(kind, ())
    return LifecycleEvent(
        name=name,
        uuid=uuid,
        kind=kind,
        detail=details[detail] if 0 <= detail < len(details) else str(detail),
    )
