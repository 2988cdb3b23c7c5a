"""SharingManager: nominate, share and unshare guest pages, keyed by mfn.

Overview (the design of Xen's ``mem_sharing.c`` after the RFC that dropped the
handle hashtable, with a content check Xen does not make):

* ``nominate(d, gfn)`` turns a private page into a shared frame of one gfn: the
  frame gets a *sharing record* (a fresh 64-bit version, the handle, and a
  reverse map holding (d, gfn)), its owner becomes ``DOMID_COW`` and the p2m entry
  becomes SHARED (read-only: a guest write faults into ``unshare``).
* ``share(src, cli)`` checks both handles against the records the gfns map
  *now*, compares the frames' bytes, moves every gfn of the client frame onto
  the source frame and frees the client frame.
* ``unshare(d, gfn)`` gives the gfn a private page again: in place if it is the
  frame's last gfn, else a copy in a newly allocated frame.
* ``nominate_many`` / ``share_many`` are the batch forms for bulk callers (the
  scanner): per item the handle / None or the exception the single call would
  have raised, with exactly the single calls' outcome in order, at one lock
  hold and one batch lookup per chunk (:mod:`sharing.batch`, which explains why
  its up-front lookups stay exact).
* Consent (:mod:`sharing.consent`): a domain whose guest does not merge across
  guests has its pages merged only with its own.  ``share`` refuses
  (``MergeNotConsented``) any merge that would put gfns of two domains on one
  frame unless both do; ``set_cross_domain(d, False)`` gives every gfn of d that
  sits on such a frame a private copy, under one lock hold, so no merge slips in.

Structures and validity (per mfn, flat arrays sized to the machine's frames):

* ``_version[mfn]`` uint64: 0 = the frame has no sharing record; otherwise the
  record's version, unique for the manager's lifetime (never reused, so a handle
  kept across unshare + free + reallocation of that mfn is detectably stale).
* ``_rmap.head[mfn]``: the record's reverse map; non-empty iff ``_version`` is
  non-zero.  See :mod:`sharing.rmap` for entries and per-domain back pointers.
* ``_home[mfn]`` int32, valid where ``_version`` is non-zero: the one domain all
  the record's gfns belong to, or ``MIXED`` (-1) once a merge brought two domains
  together (it stays MIXED when they part again: conservative, never wrong).
  Every domain with a gfn on a MIXED frame merges across (audited).

Per domain: ``_cross[d]``: d's guest merges across guests (``merges_across``;
``cross_domain_default`` for a domain never set: False in the agent, True for
the pure data-structure tests).

Counters (named as in Xen, recomputed by :func:`sharing.audit.audit`):

* ``nr_shared_mfns``: frames with a sharing record.
* ``nr_saved_mfns``: frames freed by merging = reverse-map entries − records.
* ``shr_pages[d]``: gfns of domain d in SHARED state (its reverse-map entries).
* Invariant: ``sum(shr_pages) == nr_saved_mfns + nr_shared_mfns``.

Locking.  One lock, ``_lock``, protects every field above (``_cross`` is
written under it and read by the merge paths under it), and it is the
machine's p2m lock (``machine.lock``): each operation holds it from its first
lookup to its last remap, and the machine's guest write path takes the same
lock around its (check type, store bytes) pair.  So no guest write can land
between share's byte compare and its merge, nor between nominate's retype and
anything after it; a write to a SHARED page faults into ``unshare`` *without*
the lock and waits for it.  The lock order of a finer-grained design — gfns by
(domain, gfn), then frames by mfn — holds trivially, as one lock covers both
levels.  Why not striped locks: under CPython's GIL these critical sections
are pure Python and cannot run in parallel anyway; one lock costs one acquire
per operation (the machine's mutators then need no lock of their own, which
halves the cost of share), and compare-then-merge of two frames needs both
frames stable, which one lock gives with no ordering hazard.

Domain teardown is incremental: ``teardown_step(d, budget)`` releases at most
``budget`` shared references per lock hold, so a domain holding 100k references
to the zero page does not stall everyone else.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from memd.errors import NotShareable, SharingError
from sharing import batch
from sharing.batch import BATCH_CHUNK, MIXED, SharePair
from sharing.machine import (
    DOMID_COW,
    INVALID_MFN,
    BatchMachine,
    Int64Array,
    Machine,
    PageType,
    Uint8Array,
    lookup_many,
)
from sharing.rmap import NO_ENTRY, ReverseMaps

if TYPE_CHECKING:
    from sharing.audit import AuditReport

_RAM = int(PageType.RAM)
_SHARED = int(PageType.SHARED)
_INVALID = int(PageType.INVALID)


@dataclass
class _Teardown:
    """Progress of an incremental domain teardown."""

    pending: Int64Array  # gfns that held a reverse-map entry when teardown began
    pos: int = 0


class SharingManager:
    """The mfn-keyed page-sharing manager over one :class:`~sharing.machine.Machine`."""

    def __init__(self, machine: Machine, *, cross_domain_default: bool = False) -> None:
        self._machine = machine
        self._lock = machine.lock
        nr = machine.nr_frames
        self._version = array("Q", [0]) * nr
        self._home = array("i", [MIXED]) * nr
        self._cross: dict[int, bool] = {}
        self._cross_default = cross_domain_default
        self._rmap = ReverseMaps(nr)
        self._next_version = 1
        self._nr_shared_mfns = 0
        self._nr_saved_mfns = 0
        self._shr_pages: dict[int, int] = {}
        self._dying: set[int] = set()
        self._teardowns: dict[int, _Teardown] = {}
        # Bound once: these run on every operation.
        self._lookup = machine.lookup
        self._set_entry = machine.set_entry
        self._frames_equal = machine.frames_equal
        self._free_frame = machine.free_frame
        # Batch queries: the machine's own if it has them, else one call per page.
        self._lookup_many: Callable[[int, Int64Array], tuple[Int64Array, Uint8Array]]
        if isinstance(machine, BatchMachine):
            self._lookup_many = machine.lookup_many
        else:
            self._lookup_many = functools.partial(lookup_many, machine)
        machine.set_write_fault_handler(self._write_fault)

    # --- counters -----------------------------------------------------------------------

    @property
    def machine(self) -> Machine:
        return self._machine

    @property
    def nr_shared_mfns(self) -> int:
        return self._nr_shared_mfns

    @property
    def nr_saved_mfns(self) -> int:
        return self._nr_saved_mfns

    def shr_pages(self, domid: int) -> int:
        return self._shr_pages.get(domid, 0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "nr_shared_mfns": self._nr_shared_mfns,
                "nr_saved_mfns": self._nr_saved_mfns,
                "shr_pages": dict(sorted(self._shr_pages.items())),
                "rmap_entries": self._rmap.nr_live,
                "metadata_bytes": self.metadata_bytes(),
            }

    def metadata_bytes(self) -> int:
        """Bytes of sharing metadata held (array capacity included)."""
        return self._rmap.nbytes() + self._version.buffer_info()[1] * self._version.itemsize

    # --- queries ------------------------------------------------------------------------

    def handle_of(self, domid: int, gfn: int) -> int | None:
        """The current handle of a SHARED gfn, None if the gfn is private."""
        with self._lock:
            mfn, ptype = self._machine.lookup(domid, gfn)
            return self._version[mfn] if ptype == _SHARED else None

    def gfns_of(self, mfn: int) -> list[tuple[int, int]]:
        """The reverse map of a shared frame: the (domid, gfn) pairs mapping it."""
        with self._lock:
            if mfn >= len(self._version) or self._version[mfn] == 0:
                return []
            return self._rmap.gfns(mfn)

    def records(self) -> dict[int, list[tuple[int, int]]]:
        """Every sharing record: mfn → its reverse map, taken under one lock hold."""
        with self._lock:
            versions = np.frombuffer(self._version, dtype=np.uint64)
            return {int(m): self._rmap.gfns(int(m)) for m in np.flatnonzero(versions).tolist()}

    # --- consent (sharing.consent) -----------------------------------------------------

    def merges_across(self, domid: int) -> bool:
        """True if the domain's pages may share frames with other domains' pages."""
        return self._cross.get(domid, self._cross_default)

    def set_cross_domain(self, domid: int, allowed: bool) -> int:
        """Let the domain's pages merge with other domains' pages, or stop it.

        Stopping gives every gfn of the domain that sits on a frame another domain
        may map (``MIXED``) a private page, in the same lock hold, so no merge can
        slip in between; returns how many gfns that unshared.  Raises OutOfFrames
        (the domain stays closed; the gfns not yet unshared stay on their frames, and
        the audit lists them)."""
        with self._lock:
            self._cross[domid] = allowed
            if allowed:
                return 0
            slot = self._rmap.slot.get(domid)
            if slot is None:
                return 0
            gfns = np.flatnonzero(np.frombuffer(slot, dtype=np.int32) != NO_ENTRY)
            if len(gfns) == 0:
                return 0
            mfns, _ = self._lookup_many(domid, gfns.astype(np.int64))
            home = np.frombuffer(self._home, dtype=np.int32)
            mixed = gfns[home[mfns] == MIXED]
            for gfn in mixed.tolist():
                self._unshare_locked(domid, gfn)
            return len(mixed)

    # --- nominate -----------------------------------------------------------------------

    def nominate(self, domid: int, gfn: int) -> int:
        """Make a page shareable and return its handle.

        A private page gets a new sharing record with a fresh version; a page that
        is already shared returns its record's current version (as Xen does).
        Raises NoSuchDomain (unknown domain, gfn out of range) and NotShareable
        (unmapped page, page with other references, domain being torn down)."""
        with self._lock:
            return self._nominate_locked(domid, gfn)

    def nominate_many(
        self, domid: int, gfns: Iterable[int], chunk: int = BATCH_CHUNK
    ) -> list[int | SharingError]:
        """:meth:`nominate` of each gfn of one domain, in order: per gfn its handle
        or the exception nominate would have raised (NoSuchDomain, NotShareable).

        Same result as one nominate per gfn; the lock is taken once per ``chunk``
        gfns, the p2m and frame tables are read in one batch per chunk
        (:mod:`sharing.batch`)."""
        return batch.nominate_many(self, domid, gfns, chunk)

    def _nominate_locked(self, domid: int, gfn: int) -> int:
        mfn, ptype = self._lookup(domid, gfn)
        if ptype == _SHARED:
            return self._version[mfn]
        if domid in self._dying:
            raise NotShareable(
                f"domain {domid} is being torn down", op="nominate", domain=domid, gfn=gfn
            )
        if ptype != _RAM:
            raise NotShareable(
                f"gfn {gfn:#x} of domain {domid} is not mapped",
                op="nominate",
                domain=domid,
                gfn=gfn,
            )
        owner, mapcount = self._machine.frame_info(mfn)
        if owner != domid or mapcount != 1:
            raise NotShareable(
                f"frame {mfn:#x} has other references (owner {owner}, {mapcount} maps)",
                op="nominate",
                domain=domid,
                gfn=gfn,
                mfn=mfn,
            )
        return self._new_record_locked(domid, gfn, mfn)

    def _new_record_locked(self, domid: int, gfn: int, mfn: int) -> int:
        """Give a private frame (owned by domid, mapped once) a sharing record."""
        m = self._machine
        if mfn >= len(self._version):
            self._grow(m.nr_frames)
        rmap = self._rmap
        if domid not in rmap.slot:
            rmap.add_domain(domid, m.nr_gfns(domid))
        version = self._next_version
        self._next_version = version + 1
        m.set_frame_owner(mfn, DOMID_COW)
        try:
            self._set_entry(domid, gfn, mfn, _SHARED)
        except BaseException:
            m.set_frame_owner(mfn, domid)
            raise
        self._version[mfn] = version
        self._home[mfn] = domid
        rmap.add(mfn, domid, gfn)
        self._nr_shared_mfns += 1
        self._shr_pages[domid] = self._shr_pages.get(domid, 0) + 1
        return version

    # --- share --------------------------------------------------------------------------

    def share(
        self,
        source_domain: int,
        source_gfn: int,
        source_handle: int,
        client_domain: int,
        client_gfn: int,
        client_handle: int,
    ) -> None:
        """Merge the client page into the source page.

        Both handles must name the records their gfns map now.  Raises
        StaleSourceHandle / StaleClientHandle (handle no longer current, or the
        gfn is no longer shared), ContentMismatch (bytes differ: nothing changes),
        NoSuchDomain.  Sharing a page with itself is a successful no-op."""
        lock = self._lock
        lock.acquire()  # explicit acquire/release: half the cost of ``with`` here
        try:
            self._share_locked(
                source_domain, source_gfn, source_handle, client_domain, client_gfn, client_handle
            )
        finally:
            lock.release()

    def share_many(
        self, pairs: Iterable[SharePair], chunk: int = BATCH_CHUNK
    ) -> list[SharingError | None]:
        """:meth:`share` of each ``(source_domain, source_gfn, source_handle,
        client_domain, client_gfn, client_handle)``, in order: per pair None or the
        exception share would have raised (StaleSourceHandle, StaleClientHandle,
        ContentMismatch, NoSuchDomain).

        Same outcome as one share per pair, pairs that depend on earlier ones in
        the batch included.  The lock is held for ``chunk`` pairs at a time, so
        each pair's compare and merge still happen under one hold; the gfns of a
        chunk are looked up in one batch per domain (:mod:`sharing.batch`)."""
        return batch.share_many(self, pairs, chunk)

    def _share_locked(
        self,
        source_domain: int,
        source_gfn: int,
        source_handle: int,
        client_domain: int,
        client_gfn: int,
        client_handle: int,
    ) -> None:
        lookup = self._lookup
        version = self._version
        smfn, stype = lookup(source_domain, source_gfn)
        if stype != _SHARED or version[smfn] != source_handle:
            raise batch.stale_source(source_domain, source_gfn, smfn, source_handle)
        cmfn, ctype = lookup(client_domain, client_gfn)
        if ctype != _SHARED or version[cmfn] != client_handle:
            raise batch.stale_client(client_domain, client_gfn, cmfn, client_handle)
        if smfn == cmfn:
            return
        if not self._frames_equal(smfn, cmfn):
            raise batch.mismatch(smfn, cmfn, client_domain, client_gfn, client_handle)
        if not self._may_merge_locked(smfn, cmfn):
            raise batch.not_consented(smfn, cmfn, client_domain, client_gfn, client_handle)
        self._merge_locked(smfn, cmfn, client_domain, client_gfn)

    def _may_merge_locked(self, smfn: int, cmfn: int) -> bool:
        """Consent: may the two records' gfns share one frame?  (A MIXED frame holds
        only gfns of domains that merge across.)"""
        hs, hc = self._home[smfn], self._home[cmfn]
        if hs == hc and hs != MIXED:
            return True  # one domain's own duplicates
        return (hs == MIXED or self.merges_across(hs)) and (hc == MIXED or self.merges_across(hc))

    def _merge_locked(self, smfn: int, cmfn: int, client_domain: int, client_gfn: int) -> None:
        """Move every gfn of the client frame onto the source frame; free the client."""
        moved = self._rmap.splice(cmfn, smfn)
        if self._home[smfn] != self._home[cmfn]:
            self._home[smfn] = MIXED
        set_entry = self._set_entry
        if len(moved) == 1:
            set_entry(client_domain, client_gfn, smfn, _SHARED)
        else:
            dom = self._rmap.dom
            gfn = self._rmap.gfn
            for e in moved:
                set_entry(dom[e], gfn[e], smfn, _SHARED)
        self._version[cmfn] = 0
        self._free_frame(cmfn)
        self._nr_shared_mfns -= 1
        self._nr_saved_mfns += 1

    # --- unshare ------------------------------------------------------------------------

    def unshare(self, domid: int, gfn: int) -> bool:
        """Give a shared gfn a private page again; False if it was not shared.

        The frame's last gfn becomes private in place (no copy, no allocation);
        otherwise a new frame is allocated, filled and mapped.  Raises OutOfFrames
        (every structure and counter unchanged) and NoSuchDomain."""
        with self._lock:
            return self._unshare_locked(domid, gfn)

    def _unshare_locked(self, domid: int, gfn: int) -> bool:
        m = self._machine
        mfn, ptype = m.lookup(domid, gfn)
        if ptype != _SHARED:
            return False
        rmap = self._rmap
        e = self._entry_of(domid, gfn, mfn)
        if rmap.is_single(mfn, e):
            rmap.remove(mfn, e)
            self._version[mfn] = 0
            m.set_frame_owner(mfn, domid)
            m.set_entry(domid, gfn, mfn, _RAM)
            self._nr_shared_mfns -= 1
        else:
            new = m.alloc_frame(domid)  # OutOfFrames: nothing has changed yet
            rmap.remove(mfn, e)
            self._nr_saved_mfns -= 1
            try:
                m.copy_frame(mfn, new)
                m.set_entry(domid, gfn, new, _RAM)
            except BaseException:
                # Restore every structure and counter, then give the frame back.
                rmap.relink(mfn, e)
                self._nr_saved_mfns += 1
                m.set_frame_owner(new, domid)
                m.free_frame(new)
                raise
        self._shr_pages[domid] -= 1
        return True

    def _write_fault(self, domid: int, gfn: int) -> None:
        """The machine's copy-on-write fault: a guest wrote a SHARED page."""
        self.unshare(domid, gfn)

    # --- teardown -----------------------------------------------------------------------

    def teardown_step(self, domid: int, budget: int = 4096) -> int:
        """Release up to ``budget`` of the domain's shared references; returns how
        many remain (0 = done).  The first call marks the domain dying (no more
        nominations).  Raises NoSuchDomain for an unknown domain."""
        m = self._machine
        with self._lock:
            td = self._teardowns.get(domid)
            if td is None:
                m.nr_gfns(domid)  # NoSuchDomain if unknown
                self._dying.add(domid)
                slot = self._rmap.slot.get(domid)
                pending = (
                    np.flatnonzero(np.frombuffer(slot, dtype=np.int32) >= 0)
                    if slot is not None
                    else np.zeros(0, dtype=np.int64)
                )
                td = self._teardowns[domid] = _Teardown(pending.astype(np.int64))
            end = min(td.pos + max(budget, 1), len(td.pending))
            for gfn in td.pending[td.pos : end].tolist():
                self._release_locked(domid, gfn)
            td.pos = end
            remaining = len(td.pending) - end
            if remaining == 0:
                self._rmap.drop_domain(domid)
                self._shr_pages.pop(domid, None)
            return remaining

    def destroy_domain(self, domid: int, budget: int = 4096) -> None:
        """Release all the domain's shared references in steps of ``budget`` (the
        lock is dropped between steps), then destroy it on the machine."""
        while self.teardown_step(domid, budget):
            pass
        self._machine.destroy_domain(domid)  # takes the machine lock itself
        with self._lock:
            self._teardowns.pop(domid, None)
            self._dying.discard(domid)
            self._cross.pop(domid, None)

    def _release_locked(self, domid: int, gfn: int) -> None:
        """Drop one shared reference without copying (the gfn is going away)."""
        slot = self._rmap.slot[domid]
        e = slot[gfn]
        if e == NO_ENTRY:
            return  # unshared since teardown began
        m = self._machine
        mfn, _ = m.lookup(domid, gfn)
        last = self._rmap.remove(mfn, e)
        m.set_entry(domid, gfn, INVALID_MFN, _INVALID)
        self._shr_pages[domid] -= 1
        if last:
            self._version[mfn] = 0
            self._nr_shared_mfns -= 1
            m.free_frame(mfn)
        else:
            self._nr_saved_mfns -= 1

    # --- audit --------------------------------------------------------------------------

    def audit(self) -> AuditReport:
        """Recompute every structure and counter; see :func:`sharing.audit.audit`."""
        from sharing.audit import audit

        return audit(self)

    # --- helpers ------------------------------------------------------------------------

    def _entry_of(self, domid: int, gfn: int, mfn: int) -> int:
        slot = self._rmap.slot.get(domid)
        e = NO_ENTRY if slot is None else slot[gfn]
        if e == NO_ENTRY:
            raise SharingError(
                f"gfn {gfn:#x} of domain {domid} is SHARED but has no reverse-map entry",
                op="unshare",
                domain=domid,
                gfn=gfn,
                mfn=mfn,
            )
        return e

    def _grow(self, nr_frames: int) -> None:
        if nr_frames > len(self._version):
            grow = nr_frames - len(self._version)
            self._version.extend(array("Q", [0]) * grow)
            self._home.extend(array("i", [MIXED]) * grow)
            self._rmap.ensure_frames(nr_frames)
