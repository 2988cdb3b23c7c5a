"""The CLI's output for people: tables and summaries of the agent's JSON results.

Pure functions from a command's result (what ``--json`` prints) to text; memd.cli
picks one per command.  No I/O.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any


def human_size(n: int) -> str:
    """Bytes as the CLI takes them back: 512M, 1.5G, 16K, 100B."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}B"


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def kv(d: dict[str, Any], indent: str = "") -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(kv(v, indent + "  "))
        elif isinstance(v, list):  # people read "a, b, c", not a Python list
            lines.append(f"{indent}{k:24} {', '.join(map(str, v)) or '-'}")
        else:
            lines.append(f"{indent}{k:24} {v}")
    return "\n".join(lines)


def format_audit(r: dict[str, Any]) -> str:
    out = [f"audit: {'clean' if r['clean'] else 'NOT CLEAN'} ({r['errors']} discrepancies)"]
    t = r["tmem"]
    out.append(f"  tmem     {'clean' if t['clean'] else str(t['errors']) + ' errors'}")
    out += [f"    - {f}" for f in t["findings"]]
    s = r.get("sharing")
    if s:
        out.append(
            f"  sharing  {'clean' if s['clean'] else str(s['errors']) + ' errors'}: "
            f"{s['nr_shared_mfns']} shared frames, {s['nr_saved_mfns']} saved, "
            f"{s['rmap_entries']} reverse-map entries"
        )
        for guest, n in s.get("guests", {}).items():
            out.append(f"    {guest:20} {n} shared pages")
        out += [f"    - {f['kind']}: {f['message']}" for f in s["findings"]]
    if r.get("realized"):
        out += _format_realized(r["realized"])
    return "\n".join(out)


def format_status(r: dict[str, Any]) -> str:
    t = r["tmem"]
    budget = t["budget_bytes"]
    used = f"{human_size(t['used_bytes'])} ({t['used_bytes'] / budget:.1%})" if budget else "-"
    out = [
        f"agent     {r['runstate']}, up {r['uptime_s']} s, {r['guests']} guests attached "
        f"({r['connected']} connected)",
        f"tmem      budget {human_size(budget)}, used {used}; {t['pages']} pages "
        f"({t['ephemeral_pages']} ephemeral, {t['persistent_pages']} persistent), "
        f"{t['dedup_hits']} dedup hits",
    ]
    store = r.get("store")
    out.append(
        "store     none: persistent pages die with the agent"
        if store is None
        else f"store     {store['path']}, {human_size(store['bytes_used'])} in use, file "
        f"{human_size(store['file_bytes'])}"
        f"{', durable (fsync per commit)' if store['durable'] else ''}"
    )
    if r.get("metrics"):
        out.append(f"metrics   {r['metrics']}")
    unattached = r.get("unattached_clients") or []
    if unattached:
        out.append(
            f"          {len(unattached)} clients not attached hold pages: "
            f"{', '.join(unattached)} (see memd clients; memd drop NAME)"
        )
    disks = r.get("swap_disks") or []
    if disks:
        out.append(
            f"swap      {len(disks)} NBD swap disks: " + ", ".join(_swap_summary(d) for d in disks)
        )
    migrations = r.get("migrations") or {}
    if migrations.get("listening"):
        out.append(f"migrate   accepting guests on {migrations['listening']} (TLS)")
    for m in migrations.get("active", []) + migrations.get("finished", [])[-3:]:
        out.append(f"migrate   {format_migration(m)}")
    if migrations.get("held"):
        out.append(
            "migrate   requests held until their pages arrive: " + ", ".join(migrations["held"])
        )
    sim = r.get("sharing")
    if sim:
        out.append(
            f"sharing   simulated guests: {sim.get('nr_shared_mfns', 0)} shared frames, "
            f"{sim.get('nr_saved_mfns', 0)} saved (memd scan)"
        )
    k = r.get("ksm")
    if k is None:
        out.append("ksm       not available on this kernel")
    else:
        state = {0: "stopped", 1: "merging", 2: "unmerging"}.get(k["run"], str(k["run"]))
        out.append(
            f"ksm       {state}: {k['pages_sharing']} pages sharing "
            f"{k['pages_shared']} frames (host-wide); steering {k['steering']} "
            f"(memd ksm)"
        )
    return "\n".join(out)


