"""Backend-neutral descriptions of guests and their lifecycle: plain data, no I/O.

:class:`GuestInfo` is what discovery returns (libvirt today, a bare QEMU tomorrow) and what
``memd guests --json`` prints; :class:`LifecycleEvent` is what event following delivers.
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
            "name": self.name, "state": self.state, "channel": self.channel,
            "uuid": self.uuid, "has_channel": self.has_channel, "qemu_pid": self.qemu_pid,
            "id": self.domain_id, "persistent": self.persistent,
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
