"""`memd tls-init` and `memd libvirt-hook`: setting hosts up for migration; and the
arguments of `memd migrate` (moving a guest, or ``--cancel``).

Their arguments and output for people; the work is memd.migrate.pki (certificates, with
the openssl command line) and memd.libvirt_hook (libvirt's ``qemu`` hook).  Neither
needs an agent, except the hook itself, which asks the local one.  memd.cli hands these
two commands here so that it stays the table of agent commands; `memd migrate` is an
agent command, whose request :func:`migrate_request` builds from its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memd import paths
from memd.agent.commands import CancelMigrationArgs, CommandArgs, MigrateArgs
from memd.errors import InvalidArgument

COMMANDS = ("tls-init", "libvirt-hook")


def add_commands(cmd: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add the two subcommands through memd.cli's ``cmd`` (which gives each ``--json``)."""
    from memd.libvirt_hook import DEFAULT_HOOKS_DIR
    from memd.migrate import pki

    c = cmd(
        "tls-init",
        "make migration certificates: a CA (--ca DIR), or a host's (--host NAME --out DIR)",
    )
    c.add_argument(
        "--ca",
        required=True,
        metavar="DIR",
        help="the CA's directory (cacert.pem, cakey.pem); alone: make a new CA there",
    )
    c.add_argument(
        "--host",
        metavar="NAME",
        help="make this host's server and client certificates (NAME: its DNS name or address)",
    )
    c.add_argument(
        "--addr",
        action="append",
        default=[],
        metavar="ADDR[,ADDR]",
        help="more addresses or DNS names the host's migration listener is reached by "
        "(what `memd migrate --to` will use; repeatable)",
    )
    c.add_argument(
        "--out",
        metavar="DIR",
        help="where the host's files go, in the --tls-dir layout (copy it to the host)",
    )
    c.add_argument(
        "--days",
        type=int,
        default=None,
        help=f"validity (default {pki.CA_DAYS} for a CA, {pki.HOST_DAYS} for a host)",
    )
    c = cmd(
        "libvirt-hook",
        "libvirt's qemu hook on a destination: refuse a memd guest whose pages are not coming",
    )
    c.add_argument(
        "hook_args",
        nargs="*",
        metavar="ARG",
        help="DOMAIN OPERATION SUB-OPERATION EXTRA, as libvirt passes them (XML on stdin)",
    )
    c.add_argument(
        "--install",
        action="store_true",
        help="write HOOKS_DIR/qemu.d/memd, a script that runs this guard",
    )
    c.add_argument("--hooks-dir", default=str(DEFAULT_HOOKS_DIR), metavar="HOOKS_DIR")


def add_migrate(cmd: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """`memd migrate`'s arguments (memd.cli sends :func:`migrate_request` to the agent)."""
    c = cmd("migrate", "move a guest's tmem pages and swap disk to the agent at HOST:PORT")
    c.add_argument("guest")
    c.add_argument("--to", metavar="HOST:PORT")
    c.add_argument(
        "--cancel",
        action="store_true",
        help="stop this agent's outgoing transfer of the guest (and a QEMU or libvirt "
        "migration memd follows); the guest keeps its pages here",
    )
    c.add_argument(
        "--arm-timeout",
        type=int,
        metavar="SECONDS",
        help="following libvirt: give up if no migration of the guest begins within "
        "SECONDS of memd arming (default 300)",
    )
    c.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="follow the QEMU migration started on this QEMU (memd arms "
        "pause-before-switchover and returns; progress in memd status); without "
        "it the guest must be paused or stopped and the move happens now",
    )


def migrate_request(args: argparse.Namespace) -> CommandArgs:
    """The control request `memd migrate` sends: a move, or ``--cancel``."""
    if args.cancel:
        if args.to or args.qmp or args.arm_timeout is not None:
            raise InvalidArgument("--cancel takes only the guest (no --to, --qmp, --arm-timeout)")
        return CancelMigrationArgs(guest=args.guest)
    if not args.to:
        raise InvalidArgument("migrate needs --to HOST:PORT (or --cancel)")
    if args.arm_timeout is not None and args.arm_timeout < 1:
        raise InvalidArgument("--arm-timeout is a number of seconds, at least 1")
    qmp = os.path.abspath(args.qmp) if args.qmp else None
    return MigrateArgs(guest=args.guest, to=args.to, qmp=qmp, arm_timeout=args.arm_timeout)


def run(args: argparse.Namespace, control_path: str | None) -> int:
    if args.command == "tls-init":
        return _tls_init(args)
    return _libvirt_hook(args, control_path)


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    print(json.dumps(result, indent=2) if args.json else human)


def _tls_init(args: argparse.Namespace) -> int:
    from memd.migrate import pki

    if args.days is not None and not 1 <= args.days <= 36500:
        raise InvalidArgument("--days must be 1..36500")
    names = [n for item in args.addr for n in item.split(",") if n.strip()]
    if args.host is None:
        if args.addr or args.out:
            raise InvalidArgument("--addr and --out go with --host NAME (the host to certify)")
        ca = pki.make_ca(args.ca, days=args.days or pki.CA_DAYS)
        _emit(
            args,
            {"ca_cert": str(ca.cert), "ca_key": str(ca.key)},
            f"made a CA: {ca.cert} (every host gets a copy) and {ca.key} (mode 0600; it "
            "signs the hosts' certificates: keep it off them)\n"
            f"next, per host: memd tls-init --ca {args.ca} --host NAME --addr ADDR --out DIR",
        )
        return 0
    if args.out is None:
        raise InvalidArgument("--host needs --out DIR, where its certificates go")
    files = pki.make_host(args.ca, args.out, args.host, names, days=args.days or pki.HOST_DAYS)
    sans = pki.subject_alt_names([args.host, *names])
    listen = next((s.split(":", 1)[1] for s in sans if s.startswith("IP:")), args.host)
    _emit(
        args,
        {"files": {k: str(v) for k, v in files.items()}, "subject_alt_names": sans},
        f"made {args.host}'s certificates in {args.out} (the server certificate names "
        f"{', '.join(sans)}; keys in private/, mode 0600)\n"
        f"on {args.host}: memd serve --migrate-listen {listen}:PORT --tls-dir DIR "
        "(DIR: a copy of these files), or put them in libvirt's /etc/pki layout",
    )
    return 0


def _libvirt_hook(args: argparse.Namespace, control_path: str | None) -> int:
    from memd import libvirt_hook
    from memd.agent.control import DEFAULT_CONTROL_PATH

    if not args.install:
        return libvirt_hook.run_hook(
            args.hook_args, control_path=control_path, stdin=sys.stdin, stderr=sys.stderr
        )
    if args.hook_args:
        raise InvalidArgument("--install takes no DOMAIN arguments (only --hooks-dir)")
    resolved = control_path or str(paths.control_socket())
    script = libvirt_hook.install(
        Path(args.hooks_dir),
        control_path=None if resolved == DEFAULT_CONTROL_PATH else resolved,
    )
    _emit(
        args,
        {"script": str(script)},
        f"installed {script}: incoming libvirt migrations of memd guests now need a memd "
        "transfer arriving first\n"
        "libvirtd looks for hooks only when it starts or reloads: run `systemctl reload "
        "libvirtd` (or virtqemud) once if this host had no qemu hook before",
    )
    return 0
