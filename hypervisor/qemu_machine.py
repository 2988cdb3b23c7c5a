"""QemuMachine: the read-only :class:`~sharing.machine.FrameView` over real QEMU processes.

A set of *attached* guests (each a QEMU pid plus a monitor: ``QmpMonitor`` for a QEMU
started by hand, ``LibvirtMonitor`` for a libvirt domain).  On attach the machine learns

1. the guest's RAM blocks from ``query-memdev`` (``pc.ram`` for plain ``-m``),
2. where each gfn lives in those blocks from ``info mtree -f`` (:mod:`hypervisor.mtree`;
   the PCI hole is read, not assumed),
3. where each block lives in the QEMU process: the private anonymous ``rw`` mapping of
   exactly the block's size in ``/proc/<pid>/maps`` (QEMU 7.2 has no HVA column in
   ``info ramblock``); several candidates are told apart by comparing bytes read through
   ``/proc/<pid>/mem`` with the monitor's ``xp``.

From then on: gfn → host virtual address is one array lookup (``gfn_vaddr``), gfn → mfn
is the PFN in ``/proc/<pid>/pagemap`` (root), frame contents come from
``/proc/<pid>/mem`` of a guest that maps the frame, and KSM state from
``/proc/kpageflags`` / ``kpagecount`` and ``/proc/<pid>/ksm_stat``.

What a KSM host cannot do: remap a frame from user space.  So this is a
:class:`~sharing.machine.FrameView`, not a :class:`~sharing.machine.Machine`: merging is
the kernel's (switched per guest with :meth:`QemuMachine.set_merge`), and unsharing is
the guest's own write (copy-on-write in the kernel).

Page types seen here: INVALID (gfn in a hole, or never touched / swapped: no frame),
SHARED (the frame is a KSM page, the zero page, or mapped more than once), RAM otherwise.
Frame owner/mapcount (``frame_info``) count attached guests' gfns only.

Consistency: every query reads the kernel's current state; a query over several guests
reads them one after another, so KSM may act in between (a snapshot, not a lock).
``_lock`` guards only the table of attached guests.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hypervisor.ksm import process_stat
from hypervisor.mtree import RamLayout, parse_ram_layout
from hypervisor.procmem import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    KernelPages,
    ProcessMemory,
    has_flag,
    host_max_pfn,
    pfns_of,
    ram_candidates,
    read_maps,
)
from hypervisor.qmp import Monitor, qom_set_merge, query_memdev
from memd.errors import BackendError, CommandFailed, NoSuchDomain, SharingDenied, SharingError
from memd.vocab import PAGE_SHIFT, PAGE_SIZE
from sharing.ground_truth import GroundTruth, compute
from sharing.machine import (
    DOMID_COW,
    DOMID_FREE,
    DOMID_MAX,
    INVALID_MFN,
    Int32Array,
    Int64Array,
    PageType,
    Uint8Array,
)

#: gfns below 1 MiB: legacy BIOS/VGA area, remapped at run time by the chipset.
_LOW_MEMORY_GFNS = 0x100

_XP_LINE = re.compile(r"^[0-9a-f]+:((?:\s+0x[0-9a-f]{2})+)\s*$")


@dataclass(eq=False)
class RamBlock:
    """One RAM backend of a guest and where it is mapped in the QEMU process."""

    name: str
    size: int
    hva: int
    merge: bool
    share: bool


@dataclass(eq=False)
class QemuGuest:
    """An attached guest.  ``gfn_vaddr[gfn]`` is the QEMU virtual address of the page
    (-1 in holes); fixed at attach (a memory hotplug needs a re-attach)."""

    domid: int
    name: str
    pid: int
    monitor: Monitor
    layout: RamLayout
    blocks: list[RamBlock]
    mem: ProcessMemory
    gfn_vaddr: Int64Array = field(repr=False)

    @property
    def nr_gfns(self) -> int:
        return len(self.gfn_vaddr)


def hmp_read(monitor: Monitor, gpa: int, length: int) -> bytes:
    """``length`` bytes of guest-physical memory through the monitor's ``xp``."""
    text = monitor.hmp(f"xp /{length}xb {gpa:#x}")
    out = bytearray()
    for line in text.splitlines():
        m = _XP_LINE.match(line.strip())
        if m:
            out.extend(int(b, 16) for b in m.group(1).split())
    if len(out) != length:
        raise CommandFailed(
            f"xp of {gpa:#x} on {monitor.target} returned {len(out)} of {length} bytes",
            command="xp",
            error_class="BadHmpOutput",
        )
    return bytes(out)


