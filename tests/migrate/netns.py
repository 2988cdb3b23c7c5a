"""Two simulated hosts on this machine: network namespaces joined by a veth pair, one
``memd serve`` in each, QEMU processes beside them (shared filesystem: unix sockets reach
across namespaces, so QEMU's chardev, NBD and migration sockets work unchanged).

Names are unique per test run and every namespace is deleted at teardown, whatever
happened.  Needs root, ``ip`` and ``openssl``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor.qmp import QmpMonitor
from tests.support.bare_qemu import start_bare_qemu
from tests.support.memd_agent import ROOT, AgentProcess, serve_argv
from tests.support.veth import End, delete_namespaces, link_namespaces

PORT = 7700


def netns_available() -> bool:
    return (
        os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("openssl") is not None
    )


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
        link_namespaces(
            End(self.ns_a, f"mv{self.tag}a"[:15], self.addr_a),
            End(self.ns_b, f"mv{self.tag}b"[:15], self.addr_b),
            self.made,
        )

    def delete(self) -> None:
        delete_namespaces(self.made)


class Agent(AgentProcess):
    """``memd serve`` inside one namespace; the CLI reaches it over its unix socket."""

    def __init__(self, ns: str, addr: str, workdir: Path, tls: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "agent.log", workdir / "memd.sock", ns)
        self.ns, self.addr, self.dir, self.tls = ns, addr, workdir, tls
        self.socket = workdir / "memd.sock"
        self.channel = workdir / "vm1.sock"
        self.swap = workdir / "vm1.swap"

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
        serve = serve_argv(
            self.socket,
            self.dir / "store",
            self.address,
            self.tls,
            *channel,
            "--swap",
            f"vm1={self.swap}:{swap_mib}M",
        )
        # Each host has its own run and state directories (swap-disk markers live there).
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MEMD_RUN_DIR": str(self.dir / "run"),
            "MEMD_STATE_DIR": str(self.dir / "state"),
        }
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *serve],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_listening(30)


class Qemu:
    """A guest-less QEMU (SeaBIOS finds nothing to boot and idles) with memd's swap disk
    on NBD and two QMP monitors: ``memd.qmp`` for memd, ``op.qmp`` for the operator."""

    def __init__(self, workdir: Path, swap: Path, *, incoming: str | None = None) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.memd_qmp = workdir / "memd.qmp"
        self.op_qmp = workdir / "op.qmp"
        self.log = workdir / "qemu.log"
        self.process = start_bare_qemu(
            [self.memd_qmp, self.op_qmp],
            "-M",
            "pc",
            "-m",
            "64",
            "-blockdev",
            f"driver=nbd,node-name=swap0,server.type=unix,server.path={swap},discard=unmap",
            "-device",
            "virtio-blk-pci,drive=swap0",
            *(("-incoming", incoming) if incoming else ()),
            log=self.log,
        )
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