def format_migration(m: dict[str, Any]) -> str:
    """One transfer (``memd migrate``, a line of ``memd status``)."""
    where = "to" if m["direction"] == "out" else "from"
    line = (
        f"{m['guest']} {where} {m['peer']}: {m.get('outcome', m['phase'])}, "
        f"{m['pages']} pages ({human_size(m['bytes'])}) in {m['elapsed_s']} s, "
        f"{m['pages_per_s']:.0f} pages/s, {m['chunks_remaining']} chunks to go"
    )
    if m.get("switchover_ms") is not None:
        line += f", switch-over {m['switchover_ms']} ms"
    return line + (f" ({m['error']})" if m.get("error") else "")


def _swap_summary(d: dict[str, Any]) -> str:
    lost = f", {d['lost_pages']} LOST" if d["lost_pages"] else ""
    return (
        f"{d['name']} {human_size(d['size'])} ({d['pages']} pages in memory, "
        f"{d['spilled_pages']} spilled{lost}, {d['connections']} conn)"
    )


def format_explain(r: dict[str, Any]) -> str:
    """One guest page (memd audit --gfn): scalars, then who else maps its frame."""
    mapped = r.pop("mapped_by", None)
    total = r.pop("mapped_by_count", None)
    out = kv(r)
    if mapped is not None:
        total = len(mapped) if total is None else total
        shown = ", ".join(f"{m['vm']}:{m['gfn']:#x}" for m in mapped)
        more = f" (first {len(mapped)} shown)" if total > len(mapped) else ""
        out += f"\n{'mapped_by':24} {total} other guest pages{more}"
        if shown:
            out += "\n" + textwrap.fill(
                shown, width=96, initial_indent="  ", subsequent_indent="  "
            )
    return out


def _format_realized(z: dict[str, Any]) -> list[str]:
    """Real guests' RAM as pagemap shows it: frames, per VM, VM×VM matrix, top frames."""
    f = z["frames"]
    out = [
        f"  host frames (pagemap)  {f['mapped']} mapped, {f['shared']} shared, "
        f"{f['saved']} saved, {f['ksm']} KSM pages"
    ]
    out.append(
        _indent(
            table(
                [
                    {"vm": n, **{k: v for k, v in d.items() if k != "ksm_stat"}}
                    for n, d in z["per_vm"].items()
                ],
                ["vm", "gfns", "present", "shared_gfns", "private", "frames", "merge"],
            ),
            "    ",
        )
    )
    vms = z["matrix"]["vms"]
    if vms:
        out.append("    frames mapped by both (diagonal: shared within the VM)")
        rows = [
            {"vm": a, **{b: z["matrix"]["frames"][i][j] for j, b in enumerate(vms)}}
            for i, a in enumerate(vms)
        ]
        out.append(_indent(table(rows, ["vm", *vms]), "    "))
    if z["top_frames"]:
        out.append("    most referenced frames")
        out.append(_indent(table(z["top_frames"], ["mfn", "refs", "zero", "ksm"]), "    "))
    pot = z.get("potential")
    if pot:
        out.append(
            f"  potential  {pot['potential_saved_frames']} frames could be saved by "
            f"merging equal pages; {pot['realized_saved_frames']} are "
            f"({pot['realized_fraction']:.0%}), gap {pot['gap_frames']} "
            f"({pot['present_pages']} present pages scanned at "
            f"{pot['scan_gb_per_s']} GB/s)"
        )
    nom = z.get("nominated")
    if nom and nom.get("entries"):
        out.append(
            f"  nominated  {nom['entries']} guest pages: {nom['shared']} shared, "
            f"{nom['nominated']} waiting for ksmd, {nom['unshared']} written since"
        )
    for d in z["discrepancies"]:
        out.append(f"    - {d['kind']}: {d['message']}")
    return out