class QemuMachine:
    """The FrameView protocol over attached QEMU guests (see the module docstring)."""

    def __init__(
        self, *, nr_frames: int | None = None, may_merge: Callable[[str], bool] | None = None
    ) -> None:
        self._guests: dict[int, QemuGuest] = {}
        #: Consent to cross-guest merging by VM name (sharing.consent, given by the agent):
        #: checked whenever merging is switched on, whoever asks.  None: anyone may.
        self._may_merge = may_merge
        self._lock = threading.Lock()
        self._nr_frames = nr_frames if nr_frames is not None else host_max_pfn()
        self._kpages = KernelPages()

    # --- attach / detach ------------------------------------------------------------------

    def attach(self, name: str, pid: int, monitor: Monitor, *, domid: int | None = None) -> int:
        """Start tracking a running QEMU; returns its domid.  Raises BackendError kinds
        when the monitor or /proc refuse, or the RAM mapping cannot be found."""
        if domid is None:
            domid = max(self._guests, default=0) + 1
        if not 0 < domid <= DOMID_MAX or domid in self._guests:
            raise NoSuchDomain(f"domid {domid} is taken or out of range", domain=domid)
        if any(g.name == name for g in self._guests.values()):
            raise BackendError(f"a guest named {name!r} is already attached", target=name)
        memdevs = query_memdev(monitor)
        if not memdevs:  # machines without memdevs: plain -m RAM is still pc.ram
            summary = monitor.execute("query-memory-size-summary")
            sizes = {"pc.ram": int(summary["base-memory"])}
            flags = {"pc.ram": (True, False)}
        else:
            sizes = {m.id: m.size for m in memdevs}
            flags = {m.id: (m.merge, m.share) for m in memdevs}
        layout = parse_ram_layout(monitor.hmp("info mtree -f"), sizes)
        mem = ProcessMemory(pid)
        try:
            areas = read_maps(pid)
            blocks = []
            for block in sorted({r.block for r in layout.ranges}):
                candidates = ram_candidates(areas, sizes[block])
                hva = self._choose_mapping(name, monitor, mem, layout, block, candidates)
                blocks.append(RamBlock(block, sizes[block], hva, *flags[block]))
            index = {b.name: b for b in blocks}
            order = [b.name for b in blocks]
            bidx, bpage = layout.block_pages(order)
            hvas = np.array([index[n].hva for n in order] + [-1], dtype=np.int64)
            vaddr = np.where(bidx >= 0, hvas[bidx] + (bpage << PAGE_SHIFT), -1)
            guest = QemuGuest(
                domid, name, pid, monitor, layout, blocks, mem, vaddr.astype(np.int64)
            )
        except BaseException:
            mem.close()
            raise
        with self._lock:
            self._guests[domid] = guest
        return domid

    def _choose_mapping(
        self,
        name: str,
        monitor: Monitor,
        mem: ProcessMemory,
        layout: RamLayout,
        block: str,
        candidates: list[tuple[int, int]],
    ) -> int:
        if not candidates:
            raise BackendError(
                f"no anonymous mapping of RAM block {block} of {name} in /proc/{mem.pid}/maps",
                target=name,
            )
        if len(candidates) == 1:
            return candidates[0][0]
        matching = [
            hva for hva, _ in candidates if self._matches(monitor, mem, layout, block, hva) is True
        ]
        if len(matching) != 1:
            raise BackendError(
                f"cannot tell which of {len(candidates)} mappings is RAM block {block} of {name}",
                target=name,
            )
        return matching[0]

    @staticmethod
    def _matches(
        monitor: Monitor,
        mem: ProcessMemory,
        layout: RamLayout,
        block: str,
        hva: int,
        samples: int = 4,
    ) -> bool | None:
        """Compare up to ``samples`` non-zero present pages of a candidate mapping with
        the monitor's view; None when there is nothing non-zero to compare."""
        checked = 0
        for r in layout.ranges:
            if r.block != block:
                continue
            base = hva + (r.block_page << PAGE_SHIFT)
            pfn = pfns_of(mem.pagemap(base, r.pages))
            # Skip the first MiB: what the BIOS area maps changes with the PAM registers.
            first = max(0, _LOW_MEMORY_GFNS - r.gfn)
            present = first + np.flatnonzero(pfn[first:] >= 0)
            # Spread the probes: runs of present pages are often all zero (THP-sized).
            probes = (
                present[
                    np.unique(
                        np.linspace(0, len(present) - 1, min(len(present), 256)).astype(np.int64)
                    )
                ]
                if len(present)
                else present
            )
            for i in probes.tolist():
                addr = base + (i << PAGE_SHIFT)
                ours = mem.read(addr, 32).tobytes()
                if not any(ours):
                    continue
                theirs = hmp_read(monitor, (r.gfn + i) << PAGE_SHIFT, 32)
                again = mem.read(addr, 32).tobytes()
                if again != ours:
                    continue  # the guest is writing this page: no evidence either way
                if theirs != ours:
                    return False
                checked += 1
                if checked >= samples:
                    return True
        return True if checked else None

    def verify_mapping(self, domid: int) -> bool | None:
        """Recheck each block's mapping against the monitor's ``xp`` (None: nothing to
        compare yet, e.g. a guest whose RAM is all zero)."""
        g = self.guest(domid)
        results = [self._matches(g.monitor, g.mem, g.layout, b.name, b.hva) for b in g.blocks]
        if any(r is False for r in results):
            return False
        return True if any(r for r in results) else None

    def detach(self, domid: int) -> None:
        """Stop tracking a guest (the VM keeps running)."""
        with self._lock:
            g = self._guests.pop(domid, None)
        if g is None:
            raise NoSuchDomain(f"no attached guest with domid {domid}", domain=domid)
        g.mem.close()

    def close(self) -> None:
        for d in list(self._guests):
            self.detach(d)
        self._kpages.close()

    def guest(self, key: int | str) -> QemuGuest:
        """An attached guest by domid or name."""
        if isinstance(key, int) and key in self._guests:
            return self._guests[key]
        for g in self._guests.values():
            if g.name == key or (isinstance(key, str) and key.isdigit() and g.domid == int(key)):
                return g
        raise NoSuchDomain(f"no attached guest {key!r}", domain=key)

    def guests(self) -> list[QemuGuest]:
        return [self._guests[d] for d in sorted(self._guests)]

    def set_merge(self, domid: int, merge: bool) -> None:
        """Switch KSM merging of every RAM block of the guest (``qom-set ... merge``).
        Turning it off un-merges the guest's pages at once (host memory spike).  Turning
        it on raises SharingDenied when consent (``may_merge``) rules merging out."""
        g = self.guest(domid)
        if merge and self._may_merge is not None and not self._may_merge(g.name):
            raise SharingDenied(
                f"{g.name} may not be merged with other guests: the operator "
                "opted it out, or its guest did not consent (HELLO without "
                "DEDUP_OPT_IN)",
                op="merge",
                domain=g.name,
            )
        for b in g.blocks:
            qom_set_merge(g.monitor, b.name, merge)
            b.merge = merge

    @property
    def kpages(self) -> KernelPages:
        """/proc/kpagecount and /proc/kpageflags, for callers that explain frames."""
        return self._kpages

    def ksm_stat(self, domid: int) -> dict[str, int | str]:
        return process_stat(self.guest(domid).pid)

    # --- protocol: shape ------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return PAGE_SIZE

    @property
    def nr_frames(self) -> int:
        return self._nr_frames

    def domains(self) -> list[int]:
        return sorted(self._guests)

    def nr_gfns(self, domid: int) -> int:
        return self._domain(domid).nr_gfns

    def _domain(self, domid: int) -> QemuGuest:
        g = self._guests.get(domid)
        if g is None:
            raise NoSuchDomain(f"no attached guest with domid {domid}", domain=domid)
        return g

    # --- protocol: p2m --------------------------------------------------------------------

    def p2m(self, domid: int) -> Int64Array:
        """PFN of every gfn of the guest (-1: hole or no frame), read in one pass."""
        g = self._domain(domid)
        return self._pfns(g, np.arange(g.nr_gfns, dtype=np.int64))

    def _pfns(self, g: QemuGuest, gfns: Int64Array) -> Int64Array:
        vaddr = g.gfn_vaddr[gfns]
        mapped = vaddr >= 0
        out = np.full(len(gfns), -1, dtype=np.int64)
        if mapped.any():
            out[mapped] = pfns_of(g.mem.pagemap_at(vaddr[mapped]))
        return out

    def lookup(self, domid: int, gfn: int) -> tuple[int, int]:
        mfns, types = self.lookup_range(domid, gfn, 1)
        return int(mfns[0]), int(types[0])

    def lookup_range(self, domid: int, start: int, count: int) -> tuple[Int64Array, Uint8Array]:
        g = self._domain(domid)
        if start < 0 or count < 0 or start + count > g.nr_gfns:
            raise NoSuchDomain(
                f"gfns {start:#x}+{count} are outside guest {g.name}", domain=domid, gfn=start
            )
        pfns = self._pfns(g, np.arange(start, start + count, dtype=np.int64))
        types = np.full(count, int(PageType.INVALID), dtype=np.uint8)
        present = pfns >= 0
        if present.any():
            flags = self._kpages.flags(pfns[present])
            counts = self._kpages.counts(pfns[present])
            shared = has_flag(flags, KPF_KSM) | has_flag(flags, KPF_ZERO_PAGE) | (counts > 1)
            types[present] = np.where(shared, int(PageType.SHARED), int(PageType.RAM))
        mfns = np.where(present, pfns, INVALID_MFN).astype(np.int64)
        return mfns, types

    # --- protocol: frames -----------------------------------------------------------------

    def ground_truth(self) -> GroundTruth:
        """Per-mfn gfn lists of all attached guests (see :mod:`sharing.ground_truth`)."""
        return compute({d: self.p2m(d) for d in self.domains()})

    def frame_info(self, mfn: int) -> tuple[int, int]:
        owners, counts = self.frame_info_many(np.array([mfn], dtype=np.int64))
        return int(owners[0]), int(counts[0])

    def frame_info_many(self, mfns: Int64Array) -> tuple[Int32Array, Int32Array]:
        truth = self.ground_truth()
        return self._owners(truth, np.asarray(mfns, dtype=np.int64))

    def _owners(self, truth: GroundTruth, mfns: Int64Array) -> tuple[Int32Array, Int32Array]:
        idx = truth.index_of(mfns)
        found = idx >= 0
        refs = np.where(found, truth.refs[np.maximum(idx, 0)], 0).astype(np.int32)
        owner = np.full(len(mfns), DOMID_FREE, dtype=np.int32)
        if found.any():
            first_dom = (
                truth.entry_dom[truth.starts[np.maximum(idx, 0)]]
                if len(truth.entry_dom)
                else np.zeros(len(mfns), np.int64)
            )
            ksm = has_flag(self._kpages.flags(np.where(found, mfns, -1)), KPF_KSM)
            shared = found & ((refs > 1) | ksm)
            owner = np.where(shared, DOMID_COW, np.where(found, first_dom, DOMID_FREE))
        return owner.astype(np.int32), refs

    def frames_owned_by(self, owner: int) -> Int64Array:
        truth = self.ground_truth()
        owners, _ = self._owners(truth, truth.mfns)
        result: Int64Array = truth.mfns[owners == owner].astype(np.int64)
        return result

    def read_frame(self, mfn: int) -> bytes:
        return bytes(self.read_frames(np.array([mfn], dtype=np.int64))[0].tobytes())

    def read_frames(self, mfns: Int64Array) -> Uint8Array:
        """Frames' bytes, read through a guest that maps each one; the mapping is
        re-checked after the read (a frame that moved meanwhile is read again)."""
        mfns = np.asarray(mfns, dtype=np.int64)
        out = np.empty((len(mfns), PAGE_SIZE), dtype=np.uint8)
        todo = np.arange(len(mfns))
        for _ in range(3):
            if len(todo) == 0:
                return out
            truth = self.ground_truth()
            idx = truth.index_of(mfns[todo])
            if (idx < 0).any():
                bad = int(mfns[todo][idx < 0][0])
                raise SharingError(
                    f"frame {bad:#x} is not mapped by any attached guest", op="read_frame", mfn=bad
                )
            doms = truth.entry_dom[truth.starts[idx]]
            gfns = truth.entry_gfn[truth.starts[idx]]
            retry = []
            for d in np.unique(doms).tolist():
                sel = np.flatnonzero(doms == d)
                g = self._guests[d]
                vaddr = g.gfn_vaddr[gfns[sel]]
                order = np.argsort(vaddr, kind="stable")
                pages = g.mem.read_pages(vaddr[order])
                out[todo[sel[order]]] = pages
                after = pfns_of(g.mem.pagemap_at(vaddr[order]))
                retry.extend(todo[sel[order]][after != mfns[todo[sel[order]]]].tolist())
            todo = np.array(sorted(retry), dtype=np.int64)
        if len(todo):
            raise SharingError(
                f"frame {int(mfns[todo[0]]):#x} keeps moving while read",
                op="read_frame",
                mfn=int(mfns[todo[0]]),
            )
        return out

    def read_gfns(self, domid: int, gfns: Int64Array) -> Uint8Array:
        """Guest pages by gfn (holes raise NoSuchDomain); pages with no frame read as
        zero without being populated."""
        g = self._domain(domid)
        gfns = np.asarray(gfns, dtype=np.int64)
        if len(gfns) and (
            gfns.min() < 0 or gfns.max() >= g.nr_gfns or (g.gfn_vaddr[gfns] < 0).any()
        ):
            raise NoSuchDomain(f"a gfn is outside the RAM of guest {g.name}", domain=domid)
        out = np.zeros((len(gfns), PAGE_SIZE), dtype=np.uint8)
        present = np.flatnonzero(self._pfns(g, gfns) >= 0)
        if len(present):
            out[present] = g.mem.read_pages(g.gfn_vaddr[gfns[present]])
        return out

    def frames_equal(self, mfn_a: int, mfn_b: int) -> bool:
        if mfn_a == mfn_b:
            return True
        a, b = self.read_frames(np.array([mfn_a, mfn_b], dtype=np.int64))
        return bool(np.array_equal(a, b))

    # --- protocol: guest activity ---------------------------------------------------------

    def collect_dirty(self, domid: int) -> Int64Array:
        """Every RAM gfn, on every call: this kernel build has no soft-dirty tracking
        (CONFIG_MEM_SOFT_DIRTY), and "all" is a safe over-approximation."""
        g = self._domain(domid)
        return np.flatnonzero(g.gfn_vaddr >= 0).astype(np.int64)
