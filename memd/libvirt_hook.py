"""libvirt's ``qemu`` hook on a destination host: no memd guest arrives without its pages.

Overview.  libvirt runs every executable in /etc/libvirt/hooks/qemu.d/ (since 6.5; and
/etc/libvirt/hooks/qemu) as ``HOOK DOMAIN OPERATION SUB-OPERATION EXTRA`` with the domain
XML on stdin, for every domain event on the host, and waits for it.  For an incoming
migration the operation is ``migrate`` (sub-operation ``begin``), at the destination's
prepare step, before any QEMU starts there; a non-zero exit makes libvirt refuse the
migration, quoting the hook's stderr.  The guard:

    operation other than migrate/begin          exit 0 at once, reading nothing
    domain without a memd channel or swap disk  exit 0 (its memory is all in its RAM)
    memd guest, and the local agent has an      exit 0 (`memd migrate DOMAIN --to
      incoming transfer for it                   THIS_HOST:PORT` runs on the source)
    memd guest, no such transfer, or no agent   exit 1, one sentence on stderr

Its stdout stays empty: for ``migrate`` libvirt reads a hook's stdout as a replacement
domain XML (empty = unchanged).  An unrelated guest must never be refused, and the
``reconnect`` operation's failure would make libvirt kill a running QEMU: every other
operation, and any XML this cannot read, passes.  :func:`verdict` is the decision on
plain values (tested without libvirt); :func:`run_hook` reads stdin and asks the agent;
:func:`install` writes the ``qemu.d/memd`` script.  ``python3 -m memd.libvirt_hook`` is
what that script runs for ``migrate`` (no CLI import: libvirt waits for it).  No state.
"""

from __future__ import annotations

import os
import shlex
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from hypervisor.domain_xml import find_memd_channel, find_swap_disk
from memd.errors import MemdError, PermissionDenied

#: Where libvirt looks for hook scripts (libvirt's $SYSCONFDIR/libvirt/hooks).
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
#: The script's name in qemu.d/ (libvirt runs that directory's scripts in name order).
SCRIPT_NAME = "memd"
#: What libvirt passes for an incoming migration (docs: hooks.html, "migrate begin").
GUARDED = ("migrate", "begin")


def is_memd_guest(domain_xml: str) -> bool:
    """Whether the domain keeps pages in memd: a memd channel (tmem) or a memd swap disk."""
    try:
        return find_memd_channel(domain_xml) is not None or find_swap_disk(domain_xml) is not None
    except ET.ParseError:
        return False  # not ours to judge: libvirt itself rejects a broken XML


def verdict(
    domain: str,
    operation: str,
    sub_operation: str,
    read_xml: Callable[[], str],
    migrations: Callable[[], dict[str, Any]],
) -> str | None:
    """None to let libvirt go on, or the sentence refusing the migration.  *read_xml* and
    *migrations* (the local agent's ``migrations`` answer) are called only when needed."""
    if (operation, sub_operation) != GUARDED or not is_memd_guest(read_xml()):
        return None
    why: str | None = None
    try:
        status = migrations()
    except MemdError as err:
        why = str(err)
    except (OSError, ValueError) as err:  # a hung or garbled agent: not a guest's fault
        why = f"the memd agent here did not answer ({err})"
    if why is not None:
        return (
            f"memd: {domain} keeps persistent pages in memd on its source host, and this "
            f"host cannot receive them: {why}"
        )
    arriving = {
        row.get("guest")
        for row in status.get("active", [])
        if row.get("direction") == "in" and row.get("phase") not in ("aborted", "revoked")
    }
    if domain in arriving:
        return None
    listening = status.get("listening")
    if listening is None:
        return (
            f"memd: {domain} keeps persistent pages in memd on its source host, and the "
            "memd agent here does not accept migrations (start it with --migrate-listen "
            f"HOST:PORT, then run `memd migrate {domain} --to HOST:PORT` on the source)"
        )
    return (
        f"memd: {domain} keeps persistent pages in memd on its source host, and no memd "
        f"transfer is arriving for it; run `memd migrate {domain} --to {listening}` on the "
        "source first"
    )


def run_hook(
    argv: Sequence[str], *, control_path: str | None, stdin: TextIO, stderr: TextIO
) -> int:
    """``HOOK-ARGS`` as libvirt passes them (DOMAIN OPERATION SUB-OPERATION [EXTRA]) → the
    exit status libvirt acts on."""
    if len(argv) < 3:
        print(
            "memd: libvirt-hook takes DOMAIN OPERATION SUB-OPERATION [EXTRA] (what libvirt "
            "passes its qemu hook), or --install",
            file=stderr,
        )
        return 2

    def migrations() -> dict[str, Any]:
        from memd.agent import control
        from memd.agent.commands import MigrationsArgs

        answer = control.request(MigrationsArgs(), path=control_path, timeout=10.0)
        return answer if isinstance(answer, dict) else {}

    refusal = verdict(argv[0], argv[1], argv[2], stdin.read, migrations)
    if refusal is None:
        return 0
    print(refusal, file=stderr)
    return 1


def script_text(control_path: str | None) -> str:
    """The qemu.d script: the shell lets every other operation pass without starting
    Python; the interpreter that installed it runs the guard."""
    command = [sys.executable, "-m", "memd.libvirt_hook"]
    if control_path:
        command += ["--socket", control_path]
    return (
        "#!/bin/sh\n"
        "# memd: refuse an incoming migration of a guest whose memd pages are not being\n"
        "# moved here (written by `memd libvirt-hook --install`; docs/operators.md, 9).\n"
        f'[ "$2" = {GUARDED[0]} ] || exit 0\n'
        f'exec {shlex.join(command)} "$@"\n'
    )


def install(hooks_dir: str | Path = DEFAULT_HOOKS_DIR, *, control_path: str | None) -> Path:
    """Write (or rewrite) HOOKS_DIR/qemu.d/memd, mode 0755; → its path."""
    directory = Path(hooks_dir) / "qemu.d"
    script = directory / SCRIPT_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        scratch = directory / f".{SCRIPT_NAME}.new"
        scratch.write_text(script_text(control_path))
        os.chmod(scratch, 0o755)
        os.replace(scratch, script)  # libvirt never runs a half-written script
    except PermissionError:
        raise PermissionDenied(
            f"cannot write {script}: permission denied (run it as root)", target=str(script)
        ) from None
    except (NotADirectoryError, FileExistsError):
        raise PermissionDenied(
            f"cannot make {directory}: a file is in the way of the hooks directory",
            target=str(directory),
        ) from None
    return script


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m memd.libvirt_hook [--socket PATH] DOMAIN OPERATION SUB-OPERATION EXTRA``."""
    args = list(sys.argv[1:] if argv is None else argv)
    control_path = None
    if args[:1] == ["--socket"] and len(args) >= 2:
        control_path, args = args[1], args[2:]
    return run_hook(args, control_path=control_path, stdin=sys.stdin, stderr=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
