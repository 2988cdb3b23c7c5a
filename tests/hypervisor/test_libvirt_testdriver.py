"""LibvirtHost against libvirt's embedded test:///default driver (no daemon, no QEMU).

The test driver's state is shared by every connection in the process and outlives them
while the event loop holds a reference, so each test uses its own domain names and
removes them, and none changes the built-in running domain 'test'.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("libvirt")

from hypervisor.guests import LifecycleEvent
from hypervisor.libvirt_host import LibvirtHost
from memd.errors import ChannelMissing, NotFound, Unavailable

URI = "test:///default"
_names = itertools.count()


@pytest.fixture
def host() -> Iterator[LibvirtHost]:
    with LibvirtHost(URI) as h:
        yield h


@pytest.fixture
def make_domain(host: LibvirtHost) -> Iterator[Callable[[str], str]]:
    """Define a domain from a <devices> fragment; returns its name; removed afterwards."""
    created: list[str] = []

    def define(devices: str) -> str:
        name = f"memd-t{os.getpid()}-{next(_names)}"
        host._conn.defineXML(
            f"<domain type='test'><name>{name}</name><memory>65536</memory>"
            f"<os><type>hvm</type></os><devices>{devices}</devices></domain>"
        )
        created.append(name)
        return name

    yield define
    for name in created:
        dom = host._conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def _channel(path: str | None = None, kind: str = "unix") -> str:
    source = f"<source mode='bind' path='{path}'/>" if path else ""
    return f"<channel type='{kind}'>{source}<target type='virtio' name='org.memd.0'/></channel>"


def test_lists_builtin_domain(host: LibvirtHost) -> None:
    [test] = [g for g in host.domains() if g.name == "test"]
    assert test.state == "running" and test.running
    assert (test.has_channel, test.channel, test.qemu_pid) == (False, None, None)
    assert test.to_dict()["channel"] is None
    assert {"name", "state", "channel"} <= set(test.to_dict())


def test_unknown_domain_is_not_found(host: LibvirtHost) -> None:
    for call in (host.guest, host.channel_path, host.monitor, host.qemu_pid):
        with pytest.raises(NotFound) as info:
            call("no-such-vm")
        assert str(info.value) == "libvirt domain 'no-such-vm' does not exist"


def test_domain_without_channel(host: LibvirtHost) -> None:
    with pytest.raises(ChannelMissing) as info:
        host.channel_path("test")
    assert str(info.value) == (
        "domain 'test' has no memd channel (add <channel type='unix'> with "
        "<source mode='bind'/> and target name org.memd.0)"
    )
    assert "test" not in [g.name for g in host.attachable()]


def test_channel_path_follows_the_domain_state(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    name = make_domain(_channel("/run/memd-test/org.memd.0"))
    off = host.guest(name)
    assert (off.state, off.has_channel, off.channel, off.attachable) == (
        "shut off",
        True,
        None,
        False,
    )
    with pytest.raises(Unavailable, match="is not running"):
        host.channel_path(name)
    host._conn.lookupByName(name).create()
    assert host.channel_path(name) == "/run/memd-test/org.memd.0"
    on = host.guest(name)
    assert on.channel == "/run/memd-test/org.memd.0" and on.attachable
    assert on.domain_id is not None
    assert name in [g.name for g in host.attachable()]
    assert [g.name for g in host.domains()] == sorted(g.name for g in host.domains())


def test_channel_of_the_wrong_type(host: LibvirtHost, make_domain: Callable[[str], str]) -> None:
    name = make_domain(_channel(kind="pty"))
    host._conn.lookupByName(name).create()
    with pytest.raises(ChannelMissing, match="type 'pty'"):
        host.channel_path(name)
    assert host.guest(name).has_channel and host.guest(name).channel is None


def test_no_monitor_or_pid_on_non_qemu_driver(host: LibvirtHost) -> None:
    with pytest.raises(Unavailable, match="not a QEMU domain"):
        host.monitor("test")
    with pytest.raises(Unavailable, match="not a QEMU domain"):
        host.qemu_pid("test")


def test_unreachable_libvirtd_is_one_sentence() -> None:
    with pytest.raises(Unavailable) as info:
        LibvirtHost("qemu:///system?socket=/nonexistent/libvirt-sock")
    assert str(info.value) == (
        "cannot reach libvirtd at qemu:///system?socket=/nonexistent/libvirt-sock: "
        "is libvirtd running?"
    )
    with pytest.raises(Unavailable, match="no driver for the URI"):
        LibvirtHost("nosuchdriver:///x")


def test_close_is_idempotent() -> None:
    h = LibvirtHost(URI)
    h.close()
    h.close()
    assert not h.alive


class Recorder:
    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []
        self.cond = threading.Condition()

    def __call__(self, ev: LifecycleEvent) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def wait_for(self, name: str, count: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(mine := [e for e in self.events if e.name == name]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        return [(e.kind, e.detail) for e in mine]


def test_lifecycle_events(host: LibvirtHost, make_domain: Callable[[str], str]) -> None:
    rec = Recorder()
    host.watch(rec)
    name = make_domain("")
    dom = host._conn.lookupByName(name)
    dom.create()
    dom.suspend()
    dom.resume()
    dom.destroy()
    assert rec.wait_for(name, 5) == [
        ("defined", "added"),
        ("started", "booted"),
        ("suspended", "paused"),
        ("resumed", "unpaused"),
        ("stopped", "destroyed"),
    ]
    assert rec.events[1].starts_guest and rec.events[4].ends_guest


def test_failing_callback_does_not_stop_events(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    def explode(_ev: LifecycleEvent) -> None:
        raise RuntimeError("callback bug")

    host.watch(explode)
    rec = Recorder()
    host.watch(rec)
    name = make_domain("")
    host._conn.lookupByName(name).create()
    assert rec.wait_for(name, 2) == [("defined", "added"), ("started", "booted")]


def test_unwatch_stops_delivery(host: LibvirtHost, make_domain: Callable[[str], str]) -> None:
    gone, kept = Recorder(), Recorder()
    watch_id = host.watch(gone)
    host.watch(kept)
    host.unwatch(watch_id)
    host.unwatch(watch_id)  # second time: no-op
    name = make_domain("")
    assert kept.wait_for(name, 1) == [("defined", "added")]
    assert gone.events == []


def test_watch_queue_hands_events_to_asyncio(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    async def main() -> list[tuple[str, str]]:
        _watch_id, queue = host.watch_queue(asyncio.get_running_loop())
        name = await asyncio.to_thread(make_domain, "")
        await asyncio.to_thread(host._conn.lookupByName(name).create)
        got: list[tuple[str, str]] = []
        while len(got) < 2:
            ev = await asyncio.wait_for(queue.get(), 5.0)
            if ev.name == name:
                got.append((ev.kind, ev.detail))
        return got

    assert asyncio.run(main()) == [("defined", "added"), ("started", "booted")]
