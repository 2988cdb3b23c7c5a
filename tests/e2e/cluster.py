"""The pieces of the end-to-end tests: a real ``memd serve --libvirt`` process and libvirt TCG
guests from the vm-images template, driven through their serial consoles.

:class:`AgentProcess` runs the agent as a separate process exactly as an operator would
(``python3 -m memd.cli --socket S serve --libvirt URI --store DIR``) and talks to it only
through the ``memd`` CLI (``--json``).  :class:`LibvirtGuest` is one transient libvirt domain
(``createXML``, started paused so the console is attached before the first byte of output)
with a :class:`~tests.hypervisor.vm.console.GuestShell` on its console; the agent finds the
guest's memd channel in the live domain XML by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths, render_domain_xml
from tests.hypervisor.vm.console import CommandResult, GuestShell

T = TypeVar("T")
G = TypeVar("G")

URI = "qemu:///system"


class AgentProcess:
    """``memd serve --libvirt`` in its own process; stop() is a graceful SIGTERM."""

    def __init__(self, workdir: Path, *, budget: str = "64M") -> None:
        self.socket = workdir / "control.sock"
        self.store = workdir / "store"  # the crash-safe tmem store (LMDB)
        self.log = workdir / "agent.log"
        self.budget = budget
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.process is None, "agent already running"
        argv = [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(self.socket),
            "serve",
            "--libvirt",
            URI,
            "--store",
            str(self.store),
            "--budget",
            self.budget,
            "--log-level",
            "debug",
        ]
        with open(self.log, "ab") as log:
            log.write(f"==== start {self.starts}\n".encode())
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status (0 for a clean stop)."""
        assert self.process is not None, "agent not running"
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"agent ignored SIGTERM for {timeout} s:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no agent log)"

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``memd --socket S ARGS`` (the operator CLI) and return what it did."""
        return subprocess.run(
            [sys.executable, "-m", "memd.cli", "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, (
            f"memd {' '.join(args)} exited {proc.returncode}: "
            f"{proc.stderr}\nagent log:\n{self.log_tail()}"
        )
        return json.loads(proc.stdout)

    def guest_rows(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in self.json("guests")}

    def wait_attached(self, names: list[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Poll ``memd guests`` until every guest in ``names`` is attached and connected."""
        deadline = time.monotonic() + timeout
        rows: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"agent exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.socket.exists():
                proc = self.cli("guests", "--json")
                if proc.returncode == 0:
                    rows = {row["name"]: row for row in json.loads(proc.stdout)}
                    if all(rows.get(n, {}).get("connected") for n in names):
                        return rows
            time.sleep(0.2)
        raise AssertionError(
            f"guests {names} not attached within {timeout} s: {rows}\n{self.log_tail()}"
        )


@dataclass(frozen=True)
class Step:
    """One command of :meth:`LibvirtGuest.steps`: exit status and output."""

    rc: int
    output: str
    seconds: float = 0.0  #: guest time the command took

    def __str__(self) -> str:
        return f"exit {self.rc} after {self.seconds} s: {self.output or '(no output)'}"


class LibvirtGuest:
    """One transient TCG domain from vm-images/domain.xml.in with its console shell."""

    def __init__(
        self, conn: Any, image: ImagePaths, workdir: Path, name: str, memory_mib: int = 256
    ) -> None:
        import libvirt

        self.name = name
        self.console = workdir / f"{name[-1]}.console.sock"  # short: sun_path is 107 bytes
        self.console_log = workdir / f"{name}.console.log"
        xml = render_domain_xml(
            image, name=name, console_socket=self.console, memory_mib=memory_mib
        )
        self.domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        self._shell: GuestShell | None = None
        self.step_log: list[tuple[str, float]] = []  # (label, guest seconds) of every step

    def start(self) -> None:
        """Attach the console, then let the paused guest run."""
        self._shell = GuestShell(self.console, self.console_log)
        self.domain.resume()

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.shell.wait_ready(0, timeout)

    @property
    def shell(self) -> GuestShell:
        assert self._shell is not None, f"{self.name} has no console yet"
        return self._shell

    def channel_path(self) -> str:
        """The memd channel socket libvirt chose, from the live XML."""
        live = self.domain.XMLDesc(0)
        match = re.search(
            r"<channel type='unix'>\s*<source mode='bind' path='([^']+)'/>\s*"
            rf"<target type='virtio' name='{re.escape(CHANNEL_NAME)}'",
            live,
        )
        assert match, live
        return match.group(1)

    def run(self, script: str, timeout: float = 120.0) -> CommandResult:
        return self.shell.run(script, timeout)

    def check(self, script: str, timeout: float = 120.0) -> str:
        """Run ``script``; its stdout, or an assertion with everything it printed."""
        return self.check_bytes(script, timeout).decode(errors="replace")

    def check_bytes(self, script: str, timeout: float = 120.0) -> bytes:
        result = self.shell.run(script, timeout)
        assert result.status == 0, (
            f"{self.name}: script exited {result.status}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
        return result.stdout_bytes

    def steps(self, steps: list[tuple[str, str]], timeout: float = 180.0) -> dict[str, Step]:
        """Run shell commands in one console round trip, each in /tmp, carrying on after a
        failure; per label its exit status and its output (stdout+stderr, newlines as ``|``).
        Commands must not print raw binary (use ``memd-guest get -o FILE``)."""
        lines = ["cd /tmp"]
        for label, command in steps:
            assert re.fullmatch(r"[\w.-]+", label), label
            lines.append(
                f"t0=$(cut -d' ' -f1 /proc/uptime); {{ {command} ; }} > .step 2>&1; "
                f"rc=$?; printf '@@%s %s %s %s %s\\n' {label} $rc $t0 "
                f"$(cut -d' ' -f1 /proc/uptime) \"$(tr '\\n' '|' < .step)\""
            )
        out = self.check("\n".join(lines) + "\n", timeout)
        results: dict[str, Step] = {}
        for match in re.finditer(r"^@@(\S+) (\d+) ([\d.]+) ([\d.]+) (.*)$", out, re.MULTILINE):
            seconds = float(match.group(4)) - float(match.group(3))
            results[match.group(1)] = Step(
                int(match.group(2)), match.group(5).rstrip("|"), round(seconds, 2)
            )
        self.step_log += [(label, results[label].seconds) for label, _ in steps if label in results]
        missing = [label for label, _ in steps if label not in results]
        assert not missing, f"{self.name}: no result for {missing}:\n{out}"
        return results

    def destroy(self) -> None:
        import libvirt

        if self._shell is not None:
            self._shell.close()
            self._shell = None
        with contextlib.suppress(libvirt.libvirtError):
            self.domain.destroy()


def both(first: G, second: G, fn: Callable[[G], T]) -> tuple[T, T]:
    """``fn(first)`` and ``fn(second)`` at once (each TCG guest is one host thread)."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(fn, first), pool.submit(fn, second)
        return a.result(), b.result()


def is_root() -> bool:
    return os.geteuid() == 0
