"""The `memd serve --libvirt` follower on libvirt's embedded test driver (no daemon)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from hypervisor.libvirt_host import LibvirtHost
from memd.agent.app import AgentApp
from memd.libvirt_cli import LibvirtFollower
from tests.support.loop_thread import LoopThread

URI = "test:///default"


def _define(host: LibvirtHost, name: str, sock: Path) -> None:
    host._conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        f"<os><type>hvm</type></os><devices><channel type='unix'>"
        f"<source mode='bind' path='{sock}'/><target type='virtio' name='org.memd.0'/>"
        f"</channel></devices></domain>"
    )


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_follower_attaches_matching_domains_and_follows_their_lifecycle(tmp_path: Path) -> None:
    tag = f"f{os.getpid()}"
    web1, web2, db = f"{tag}-web-1", f"{tag}-web-2", f"{tag}-db-1"
    app = AgentApp(budget_bytes=16 << 20)
    loop = LoopThread()
    loop.run(app.start(None))
    with LibvirtHost(URI) as host:
        for name in (web1, web2, db):
            _define(host, name, tmp_path / f"{name}.sock")
        host._conn.lookupByName(web1).create()
        host._conn.lookupByName(db).create()
        follower = LibvirtFollower(app, URI, match=f"{tag}-web-*")
        try:
            loop.run(follower.start())
            channels = app.agent.channels
            assert _wait(lambda: web1 in channels)  # running at start: found by the scan
            assert channels[web1].path == str(tmp_path / f"{web1}.sock")
            host._conn.lookupByName(web2).create()
            assert _wait(lambda: web2 in channels)  # started later: found by its event
            host._conn.lookupByName(web1).destroy()
            assert _wait(lambda: web1 not in channels)  # stopped: detached
            assert db not in channels  # never matched the glob
        finally:
            loop.run(follower.stop())
            loop.run(app.stop())
            loop.close()
            for name in (web1, web2, db):
                dom = host._conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()


def test_a_stopped_domain_keeps_the_client_of_the_swap_disk_still_served(tmp_path: Path) -> None:
    """`serve --swap NAME=...` outlives the domain: forgetting the guest on its stop took
    the disk's pool from under the served disk (seen after a failed incoming libvirt
    migration: every `memd status` then failed)."""
    from memd.agent.commands import StatusArgs

    name = f"f{os.getpid()}-swap"
    app = AgentApp(budget_bytes=16 << 20, swap_markers=tmp_path / "markers")
    loop = LoopThread()
    loop.run(app.start(None))
    with LibvirtHost(URI) as host:
        _define(host, name, tmp_path / "chan.sock")
        loop.run(app.swap.add(name, str(tmp_path / "swap.nbd"), 1 << 20))
        follower = LibvirtFollower(app, URI, match=name)
        try:
            loop.run(follower.start())
            host._conn.lookupByName(name).create()
            assert _wait(lambda: name in app.agent.channels)
            host._conn.lookupByName(name).destroy()
            assert _wait(lambda: name not in app.agent.channels)
            assert app.tmem.has_client(name) and name in app.swap.disks
            disks = app.handlers.status(StatusArgs())["swap_disks"]
            assert [d["name"] for d in disks] == [name]
        finally:
            loop.run(follower.stop())
            loop.run(app.stop())
            loop.close()
            dom = host._conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
