"""libvirt domain XML: the memd channel and the memd swap disk, built and found.

Overview.  Pure text in, text or plain data out: what the XML of a domain says about
memd (its ``<channel>`` whose target name is ``org.memd.0``, its swap disk, tagged
with the serial :data:`SWAP_SERIAL`) and the XML memd hands libvirt to add either.
:class:`hypervisor.libvirt_host.LibvirtHost` fetches and sends the documents; nothing
here talks to libvirt, so every rule can be tested on a string.  No state, no locks.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from hypervisor.guests import MEMD_CHANNEL

#: The serial memd gives the swap disks it hot-plugs (the guest sees
#: /dev/disk/by-id/virtio-memd-swap); it is also how memd finds them again.
SWAP_SERIAL = "memd-swap"

#: What an operator adds to a domain (``virsh attach-device DOMAIN FILE --live --config``).
CHANNEL_XML = (
    f"<channel type='unix'><source mode='bind'/>"
    f"<target type='virtio' name='{MEMD_CHANNEL}'/></channel>"
)

#: The fix for a domain without a usable memd channel, in one clause.
MISSING_HINT = (
    f"add <channel type='unix'> with <source mode='bind'/> and target name {MEMD_CHANNEL}"
)


@dataclass(frozen=True, slots=True)
class SwapDiskSpec:
    """A memd swap disk in a domain's XML."""

    target: str  #: vdX
    socket: str
    #: whether libvirt kept <reconnect delay> (libvirt 9.0 does not know the element for
    #: NBD disks: a memd restart is then I/O errors in the guest, not a pause)
    reconnect_delay: int | None


def swap_disk_xml(socket_path: str, target: str, reconnect_delay: int) -> str:
    """The disk element memd hot-plugs (discard=unmap: the guest's TRIM reaches memd)."""
    return (
        "<disk type='network' device='disk'>"
        "<driver name='qemu' type='raw' discard='unmap'/>"
        f"<source protocol='nbd'><host transport='unix' socket={quoteattr(socket_path)}/>"
        f"<reconnect delay='{int(reconnect_delay)}'/></source>"
        f"<target dev='{target}' bus='virtio'/><serial>{SWAP_SERIAL}</serial></disk>"
    )


def find_swap_disk(domain_xml: str) -> SwapDiskSpec | None:
    found = swap_disk_element(domain_xml)
    return None if found is None else found[0]


def swap_disk_element(domain_xml: str) -> tuple[SwapDiskSpec, str] | None:
    """The memd swap disk of a domain: its spec and its ``<disk>`` element as text (what
    libvirt needs to detach it), or None."""
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        if disk.findtext("serial") == SWAP_SERIAL:
            return _swap_spec(disk), ET.tostring(disk, encoding="unicode")
    return None


def _swap_spec(disk: ET.Element) -> SwapDiskSpec:
    host = disk.find("source/host")
    reconnect = disk.find("source/reconnect")
    target = disk.find("target")  # (an Element without children is false: test for None)
    delay = reconnect.get("delay") if reconnect is not None else None
    return SwapDiskSpec(
        target=target.get("dev", "?") if target is not None else "?",
        socket=host.get("socket", "") if host is not None else "",
        reconnect_delay=int(delay) if delay and delay.isdigit() else None,
    )


def free_disk_target(domain_xml: str) -> str | None:
    """The first virtio disk name (vdb..vdz) the domain does not use, or None."""
    used = {t.get("dev") for t in ET.fromstring(domain_xml).iterfind("devices/disk/target")}
    return next((f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in used), None)


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """The domain XML's ``<channel>`` whose target name is org.memd.0."""

    source_type: str  # 'unix' is the only one memd can use
    mode: str | None  # 'bind': QEMU listens and memd connects
    path: str | None  # set by libvirt in the live XML of a running domain

    @property
    def usable(self) -> bool:
        return self.source_type == "unix" and self.mode in (None, "bind")


def find_memd_channel(domain_xml: str) -> ChannelSpec | None:
    """The memd channel of a domain XML document, or None when it has none."""
    root = ET.fromstring(domain_xml)
    for chan in root.iterfind("./devices/channel"):
        target = chan.find("target")
        if target is None or target.get("name") != MEMD_CHANNEL:
            continue
        source = chan.find("source")
        return ChannelSpec(
            source_type=chan.get("type", ""),
            mode=None if source is None else source.get("mode"),
            path=None if source is None else source.get("path"),
        )
    return None


def has_virtio_serial(domain_xml: str) -> bool:
    """Whether the domain has a virtio-serial controller (a channel can be hot-plugged)."""
    root = ET.fromstring(domain_xml)
    return any(c.get("type") == "virtio-serial" for c in root.iterfind("./devices/controller"))
