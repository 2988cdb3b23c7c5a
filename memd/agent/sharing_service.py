"""Sharing as the agent offers it: guests by name, domains by id, scan and audit.

A guest may only name its *own* gfns: the guest's name (its channel) picks the
domain, so ``nominate``/``query``/``about_to_write`` can never reach another guest's
memory.  Operators get ``scan`` (the incremental xxh3 scanner) and ``audit``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from memd.errors import NoSuchDomain, NotFound, NotShareable, SharingError
from memd.wire import ShareState, Status
from sharing.machine import PageType
from sharing.manager import SharingManager
from sharing.scanner import Scanner


class SharingService:
    """Implements the agent's GuestSharing protocol over a SharingManager."""

    def __init__(self, manager: SharingManager, scanner: Scanner | None = None) -> None:
        self.manager = manager
        self.scanner = scanner or Scanner(manager)
        self._domids: dict[str, int] = {}
        self._scan_lock = threading.Lock()  # one scan at a time; the manager locks itself

    # -- binding guests to domains ---------------------------------------------------------

    def bind(self, guest: str, domid: int, *, scan: bool = True) -> None:
        """Associate a guest name with its domain; opt it in to scanning if *scan*."""
        self._domids[guest] = domid
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
            raise NotFound(f"guest {guest!r} has no memory registered for sharing",
                           target=guest) from None

    def guests(self) -> dict[str, int]:
        return dict(self._domids)

    # -- GuestSharing (the guest's own gfns only) ------------------------------------------

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]:
        domid = self._domids.get(guest)
        out: list[tuple[int, int]] = []
        for gfn in gfns:
            if domid is None:
                out.append((int(Status.DENIED), 0))
                continue
            try:
                out.append((int(Status.OK), self.manager.nominate(domid, gfn)))
            except NoSuchDomain:
                out.append((int(Status.INVALID), 0))
            except NotShareable:
                out.append((int(Status.NOT_SHAREABLE), 0))
        return out

    def query(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]:
        domid = self._domids.get(guest)
        machine = self.manager.machine
        out: list[tuple[int, int]] = []
        for gfn in gfns:
            if domid is None or not 0 <= gfn < machine.nr_gfns(domid):
                out.append((int(ShareState.UNKNOWN), 0))
                continue
            mfn, ptype = machine.lookup(domid, gfn)
            if ptype == PageType.SHARED:
                count = len(self.manager.gfns_of(mfn))
                state = ShareState.SHARED if count > 1 else ShareState.NOMINATED
                out.append((int(state), count))
            elif ptype == PageType.RAM:
                out.append((int(ShareState.PRIVATE), 1))
            else:
                out.append((int(ShareState.UNKNOWN), 0))
        return out

    def about_to_write(self, guest: str, gfn: int) -> None:
        domid = self._domids.get(guest)
        if domid is None:
            raise SharingError("this guest has no memory registered for sharing",
                               op="about_to_write", domain=guest, gfn=gfn)
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
        report["guests"] = {names.get(int(d), f"domain {d}"): n
                            for d, n in report["shr_pages"].items()}
        return report

    def stats(self) -> dict[str, Any]:
        stats = self.manager.stats()
        stats["saved_frames"] = stats["nr_saved_mfns"]
        stats["scanning"] = [g for g, d in self._domids.items() if d in self.scanner.enabled]
        return stats


class RealGuestSharing(Protocol):
    """GuestSharing for guests whose memory is a real QEMU's (hypervisor.real_sharing)."""

    def has_guest(self, name: str) -> bool: ...

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]: ...

    def query(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]: ...

    def about_to_write(self, guest: str, gfn: int) -> None: ...


class SharingRouter:
    """The agent's one GuestSharing: a guest whose QEMU is attached goes to the real
    (KSM) backend, any other guest to the simulated machine's SharingService."""

    def __init__(self, sim: SharingService | None = None,
                 real: RealGuestSharing | None = None) -> None:
        self.sim = sim
        self.real = real

    def _real_for(self, guest: str) -> RealGuestSharing | None:
        return self.real if self.real is not None and self.real.has_guest(guest) else None

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]:
        real = self._real_for(guest)
        if real is not None:
            return real.nominate(guest, gfns)
        if self.sim is None:
            return [(int(Status.DENIED), 0)] * len(gfns)
        return self.sim.nominate(guest, gfns)

    def query(self, guest: str, gfns: Sequence[int]) -> list[tuple[int, int]]:
        real = self._real_for(guest)
        if real is not None:
            return real.query(guest, gfns)
        if self.sim is None:
            return [(int(ShareState.UNKNOWN), 0)] * len(gfns)
        return self.sim.query(guest, gfns)

    def about_to_write(self, guest: str, gfn: int) -> None:
        real = self._real_for(guest)
        if real is not None:
            real.about_to_write(guest, gfn)
        elif self.sim is None:
            raise SharingError("this guest has no memory registered for sharing",
                               op="about_to_write", domain=guest, gfn=gfn)
        else:
            self.sim.about_to_write(guest, gfn)
