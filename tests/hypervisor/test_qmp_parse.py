"""Sans-I/O parts of hypervisor.qmp and hypervisor.libvirt_host: replies, mtree, XML, events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from hypervisor.domain_xml import find_memd_channel
from hypervisor.guests import lifecycle_event
from hypervisor.qmp import (
    Memdev,
    encode_command,
    info_mtree_flat,
    parse_mtree_flat,
    parse_reply,
    qom_set_merge,
    query_memdev,
)
from memd.errors import CommandFailed, NotFound, Unavailable

# Shape of `info mtree -f` from QEMU 7.2 (pc machine, 64 MiB, TCG), trimmed; plus lines
# with the annotations newer QEMUs append, to pin down the parser's tolerance.
MTREE = """\
FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000
  0000000000100000-0000000003ffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios [ROM]

FlatView #1
 AS "i440FX", root: bus master container
 AS "PIIX3", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #2
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  0000000000000cfa-0000000000000cfb (prio 0, i/o): pci-conf-idx @0000000000000002
  0000000000000d00-0000000000000d0f (prio 0, i/o): vga ioports remapped owner:{dev id=vga}
"""


class FakeMonitor:
    """Canned replies per command; records what was sent."""

    def __init__(self, replies: Mapping[str, Any], hmp_text: str = "") -> None:
        self.target = "fake"
        self.replies = dict(replies)
        self.hmp_text = hmp_text
        self.sent: list[tuple[str, Any]] = []

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        self.sent.append((command, arguments))
        return parse_reply(command, self.replies[command], self.target)

    def hmp(self, command_line: str) -> str:
        self.sent.append(("hmp", command_line))
        return self.hmp_text

    def close(self) -> None:
        pass


def test_mtree_memory_view_maps_gpa_to_ram_block_offsets() -> None:
    views = parse_mtree_flat(MTREE)
    memory = views["memory"]
    assert views["cpu-memory-0"] is memory
    ram = [r for r in memory if r.region == "pc.ram"]
    assert [(r.start, r.size, r.offset, r.kind) for r in ram] == [
        (0, 0xC3000, 0, "ram"),
        (0xC3000, 0x25000, 0xC3000, "rom"),
        (0x100000, 0x3F00000, 0x100000, "ram"),
    ]
    bios = memory[-1]
    assert (bios.region, bios.kind, bios.last) == ("pc.bios", "rom", 0xFFFFFFFF)
    assert memory[3].priority == 4096


def test_mtree_other_views_and_odd_names() -> None:
    views = parse_mtree_flat(MTREE)
    assert views["i440FX"] == [] and views["PIIX3"] == []
    io = views["I/O"]
    assert io[1].region == "pci-conf-idx" and io[1].offset == 2
    assert io[2].region == "vga ioports remapped"


def test_mtree_garbage_gives_no_views() -> None:
    assert parse_mtree_flat("unknown command: 'info mtre'\r\n") == {}
    mon = FakeMonitor({}, hmp_text="unknown command: 'info mtre'\n")
    with pytest.raises(CommandFailed, match="no address space 'memory'"):
        info_mtree_flat(mon)


def test_info_mtree_flat_over_monitor() -> None:
    mon = FakeMonitor({}, hmp_text=MTREE)
    assert info_mtree_flat(mon, "I/O")[0].region == "dma-chan"
    assert mon.sent == [("hmp", "info mtree -f")]


def test_parse_reply_return_and_error() -> None:
    assert parse_reply("query-status", '{"return": {"status": "running"}, "id": 1}', "x") == {
        "status": "running"
    }
    assert parse_reply("qom-list", {"return": [1, 2]}, "x") == [1, 2]
    with pytest.raises(CommandFailed) as info:
        parse_reply("qom-get", '{"error": {"class": "DeviceNotFound", "desc": "no"}}', "vm1")
    assert info.value.error_class == "DeviceNotFound"
    assert str(info.value) == "QEMU refused qom-get on vm1: no"
    with pytest.raises(Unavailable):
        parse_reply("x", "not json", "vm1")
    with pytest.raises(Unavailable):
        parse_reply("x", "[1]", "vm1")


def test_encode_command() -> None:
    assert encode_command("query-status") == '{"execute": "query-status"}'
    assert encode_command("qom-list", {"path": "/objects"}) == (
        '{"execute": "qom-list", "arguments": {"path": "/objects"}}'
    )


def test_query_memdev_and_qom_set_merge() -> None:
    memdev = {
        "id": "pc.ram",
        "size": 67108864,
        "merge": True,
        "dump": True,
        "prealloc": False,
        "share": False,
        "policy": "default",
        "host-nodes": [],
    }
    mon = FakeMonitor({"query-memdev": {"return": [memdev]}, "qom-set": {"return": {}}})
    [dev] = query_memdev(mon)
    assert dev == Memdev("pc.ram", 64 << 20, True, False, True, False, "default")
    assert dev.path == "/objects/pc.ram"
    qom_set_merge(mon, "pc.ram", False)
    qom_set_merge(mon, "/objects/pc.ram", True)
    assert mon.sent[1:] == [
        ("qom-set", {"path": "/objects/pc.ram", "property": "merge", "value": False}),
        ("qom-set", {"path": "/objects/pc.ram", "property": "merge", "value": True}),
    ]


def test_qom_set_merge_rejects_bad_ids_and_missing_backends() -> None:
    mon = FakeMonitor({"qom-set": {"error": {"class": "DeviceNotFound", "desc": "gone"}}})
    with pytest.raises(NotFound, match="no memory backend '/objects/ram0'"):
        qom_set_merge(mon, "ram0", True)
    for bad in ("../machine", "/machine/unattached", "", "a b"):
        with pytest.raises(CommandFailed):
            qom_set_merge(mon, bad, True)
    assert len(mon.sent) == 1


def _domain_xml(channel: str) -> str:
    return f"<domain type='kvm'><name>d</name><devices>{channel}</devices></domain>"


def test_find_memd_channel_variants() -> None:
    assert find_memd_channel(_domain_xml("")) is None
    other = (
        "<channel type='unix'><source mode='bind' path='/x/qga'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
    assert find_memd_channel(_domain_xml(other)) is None
    memd = (
        "<channel type='unix'><source mode='bind' path='/s/org.memd.0'/>"
        "<target type='virtio' name='org.memd.0'/></channel>"
    )
    spec = find_memd_channel(_domain_xml(other + memd))
    assert spec is not None and spec.usable and spec.path == "/s/org.memd.0"
    unplaced = find_memd_channel(
        _domain_xml(
            "<channel type='unix'><source mode='bind'/><target type='virtio' name='org.memd.0'/>"
            "</channel>"
        )
    )
    assert unplaced is not None and unplaced.usable and unplaced.path is None
    pty = find_memd_channel(
        _domain_xml("<channel type='pty'><target type='virtio' name='org.memd.0'/></channel>")
    )
    assert pty is not None and not pty.usable


@pytest.mark.parametrize(
    ("event", "detail", "kind", "text", "starts", "ends"),
    [
        (2, 0, "started", "booted", True, False),
        (5, 1, "stopped", "destroyed", False, True),
        (5, 5, "stopped", "failed", False, True),
        (8, 0, "crashed", "panicked", False, True),
        (3, 0, "suspended", "paused", False, False),
        (5, 99, "stopped", "99", False, True),
        (42, 0, "42", "0", False, False),
    ],
)
def test_lifecycle_event_mapping(
    event: int, detail: int, kind: str, text: str, starts: bool, ends: bool
) -> None:
    ev = lifecycle_event("vm", "u", event, detail)
    assert (ev.kind, ev.detail, ev.starts_guest, ev.ends_guest) == (kind, text, starts, ends)


def test_missing_libvirt_python_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from hypervisor.libvirt_host import LibvirtHost

    monkeypatch.setitem(sys.modules, "libvirt", None)  # makes `import libvirt` fail
    with pytest.raises(Unavailable, match=r"libvirt-python is not installed"):
        LibvirtHost("test:///default")
