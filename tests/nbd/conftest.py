"""A real agent with swap disks on unix sockets, and helpers to run real NBD clients."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memd.agent.app import AgentApp
from tests.support.loop_thread import LoopThread

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, where python3-libnbd installs the binding


class SwapAgent:
    def __init__(self, tmp: Path, budget: int = 64 << 20) -> None:
        self.tmp = tmp
        # guest cap: half the budget, plus each disk
        self.app = AgentApp(budget_bytes=budget, swap_markers=tmp / "swap-markers")
        self.loop = LoopThread()
        self.loop.run(self.app.start(str(tmp / "control.sock")))

    def add_disk(self, name: str, size: int = 64 << 20) -> str:
        path = str(self.tmp / f"{name}.nbd")
        self.loop.run(self.app.swap.add(name, path, size))
        return path

    def close(self) -> None:
        self.loop.run(self.app.stop())
        self.loop.close()


@pytest.fixture
def swap_agent(tmp_path: Path) -> Iterator[SwapAgent]:
    agent = SwapAgent(tmp_path)
    try:
        yield agent
    finally:
        agent.close()


def accepts(path: str | Path) -> bool:
    """Something listens on the unix socket (a stale file left by a killed agent does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def nbd_uri(path: str) -> str:
    return f"nbd+unix:///?socket={path}"


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh --all)")


def have_libnbd_python() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0
