"""Guest sharing requests on real QEMU guests: nominate / query / about_to_write over KSM.

The agent's guests speak one protocol whatever the host does underneath
(:class:`sharing.guest.GuestSharing`).  On a KVM host memd cannot merge frames
itself; KSM does.  So for a real guest:

* **consent** (:mod:`sharing.consent`): KSM merges a mergeable QEMU's pages with any
  other's, so a guest's merging is on exactly while it merges across guests.  This
  object listens to the agent's ``ConsentBook`` and switches QEMU's ``merge`` property
  when the guest's word or the operator's opt-out changes (:meth:`QemuSharing.enforce`;
  the agent also calls it at attach).  Turning merging *on* is guarded once more in
  ``QemuMachine.set_merge`` (its ``may_merge``), so no other path (``memd optin``,
  steering) can merge a guest that declined.
* **nominate(gfns)** validates each gfn (RAM of *this* guest, page present), makes sure
  the guest's merging is on (SharingDenied when the guest may not merge), records the gfn
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

A guest names only its own gfns: the guest name (its channel) picks the QEMU.  Errors are
``memd.errors`` exceptions (raised, or per gfn of a nominate returned); the agent's
dispatcher maps them to wire statuses.

Lock: ``_lock`` protects ``_ledger`` and ``_next_version``; pagemap reads and QMP calls
happen outside.  Consent listeners run in the thread that changed the word (the agent's
loop thread for a HELLO).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hypervisor.procmem import KPF_KSM, has_flag
from hypervisor.qemu_machine import QemuGuest, QemuMachine
from memd.errors import MemdError, NoSuchDomain, NotShareable, SharingBusy, SharingDenied
from sharing.consent import ConsentBook
from sharing.guest import UNMAPPED, PageSharing

log = logging.getLogger("memd.ksm")


@dataclass(frozen=True)
class Nomination:
    """One ledger entry: the handle given out and the frame the gfn was on then."""

    version: int
    mfn: int


class QemuSharing:
    """GuestSharing for guests attached to a QemuMachine (see the module docstring)."""

    def __init__(
        self,
        machine: QemuMachine,
        *,
        on_nominate: Callable[[], None] | None = None,
        consent: ConsentBook | None = None,
    ) -> None:
        self.machine = machine
        self._on_nominate = on_nominate
        #: The guests' words and the operator's opt-outs (sharing.consent).
        self.consent = consent or ConsentBook()
        self._lock = threading.Lock()
        self._ledger: dict[tuple[int, int], Nomination] = {}
        self._next_version = 1
        self.consent.subscribe(self._consent_changed)

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

    # --- consent -------------------------------------------------------------------------

    def merges(self, name: str) -> bool:
        """:mod:`sharing.consent` for an attached QEMU (attaching it was the operator's yes)."""
        return self.consent.allows(name, attached=True)

    def enforce(self, name: str) -> None:
        """Switch the guest's merging to what consent says, if it is attached and differs.
        Raises what QEMU's monitor raises (BackendError kinds)."""
        g = self._guest(name)
        if g is None:
            return
        want = self.merges(name)
        if want != all(b.merge for b in g.blocks):
            self.machine.set_merge(g.domid, want)

    def _consent_changed(self, name: str) -> None:
        try:
            self.enforce(name)
        except MemdError as err:  # a HELLO must not fail because QMP did
            log.warning("cannot switch merging of %s to match its consent: %s", name, err)

    # --- GuestSharing ----------------------------------------------------------------------

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[int | MemdError]:
        g = self._guest(guest)
        if g is None or not self.merges(g.name):
            denied = SharingDenied(
                "merging is off for this guest (the operator opted it out, or it did not consent)",
                op="nominate",
                domain=guest,
            )
            return [denied] * len(gfns)
        valid = self._valid(g, gfns)
        arr = np.asarray(gfns, dtype=np.int64)
        pfns = np.full(len(arr), -1, dtype=np.int64)
        if valid.any():
            pfns[valid] = self.machine.p2m(g.domid)[arr[valid]]
        if not all(b.merge for b in g.blocks) and (pfns >= 0).any():
            try:
                self.machine.set_merge(g.domid, True)
            except MemdError as err:
                busy = SharingBusy(f"cannot switch merging on: {err}", op="nominate", domain=guest)
                return [busy] * len(gfns)
        out: list[int | MemdError] = []
        with self._lock:
            for gfn, ok, pfn in zip(arr.tolist(), valid.tolist(), pfns.tolist(), strict=True):
                if not ok:
                    out.append(
                        NoSuchDomain(
                            "gfn is not RAM of this guest", op="nominate", domain=guest, gfn=gfn
                        )
                    )
                elif pfn < 0:  # no frame: nothing to merge
                    out.append(
                        NotShareable("the page has no frame", op="nominate", domain=guest, gfn=gfn)
                    )
                else:
                    version = self._next_version
                    self._next_version += 1
                    self._ledger[(g.domid, gfn)] = Nomination(version, pfn)
                    out.append(version)
        if self._on_nominate is not None and any(isinstance(r, int) for r in out):
            self._on_nominate()
        return out

    def query(self, guest: str, gfns: Sequence[int]) -> list[PageSharing]:
        g = self._guest(guest)
        if g is None:
            return [UNMAPPED] * len(gfns)
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
        return [
            PageSharing(True, nominated=nominated[i], count=max(1, int(refs[i])))
            if present[i]
            else UNMAPPED
            for i in range(len(arr))
        ]

    def about_to_write(self, guest: str, gfn: int) -> None:
        g = self._guest(guest)
        if g is None:
            raise SharingDenied(
                "this guest has no memory registered for sharing",
                op="about_to_write",
                domain=guest,
                gfn=gfn,
            )
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
            state = "shared" if refs >= 2 else "nominated" if pfn == nom.mfn else "unshared"
            counts[state] += 1
            if len(sample) < limit:
                sample.append(
                    {
                        "vm": names[domid],
                        "gfn": gfn,
                        "handle": nom.version,
                        "mfn": pfn,
                        "refs": refs,
                        "state": state,
                    }
                )
        return {"entries": len(items), **counts, "sample": sample}
