"""LibvirtHost against a real libvirtd running real (TCG) QEMU domains.

The domains have no disk and no OS: SeaBIOS finds nothing to boot and idles, which is
all that channel discovery, pids, monitors and events need.  libvirtd is started as
root when it is not running (hypervisor.libvirtd) and left running for other tests.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("libvirt")

from hypervisor.guests import LifecycleEvent
from hypervisor.libvirt_host import LibvirtHost
from hypervisor.qmp import info_mtree_flat, qom_set_merge, query_memdev
from memd.errors import ChannelMissing, CommandFailed, NotFound, Unavailable
from tests.support.users import as_nobody

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

MEMD_CHANNEL = (
    "<channel type='unix'><source mode='bind'/><target type='virtio' name='org.memd.0'/></channel>"
)
_names = itertools.count()


@pytest.fixture
def make_domain(host: LibvirtHost) -> Iterator[Callable[[str], str]]:
    """Define a 64 MiB TCG domain with the given extra devices; destroyed and undefined after."""
    created: list[str] = []

    def define(devices: str) -> str:
        name = f"memd-pytest-{os.getpid()}-{next(_names)}"
        host._conn.defineXML(
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices><memballoon model='none'/>{devices}</devices></domain>"
        )
        created.append(name)
        return name

    yield define
    for name in created:
        try:
            dom = host._conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except Exception as err:  # cleanup must go on for the other domains
            print(f"cleanup of {name} failed: {err}")


class Recorder:
    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []
        self.cond = threading.Condition()

    def __call__(self, ev: LifecycleEvent) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def wait(
        self, name: str, pred: Callable[[LifecycleEvent], bool], timeout: float = 15.0
    ) -> LifecycleEvent:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events:
                    if ev.name == name and pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(e.kind, e.detail) for e in self.events if e.name == name]
                    pytest.fail(f"no matching event for {name}; saw {seen}")
                self.cond.wait(left)


def test_running_domain_channel_pid_monitor_events(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    rec = Recorder()
    watch_id = host.watch(rec)
    name = make_domain(MEMD_CHANNEL)
    with pytest.raises(Unavailable, match="is not running"):
        host.channel_path(name)
    host._conn.lookupByName(name).create()
    assert rec.wait(name, lambda e: e.starts_guest).detail == "booted"

    info = host.guest(name)
    path = host.channel_path(name)
    assert info.channel == path and info.attachable and info.state == "running"
    assert path == (
        f"/var/lib/libvirt/qemu/channel/target/domain-{info.domain_id}-{name}/org.memd.0"
    )
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)  # QEMU listens: the agent could attach now
    assert name in [g.name for g in host.attachable()]

    pid = host.qemu_pid(name)
    assert info.qemu_pid == pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"qemu-system-x86_64" in cmdline[0] and f"guest={name}".encode() in b",".join(cmdline)

    mon = host.monitor(name)
    assert mon.execute("query-status")["status"] == "running"
    [ram] = query_memdev(mon)
    assert (ram.id, ram.size) == ("pc.ram", 64 << 20)
    qom_set_merge(mon, ram.id, False)
    assert not query_memdev(mon)[0].merge
    qom_set_merge(mon, ram.id, True)
    assert query_memdev(mon)[0].merge
    ram_ranges = [r for r in info_mtree_flat(mon) if r.region == "pc.ram"]
    assert sum(r.size for r in ram_ranges) == 64 << 20
    with pytest.raises(CommandFailed, match="QEMU refused no-such-command"):
        mon.execute("no-such-command")

    host._conn.lookupByName(name).destroy()
    assert rec.wait(name, lambda e: e.ends_guest).detail == "destroyed"
    assert host.guest(name).state == "shut off" and host.guest(name).channel is None
    with pytest.raises(Unavailable, match="is not running"):
        mon.execute("query-status")
    host.unwatch(watch_id)


def test_qemu_that_dies_is_reported_as_ended(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    rec = Recorder()
    watch_id = host.watch(rec)
    name = make_domain(MEMD_CHANNEL)
    host._conn.lookupByName(name).create()
    rec.wait(name, lambda e: e.starts_guest)
    os.kill(host.qemu_pid(name), signal.SIGKILL)
    ended = rec.wait(name, lambda e: e.ends_guest)
    assert (ended.kind, ended.detail) in {
        ("stopped", "failed"),
        ("stopped", "crashed"),
        ("crashed", "panicked"),
    }
    assert host.guest(name).state == "shut off"
    host.unwatch(watch_id)


def test_add_channel_to_running_domain(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    # Has a virtio-serial controller (as virt-install's guests do): hot-plug works.
    name = make_domain("<controller type='virtio-serial' index='0'/>")
    host._conn.lookupByName(name).create()
    with pytest.raises(ChannelMissing, match="has no memd channel"):
        host.channel_path(name)
    info = host.add_channel(name)
    assert info.channel is not None and stat.S_ISSOCK(os.stat(info.channel).st_mode)
    assert host.channel_path(name) == info.channel
    assert host.add_channel(name) == host.guest(name)  # idempotent

    # No controller: libvirt cannot hot-plug one; the config route needs a restart.
    bare = make_domain("")
    dom = host._conn.lookupByName(bare)
    dom.create()
    with pytest.raises(ChannelMissing, match="no virtio-serial controller"):
        host.add_channel(bare)
    host.add_channel(bare, live=False)
    assert host.guest(bare).has_channel is False  # live XML unchanged
    dom.destroy()
    dom.create()
    assert stat.S_ISSOCK(os.stat(host.channel_path(bare)).st_mode)


def test_add_channel_command(
    host: LibvirtHost, make_domain: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`memd add-channel`: the operator's way to what section 4 of operators.md describes."""
    from memd.cli import main

    uri = ("--libvirt", "qemu:///system")
    ready = make_domain("<controller type='virtio-serial' index='0'/>")
    host._conn.lookupByName(ready).create()
    assert main(["add-channel", ready, *uri]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.strip() == f"{ready}: memd channel at {host.channel_path(ready)}"
    bare = make_domain("")
    host._conn.lookupByName(bare).create()
    assert main(["add-channel", bare, *uri]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--config-only" in err
    assert main(["add-channel", bare, *uri, "--config-only"]) == 0
    assert "takes effect at the next start" in capsys.readouterr().out


def test_unknown_domain_on_real_libvirtd(host: LibvirtHost) -> None:
    with pytest.raises(NotFound, match="libvirt domain 'memd-no-such-domain' does not exist"):
        host.channel_path("memd-no-such-domain")


@pytest.mark.skipif(shutil.which("virt-admin") is None, reason="virt-admin is not installed")
def test_libvirtd_dropping_us_is_reported(host: LibvirtHost) -> None:
    """libvirtd closes our connection (as on its restart): callback, then one sentence."""
    victim = LibvirtHost("qemu:///system")
    try:
        reasons: list[str] = []
        lost = threading.Event()

        def dropped(reason: str) -> None:
            reasons.append(reason)
            lost.set()

        victim.on_disconnect(dropped)
        # Find this process's newest client on the server and have libvirtd drop it.
        listing = subprocess.run(
            ["virt-admin", "srv-clients-list", "libvirtd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        ids = [line.split()[0] for line in listing.splitlines()[2:] if line.strip()]
        mine = [
            cid
            for cid in ids
            if re.search(
                rf"unix_process_id\s*:\s*{os.getpid()}\b",
                subprocess.run(
                    ["virt-admin", "client-info", "libvirtd", cid], capture_output=True, text=True
                ).stdout,
            )
        ]
        assert mine, "our own connection is not among libvirtd's clients"
        subprocess.run(
            ["virt-admin", "client-disconnect", "libvirtd", max(mine, key=int)],
            capture_output=True,
            check=True,
        )
        assert lost.wait(10) and reasons == ["eof"]
        assert not victim.alive
        with pytest.raises(Unavailable, match="lost the connection to libvirtd"):
            victim.domains()
    finally:
        victim.close()
    assert host.alive  # the other connection of this process is untouched


def _clients_of_this_process() -> list[int]:
    listing = subprocess.run(
        ["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True, text=True, check=True
    ).stdout
    ids = [line.split()[0] for line in listing.splitlines()[2:] if line.strip()]
    return [
        int(cid)
        for cid in ids
        if re.search(
            rf"unix_process_id\s*:\s*{os.getpid()}\b",
            subprocess.run(
                ["virt-admin", "client-info", "libvirtd", cid], capture_output=True, text=True
            ).stdout,
        )
    ]


@pytest.mark.skipif(shutil.which("virt-admin") is None, reason="virt-admin is not installed")
def test_follower_reconnects_and_rescans_after_libvirtd_drops_it(
    host: LibvirtHost, make_domain: Callable[[str], str]
) -> None:
    from memd.agent.app import AgentApp
    from memd.libvirt_cli import LibvirtFollower
    from tests.support.loop_thread import LoopThread

    def wait(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.1)
        return pred()

    app = AgentApp(budget_bytes=16 << 20)
    loop = LoopThread()
    loop.run(app.start(None))
    first, second = make_domain(MEMD_CHANNEL), make_domain(MEMD_CHANNEL)
    host._conn.lookupByName(first).create()
    before = set(_clients_of_this_process())
    follower = LibvirtFollower(app, "qemu:///system", match=f"memd-pytest-{os.getpid()}-*")
    try:
        loop.run(follower.start())
        assert wait(lambda: first in app.agent.channels)
        theirs = set(_clients_of_this_process()) - before  # the follower's connection(s)
        assert theirs
        for cid in theirs:
            subprocess.run(
                ["virt-admin", "client-disconnect", "libvirtd", str(cid)],
                capture_output=True,
                check=True,
            )
        # A domain started while the follower is reconnecting: only the re-scan finds it.
        host._conn.lookupByName(second).create()
        assert wait(lambda: second in app.agent.channels)
        assert first in app.agent.channels
        assert wait(lambda: bool(set(_clients_of_this_process()) - before - theirs))
    finally:
        loop.run(follower.stop())
        loop.run(app.stop())
        loop.close()
        if app.real.machine is not None:
            app.real.machine.close()


def test_a_user_libvirt_will_not_serve_is_told_so(host: LibvirtHost) -> None:
    """As `nobody`: an access problem is reported as one, not as 'is libvirtd running?'."""

    message = as_nobody(
        "import libvirt\nfrom hypervisor.libvirt_host import LibvirtHost",
        "LibvirtHost('qemu:///system', events=False).close()\nresult = 'opened'",
    )
    assert message.startswith("PermissionDenied: "), message
    assert "is libvirtd running" not in message and "run memd as root" in message
