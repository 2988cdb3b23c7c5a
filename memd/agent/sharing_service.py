"""Sharing as the agent offers it: guests by name, domains by id, scan and audit.

A guest may only name its *own* gfns: the guest's name (its channel) picks the
domain, so ``nominate``/``query``/``about_to_write`` can never reach another guest's
memory.  Operators get ``scan`` (the incremental xxh3 scanner) and ``audit``.

Errors are raised (or, per gfn of a NOMINATE, returned) as ``memd.errors`` exceptions;
the dispatcher alone turns them into wire statuses.

Consent (:mod:`sharing.consent`): the service is a listener of the agent's
``ConsentBook``; whenever a bound guest's word or the operator's opt-out changes, and at
``bind``, it tells the manager whether the guest's domain merges across guests
(``SharingManager.set_cross_domain``, which enforces it at every merge).

State: ``_domids`` (guest name → domid) is written by ``bind``/``unbind`` (the
embedding program, before its guests connect) and read by the agent's loop thread; each
access is one dict operation.  ``_scan_lock`` makes scans one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from memd.errors import MemdError, NoSuchDomain, NotFound, NotShareable, SharingDenied
from sharing.consent import ConsentBook
from sharing.guest import UNMAPPED, GuestSharing, PageSharing
from sharing.machine import PageType
from sharing.manager import SharingManager
from sharing.scanner import Scanner


def _unregistered(guest: str, op: str, gfn: int | None = None) -> SharingDenied:
    return SharingDenied(
        "this guest has no memory registered for sharing", op=op, domain=guest, gfn=gfn
    )


class SharingService:
    """The :class:`~sharing.guest.GuestSharing` of simulated guests, over a SharingManager."""

    def __init__(
        self,
        manager: SharingManager,
        scanner: Scanner | None = None,
        *,
        consent: ConsentBook | None = None,
    ) -> None:
        self.manager = manager
        self.scanner = scanner or Scanner(manager)
        #: Whose pages may merge with other guests' (no consent given: nobody's).
        self.consent = consent or ConsentBook()
        self._domids: dict[str, int] = {}
        self._scan_lock = threading.Lock()  # one scan at a time; the manager locks itself
        self.consent.subscribe(self._consent_changed)

    # -- binding guests to domains ---------------------------------------------------------

    def bind(self, guest: str, domid: int, *, scan: bool = True) -> None:
        """Associate a guest name with its domain; opt it in to scanning if *scan*.
        Its pages merge with other guests' only as :mod:`sharing.consent` says."""
        self._domids[guest] = domid
        self.manager.set_cross_domain(domid, self.consent.allows(guest))
        if scan:
            self.scanner.enable(domid)

    def unbind(self, guest: str) -> None:
        domid = self._domids.pop(guest, None)
        if domid is not None:
            self.scanner.disable(domid)

    def set_scanning(self, guest: str, enabled: bool) -> None:
        domid = self.domid(guest)
        if enabled:
            self.scanner.enable(domid)
        else:
            self.scanner.disable(domid)

    def domid(self, guest: str) -> int:
        try:
            return self._domids[guest]
        except KeyError:
            raise NotFound(
                f"guest {guest!r} has no memory registered for sharing", target=guest
            ) from None

    def guests(self) -> dict[str, int]:
        return dict(self._domids)

    def _consent_changed(self, guest: str) -> None:
        domid = self._domids.get(guest)
        if domid is not None:
            self.manager.set_cross_domain(domid, self.consent.allows(guest))

    # -- GuestSharing (the guest's own gfns only) ------------------------------------------

    def has_guest(self, guest: str) -> bool:
        return guest in self._domids

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[int | MemdError]:
        domid = self._domids.get(guest)
        if domid is None:
            return [_unregistered(guest, "nominate")] * len(gfns)
        out: list[int | MemdError] = []
        for gfn in gfns:
            try:
                out.append(self.manager.nominate(domid, gfn))
            except (NoSuchDomain, NotShareable) as err:
                out.append(err)
        return out

    def query(self, guest: str, gfns: Sequence[int]) -> list[PageSharing]:
        domid = self._domids.get(guest)
        machine = self.manager.machine
        out: list[PageSharing] = []
        for gfn in gfns:
            if domid is None or not 0 <= gfn < machine.nr_gfns(domid):
                out.append(UNMAPPED)
                continue
            mfn, ptype = machine.lookup(domid, gfn)
            if ptype == PageType.SHARED:
                out.append(PageSharing(True, nominated=True, count=len(self.manager.gfns_of(mfn))))
            elif ptype == PageType.RAM:
                out.append(PageSharing(True, count=1))
            else:
                out.append(UNMAPPED)
        return out

    def about_to_write(self, guest: str, gfn: int) -> None:
        domid = self._domids.get(guest)
        if domid is None:
            raise _unregistered(guest, "about_to_write", gfn)
        if not 0 <= gfn < self.manager.machine.nr_gfns(domid):
            raise NoSuchDomain("gfn out of range", op="about_to_write", domain=guest, gfn=gfn)
        self.manager.unshare(domid, gfn)

    # -- operator --------------------------------------------------------------------------

    def scan(self) -> dict[str, Any]:
        with self._scan_lock:
            return self.scanner.scan().to_dict()

    def audit(self) -> dict[str, Any]:
        report = self.manager.audit().to_dict()
        names = {d: g for g, d in self._domids.items()}
        report["guests"] = {
            names.get(int(d), f"domain {d}"): n for d, n in report["shr_pages"].items()
        }
        return report

    def stats(self) -> dict[str, Any]:
        stats = self.manager.stats()
        stats["saved_frames"] = stats["nr_saved_mfns"]
        stats["scanning"] = [g for g, d in self._domids.items() if d in self.scanner.enabled]
        return stats


class SharingRouter:
    """The agent's one GuestSharing: a guest whose QEMU is attached goes to the real
    (KSM) backend, any other guest to the simulated machine's SharingService."""

    def __init__(self, sim: GuestSharing | None = None, real: GuestSharing | None = None) -> None:
        self.sim = sim
        self.real = real

    def _backend(self, guest: str) -> GuestSharing | None:
        if self.real is not None and self.real.has_guest(guest):
            return self.real
        return self.sim

    def has_guest(self, guest: str) -> bool:
        return any(b is not None and b.has_guest(guest) for b in (self.real, self.sim))

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[int | MemdError]:
        backend = self._backend(guest)
        if backend is None:
            return [_unregistered(guest, "nominate")] * len(gfns)
        return backend.nominate(guest, gfns)

    def query(self, guest: str, gfns: Sequence[int]) -> list[PageSharing]:
        backend = self._backend(guest)
        if backend is None:
            return [UNMAPPED] * len(gfns)
        return backend.query(guest, gfns)

    def about_to_write(self, guest: str, gfn: int) -> None:
        backend = self._backend(guest)
        if backend is None:
            raise _unregistered(guest, "about_to_write", gfn)
        backend.about_to_write(guest, gfn)
