"""A fake KSM knob directory, fake QEMU guests and a fake potential scanner, so that
:class:`hypervisor.ksm_steer.KsmSteering` runs its real code (knob writes, ledger,
progress bookkeeping) without root, QEMU or ksmd.

Realized sharing comes from real p2m arrays (``sharing.ground_truth.compute`` counts
it): the second guest's first ``realized`` gfns map the first guest's frames.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hypervisor.potential import Potential

#: The knob files of a kernel like this host's (6.x), with values unlike steering's.
KNOBS: dict[str, str] = {
    "run": "1",
    "pages_to_scan": "123",
    "sleep_millisecs": "77",
    "smart_scan": "1",
    "advisor_mode": "[none] scan-time",
    "merge_across_nodes": "1",
    "use_zero_pages": "0",
}
COUNTERS: dict[str, str] = {"full_scans": "10", "pages_shared": "0", "pages_sharing": "0"}


def fake_knob_dir(parent: Path) -> Path:
    root = parent / "ksm"
    root.mkdir()
    for name, value in KNOBS.items():
        (root / name).write_text(value + "\n")
        (root / name).chmod(0o644)
    for name, value in COUNTERS.items():
        (root / name).write_text(value + "\n")
        (root / name).chmod(0o444)
    return root


def set_full_scans(root: Path, n: int) -> None:
    (root / "full_scans").write_text(f"{n}\n")


@dataclass
class Block:
    merge: bool = True
    share: bool = False


@dataclass
class FakeGuest:
    domid: int
    name: str
    pid: int
    blocks: list[Block] = field(default_factory=lambda: [Block()])


class FakeMachine:
    """What KsmSteering and the agent's RealGuests use of a QemuMachine."""

    def __init__(self, pages: int = 4096) -> None:
        self.pages = pages
        self._guests: dict[int, FakeGuest] = {}
        self.realized = 0
        self.lock = threading.Lock()

    def attach(
        self, name: str, pid: int, monitor: object = None, *, domid: int | None = None
    ) -> int:
        domid = domid if domid is not None else max(self._guests, default=0) + 1
        self._guests[domid] = FakeGuest(domid, name, pid)
        return domid

    def detach(self, domid: int) -> None:
        del self._guests[domid]

    def guests(self) -> list[FakeGuest]:
        return list(self._guests.values())

    def guest(self, key: int | str) -> FakeGuest:
        for g in self._guests.values():
            if g.domid == key or g.name == key:
                return g
        raise KeyError(key)

    def set_merge(self, domid: int, merge: bool) -> None:
        self._guests[domid].blocks = [Block(merge)]

    def p2m(self, domid: int) -> npt.NDArray[np.int64]:
        """Guest i maps frames i*pages..; the second guest's first ``realized`` gfns map
        the first guest's frames instead: ``realized`` frames saved."""
        order = sorted(self._guests).index(domid)
        pfns = np.arange(self.pages, dtype=np.int64) + order * self.pages
        if order == 1:
            pfns[: self.realized] = np.arange(self.realized)
        return pfns


class FakeScanner:
    """Returns a fixed potential; counts its scans; can hold a scan until released."""

    def __init__(self, machine: FakeMachine, potential: int, mergeable: int) -> None:
        self.machine = machine
        self.potential = potential
        self.mergeable = mergeable
        self.scans = 0
        self.entered = threading.Event()
        self.release: threading.Event | None = None

    def scan(self, domids: Sequence[int] | None = None) -> Potential:
        self.scans += 1
        self.entered.set()
        if self.release is not None:
            self.release.wait(10)
        return Potential(
            vms=(),
            present_pages=self.mergeable,
            distinct_contents=self.mergeable - self.potential,
            zero_pages=0,
            potential_saved_frames=self.potential,
            realized_saved_frames=self.machine.realized,
            realized_shared_frames=0,
            bytes_read=0,
            read_seconds=0.0,
            hash_seconds=0.0,
            seconds=0.0,
            taken_at=0.0,
        )


def as_any(x: object) -> Any:
    """The fakes stand in for QemuMachine / PotentialScanner (duck-typed)."""
    return x
