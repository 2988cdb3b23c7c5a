"""QemuMachine, KSM and the audit against real QEMU processes (TCG, root)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from hypervisor import ksm
from hypervisor.mtree import parse_ram_layout
from hypervisor.procmem import ProcessMemory
from hypervisor.qemu_audit import audit_report, explain_gfn, parse_vm_gfn
from hypervisor.qemu_machine import QemuMachine, hmp_read
from sharing.machine import DOMID_COW, FrameView, Machine, PageType

from .conftest import FIXTURES, PlainQemu, needs_qemu_root

pytestmark = needs_qemu_root

BASE_GFN = 0x1000  # 16 MiB: far from anything SeaBIOS touches
NPAGES = 64


def plant(machine: QemuMachine, domid: int, gfn: int, data: bytes) -> None:
    """Write bytes into guest RAM the way a root tool can: /proc/<pid>/mem."""
    g = machine.guest(domid)
    with ProcessMemory(g.pid, writable=True) as mem:
        mem.write(int(g.gfn_vaddr[gfn]), data)


def pages(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, NPAGES * 4096, dtype=np.uint8).tobytes()


def test_attach_maps_gfns_to_the_right_host_pages(start_qemu: Callable[..., PlainQemu]) -> None:
    q = start_qemu("solo", "-m", "128")
    machine = QemuMachine()
    try:
        text = q.monitor.hmp("info mtree -f")
        # Real output parses to the same layout as the stored capture of this machine above
        # the first MiB (below it, what the BIOS area maps depends on how far SeaBIOS got
        # with programming the PAM registers).
        live = parse_ram_layout(text, {"pc.ram": 128 << 20})
        stored = parse_ram_layout(
            (FIXTURES / "mtree-qemu7.2-pc128.txt").read_text(), {"pc.ram": 128 << 20}
        )
        assert live.nr_gfns == stored.nr_gfns == 0x8000
        assert (
            live.block_pages(["pc.ram"])[1][0x100:].tolist()
            == stored.block_pages(["pc.ram"])[1][0x100:].tolist()
        )
        d = machine.attach("solo", q.pid, q.monitor)
        assert machine.domains() == [d] and machine.nr_gfns(d) == 0x8000
        data = pages(1)
        plant(machine, d, BASE_GFN, data)
        # The monitor sees the planted bytes at the gpa we computed: the mapping is right.
        for i in (0, 17, NPAGES - 1):
            gpa = (BASE_GFN + i) << 12
            assert hmp_read(q.monitor, gpa + 100, 16) == data[i * 4096 + 100 : i * 4096 + 116]
        assert machine.verify_mapping(d) is True
        got = machine.read_gfns(d, np.arange(BASE_GFN, BASE_GFN + NPAGES))
        assert got.tobytes() == data
        mfns, types = machine.lookup_range(d, BASE_GFN, NPAGES)
        assert (mfns >= 0).all() and len(np.unique(mfns)) == NPAGES
        assert machine.read_frame(int(mfns[5])) == data[5 * 4096 : 6 * 4096]
        owner, mapcount = machine.frame_info(int(mfns[5]))
        assert (owner, mapcount) == (d, 1) and types[5] == PageType.RAM
        # A KSM host cannot remap frames: it is a read-only frame view, not a Machine.
        assert isinstance(machine, FrameView) and not isinstance(machine, Machine)
        info = explain_gfn(machine, "solo", BASE_GFN + 5)
        assert info["mfn"] == int(mfns[5]) and info["state"] == "private"
        assert info["gpa"] == (BASE_GFN + 5) << 12 and info["block"] == "pc.ram"
    finally:
        machine.close()


def test_ksm_merges_across_vms_and_cow_splits(
    start_qemu: Callable[..., PlainQemu], ksm_restored: dict[str, int | str]
) -> None:
    a, b = start_qemu("a"), start_qemu("b")
    machine = QemuMachine()
    try:
        da = machine.attach("a", a.pid, a.monitor)
        db = machine.attach("b", b.pid, b.monitor)
        data = pages(2)
        plant(machine, da, BASE_GFN, data)
        plant(machine, db, BASE_GFN, data)
        gfns = np.arange(BASE_GFN, BASE_GFN + NPAGES)

        def merged() -> bool:
            pa, pb = machine.p2m(da)[gfns], machine.p2m(db)[gfns]
            return bool((pa == pb).all())

        with ksm.settings(pages_to_scan=20000, sleep_millisecs=10, run=1):
            t0 = time.monotonic()
            assert ksm.wait_for(merged, timeout=30), "KSM did not merge the planted pages"
            merge_s = time.monotonic() - t0
            truth = machine.ground_truth()
            frames = machine.p2m(da)[gfns]
            assert (truth.refs_of(frames) >= 2).all()
            for g, m in zip(gfns[:4].tolist(), frames[:4].tolist(), strict=True):
                assert (da, g) in truth.gfns_of(m) and (db, g) in truth.gfns_of(m)
            mat = truth.matrix()
            assert mat[0, 1] == mat[1, 0] >= NPAGES
            _, types = machine.lookup_range(da, BASE_GFN, NPAGES)
            assert (types == PageType.SHARED).all()
            assert machine.frame_info(int(frames[0]))[0] == DOMID_COW
            assert machine.read_frame(int(frames[3])) == data[3 * 4096 : 4 * 4096]
            assert ksm.process_merging_pages(a.pid) >= NPAGES

            report = audit_report(machine)
            assert report["frames"]["shared"] >= NPAGES and report["frames"]["saved"] >= NPAGES
            assert report["matrix"]["vms"] == ["a", "b"]
            assert report["per_vm"]["a"]["shared_gfns"] >= NPAGES
            assert report["top_frames"][0]["refs"] >= 2
            info = explain_gfn(machine, "b", BASE_GFN + 3)
            assert (
                info["state"].startswith("shared")
                and {"vm": "a", "gfn": BASE_GFN + 3} in info["mapped_by"]
            )

            # A ledger that agrees with the host is clean; one that lies is caught.
            ledger = {
                int(m): [(da, g), (db, g)]
                for g, m in zip(gfns.tolist(), frames.tolist(), strict=True)
            }
            honest = SimpleNamespace(
                records=lambda: ledger,
                stats=lambda: {"nr_shared_mfns": NPAGES, "nr_saved_mfns": NPAGES},
            )
            assert audit_report(machine, honest)["ledger"]["clean"]

            # The guest's own write (here: through /proc/pid/mem) breaks sharing: CoW.
            plant(machine, da, BASE_GFN + 7, b"\xaa")
            pa, pb = machine.p2m(da)[gfns], machine.p2m(db)[gfns]
            assert pa[7] != pb[7] and (pa[:7] == pb[:7]).all()
            truth = machine.ground_truth()
            assert (da, BASE_GFN + 7) not in truth.gfns_of(int(pb[7]))
            lied = audit_report(machine, honest)["ledger"]
            assert not lied["clean"]
            assert any(
                f["kind"] == "gfn_moved" and f["gfn"] == BASE_GFN + 7 for f in lied["findings"]
            )

            # merge=false on a guest un-merges all its pages at once.
            before = ksm.counters()["pages_sharing"]
            before_a = ksm.process_merging_pages(a.pid)
            machine.set_merge(da, False)
            assert ksm.wait_for(
                lambda: not (machine.p2m(da)[gfns] == machine.p2m(db)[gfns]).any(), timeout=10
            )
            # The global counter follows once ksmd has walked its rmap items again.
            assert ksm.wait_for(lambda: ksm.counters()["pages_sharing"] < before, timeout=10)
            # Only pc.ram is switched: QEMU's other RAM blocks (ROMs, ACPI tables) stay
            # mergeable, so the process keeps a few merged pages; like the global counter,
            # the per-process one follows ksmd's passes (equal PFNs are the proof above).
            assert ksm.wait_for(lambda: ksm.process_merging_pages(a.pid) < before_a, timeout=10)
        print(f"\nKSM merged {NPAGES} planted pages across 2 VMs in {merge_s:.2f} s")
    finally:
        machine.close()


def test_parse_vm_gfn() -> None:
    assert parse_vm_gfn("web1:0x1f2") == ("web1", 0x1F2)
    assert parse_vm_gfn("a:b:12") == ("a:b", 12)
    with pytest.raises(ValueError, match="VM:GFN"):
        parse_vm_gfn("nogfn")
