"""`memd`: the operator's command line.

Every command but ``serve`` and ``demo`` talks to a running agent through its control
socket (``--socket``, ``$MEMD_SOCKET``, default /run/memd/memd.sock).  Output is a
table for people and ``--json`` for programs; any operator mistake (agent not running,
unknown guest, no permission, libvirtd down) is one sentence on stderr and exit 1.

Requests are the typed argument objects of memd.agent.commands (the table the agent
serves); the tables and summaries for people are memd.cli_render.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from memd import cli_render as render
from memd import cli_setup, paths
from memd.agent import control
from memd.agent.commands import (
    AttachArgs,
    AuditArgs,
    AuthorizeArgs,
    BudgetArgs,
    ClientsArgs,
    CommandArgs,
    DetachArgs,
    DropArgs,
    ExplainArgs,
    GuestsArgs,
    KsmArgs,
    OptInArgs,
    OptOutArgs,
    PoolsArgs,
    ScanArgs,
    StatsArgs,
    StatusArgs,
    SteerArgs,
    SwapArgs,
    UnswapArgs,
)
from memd.errors import InvalidArgument, MemdError

EXIT_ERROR = 1


def _size(text: str) -> int:
    """'512M', '2G', '1048576' → bytes (never negative)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9643' → ('127.0.0.1', 9643), for --metrics."""
    from memd.agent.metrics import parse_address

    try:
        return parse_address(text)
    except InvalidArgument as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _swap(text: str) -> tuple[str, str, int]:
    """'vm1=/run/memd/vm1.nbd:512M' → (name, socket path, size in bytes)."""
    name, sep, rest = text.partition("=")
    path, colon, size = rest.rpartition(":")
    if not sep or not name or not colon or not path or not size:
        raise argparse.ArgumentTypeError(f"expected NAME=SOCKET:SIZE, got {text!r}")
    nbytes = _size(size)
    if nbytes <= 0 or nbytes % 4096:
        raise argparse.ArgumentTypeError(
            f"a swap disk size is a positive multiple of 4K, got {size!r}"
        )
    return name, path, nbytes


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one sentence (with where to look), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memd", description="memd: tmem and page sharing for QEMU/KVM guests")
    p.add_argument(
        "--socket",
        help="agent control socket (default $MEMD_SOCKET, else "
        f"$MEMD_RUN_DIR/memd.sock, else {control.DEFAULT_CONTROL_PATH})",
    )
    p.add_argument("--version", action="version", version=f"memd {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--json", action="store_true", help="print JSON")
        return c

    c = cmd("serve", "run the host agent")
    c.add_argument("--budget", type=_size, default=256 << 20, help="tmem memory budget (256M)")
    c.add_argument(
        "--guest-cap",
        type=_size,
        default=None,
        metavar="SIZE",
        help="most any one guest may store, in raw page bytes (half the budget)",
    )
    c.add_argument(
        "--channel",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a guest whose QEMU serves its memd port on PATH (repeatable)",
    )
    c.add_argument(
        "--listen",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="listen on PATH for a guest's channel (repeatable)",
    )
    c.add_argument(
        "--swap",
        type=_swap,
        action="append",
        default=[],
        metavar="NAME=SOCKET:SIZE",
        help="serve guest NAME a swap disk of SIZE over NBD on the unix socket "
        "SOCKET (mode 0600; QEMU: nbd+unix:///?socket=SOCKET) (repeatable)",
    )
    c.add_argument(
        "--spill-dir",
        default=str(paths.state_dir() / "spill"),
        metavar="DIR",
        help="swap disks move their coldest pages to a sparse file here when "
        "memory runs out ('' = never: ENOSPC at once; default "
        "$MEMD_STATE_DIR/spill, else /var/lib/memd/spill)",
    )
    c.add_argument(
        "--metrics",
        type=_address,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (bind only "
        "there: 127.0.0.1:9643 for a local Prometheus)",
    )
    c.add_argument(
        "--qmp",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="audit the RAM of a QEMU (started without libvirt) with QMP at PATH",
    )
    c.add_argument("--libvirt", metavar="URI", help="follow libvirt domains (qemu:///system)")
    c.add_argument(
        "--libvirt-match",
        default="*",
        metavar="GLOB",
        help="with --libvirt: attach only domains whose name matches (default: all)",
    )
    c.add_argument(
        "--ksm-steer",
        action="store_true",
        help="drive KSM by the gap between potential and realized sharing of the "
        "attached QEMUs (knobs are restored on exit)",
    )
    c.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="crash-safe store of persistent tmem pages (default $MEMD_RUN_DIR/store, "
        "else /run/memd/store, on tmpfs: survives the agent, not the host; "
        "'' = none, pages die with the agent)",
    )
    c.add_argument(
        "--durable",
        action="store_true",
        help="fsync every store commit, so acknowledged pages survive a power loss "
        "(use with --store on disk)",
    )
    c.add_argument(
        "--migrate-listen",
        metavar="HOST:PORT",
        default=None,
        help="accept guests migrating here from other agents (mutual TLS)",
    )
    c.add_argument(
        "--tls-dir",
        metavar="DIR",
        default=None,
        help="migration certificates: DIR/cacert.pem, DIR/{server,client}cert.pem, "
        "DIR/private/{server,client}key.pem (default: libvirt's /etc/pki layout)",
    )
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
    cmd("scan", "run one sharing scan of simulated guests now (real guests: memd ksm)")
    c = cmd("ksm", "KSM steering: knobs, potential vs realized sharing of real guests")
    c.add_argument("--step", action="store_true", help="run one steering step now")
    c.add_argument("--steer", choices=["on", "off"], help="start or stop the steering loop")
    c = cmd("optout", "switch KSM merging off for a VM (its memory re-expands at once)")
    c.add_argument("vm")
    c = cmd("optin", "switch KSM merging on for a VM")
    c.add_argument("vm")
    c = cmd("attach", "attach a guest channel, or (--swap) give it a swap disk")
    c.add_argument("domain")
    c.add_argument(
        "--swap",
        type=_size,
        metavar="SIZE",
        help="serve the VM a swap disk of SIZE over NBD and hot-plug it through "
        "libvirt (with --path: only serve it there, for a plain QEMU)",
    )
    c.add_argument("--path", help="channel socket (default: read from libvirt)")
    c.add_argument("--mode", choices=["connect", "listen"], default="connect")
    c.add_argument("--libvirt", metavar="URI", default=None)
    c = cmd("detach", "detach a guest channel, or (--swap) its swap disk")
    c.add_argument("domain")
    c.add_argument(
        "--swap",
        action="store_true",
        help="unplug and stop serving the VM's swap disk (swapoff in the guest first)",
    )
    c.add_argument("--libvirt", metavar="URI", default=None)
    c = cmd(
        "add-channel",
        "give a libvirt domain a memd channel (live if it runs, and in its saved config)",
    )
    c.add_argument("domain")
    c.add_argument("--libvirt", metavar="URI", default=None)
    c.add_argument(
        "--config-only",
        action="store_true",
        help="only the saved config (takes effect at the next start)",
    )
    cmd("clients", "every tmem client the agent holds pages for, attached or not")
    c = cmd("drop", "drop a tmem client that is not attached, and every page it stored")
    c.add_argument("guest")
    c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    cmd("ksm-restore", "put back KSM knobs a crashed agent left changed (no agent needed)")
    c = cmd("budget", "set the tmem memory budget")
    c.add_argument("size", type=_size)
    c = cmd("authorize", "allow a guest to join a shared tmem pool")
    c.add_argument("guest")
    c.add_argument("uuid")
    cli_setup.add_migrate(cmd)
    cli_setup.add_commands(cmd)  # tls-init, libvirt-hook
    c = cmd("demo", "run the embedded demo: agent + simulated guests over unix sockets")
    c.add_argument("--guests", type=int, default=4)
    c.add_argument("--guest-mib", type=int, default=16)
    return p


