"""What sharing needs from a hypervisor: a read-only :class:`FrameView` and a :class:`Machine`.

The sharing logic in this package never touches host I/O; it reads and drives a host
through two protocols:

* :class:`FrameView` — read-only: geometry, the p2m (gfn → mfn, type), frame owners
  and mapcounts, frame bytes and the guests' dirty tracking.  What the scanner, the
  audits and the ground truth need.  ``hypervisor.qemu_machine.QemuMachine`` (real
  QEMU guests read through ``/proc``) implements only this: a KSM host cannot move
  frames from user space (the kernel merges, and a guest's own write breaks sharing).
* :class:`Machine` — a :class:`FrameView` whose p2m and frames the
  :class:`sharing.manager.SharingManager` can change: the p2m lock, remapping, frame
  allocation, copy, the copy-on-write fault and domain teardown.
  ``hypervisor.simmachine.SimMachine`` (the embedded default) implements it.

Vocabulary (Xen's): a *domain* (``domid``, a small int) is a guest; a *gfn* is a
guest frame number (index of a page in the guest's memory); an *mfn* is a machine
frame number (a host page).  The p2m maps gfn → (mfn, :class:`PageType`).

Frame ownership mirrors Xen's ``page_info`` owner: a private frame is owned by
its domain, a frame that carries a sharing record is owned by :data:`DOMID_COW`,
and a free frame by :data:`DOMID_FREE`.  ``mapcount`` is the number of p2m entries
(over all domains) that point at a frame: the audit compares it with the length
of the frame's reverse map.

Locking: a :class:`Machine` has one *p2m lock* (:attr:`Machine.lock`).  The mutators
``set_entry``, ``set_frame_owner``, ``alloc_frame``, ``free_frame`` and
``copy_frame`` (and the batch ``set_entries``, ``free_frames``) expect the
caller to hold it; the guests' write path takes it
around each (check type, store bytes) pair.  A sharing manager that holds it for
a whole operation therefore excludes guest writes from its compare-and-merge.
Queries (``lookup``, ``frame_info``, batch queries, reads) take no lock: they
see a consistent state when the caller holds it, a racy snapshot otherwise (a
:class:`FrameView` with no lock, such as a running QEMU's, is always a snapshot).
``collect_dirty`` and ``destroy_domain`` take it themselves (never call them
with it held).

Write notification: the manager registers a handler with
:meth:`Machine.set_write_fault_handler`; a guest write to a SHARED entry must
call it *before* the write lands (the copy-on-write fault) and then retry, so a
write can never modify a shared frame.

Batches: :class:`BatchMachine` adds batch forms of ``lookup``, ``set_entry``
and ``free_frame`` for the manager's batched operations.  A backend need not
implement them: :func:`lookup_many`, :func:`set_entries` and :func:`free_frames`
use the machine's own batch methods when it has them and fall back to the
single-page methods otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from types import TracebackType
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

#: Owner of a frame that carries a sharing record (Xen's ``dom_cow``).
DOMID_COW = 0x7FF1
#: Owner of a free frame.
DOMID_FREE = 0x7FF4
#: Largest domid a guest may have (domids are 15-bit, as in Xen).
DOMID_MAX = 0x7FEF

#: The mfn stored in a p2m entry of type INVALID.
INVALID_MFN = -1


class PageType(IntEnum):
    """Type of a p2m entry."""

    INVALID = 0  #: not mapped (ballooned out, or the domain is being torn down)
    RAM = 1  #: private, writable
    SHARED = 2  #: read-only; the frame has a sharing record; a write faults (CoW)


#: Called by the machine as ``handler(domid, gfn)`` when a guest writes a SHARED page.
WriteFaultHandler = Callable[[int, int], None]

Int64Array = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]
Uint8Array = npt.NDArray[np.uint8]


class LockLike(Protocol):
    """The part of ``threading.Lock`` the sharing manager uses."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class FrameView(Protocol):
    """A host whose guests' frames can be read: the p2m, frame owners, frame bytes.

    All methods raise :class:`memd.errors.NoSuchDomain` for an unknown domid or a gfn
    outside the domain.
    """

    @property
    def page_size(self) -> int:
        """Bytes per frame (4096)."""
        ...

    @property
    def nr_frames(self) -> int:
        """One more than the largest mfn the machine may hand out."""
        ...

    def domains(self) -> list[int]:
        """The live domids."""
        ...

    def nr_gfns(self, domid: int) -> int:
        """Number of gfns of the domain (valid gfns are ``0 .. nr_gfns-1``)."""
        ...

    # --- p2m ---------------------------------------------------------------------------

    def lookup(self, domid: int, gfn: int) -> tuple[int, int]:
        """``(mfn, PageType)`` of one gfn."""
        ...

    def lookup_range(self, domid: int, start: int, count: int) -> tuple[Int64Array, Uint8Array]:
        """Copies of the mfns and types of ``count`` gfns from ``start`` (batch lookup)."""
        ...

    # --- frames ------------------------------------------------------------------------

    def frame_info(self, mfn: int) -> tuple[int, int]:
        """``(owner, mapcount)`` of one frame."""
        ...

    def frame_info_many(self, mfns: Int64Array) -> tuple[Int32Array, Int32Array]:
        """Owners and mapcounts of many frames (batch, for the audit)."""
        ...

    def frames_owned_by(self, owner: int) -> Int64Array:
        """All mfns currently owned by ``owner`` (e.g. :data:`DOMID_COW`)."""
        ...

    def read_frame(self, mfn: int) -> bytes:
        """Copy of a frame's bytes."""
        ...

    def read_frames(self, mfns: Int64Array) -> Uint8Array:
        """Copies of many frames as a ``(len(mfns), page_size)`` uint8 array."""
        ...

    def frames_equal(self, mfn_a: int, mfn_b: int) -> bool:
        """True if the two frames hold the same bytes."""
        ...

    # --- guest activity ----------------------------------------------------------------

    def collect_dirty(self, domid: int) -> Int64Array:
        """Sorted gfns written since the previous call (all gfns on the first call),
        and reset the tracking.  A repoint by the sharing manager is not a write.
        (The one query with a side effect: the scanner is its only consumer.)"""
        ...


