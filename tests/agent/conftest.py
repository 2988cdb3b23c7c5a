"""A real agent (asyncio loop in a thread, control socket, in-process machine) per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from memd.agent.app import AgentApp
from memd.demo import _LoopThread
from memd.guest.client import GuestClient


class RunningAgent:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.app = AgentApp(budget_bytes=32 << 20, sim_frames=4096)
        self.loop = _LoopThread()
        self.control = str(tmp / "control.sock")
        self.loop.run(self.app.start(self.control))

    def add_guest(self, name: str, ram_pages: int = 256) -> str:
        path = str(self.tmp / f"{name}.sock")
        assert self.app.machine is not None and self.app.sharing is not None
        domid = self.app.machine.create_domain(ram_pages)
        self.app.sharing.bind(name, domid)
        self.loop.run(self.app.agent.add_channel(name, path, mode="listen"))
        return path

    def client(self, path: str, **kw: object) -> GuestClient:
        kw.setdefault("boot_id", os.urandom(16))
        kw.setdefault("timeout", 5.0)
        kw.setdefault("reconnect_timeout", 5.0)
        return GuestClient.for_unix_socket(path, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.run(self.app.stop())
        self.loop.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running
    finally:
        running.close()
