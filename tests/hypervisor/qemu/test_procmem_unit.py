"""Pure parts of hypervisor.procmem: maps parsing, RAM-block candidates, runs, pagemap bits."""

from __future__ import annotations

import numpy as np

from hypervisor.procmem import (
    PM_PRESENT,
    PM_SWAPPED,
    page_runs,
    parse_maps,
    pfns_of,
    ram_candidates,
)

from .conftest import FIXTURES

MiB = 1 << 20


def test_ram_block_of_a_real_qemu_is_the_one_anonymous_mapping_of_its_size() -> None:
    areas = parse_maps((FIXTURES / "maps-qemu7.2-pc128.txt").read_text())
    assert ram_candidates(areas, 128 * MiB) == [(0x7F937BE00000, 128 * MiB)]
    assert ram_candidates(areas, 1023 * MiB + 1) == []


def test_a_split_mapping_is_found_as_a_run_of_adjacent_areas() -> None:
    text = "\n".join(
        [
            "10000000-10400000 rw-p 00000000 00:00 0",
            "10400000-10800000 rw-p 00000000 00:00 0",  # split by madvise
            "10800000-10801000 ---p 00000000 00:00 0",
            "20000000-20800000 rw-p 00000000 08:01 1234       /tmp/file",
            "30000000-30800000 rw-s 00000000 00:01 99         /memfd:x (deleted)",
        ]
    )
    areas = parse_maps(text)
    assert areas[3].path == "/tmp/file" and not areas[3].anonymous_private
    assert ram_candidates(areas, 8 * MiB) == [(0x10000000, 8 * MiB)]
    assert ram_candidates(areas, 4 * MiB) == [(0x10000000, 4 * MiB), (0x10400000, 4 * MiB)]


def test_page_runs() -> None:
    starts, lengths = page_runs(np.array([5, 6, 7, 9, 10, 3], dtype=np.int64))
    assert starts.tolist() == [0, 3, 5] and lengths.tolist() == [3, 2, 1]
    assert page_runs(np.zeros(0, np.int64))[0].size == 0


def test_pfns_of_keeps_present_frames_only() -> None:
    entries = np.array(
        [PM_PRESENT | 0x1234, 0, PM_SWAPPED | 0x55, PM_PRESENT | (1 << 55) | 7], dtype=np.uint64
    )
    assert pfns_of(entries).tolist() == [0x1234, -1, -1, 7]
