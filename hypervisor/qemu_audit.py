"""``memd audit`` on real guests: host ground truth, and a ledger checked against it.

:func:`audit_report` reads every attached guest's pagemap once (through
:meth:`QemuMachine.ground_truth`), adds kpageflags/kpagecount and contents for the
most-referenced frames, KSM counters, and — when given a sharing manager — compares
the manager's ledger (its sharing records and their gfn lists) with the truth.
:func:`explain_gfn` tells the whole story of one guest page.  Both return plain dicts
(JSON-ready, ints and strings only) for the agent and the CLI.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import xxhash

from hypervisor import ksm
from hypervisor.procmem import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PM_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAPPED,
    flag_names,
    has_flag,
)
from hypervisor.qemu_machine import QemuMachine
from memd.errors import BackendError, NoSuchDomain, SharingError
from memd.vocab import PAGE_SHIFT
from sharing.ground_truth import GroundTruth, Ledger, compare_ledger, untracked_shared

#: Frames listed under ``top_frames``, and gfns listed per frame there.
TOP_FRAMES = 10
SAMPLE_GFNS = 8

_VM_GFN = re.compile(r"^(?P<vm>.+):(?P<gfn>(?:0x)?[0-9a-fA-F]+)$")


def parse_vm_gfn(text: str) -> tuple[str, int]:
    """``VM:GFN`` (gfn decimal, or hex with 0x) → (vm, gfn); ValueError with one sentence."""
    m = _VM_GFN.match(text.strip())
    if m is None:
        raise ValueError(f"'{text}' is not VM:GFN (for example web1:0x1f2)")
    raw = m["gfn"]
    try:
        gfn = int(raw, 16) if raw.lower().startswith("0x") else int(raw, 10)
    except ValueError:
        raise ValueError(f"'{raw}' is not a gfn (decimal, or hex with 0x)") from None
    return m["vm"], gfn


def ledger_of(manager: Any) -> Ledger:
    """The manager's sharing records as mfn → [(domain, gfn)]."""
    return dict(manager.records())


def audit_report(
    machine: QemuMachine, manager: Any | None = None, *, top: int = TOP_FRAMES
) -> dict[str, Any]:
    """Ground truth of sharing across the attached guests; see docs/real-guests.md."""
    t0 = time.perf_counter()
    truth = machine.ground_truth()
    guests = machine.guests()
    names = {g.domid: g.name for g in guests}
    flags = machine.kpages.flags(truth.mfns)
    ksm_frames = int(np.count_nonzero(has_flag(flags, KPF_KSM)))
    per_dom = truth.per_domain()
    per_vm: dict[str, Any] = {}
    for g in guests:
        entry: dict[str, Any] = {
            "domid": g.domid,
            "pid": g.pid,
            **per_dom[g.domid],
            "merge": all(b.merge for b in g.blocks),
        }
        try:
            stat = machine.ksm_stat(g.domid)
            entry["ksm_stat"] = {k: v for k, v in stat.items() if isinstance(v, int)}
        except BackendError:
            entry["ksm_stat"] = None
        per_vm[g.name] = entry
    report: dict[str, Any] = {
        "source": "pagemap",
        "frames": {
            "mapped": truth.nr_frames,
            "shared": truth.nr_shared_mfns,
            "saved": truth.nr_saved_mfns,
            "ksm": ksm_frames,
        },
        "per_vm": per_vm,
        "matrix": {"vms": [names[d] for d in truth.domids], "frames": truth.matrix().tolist()},
        "top_frames": _top_frames(machine, truth, names, top),
        "ksm": _ksm_counters(),
        "ledger": None,
        "discrepancies": [],
    }
    if manager is not None:
        ledger = ledger_of(manager)
        report["ledger"] = _ledger_section(truth, ledger, manager)
        report["discrepancies"] = report["ledger"]["findings"]
    report["seconds"] = round(time.perf_counter() - t0, 4)
    return report


def _ksm_counters() -> dict[str, Any] | None:
    try:
        return {**ksm.counters(), "run": ksm.get("run")}
    except BackendError:
        return None


def _top_frames(
    machine: QemuMachine, truth: GroundTruth, names: dict[int, str], k: int
) -> list[dict[str, Any]]:
    rows = truth.top(k)
    if len(rows) == 0:
        return []
    mfns = truth.mfns[rows]
    flags = machine.kpages.flags(mfns)
    counts = machine.kpages.counts(mfns)
    try:
        contents = machine.read_frames(mfns)
        zero = [bool(not page.any()) for page in contents]
    except (BackendError, SharingError):
        # Running guests move pages: a top frame may be gone since the pagemap read.  The
        # zero column is best effort; the audit itself must not fail on it.
        zero = [False] * len(rows)
    out = []
    for i, row in enumerate(rows.tolist()):
        out.append(
            {
                "mfn": int(mfns[i]),
                "refs": int(truth.refs[row]),
                "zero": zero[i],
                "ksm": bool(flags[i] >> np.uint64(KPF_KSM) & np.uint64(1)),
                "zero_page_flag": bool(flags[i] >> np.uint64(KPF_ZERO_PAGE) & np.uint64(1)),
                "kpagecount": int(counts[i]),
                "vms": {names[d]: n for d, n in truth.refs_by_domain(row).items()},
                "sample": [[names[d], g] for d, g in truth.gfns_of(int(mfns[i]), SAMPLE_GFNS)],
            }
        )
    return out