def format_ksm(r: dict[str, Any]) -> str:
    k = r["knobs"]
    out = [
        f"ksm: run={k['run']} pages_to_scan={k['pages_to_scan']} "
        f"sleep_millisecs={k['sleep_millisecs']}  steering "
        f"{'on' if r['steering'] else 'off'}  ksmd cpu {r['ksmd_cpu_seconds']} s"
    ]
    step = r.get("last_step")
    if step:
        out.append(f"  {step['mode']}: {step['reason']}")
        out.append(
            f"  potential {step['potential_saved_frames']} frames, realized "
            f"{step['realized_saved_frames']} ({step['realized_fraction']:.0%})"
        )
    pot = r.get("potential")
    if pot:
        out.append(
            f"  last scan: {pot['present_pages']} pages, {pot['distinct_contents']} "
            f"distinct, {pot['zero_pages']} zero, {pot['scan_gb_per_s']} GB/s"
        )
    for vm, v in r.get("vms", {}).items():
        out.append(f"    {vm:20} merge {'on' if v['merge'] else 'off'}")
    return "\n".join(out)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _swap_rows(disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "name": d["name"],
            "size": human_size(d["size"]),
            "pages": d["pages"],
            "held": human_size(d["bytes_stored"]),
            "ratio": f"{d['ratio']:.2f}",
            "spilled": d.get("spilled_pages", 0),
            "socket": d["path"],
            "conns": d["connections"],
            "reads": d["reads"],
            "writes": d["writes"],
            "errors": d["errors"],
        }
        for d in disks
    ]


_SWAP_COLUMNS = [
    "name",
    "size",
    "pages",
    "held",
    "ratio",
    "spilled",
    "socket",
    "conns",
    "reads",
    "writes",
    "errors",
]


def _memory_columns(memory: dict[str, Any] | None) -> dict[str, Any]:
    """The guest's last MEM_REPORT as table cells ("-" when it sent none)."""
    if not memory:
        return {
            "mem_avail": "-",
            "swap_free": "-",
            "psi_some": "-",
            "psi_full": "-",
            "report_age": "-",
        }

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    return {
        "mem_avail": human_size(memory["mem_available_kib"] * 1024),
        "swap_free": human_size(memory["swap_free_kib"] * 1024),
        "psi_some": pct(memory["psi_some_avg10"]),
        "psi_full": pct(memory["psi_full_avg10"]),
        "report_age": f"{memory['age_s']}s",
    }


_MEMORY_COLUMNS = ["mem_avail", "swap_free", "psi_some", "psi_full", "report_age"]


def format_guests(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, **_memory_columns(r.get("memory"))} for r in rows]
    out = table(
        rows,
        [
            "name",
            "connected",
            "mode",
            "path",
            "pools",
            "tmem_pages",
            "requests",
            "errors",
            "reboots",
            *_MEMORY_COLUMNS,
            "last_error",
        ],
    )
    disks = [r["swap"] for r in rows if r.get("swap")]
    if disks:
        out += "\n\nswap disks (NBD)\n" + table(_swap_rows(disks), _SWAP_COLUMNS)
    return out


def format_stats(r: dict[str, Any]) -> str:
    out = (
        kv(r["store"])
        + "\n\n"
        + table(
            r["clients"],
            [
                "client",
                "pools",
                "ephemeral_pages",
                "persistent_pages",
                "bytes_stored",
                "puts",
                "good_puts",
                "gets",
                "found_gets",
                "evictions",
            ],
        )
    )
    if r.get("swap_disks"):
        out += "\n\nswap disks (NBD)\n" + table(_swap_rows(r["swap_disks"]), _SWAP_COLUMNS)
    if r.get("guest_memory"):
        rows = [{"guest": name, **_memory_columns(m)} for name, m in r["guest_memory"].items()]
        out += "\n\nguest memory (MEM_REPORT)\n" + table(rows, ["guest", *_MEMORY_COLUMNS])
    return out


def format_budget(r: dict[str, Any]) -> str:
    out = (
        f"budget set to {human_size(r['budget_bytes'])} (was "
        f"{human_size(r['previous_bytes'])}); {r['evicted']} ephemeral pages evicted"
    )
    if r["used_bytes"] > r["budget_bytes"]:
        out += (
            f"\nwarning: persistent pages hold {human_size(r['used_bytes'])}, above the "
            "budget: every put is refused (NO_SPACE) until guests flush"
        )
    return out
