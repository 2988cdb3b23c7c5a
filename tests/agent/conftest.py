"""A real agent (asyncio loop in a thread, control socket, in-process machine, an LMDB
tmem store in the test's tmp dir) per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.lmdb_store import LmdbStore
from memd.agent.app import AgentApp
from memd.guest.client import GuestClient
from tests.support.loop_thread import LoopThread


class RunningAgent:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.control = str(tmp / "control.sock")
        self.store = LmdbStore(tmp / "store", budget_bytes=32 << 20, control_path=self.control)
        self.app = AgentApp(budget_bytes=32 << 20, sim_frames=4096, store=self.store)
        self.loop = LoopThread()
        self.loop.run(self.app.start(self.control))

    def restart(self) -> AgentApp:
        """Stop this agent and start another on the same store (the channels of the
        guests named in *names* are added again by the caller)."""
        self.loop.run(self.app.stop())
        self.store.close()
        self.store = LmdbStore(self.tmp / "store", budget_bytes=32 << 20, control_path=self.control)
        self.app = AgentApp(budget_bytes=32 << 20, sim_frames=4096, store=self.store)
        self.loop.run(self.app.start(self.control))
        return self.app

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
        return GuestClient.for_unix_socket(path, **kw)

    def close(self) -> None:
        self.loop.run(self.app.stop())
        self.loop.close()
        self.store.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running
    finally:
        running.close()
