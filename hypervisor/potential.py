"""Sharing potential of real guests: read and hash every present guest page.

KSM finds duplicates slowly on purpose (a few thousand pages per second at its
defaults).  memd measures the *potential* itself, fast, so that it knows how much
sharing there is to be had and can drive KSM (:mod:`hypervisor.ksm_steer`) until the
*realized* sharing (equal PFNs in pagemap, :mod:`sharing.ground_truth`) catches up.

One scan, for the chosen attached guests:

1. pagemap of every RAM gfn (one pread per guest) → the present pages; pages the guest
   never touched have no frame and are skipped (reading them would map the zero page);
2. each distinct frame is read once (pages KSM already merged share it), through
   ``/proc/<pid>/mem`` in runs of consecutive host addresses into ONE reused buffer of
   ``batch_pages`` pages (a fresh buffer per read costs its page faults); never through
   ``process_vm_readv``, whose page pins make the kernel unshare KSM pages;
3. each page is hashed with xxh3-64 (per page on memoryview slices: no copies);
4. the hashes are grouped with NumPy: ``potential_saved_frames = present pages −
   distinct contents`` — the frames KSM would save if it merged every duplicate,
   within and across guests, zero pages included.

The scan is a snapshot: guests keep running, so a page may change between its pagemap
entry and its read; that only moves the estimate by the pages written meanwhile.  A
64-bit hash collision would count two different pages as one content (probability
~n²/2⁶⁵, < 10⁻⁹ for a million pages); the potential is an estimate for steering, never
used to merge anything.

Realized sharing comes from the same moment's pagemap: ``realized_saved_frames`` is
``sum(refs − 1)`` over frames mapped by ≥ 2 gfns of the scanned guests.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from hypervisor.procmem import page_runs
from hypervisor.qemu_machine import QemuGuest, QemuMachine
from memd.vocab import PAGE_SHIFT, PAGE_SIZE
from sharing.ground_truth import compute

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: 64 MiB per read batch: big preads, and a buffer small enough to keep around.
DEFAULT_BATCH_PAGES = 16384

_ZERO_HASH = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))


@dataclass(frozen=True)
class VmPotential:
    """One guest's share of a scan."""

    name: str
    domid: int
    present: int
    zero: int
    #: Pages whose content also occurs elsewhere (this or another scanned guest).
    duplicate: int
    #: Pages whose content also occurs in another scanned guest.
    cross_vm: int
    #: This guest's share of ``potential_saved_frames`` and ``realized_saved_frames``:
    #: a content (or frame) used by n pages saves n - 1 frames, and each of those pages
    #: is credited (n - 1) / n of them, so the guests' shares add up to the totals.
    potential_saved: float = 0.0
    realized_saved: float = 0.0


@dataclass(frozen=True)
class Potential:
    """Result of one scan (see the module docstring for the figures)."""

    vms: tuple[VmPotential, ...]
    present_pages: int
    distinct_contents: int
    zero_pages: int
    potential_saved_frames: int
    realized_saved_frames: int
    realized_shared_frames: int
    bytes_read: int
    read_seconds: float
    hash_seconds: float
    seconds: float
    taken_at: float = field(default_factory=time.monotonic)

    @property
    def gap(self) -> int:
        """Frames still to be saved (never negative: KSM may be ahead of a stale scan)."""
        return max(0, self.potential_saved_frames - self.realized_saved_frames)

    @property
    def realized_fraction(self) -> float:
        if self.potential_saved_frames <= 0:
            return 1.0
        return min(1.0, self.realized_saved_frames / self.potential_saved_frames)

    @property
    def scan_gb_per_s(self) -> float:
        busy = self.read_seconds + self.hash_seconds
        return self.bytes_read / busy / 1e9 if busy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "present_pages": self.present_pages,
            "distinct_contents": self.distinct_contents,
            "zero_pages": self.zero_pages,
            "potential_saved_frames": self.potential_saved_frames,
            "realized_saved_frames": self.realized_saved_frames,
            "realized_shared_frames": self.realized_shared_frames,
            "gap_frames": self.gap,
            "realized_fraction": round(self.realized_fraction, 4),
            "per_vm": {
                v.name: {
                    "domid": v.domid,
                    "present": v.present,
                    "zero": v.zero,
                    "duplicate": v.duplicate,
                    "cross_vm": v.cross_vm,
                    "potential_saved": round(v.potential_saved, 1),
                    "realized_saved": round(v.realized_saved, 1),
                }
                for v in self.vms
            },
            "bytes_read": self.bytes_read,
            "scan_gb_per_s": round(self.scan_gb_per_s, 3),
            "seconds": round(self.seconds, 4),
        }


