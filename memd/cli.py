"""`memd`: the operator's command line.

Every command but ``serve`` and ``demo`` talks to a running agent through its control
socket (``--socket``, ``$MEMD_SOCKET``, default /run/memd/memd.sock).  Output is a
table for people and ``--json`` for programs; any operator mistake (agent not running,
unknown guest, no permission, libvirtd down) is one sentence on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from memd.agent import control
from memd.errors import InvalidArgument, MemdError

EXIT_ERROR = 1


def _size(text: str) -> int:
    """'512M', '2G', '1048576' → bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)") from None


def _pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memd", description="memd: tmem and page sharing for "
                                "QEMU/KVM guests")
    p.add_argument("--socket", help="agent control socket (default $MEMD_SOCKET or "
                   f"{control.DEFAULT_CONTROL_PATH})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--json", action="store_true", help="print JSON")
        return c

    c = cmd("serve", "run the host agent")
    c.add_argument("--budget", type=_size, default=256 << 20, help="tmem memory budget (256M)")
    c.add_argument("--guest-cap", type=_size, default=None, metavar="SIZE",
                   help="most any one guest may store, in raw page bytes (half the budget)")
    c.add_argument("--channel", type=_pair, action="append", default=[], metavar="NAME=PATH",
                   help="a guest whose QEMU serves its memd port on PATH (repeatable)")
    c.add_argument("--listen", type=_pair, action="append", default=[], metavar="NAME=PATH",
                   help="listen on PATH for a guest's channel (repeatable)")
    c.add_argument("--qmp", type=_pair, action="append", default=[], metavar="NAME=PATH",
                   help="audit the RAM of a QEMU (started without libvirt) with QMP at PATH")
    c.add_argument("--libvirt", metavar="URI", help="follow libvirt domains (qemu:///system)")
    c.add_argument("--libvirt-match", default="*", metavar="GLOB",
                   help="with --libvirt: attach only domains whose name matches (default: all)")
    c.add_argument("--ksm-steer", action="store_true",
                   help="drive KSM by the gap between potential and realized sharing of the "
                   "attached QEMUs (knobs are restored on exit)")
    c.add_argument("--state", default="/var/lib/memd/tmem.snapshot", metavar="FILE",
                   help="persistent pools survive a graceful restart through FILE ('' = off)")
    c.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    cmd("status", "agent state and headline figures")
    c = cmd("guests", "attached guests (or, with --libvirt, the domains libvirt knows)")
    c.add_argument("--libvirt", metavar="URI", help="list libvirt domains and memd channels")
    c = cmd("pools", "tmem pools")
    c.add_argument("guest", nargs="?")
    c = cmd("stats", "tmem statistics per guest and for the store")
    c.add_argument("guest", nargs="?")
    c = cmd("audit", "recompute and check tmem and sharing state (and real guests' RAM)")
    c.add_argument("--gfn", metavar="VM:GFN", help="explain one guest page")
    cmd("scan", "run one sharing scan now")
    c = cmd("ksm", "KSM steering: knobs, potential vs realized sharing of real guests")
    c.add_argument("--step", action="store_true", help="run one steering step now")
    c.add_argument("--steer", choices=["on", "off"], help="start or stop the steering loop")
    c = cmd("optout", "switch KSM merging off for a VM (its memory re-expands at once)")
    c.add_argument("vm")
    c = cmd("optin", "switch KSM merging on for a VM")
    c.add_argument("vm")
    c = cmd("attach", "attach a guest channel")
    c.add_argument("domain")
    c.add_argument("--path", help="channel socket (default: read from libvirt)")
    c.add_argument("--mode", choices=["connect", "listen"], default="connect")
    c.add_argument("--libvirt", metavar="URI", default=None)
    c = cmd("detach", "detach a guest channel")
    c.add_argument("domain")
    c = cmd("budget", "set the tmem memory budget")
    c.add_argument("size", type=_size)
    c = cmd("authorize", "allow a guest to join a shared tmem pool")
    c.add_argument("guest")
    c.add_argument("uuid")
    c = cmd("demo", "run the embedded demo: agent + simulated guests over unix sockets")
    c.add_argument("--guests", type=int, default=4)
    c.add_argument("--guest-mib", type=int, default=16)
    return p