@runtime_checkable
class Machine(FrameView, Protocol):
    """A :class:`FrameView` whose frames the sharing manager can remap (see the module
    docstring for the lock)."""

    @property
    def lock(self) -> LockLike:
        """The p2m lock (not re-entrant); see the module docstring."""
        ...

    def set_entry(self, domid: int, gfn: int, mfn: int, ptype: int) -> None:
        """Point gfn at mfn with the given type (repoint/retype); keeps mapcounts.
        Caller holds :attr:`lock`."""
        ...

    def set_frame_owner(self, mfn: int, owner: int) -> None:
        """Hand a frame to a domain or to :data:`DOMID_COW`.  Caller holds :attr:`lock`."""
        ...

    def alloc_frame(self, owner: int) -> int:
        """A free frame (unspecified contents); raises :class:`memd.errors.OutOfFrames`.
        Caller holds :attr:`lock`."""
        ...

    def free_frame(self, mfn: int) -> None:
        """Return a frame that no p2m entry maps any more.  Caller holds :attr:`lock`."""
        ...

    def copy_frame(self, src: int, dst: int) -> None:
        """Copy the bytes of frame ``src`` into frame ``dst``.  Caller holds :attr:`lock`."""
        ...

    # --- guest activity ----------------------------------------------------------------

    def set_write_fault_handler(self, handler: WriteFaultHandler | None) -> None:
        """Register the CoW fault handler (one per machine; None removes it)."""
        ...

    def destroy_domain(self, domid: int) -> None:
        """Free the domain's private frames and forget it.  Shared references must
        have been released first (``SharingManager.destroy_domain``)."""
        ...


@runtime_checkable
class BatchMachine(Machine, Protocol):
    """A :class:`Machine` with batch forms of the per-page calls the manager's
    batched operations make (optional; see the module docstring).  Locking as for
    the single-page forms."""

    def lookup_many(self, domid: int, gfns: Int64Array) -> tuple[Int64Array, Uint8Array]:
        """Mfns and types of the given gfns (any order, repeats allowed).  Raises
        NoSuchDomain if the domain is unknown or any gfn is outside it."""
        ...

    def set_entries(self, domid: int, gfns: Int64Array, mfns: Int64Array, ptype: int) -> None:
        """The end state of :meth:`Machine.set_entry` for each (gfn, mfn) in order (a
        repeated gfn ends on its last mfn).  Caller holds :attr:`Machine.lock`."""
        ...

    def free_frames(self, mfns: Int64Array) -> None:
        """:meth:`Machine.free_frame` of each mfn.  Caller holds :attr:`Machine.lock`."""
        ...


def lookup_many(machine: Machine, domid: int, gfns: Int64Array) -> tuple[Int64Array, Uint8Array]:
    """:meth:`BatchMachine.lookup_many` on any machine (one ``lookup`` per gfn if the
    machine has no batch form)."""
    if isinstance(machine, BatchMachine):
        return machine.lookup_many(domid, gfns)
    mfns = np.empty(len(gfns), dtype=np.int64)
    types = np.empty(len(gfns), dtype=np.uint8)
    for i, gfn in enumerate(gfns.tolist()):
        mfns[i], types[i] = machine.lookup(domid, gfn)
    return mfns, types


def set_entries(
    machine: Machine, domid: int, gfns: Int64Array, mfns: Int64Array, ptype: int
) -> None:
    """:meth:`BatchMachine.set_entries` on any machine (one ``set_entry`` per gfn
    if the machine has no batch form)."""
    if isinstance(machine, BatchMachine):
        machine.set_entries(domid, gfns, mfns, ptype)
        return
    for gfn, mfn in zip(gfns.tolist(), mfns.tolist(), strict=True):
        machine.set_entry(domid, gfn, mfn, ptype)


def free_frames(machine: Machine, mfns: Int64Array) -> None:
    """:meth:`BatchMachine.free_frames` on any machine (one ``free_frame`` per mfn
    if the machine has no batch form)."""
    if isinstance(machine, BatchMachine):
        machine.free_frames(mfns)
        return
    for mfn in mfns.tolist():
        machine.free_frame(mfn)