def _emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(result, indent=2, default=str) if args.json else human(result))


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

    def call(request: CommandArgs) -> Any:
        return control.request(request, path=path)

    match args.command:
        case command if command in cli_setup.COMMANDS:
            return cli_setup.run(args, path)
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
            _emit(args, call(StatusArgs()), render.format_status)
        case "guests":
            if args.libvirt:
                from memd.libvirt_cli import list_domains

                _emit(
                    args,
                    list_domains(args.libvirt),
                    lambda r: render.table(r, ["name", "state", "channel"]),
                )
            else:
                _emit(args, call(GuestsArgs()), render.format_guests)
        case "pools":
            _emit(
                args,
                call(PoolsArgs(guest=args.guest)),
                lambda r: render.table(
                    r,
                    [
                        "client",
                        "pool_id",
                        "kind",
                        "shared",
                        "pages",
                        "objects",
                        "bytes_stored",
                        "puts",
                        "gets",
                        "found_gets",
                        "evictions",
                    ],
                ),
            )
        case "stats":
            _emit(args, call(StatsArgs(guest=args.guest)), render.format_stats)
        case "audit" if args.gfn:
            _emit(args, call(ExplainArgs(page=args.gfn)), render.format_explain)
        case "audit":
            result = _with_progress("auditing", lambda: call(AuditArgs()))
            _emit(args, result, render.format_audit)
            return 0 if result["clean"] else 2
        case "scan":
            _emit(args, _with_progress("scanning", lambda: call(ScanArgs())), render.kv)
        case "ksm":
            if args.steer:
                result = call(SteerArgs(on=args.steer == "on"))
            else:
                result = call(KsmArgs(step=args.step))
            _emit(args, result, render.format_ksm)
        case "optout":
            result = call(OptOutArgs(vm=args.vm))
            if not args.json:
                print(f"memd: warning: {result['warning']}", file=sys.stderr)
            _emit(args, result, lambda r: f"{r['vm']}: merging off")
        case "optin":
            _emit(args, call(OptInArgs(vm=args.vm)), lambda r: f"{r['vm']}: merging on")
        case "attach" if args.swap is not None:
            if args.swap <= 0 or args.swap % 4096:
                raise InvalidArgument("a swap disk size is a positive multiple of 4K")
            if args.path:
                result = call(
                    SwapArgs(name=args.domain, path=os.path.abspath(args.path), size=args.swap)
                )
            else:
                from memd.libvirt_cli import attach_swap

                result = attach_swap(
                    args.libvirt, args.domain, args.swap, call, nbd_dir=paths.nbd_dir()
                )
            _emit(
                args,
                result,
                lambda r: (
                    f"{r['name']}: swap disk of {render.human_size(r['size'])} on {r['path']}"
                    + (f", hot-plugged as /dev/{r['target']}" if r.get("target") else "")
                ),
            )
        case "detach" if args.swap:
            if args.libvirt is None and args.domain not in {
                d["name"] for d in call(StatsArgs())["swap_disks"] if d.get("qemu_pid")
            }:
                result = call(UnswapArgs(name=args.domain))  # a plain QEMU's disk
            else:
                from memd.libvirt_cli import detach_swap

                result = detach_swap(args.libvirt, args.domain, call)
            _emit(args, result, lambda r: f"{r['detached']}: swap disk detached")
        case "attach":
            chan = args.path
            if chan is None:
                from memd.libvirt_cli import channel_path

                chan = channel_path(args.libvirt, args.domain)
            _emit(
                args,
                call(AttachArgs(name=args.domain, path=chan, mode=args.mode)),
                lambda r: f"attached {r['name']} ({r['mode']} {r['path']})",
            )
        case "detach":
            _emit(args, call(DetachArgs(name=args.domain)), lambda r: f"detached {r['detached']}")
        case "add-channel":
            from memd.libvirt_cli import add_channel

            result = add_channel(args.libvirt, args.domain, live=not args.config_only)
            _emit(
                args,
                result,
                lambda r: (
                    f"{r['name']}: memd channel "
                    f"{'at ' + r['channel'] if r.get('channel') else 'in the saved config'}"
                    f"{'' if r.get('channel') else ' (takes effect at the next start)'}"
                ),
            )
        case "clients":
            _emit(
                args,
                call(ClientsArgs()),
                lambda r: render.table(
                    r,
                    [
                        "client",
                        "attached",
                        "connected",
                        "pools",
                        "ephemeral_pages",
                        "persistent_pages",
                        "bytes_stored",
                    ],
                ),
            )
        case "drop":
            return _drop(args, call)
        case "ksm-restore":
            from hypervisor.ksm import restore_originals

            restored = restore_originals(paths.ksm_originals())
            _emit(
                args,
                {"restored": restored},
                lambda r: (
                    "nothing to restore: no agent left KSM knobs changed"
                    if r["restored"] is None
                    else "restored KSM knobs: "
                    + " ".join(f"{k}={v}" for k, v in sorted(r["restored"].items()))
                ),
            )
        case "budget":
            _emit(args, call(BudgetArgs(bytes=args.size)), render.format_budget)
        case "migrate":
            _emit(args, call(cli_setup.migrate_request(args)), render.format_migration)
        case "authorize":
            _emit(
                args,
                call(AuthorizeArgs(guest=args.guest, uuid=args.uuid)),
                lambda r: f"{r['guest']} may now join shared pool {r['uuid']}",
            )
    return 0


