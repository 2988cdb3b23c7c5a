"""Two simulated hosts on this machine: network namespaces joined by a veth pair, one
``memd serve`` in each, QEMU processes beside them (shared filesystem: unix sockets reach
across namespaces, so QEMU's chardev, NBD and migration sockets work unchanged).

Names are unique per test run and every namespace is deleted at teardown, whatever
happened.  Needs root, ``ip`` and ``openssl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor.qmp import QmpMonitor

ROOT = Path(__file__).resolve().parents[2]
PORT = 7700


def netns_available() -> bool:
    return (
        os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("openssl") is not None
    )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Net:
    """Two namespaces, ``a`` and ``b``, with addresses ``addr_a`` and ``addr_b``."""

    tag: str
    subnet: int
    made: list[str] = field(default_factory=list)

    @property
    def ns_a(self) -> str:
        return f"memdmig-{self.tag}-a"

    @property
    def ns_b(self) -> str:
        return f"memdmig-{self.tag}-b"

    @property
    def addr_a(self) -> str:
        return f"10.231.{self.subnet}.1"

    @property
    def addr_b(self) -> str:
        return f"10.231.{self.subnet}.2"

    def create(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        veth_a, veth_b = f"mv{self.tag}a"[:15], f"mv{self.tag}b"[:15]
        _ip(
            "link",
            "add",
            veth_a,
            "netns",
            self.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            self.ns_b,
        )
        _ip("-n", self.ns_a, "addr", "add", f"{self.addr_a}/24", "dev", veth_a)
        _ip("-n", self.ns_b, "addr", "add", f"{self.addr_b}/24", "dev", veth_b)
        _ip("-n", self.ns_a, "link", "set", veth_a, "up")
        _ip("-n", self.ns_b, "link", "set", veth_b, "up")

    def delete(self) -> None:
        for ns in self.made:  # deleting a namespace deletes its end of the veth pair too
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self.made.clear()


class Agent:
    """``memd serve`` inside one namespace; the CLI reaches it over its unix socket."""

    def __init__(self, ns: str, addr: str, workdir: Path, tls: Path) -> None:
        self.ns, self.addr, self.dir, self.tls = ns, addr, workdir, tls
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "memd.sock"
        self.channel = workdir / "vm1.sock"
        self.swap = workdir / "vm1.swap"
        self.log = workdir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.addr}:{PORT}"

    def start(self, *, qemu_channel: Path | None = None, swap_mib: int = 64) -> None:
        """``qemu_channel``: a real guest's port, where QEMU listens (``--channel``);
        without it the agent listens on :attr:`channel` for a simulated guest."""
        channel = (
            ["--channel", f"vm1={qemu_channel}"]
            if qemu_channel is not None
            else ["--listen", f"vm1={self.channel}"]
        )
        argv = [
            "ip",
            "netns",
            "exec",
            self.ns,
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(self.socket),
            "serve",
            "--store",
            str(self.dir / "store"),
            "--budget",
            "512M",
            "--spill-dir",
            "",
            "--migrate-listen",
            self.address,
            "--tls-dir",
            str(self.tls),
            *channel,
            "--swap",
            f"vm1={self.swap}:{swap_mib}M",
            "--log-json",
            "--log-level",
            "debug",
        ]
        # Each host has its own run and state directories (swap-disk markers live there).
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MEMD_RUN_DIR": str(self.dir / "run"),
            "MEMD_STATE_DIR": str(self.dir / "state"),
        }
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.cli("status")["migrations"]["listening"]:
                    return
            except subprocess.CalledProcessError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent in {self.ns} did not start:\n{self.tail()}")
            time.sleep(0.1)

    def cli(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "memd.cli", "--socket", str(self.socket), *args, "--json"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return json.loads(out.stdout)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Qemu:
    """A guest-less QEMU (SeaBIOS finds nothing to boot and idles) with memd's swap disk
    on NBD and two QMP monitors: ``memd.qmp`` for memd, ``op.qmp`` for the operator."""

    def __init__(self, workdir: Path, swap: Path, *, incoming: str | None = None) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.memd_qmp = workdir / "memd.qmp"
        self.op_qmp = workdir / "op.qmp"
        argv = [
            "qemu-system-x86_64",
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.memd_qmp},server=on,wait=off",
            "-qmp",
            f"unix:{self.op_qmp},server=on,wait=off",
            "-blockdev",
            f"driver=nbd,node-name=swap0,server.type=unix,server.path={swap},discard=unmap",
            "-device",
            "virtio-blk-pci,drive=swap0",
        ]
        if incoming:
            argv += ["-incoming", incoming]
        self.log = workdir / "qemu.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 20
        while not self.op_qmp.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.qmp = Qmp(self.op_qmp, 30)

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])

    def migration(self) -> str:
        return str((self.qmp.execute("query-migrate") or {}).get("status", "none"))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            self.qmp.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Qmp:
    """A test's QMP connection to one of its QEMUs: the product's synchronous monitor,
    called with keyword arguments as QMP names them."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._monitor = QmpMonitor.connect(str(path), timeout=timeout)

    def execute(self, command: str, **arguments: Any) -> Any:
        return self._monitor.execute(command, arguments or None)

    def close(self) -> None:
        self._monitor.close()