def _ledger_section(truth: GroundTruth, ledger: Ledger, manager: Any) -> dict[str, Any]:
    findings, truncated = compare_ledger(truth, ledger)
    mfns = np.fromiter(ledger.keys(), dtype=np.int64, count=len(ledger))
    refs = truth.refs_of(mfns)
    want_shared = int(np.count_nonzero(refs >= 1))
    want_saved = int(np.maximum(refs - 1, 0).sum())
    stats = manager.stats() if hasattr(manager, "stats") else {}
    for name, want in (("nr_shared_mfns", want_shared), ("nr_saved_mfns", want_saved)):
        have = stats.get(name)
        if have is not None and have != want:
            findings.append(
                {
                    "kind": f"counter_{name}",
                    "message": f"the ledger's {name} is "
                    f"{have}, the host shows {want} on the ledger's frames",
                    "expected": want,
                    "found": have,
                }
            )
    return {
        "records": len(ledger),
        "entries": sum(len(v) for v in ledger.values()),
        "counters": {
            k: v for k, v in stats.items() if k in ("nr_shared_mfns", "nr_saved_mfns", "shr_pages")
        },
        "truth_on_ledger_frames": {"nr_shared_mfns": want_shared, "nr_saved_mfns": want_saved},
        "untracked_shared_frames": untracked_shared(truth, ledger),
        "findings": findings,
        "truncated": truncated,
        "clean": not findings and not truncated,
    }


def explain_gfn(
    machine: QemuMachine, vm: int | str, gfn: int, manager: Any | None = None
) -> dict[str, Any]:
    """Everything about one guest page: where it lives, its frame, who else maps it."""
    g = machine.guest(vm)
    if not 0 <= gfn < g.nr_gfns or g.gfn_vaddr[gfn] < 0:
        raise NoSuchDomain(
            f"gfn {gfn:#x} is not RAM of guest {g.name} (RAM gfns end at "
            f"{g.nr_gfns:#x}; holes are PCI/firmware)",
            domain=g.name,
            gfn=gfn,
        )
    block, page = g.layout.locate(gfn) or ("", -1)
    vaddr = int(g.gfn_vaddr[gfn])
    raw = int(g.mem.pagemap(vaddr, 1)[0])
    present = bool(raw & PM_PRESENT)
    out: dict[str, Any] = {
        "vm": g.name,
        "domid": g.domid,
        "gfn": gfn,
        "gpa": gfn << PAGE_SHIFT,
        "block": block,
        "block_offset": page << PAGE_SHIFT,
        "hva": vaddr,
        "pagemap": {
            "raw": f"{raw:#018x}",
            "present": present,
            "swapped": bool(raw & PM_SWAPPED),
            "exclusive": bool(raw & PM_EXCLUSIVE),
            "soft_dirty": bool(raw & PM_SOFT_DIRTY),
        },
        "mfn": None,
        "state": "swapped" if raw & PM_SWAPPED else "not present",
    }
    if present:
        mfn = raw & PM_PFN_MASK
        arr = np.array([mfn], dtype=np.int64)
        flags = int(machine.kpages.flags(arr)[0])
        truth = machine.ground_truth()
        names = {x.domid: x.name for x in machine.guests()}
        page_bytes = machine.read_gfns(g.domid, np.array([gfn], dtype=np.int64))[0]
        refs = int(truth.refs_of(arr)[0])
        out.update(
            {
                "mfn": mfn,
                "kpagecount": int(machine.kpages.counts(arr)[0]),
                "kpageflags": flag_names(flags),
                "refs": refs,
                "mapped_by": [
                    {"vm": names[d], "gfn": x}
                    for d, x in truth.gfns_of(mfn, 64)
                    if (d, x) != (g.domid, gfn)
                ],
                "mapped_by_count": max(0, refs - 1),
                "content": {
                    "zero": bool(not page_bytes.any()),
                    "xxh3_64": f"{xxhash.xxh3_64_intdigest(page_bytes.tobytes()):#018x}",
                },
            }
        )
        if flags >> KPF_ZERO_PAGE & 1:
            out["state"] = "zero page"
        elif flags >> KPF_KSM & 1:
            out["state"] = f"shared (KSM frame, {refs} guest mappings)"
        elif refs > 1:
            out["state"] = f"shared ({refs} guest mappings)"
        else:
            out["state"] = "private"
    if manager is not None:
        ledger = ledger_of(manager)
        where = [m for m, gfns in ledger.items() if (g.domid, gfn) in gfns]
        out["ledger"] = {
            "listed": bool(where),
            "mfn": where[0] if where else None,
            "agrees": (where[0] == out["mfn"])
            if where
            else out["state"] in ("private", "not present", "swapped"),
        }
    return out