# -- output ------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _kv(d: dict[str, Any], indent: str = "") -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(_kv(v, indent + "  "))
        else:
            lines.append(f"{indent}{k:24} {v}")
    return "\n".join(lines)


def _emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(result, indent=2, default=str) if args.json else human(result))


def _format_audit(r: dict[str, Any]) -> str:
    out = [f"audit: {'clean' if r['clean'] else 'NOT CLEAN'} ({r['errors']} discrepancies)"]
    t = r["tmem"]
    out.append(f"  tmem     {'clean' if t['clean'] else str(t['errors']) + ' errors'}")
    out += [f"    - {f}" for f in t["findings"]]
    s = r.get("sharing")
    if s:
        out.append(f"  sharing  {'clean' if s['clean'] else str(s['errors']) + ' errors'}: "
                   f"{s['nr_shared_mfns']} shared frames, {s['nr_saved_mfns']} saved, "
                   f"{s['rmap_entries']} reverse-map entries")
        for guest, n in s.get("guests", {}).items():
            out.append(f"    {guest:20} {n} shared pages")
        out += [f"    - {f['kind']}: {f['message']}" for f in s["findings"]]
    if r.get("realized"):
        out += _format_realized(r["realized"])
    return "\n".join(out)


def _format_realized(z: dict[str, Any]) -> list[str]:
    """Real guests' RAM as pagemap shows it: frames, per VM, VM×VM matrix, top frames."""
    f = z["frames"]
    out = [f"  host frames (pagemap)  {f['mapped']} mapped, {f['shared']} shared, "
           f"{f['saved']} saved, {f['ksm']} KSM pages"]
    out.append(_indent(_table([{"vm": n, **{k: v for k, v in d.items() if k != "ksm_stat"}}
                               for n, d in z["per_vm"].items()],
                              ["vm", "gfns", "present", "shared_gfns", "private", "frames",
                               "merge"]), "    "))
    vms = z["matrix"]["vms"]
    if vms:
        out.append("    frames mapped by both (diagonal: shared within the VM)")
        rows = [{"vm": a, **{b: z["matrix"]["frames"][i][j] for j, b in enumerate(vms)}}
                for i, a in enumerate(vms)]
        out.append(_indent(_table(rows, ["vm", *vms]), "    "))
    if z["top_frames"]:
        out.append("    most referenced frames")
        out.append(_indent(_table(z["top_frames"], ["mfn", "refs", "zero", "ksm"]), "    "))
    for d in z["discrepancies"]:
        out.append(f"    - {d['kind']}: {d['message']}")
    return out


def _format_ksm(r: dict[str, Any]) -> str:
    k = r["knobs"]
    out = [f"ksm: run={k['run']} pages_to_scan={k['pages_to_scan']} "
           f"sleep_millisecs={k['sleep_millisecs']}  steering "
           f"{'on' if r['steering'] else 'off'}  ksmd cpu {r['ksmd_cpu_seconds']} s"]
    step = r.get("last_step")
    if step:
        out.append(f"  {step['mode']}: {step['reason']}")
        out.append(f"  potential {step['potential_saved_frames']} frames, realized "
                   f"{step['realized_saved_frames']} ({step['realized_fraction']:.0%})")
    pot = r.get("potential")
    if pot:
        out.append(f"  last scan: {pot['present_pages']} pages, {pot['distinct_contents']} "
                   f"distinct, {pot['zero_pages']} zero, {pot['scan_gb_per_s']} GB/s")
    for vm, v in r.get("vms", {}).items():
        out.append(f"    {vm:20} merge {'on' if v['merge'] else 'off'}")
    return "\n".join(out)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# -- commands ----------------------------------------------------------------------------


def _with_progress(label: str, fn: Callable[[], Any]) -> Any:
    """Run fn; on a terminal, show elapsed time while it runs."""
    if not sys.stderr.isatty():
        return fn()
    done = threading.Event()

    def spin() -> None:
        t0 = time.monotonic()
        while not done.wait(0.2):
            sys.stderr.write(f"\r{label}… {time.monotonic() - t0:5.1f} s")
            sys.stderr.flush()
        sys.stderr.write("\r" + " " * (len(label) + 12) + "\r")

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        return fn()
    finally:
        done.set()
        t.join()


