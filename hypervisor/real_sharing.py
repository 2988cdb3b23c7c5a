"""Guest sharing requests on real QEMU guests: nominate / query / about_to_write over KSM.

The agent's guests speak one protocol whatever the host does underneath
(:class:`memd.agent.dispatch.GuestSharing`).  On a KVM host memd cannot merge frames
itself; KSM does.  So for a real guest:

* **nominate(gfns)** validates each gfn (RAM of *this* guest, page present), makes sure
  the guest's merging is on (unless the operator opted it out: DENIED), records the gfn
  in a small ledger with a fresh handle (a version from a 64-bit counter, as the
  mfn-keyed manager hands out) and the frame it was on, and pokes the steering loop, so
  that ksmd runs fast until the page is merged.  The merge itself is ksmd's.
* **query(gfns)** reads the truth: pagemap PFN, then how many attached guest gfns map
  that frame (for a KSM page, at least its kernel map count).  SHARED (count =
  mappings) when the frame is mapped more than once; NOMINATED when it is in the ledger but not
  merged yet; PRIVATE otherwise; UNKNOWN when the gfn is not RAM or has no frame.
* **about_to_write(gfn)** has nothing to do on the host: the guest's own write breaks
  KSM sharing (copy-on-write in the kernel).  The ledger entry is retired (its handle
  becomes stale), and :meth:`QemuSharing.ledger_report` shows, for every nominated gfn,
  whether the host still agrees (``shared``/``nominated``/``unshared``).

A guest names only its own gfns: the guest name (its channel) picks the QEMU.

Lock: ``_lock`` protects ``_ledger`` and ``_next_version``; pagemap reads happen outside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hypervisor.procmem import KPF_KSM, has_flag
from hypervisor.qemu_machine import QemuGuest, QemuMachine
from memd.errors import MemdError, NoSuchDomain, SharingError
from memd.wire import ShareState, Status


@dataclass(frozen=True)
class Nomination:
    """One ledger entry: the handle given out and the frame the gfn was on then."""

    version: int
    mfn: int


class QemuSharing:
    """GuestSharing for guests attached to a QemuMachine (see the module docstring)."""

    def __init__(self, machine: QemuMachine, *, on_nominate: Callable[[], None] | None = None,
                 opted_out: Callable[[str], bool] | None = None) -> None:
        self.machine = machine
        self._on_nominate = on_nominate
        #: Operator opt-out by VM name (the guest must not switch merging back on).
        self._opted_out = opted_out or (lambda name: False)
        self._lock = threading.Lock()
        self._ledger: dict[tuple[int, int], Nomination] = {}
        self._next_version = 1

    def has_guest(self, name: str) -> bool:
        return any(g.name == name for g in self.machine.guests())

    def _guest(self, name: str) -> QemuGuest | None:
        try:
            return self.machine.guest(name)
        except NoSuchDomain:
            return None

    def _valid(self, g: QemuGuest, gfns: Sequence[int]) -> np.ndarray[Any, np.dtype[np.bool_]]:
        arr = np.asarray(gfns, dtype=np.int64)
        ok = (arr >= 0) & (arr < g.nr_gfns)
        ok[ok] = g.gfn_vaddr[arr[ok]] >= 0
        return ok

    # --- GuestSharing ----------------------------------------------------------------------

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]:
        g = self._guest(guest)
        if g is None or self._opted_out(g.name):
            return [(int(Status.DENIED), 0)] * len(gfns)
        valid = self._valid(g, gfns)
        arr = np.asarray(gfns, dtype=np.int64)
        pfns = np.full(len(arr), -1, dtype=np.int64)
        if valid.any():
            pfns[valid] = self.machine.p2m(g.domid)[arr[valid]]
        if not all(b.merge for b in g.blocks) and (pfns >= 0).any():
            try:
                self.machine.set_merge(g.domid, True)
            except MemdError:
                return [(int(Status.BUSY), 0)] * len(gfns)
        out: list[tuple[int, int]] = []
        with self._lock:
            for gfn, ok, pfn in zip(arr.tolist(), valid.tolist(), pfns.tolist(), strict=True):
                if not ok:
                    out.append((int(Status.INVALID), 0))
                elif pfn < 0:
                    out.append((int(Status.NOT_SHAREABLE), 0))  # no frame: nothing to merge
                else:
                    version = self._next_version
                    self._next_version += 1
                    self._ledger[(g.domid, gfn)] = Nomination(version, pfn)
                    out.append((int(Status.OK), version))
        if self._on_nominate is not None and any(s == Status.OK for s, _ in out):
            self._on_nominate()
        return out

    def query(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]:
        g = self._guest(guest)
        if g is None:
            return [(int(ShareState.UNKNOWN), 0)] * len(gfns)
        arr = np.asarray(gfns, dtype=np.int64)
        valid = self._valid(g, gfns)
        pfns = np.full(len(arr), -1, dtype=np.int64)
        if valid.any():
            pfns[valid] = self.machine.p2m(g.domid)[arr[valid]]
        present = pfns >= 0
        refs = np.zeros(len(arr), dtype=np.int64)
        if present.any():
            truth = self.machine.ground_truth()
            refs[present] = truth.refs_of(pfns[present])
            # A KSM page also shared with processes memd does not watch counts by its
            # kernel map count; a KSM page left with one mapping is not shared.
            ksm_page = has_flag(self.machine.kpages.flags(pfns[present]), KPF_KSM)
            kcount = self.machine.kpages.counts(pfns[present]).astype(np.int64)
            refs[present] = np.maximum(refs[present], np.where(ksm_page, kcount, 0))
        with self._lock:
            nominated = [(g.domid, x) in self._ledger for x in arr.tolist()]
        out: list[tuple[int, int]] = []
        for i in range(len(arr)):
            if not present[i]:
                out.append((int(ShareState.UNKNOWN), 0))
            elif refs[i] >= 2:
                out.append((int(ShareState.SHARED), int(refs[i])))
            elif nominated[i]:
                out.append((int(ShareState.NOMINATED), 1))
            else:
                out.append((int(ShareState.PRIVATE), 1))
        return out

    def about_to_write(self, guest: str, gfn: int) -> None:
        g = self._guest(guest)
        if g is None:
            raise SharingError("this guest has no memory registered for sharing",
                               op="about_to_write", domain=guest, gfn=gfn)
        if not bool(self._valid(g, [gfn])[0]):
            raise NoSuchDomain("gfn out of range", op="about_to_write", domain=guest, gfn=gfn)
        # The write itself unshares (kernel copy-on-write); retire the handle.
        with self._lock:
            self._ledger.pop((g.domid, gfn), None)

    # --- operator --------------------------------------------------------------------------

    def forget(self, domid: int) -> None:
        """Drop a detached guest's ledger entries."""
        with self._lock:
            for key in [k for k in self._ledger if k[0] == domid]:
                del self._ledger[key]

    def pending(self) -> int:
        """Nominated gfns not merged yet (steering boosts while there are any)."""
        with self._lock:
            if not self._ledger:
                return 0
        return int(self.ledger_report(limit=0)["nominated"])

    def ledger_report(self, limit: int = 64) -> dict[str, Any]:
        """Each nominated gfn against the host's truth: shared (frame mapped ≥ 2 times),
        nominated (not merged yet, still on its frame), or unshared (the guest wrote it
        after a merge, or the frame changed: the ledger follows the host)."""
        with self._lock:
            items = sorted(self._ledger.items())
        names = {g.domid: g.name for g in self.machine.guests()}
        items = [(k, n) for k, n in items if k[0] in names]
        if not items:
            return {"entries": 0, "shared": 0, "nominated": 0, "unshared": 0, "sample": []}
        truth = self.machine.ground_truth()
        counts = {"shared": 0, "nominated": 0, "unshared": 0}
        sample: list[dict[str, Any]] = []
        for (domid, gfn), nom in items:
            pfn = int(truth.p2m[domid][gfn]) if domid in truth.p2m else -1
            refs = int(truth.refs_of(np.array([pfn], dtype=np.int64))[0]) if pfn >= 0 else 0
            state = ("shared" if refs >= 2 else "nominated" if pfn == nom.mfn else "unshared")
            counts[state] += 1
            if len(sample) < limit:
                sample.append({"vm": names[domid], "gfn": gfn, "handle": nom.version,
                               "mfn": pfn, "refs": refs, "state": state})
        return {"entries": len(items), **counts, "sample": sample}