class PotentialScanner:
    """Reads + hashes the present pages of attached guests (one scan at a time: the
    read buffer is shared; callers serialise, as the steering loop does)."""

    def __init__(self, machine: QemuMachine, *, batch_pages: int = DEFAULT_BATCH_PAGES) -> None:
        if batch_pages <= 0:
            raise ValueError("batch_pages must be positive")
        self.machine = machine
        self.batch_pages = batch_pages
        self._buffer: npt.NDArray[np.uint8] | None = None
        self.last: Potential | None = None

    def _buf(self) -> npt.NDArray[np.uint8]:
        if self._buffer is None:
            # Touch every page once now (np.zeros would be lazy), so that no scan pays
            # the first-touch faults.
            self._buffer = np.empty(self.batch_pages * PAGE_SIZE, dtype=np.uint8)
            self._buffer.fill(0xA5)
        return self._buffer

    def scan(self, domids: Sequence[int] | None = None) -> Potential:
        """Hash every present page of ``domids`` (default: all attached guests)."""
        t0 = time.perf_counter()
        guests = [
            self.machine.guest(d)
            for d in (domids if domids is not None else self.machine.domains())
        ]
        p2m = {g.domid: self.machine.p2m(g.domid) for g in guests}
        truth = compute(p2m)
        # One read per distinct frame: pages KSM already merged share their frame's hash.
        rep_dom = truth.entry_dom[truth.starts[:-1]]
        rep_gfn = truth.entry_gfn[truth.starts[:-1]]
        frame_hash = np.zeros(truth.nr_frames, dtype=np.uint64)
        read_s = hash_s = 0.0
        for g in guests:
            rows = np.flatnonzero(rep_dom == g.domid)
            h, r, hs = self._hash_gfns(g, rep_gfn[rows])
            frame_hash[rows] = h
            read_s += r
            hash_s += hs
        hashes: list[U64] = []
        realized_share: list[float] = []
        for g in guests:
            pfns = p2m[g.domid]
            rows = truth.index_of(pfns[pfns >= 0])
            hashes.append(frame_hash[rows])
            refs = truth.refs[rows].astype(np.float64)  # gfns mapping each page's frame
            realized_share.append(float(((refs - 1) / refs).sum()))
        all_h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        owner = (
            np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(hashes)])
            if hashes
            else np.zeros(0, np.int64)
        )
        uniq, inverse, counts = np.unique(all_h, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        # Contents seen in more than one guest: count distinct guests per content.
        pairs = (
            np.unique(np.stack([inverse, owner]), axis=1)
            if len(all_h)
            else np.zeros((2, 0), np.int64)
        )
        vms_per_content = np.bincount(pairs[0], minlength=len(uniq)) if len(all_h) else counts
        vms = []
        for i, g in enumerate(guests):
            mine = inverse[owner == i]
            h = hashes[i]
            n = counts[mine].astype(np.float64)  # pages with each page's content
            vms.append(
                VmPotential(
                    g.name,
                    g.domid,
                    len(h),
                    int(np.count_nonzero(h == np.uint64(_ZERO_HASH))),
                    int(np.count_nonzero(counts[mine] >= 2)),
                    int(np.count_nonzero(vms_per_content[mine] >= 2)),
                    potential_saved=float(((n - 1) / n).sum()),
                    realized_saved=realized_share[i],
                )
            )
        result = Potential(
            vms=tuple(vms),
            present_pages=len(all_h),
            distinct_contents=len(uniq),
            zero_pages=int(np.count_nonzero(all_h == np.uint64(_ZERO_HASH))),
            potential_saved_frames=len(all_h) - len(uniq),
            realized_saved_frames=truth.nr_saved_mfns,
            realized_shared_frames=truth.nr_shared_mfns,
            bytes_read=truth.nr_frames * PAGE_SIZE,
            read_seconds=read_s,
            hash_seconds=hash_s,
            seconds=time.perf_counter() - t0,
        )
        self.last = result
        return result

    def _hash_gfns(self, g: QemuGuest, gfns: I64) -> tuple[U64, float, float]:
        """xxh3-64 of each page of ``gfns`` (present pages), read in big runs."""
        out = np.empty(len(gfns), dtype=np.uint64)
        if len(gfns) == 0:
            return out, 0.0, 0.0
        buf = self._buf()
        view = buf.data
        vaddr = g.gfn_vaddr[gfns]
        order = np.argsort(vaddr, kind="stable")
        vaddr = vaddr[order]
        digest = xxhash.xxh3_64_intdigest
        read_s = hash_s = 0.0
        for lo in range(0, len(vaddr), self.batch_pages):
            chunk = vaddr[lo : lo + self.batch_pages]
            starts, lengths = page_runs(chunk >> PAGE_SHIFT)
            t = time.perf_counter()
            g.mem.read_runs_into(chunk[starts], lengths << PAGE_SHIFT, buf)
            t1 = time.perf_counter()
            n = len(chunk)
            out[order[lo : lo + n]] = np.fromiter(
                (digest(view[o : o + PAGE_SIZE]) for o in range(0, n * PAGE_SIZE, PAGE_SIZE)),
                dtype=np.uint64,
                count=n,
            )
            read_s += t1 - t
            hash_s += time.perf_counter() - t1
        return out, read_s, hash_s