def _run(args: argparse.Namespace) -> int:
    path = args.socket

    def call(cmd: str, **kw: Any) -> Any:
        return control.call(cmd, {k: v for k, v in kw.items() if v is not None}, path=path)

    match args.command:
        case "serve":
            from memd.serve import serve

            return serve(args, control_path=path or control.control_path())
        case "demo":
            from memd.demo import DemoConfig, format_summary, run_demo

            if not 1 <= args.guests <= 64 or not 1 <= args.guest_mib <= 1024:
                raise InvalidArgument("--guests must be 1..64 and --guest-mib 1..1024")
            cfg = DemoConfig(guests=args.guests, guest_pages=args.guest_mib * 256)
            progress = None if args.json else (lambda m: print(f"· {m}", flush=True))
            result = run_demo(cfg, progress=progress)
            _emit(args, result, format_summary)
            return 0 if result["audit"]["clean"] and not result["byte_mismatches"] else 1
        case "status":
            _emit(args, call("status"), lambda r: _kv(r))
        case "guests":
            if args.libvirt:
                from memd.libvirt_cli import list_domains

                _emit(args, list_domains(args.libvirt), lambda r: _table(
                    r, ["name", "state", "channel"]))
            else:
                _emit(args, call("guests"), lambda r: _table(
                    r, ["name", "connected", "mode", "path", "pools", "tmem_pages", "requests",
                        "errors", "reboots"]))
        case "pools":
            _emit(args, call("pools", guest=args.guest), lambda r: _table(
                r, ["client", "pool_id", "kind", "shared", "pages", "objects", "bytes_stored",
                    "puts", "gets", "found_gets", "evictions"]))
        case "stats":
            _emit(args, call("stats", guest=args.guest), lambda r: _kv(r["store"]) + "\n\n" +
                  _table(r["clients"], ["client", "pools", "ephemeral_pages",
                                        "persistent_pages", "bytes_stored", "puts",
                                        "good_puts", "gets", "found_gets", "evictions"]))
        case "audit" if args.gfn:
            _emit(args, call("explain", page=args.gfn), lambda r: _kv(r))
        case "audit":
            result = _with_progress("auditing", lambda: call("audit"))
            _emit(args, result, _format_audit)
            return 0 if result["clean"] else 2
        case "scan":
            _emit(args, _with_progress("scanning", lambda: call("scan")), lambda r: _kv(r))
        case "ksm":
            if args.steer:
                result = call("steer", on=args.steer == "on")
            else:
                result = call("ksm", step=True if args.step else None)
            _emit(args, result, _format_ksm)
        case "optout":
            result = call("optout", vm=args.vm)
            if not args.json:
                print(f"memd: warning: {result['warning']}", file=sys.stderr)
            _emit(args, result, lambda r: f"{r['vm']}: merging off")
        case "optin":
            _emit(args, call("optin", vm=args.vm), lambda r: f"{r['vm']}: merging on")
        case "attach":
            chan = args.path
            if chan is None:
                from memd.libvirt_cli import channel_path

                chan = channel_path(args.libvirt, args.domain)
            _emit(args, call("attach", name=args.domain, path=chan, mode=args.mode),
                  lambda r: f"attached {r['name']} ({r['mode']} {r['path']})")
        case "detach":
            _emit(args, call("detach", name=args.domain), lambda r: f"detached {r['detached']}")
        case "budget":
            _emit(args, call("budget", bytes=args.size),
                  lambda r: f"budget set; {r['evicted']} ephemeral pages evicted")
        case "authorize":
            _emit(args, call("authorize", guest=args.guest, uuid=args.uuid),
                  lambda r: f"{r['guest']} may now join shared pool {r['uuid']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except MemdError as err:
        print(f"memd: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname,
                           "logger": record.name, "msg": record.getMessage()})


if __name__ == "__main__":
    sys.exit(main())
