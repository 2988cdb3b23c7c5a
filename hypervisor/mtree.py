"""Guest-physical layout of a QEMU guest's RAM, from ``info mtree -f`` (pure).

The flat view of the ``memory`` address space lists every guest-physical range with the
memory region that finally backs it and the offset inside that region (QEMU resolves the
``ram-below-4g`` / ``ram-above-4g`` aliases of ``pc.ram`` before printing the flat view,
so a range reads ``0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000``).
Keeping the ranges whose region is one of the guest's RAM backends (``query-memdev``
ids: ``pc.ram`` for plain ``-m``, the memdev id otherwise) gives gpa → (block, offset)
without knowing where the PCI hole is.  ``rom`` ranges of a RAM block (the BIOS area
shadowed read-only by the PAM registers) are still RAM-block pages and are kept.

A *gfn* here is ``gpa >> 12``; gfns in holes (PCI, firmware, I/O) map no block.
Text parsing itself is :func:`hypervisor.qmp.parse_mtree_flat`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hypervisor.qmp import FlatRange, parse_mtree_flat
from memd.errors import CommandFailed
from memd.vocab import PAGE_SHIFT, PAGE_SIZE

_RAM_KINDS = ("ram", "rom")


@dataclass(frozen=True, slots=True)
class RamRange:
    """Guest pages ``[gfn, gfn + pages)`` are block ``block`` from page ``block_page`` on."""

    gfn: int
    pages: int
    block: str
    block_page: int
    readonly: bool


@dataclass(frozen=True)
class RamLayout:
    """Where each guest page lives in the guest's RAM blocks."""

    ranges: tuple[RamRange, ...]
    block_sizes: Mapping[str, int]

    @property
    def nr_gfns(self) -> int:
        """One more than the highest gfn backed by RAM."""
        return max((r.gfn + r.pages for r in self.ranges), default=0)

    @property
    def ram_pages(self) -> int:
        return sum(r.pages for r in self.ranges)

    def locate(self, gfn: int) -> tuple[str, int] | None:
        """(block, page in block) of one gfn, None in a hole."""
        for r in self.ranges:
            if r.gfn <= gfn < r.gfn + r.pages:
                return r.block, r.block_page + gfn - r.gfn
        return None

    def block_pages(self, order: list[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per gfn: index of its block in ``order`` and page in that block (-1, -1 in holes)."""
        n = self.nr_gfns
        block = np.full(n, -1, dtype=np.int64)
        page = np.full(n, -1, dtype=np.int64)
        index = {name: i for i, name in enumerate(order)}
        for r in self.ranges:
            block[r.gfn : r.gfn + r.pages] = index[r.block]
            page[r.gfn : r.gfn + r.pages] = np.arange(r.block_page, r.block_page + r.pages)
        return block, page


def layout_from_ranges(flat: list[FlatRange], block_sizes: Mapping[str, int]) -> RamLayout:
    """Keep the ranges backed by the named RAM blocks; check they fit and do not overlap."""
    ranges = []
    for fr in flat:
        if fr.region not in block_sizes or fr.kind not in _RAM_KINDS:
            continue
        if fr.start % PAGE_SIZE or fr.size % PAGE_SIZE or fr.offset % PAGE_SIZE:
            raise CommandFailed(
                f"RAM range {fr.start:#x}-{fr.last:#x} of {fr.region} is not page aligned",
                command="info mtree -f",
                error_class="UnalignedRam",
            )
        if fr.offset + fr.size > block_sizes[fr.region]:
            raise CommandFailed(
                f"RAM range {fr.start:#x}-{fr.last:#x} runs past the end of {fr.region}",
                command="info mtree -f",
                error_class="RangeOutsideBlock",
            )
        ranges.append(
            RamRange(
                fr.start >> PAGE_SHIFT,
                fr.size >> PAGE_SHIFT,
                fr.region,
                fr.offset >> PAGE_SHIFT,
                fr.kind == "rom",
            )
        )
    ranges.sort(key=lambda r: r.gfn)
    for a, b in itertools.pairwise(ranges):
        if a.gfn + a.pages > b.gfn:
            raise CommandFailed(
                f"RAM ranges overlap at gfn {b.gfn:#x}",
                command="info mtree -f",
                error_class="OverlappingRam",
            )
    return RamLayout(tuple(_merge_adjacent(ranges)), dict(block_sizes))


def _merge_adjacent(ranges: list[RamRange]) -> list[RamRange]:
    """Join ranges that continue each other in both gpa and block (ram/rom splits)."""
    out: list[RamRange] = []
    for r in ranges:
        if out:
            p = out[-1]
            if (
                p.block == r.block
                and p.gfn + p.pages == r.gfn
                and p.block_page + p.pages == r.block_page
            ):
                out[-1] = RamRange(
                    p.gfn, p.pages + r.pages, p.block, p.block_page, p.readonly and r.readonly
                )
                continue
        out.append(r)
    return out


def parse_ram_layout(
    text: str, block_sizes: Mapping[str, int], address_space: str = "memory"
) -> RamLayout:
    """``info mtree -f`` text + RAM block sizes → :class:`RamLayout`."""
    views = parse_mtree_flat(text)
    if address_space not in views:
        raise CommandFailed(
            f"'info mtree -f' shows no address space '{address_space}'",
            command="info mtree -f",
            error_class="NoAddressSpace",
        )
    layout = layout_from_ranges(views[address_space], block_sizes)
    if not layout.ranges:
        raise CommandFailed(
            f"'info mtree -f' maps none of the RAM blocks "
            f"{', '.join(sorted(block_sizes))} into guest memory",
            command="info mtree -f",
            error_class="NoRam",
        )
    return layout