def _drop(args: argparse.Namespace, call: Callable[[CommandArgs], Any]) -> int:
    """Drop an unattached client after the operator confirmed it (--yes, or y at a prompt)."""
    rows = {r["client"]: r for r in call(ClientsArgs())}
    row = rows.get(args.guest)
    if row is None:
        raise InvalidArgument(f"the agent holds nothing for {args.guest!r} (see memd clients)")
    what = (
        f"{args.guest}: {row['pools']} pools, {row['persistent_pages']} persistent and "
        f"{row['ephemeral_pages']} ephemeral pages"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidArgument(f"dropping {what} cannot be undone: add --yes to confirm")
        answer = input(f"drop {what}? this cannot be undone [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing dropped", file=sys.stderr)
            return EXIT_ERROR
    result = call(DropArgs(guest=args.guest, confirm=True))
    _emit(args, result, lambda r: f"dropped {r['dropped']} ({r['pages']} pages)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()
        return code
    except MemdError as err:
        print(f"memd: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (memd pools --json | head): stop quietly, as cat does.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


#: Attributes every LogRecord has; anything else was passed with ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, vm (when the line is about one
    guest), msg, plus any other ``extra=`` fields the caller gave."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": extra.pop("event", record.name.rsplit(".", 1)[-1]),
            "vm": extra.pop("vm", None),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps({**line, **extra}, default=str)


if __name__ == "__main__":
    sys.exit(main())
