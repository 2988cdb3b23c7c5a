"""RAM layout from `info mtree -f` text captured from real QEMU 7.2 runs (fixtures/)."""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.mtree import RamRange, parse_ram_layout
from memd.errors import CommandFailed

from .conftest import FIXTURES

GiB = 1 << 30
MiB = 1 << 20


def fixture(name: str) -> str:
    return (FIXTURES / f"mtree-qemu7.2-{name}.txt").read_text()


def test_small_pc_guest_is_one_contiguous_run_below_4g() -> None:
    layout = parse_ram_layout(fixture("pc128"), {"pc.ram": 128 * MiB})
    # ram/rom pieces of the BIOS shadow area merge back into one run of pc.ram.
    assert layout.ranges == (RamRange(0, 128 * MiB >> 12, "pc.ram", 0, False),)
    assert layout.nr_gfns == layout.ram_pages == 0x8000
    assert layout.locate(0x7FFF) == ("pc.ram", 0x7FFF)
    assert layout.locate(0x8000) is None


def test_pc_4g_splits_at_the_pci_hole_read_from_the_text() -> None:
    layout = parse_ram_layout(fixture("pc4g"), {"pc.ram": 4 * GiB})
    # i440fx with 4 GiB: 3 GiB below the hole, the rest at 4 GiB (pc.ram @0xc0000000).
    assert layout.ranges == (
        RamRange(0, 0xC0000, "pc.ram", 0, False),
        RamRange(0x100000, 0x40000, "pc.ram", 0xC0000, False),
    )
    assert layout.ram_pages * 4096 == 4 * GiB
    assert layout.nr_gfns == 0x140000
    assert layout.locate(0xC0000) is None  # the PCI hole
    assert layout.locate(0x100001) == ("pc.ram", 0xC0001)
    block, page = layout.block_pages(["pc.ram"])
    assert (block[0xC0000:0x100000] == -1).all() and (page[0xC0000:0x100000] == -1).all()
    assert page[0x100000] == 0xC0000 and page[0xBFFFF] == 0xBFFFF
    assert np.count_nonzero(block == 0) == layout.ram_pages


def test_q35_4g_splits_at_2g() -> None:
    layout = parse_ram_layout(fixture("q35_4g"), {"pc.ram": 4 * GiB})
    assert [(r.gfn, r.pages, r.block_page) for r in layout.ranges] == [
        (0, 0x80000, 0),
        (0x100000, 0x80000, 0x80000),
    ]


def test_memdev_backed_ram_is_found_by_memdev_id() -> None:
    layout = parse_ram_layout(fixture("pc_memdev"), {"mem0": 256 * MiB})
    assert {r.block for r in layout.ranges} == {"mem0"}
    assert layout.ram_pages == 256 * MiB >> 12
    with pytest.raises(CommandFailed, match="maps none of the RAM blocks"):
        parse_ram_layout(fixture("pc_memdev"), {"pc.ram": 256 * MiB})


def test_inconsistent_sizes_and_garbage_are_refused() -> None:
    with pytest.raises(CommandFailed, match="runs past the end"):
        parse_ram_layout(fixture("pc4g"), {"pc.ram": 2 * GiB})
    with pytest.raises(CommandFailed, match="no address space"):
        parse_ram_layout("unknown command: 'info mtre'\n", {"pc.ram": MiB})
    text = fixture("pc128").replace(
        "0000000000100000-0000000007ffffff (prio 0, ram): pc.ram @0000000000100000",
        "0000000000100000-0000000007ffffff (prio 0, ram): pc.ram @0000000000100800",
    )
    with pytest.raises(CommandFailed, match="not page aligned"):
        parse_ram_layout(text, {"pc.ram": 256 * MiB})
