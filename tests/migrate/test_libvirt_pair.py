"""A real libvirt live migration between two simulated hosts on this machine.

The hosts are :mod:`tests.support.libvirt_pair` (network, mount and UTS namespaces, each with
its own libvirtd).  A TCG guest from vm-images boots on host ``a``; libvirt migrates it live,
peer to peer, to host ``b`` over TCP on the namespaces' addresses; the guest then answers on
``b``'s console with the state it had on ``a`` and ``a`` no longer has it.

The guest's console socket is in the pair's same-path private directory: the destination
QEMU binds the same path as the source QEMU, each in its own host's directory, which is what
memd's channel and swap-disk sockets need too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.domain_xml import swap_disk_xml
from hypervisor.vmimage import ImagePaths, render_domain_xml
from tests.hypervisor.vm.console import GuestShell
from tests.support.libvirt_pair import (
    LibvirtPair,
    libvirt_pair,
    requires_libvirt_pair,
    sweep_stale,
)

pytestmark = requires_libvirt_pair()

#: Every phase's wall-clock seconds, printed at the end of the module (pytest -s, or -rA).
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtPair]:
    # Short base: the console and libvirt sockets under it must fit in 107 bytes.
    base = tmp_path_factory.mktemp("lvp")
    start = time.monotonic()
    with libvirt_pair(base) as made:
        TIMINGS["pair_up_s"] = round(time.monotonic() - start, 2)
        yield made
    assert not [line for line in _mountinfo() if str(base) in line], "a mount leaked out"
    print(f"\nlibvirt pair timings: {TIMINGS}")


def _mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def test_hosts_are_distinct_and_reach_each_other(pair: LibvirtPair) -> None:
    for host, peer in ((pair.a, pair.b), (pair.b, pair.a)):
        conn = host.connect()
        try:
            # libvirt's same-host check compares hostnames and host UUIDs (the UUIDs are
            # only in the capabilities XML, whose probe of every emulator costs seconds: the
            # migration test shows they differ, libvirt would refuse otherwise).
            assert conn.getHostname() == host.hostname
        finally:
            conn.close()
        # Inside the host, the plain system URI is the host's own libvirtd (a `memd serve
        # --libvirt qemu:///system` started with host.popen follows that one) ...
        own = host.virsh("hostname").strip()
        assert own == host.hostname
        # ... and the peer's libvirtd answers over TCP on the private network.
        out = host.run(["virsh", "-c", peer.tcp_uri, "hostname"]).stdout.strip()
        assert out == peer.hostname
        # The machine's own network does not see the hosts' addresses.
        assert host.address not in os.popen("ip -br addr").read()
    assert pair.a.hostname != pair.b.hostname and pair.a.host_uuid != pair.b.host_uuid
    # Each host's private directory is its own, at the same path.
    pair.a.run(["sh", "-c", f"echo a > {pair.private}/who"])
    assert pair.b.run(["sh", "-c", f"cat {pair.private}/who || true"]).stdout == ""
    assert (pair.a.outside(pair.private) / "who").read_text() == "a\n"
    assert not (pair.private / "who").exists()
    # The hosts' libvirtds keep their pid files in their own /run/libvirt, not the machine's.
    assert (pair.a.outside("/run/libvirt") / "libvirtd.pid").exists()


class Guest:
    """A transient TCG domain started on a host, with its console shell."""

    def __init__(self, pair: LibvirtPair, image: ImagePaths, workdir: Path, name: str) -> None:
        import libvirt

        self.name = name
        self.console = pair.private / "c.sock"  # inside path: each host binds its own file
        self.workdir = workdir
        self.xml = render_domain_xml(image, name=name, console_socket=self.console)
        self.conn_a = pair.a.connect()
        self.conn_b = pair.b.connect()
        self.domain = self.conn_a.createXML(self.xml, libvirt.VIR_DOMAIN_START_PAUSED)
        self.shell: GuestShell | None = None

    def attach(self, host_outside: Path, *, booting: bool) -> GuestShell:
        if self.shell is not None:
            self.shell.close()
        self.shell = GuestShell(host_outside, self.workdir / f"{host_outside.parent.name}.log")
        if booting:
            self.domain.resume()
            self.shell.wait_ready(0, 180)
        else:
            self.shell.attach(60)
        return self.shell

    def close(self) -> None:
        import libvirt

        if self.shell is not None:
            self.shell.close()
        for conn in (self.conn_a, self.conn_b):
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(self.name).destroy()
            conn.close()


@pytest.fixture
def guest(pair: LibvirtPair, vm_image: ImagePaths, tmp_path: Path) -> Iterator[Guest]:
    started = Guest(pair, vm_image, tmp_path, f"memd-lvp-{os.getpid()}")
    try:
        yield started
    finally:
        started.close()


def _serve_disks(pair: LibvirtPair) -> Path:
    """A qemu-nbd on each host at the same socket path under ``pair.private`` (as memd's swap
    disk is), each serving a disk that starts with its host's name; the socket path."""
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed (qemu-utils)")
    sock = pair.private / "swap.sock"
    for host in pair.hosts:
        image = host.outside(pair.private) / "disk.img"
        image.write_bytes(f"host-{host.label}".encode().ljust(4 << 20, b"\0"))
        # --persistent: the source QEMU disconnects at the end of the migration, and the
        # server must still be there for a migration back.
        host.popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-k",
                str(sock),
                "--persistent",
                "-e",
                "4",
                str(pair.private / "disk.img"),
            ]
        )
    deadline = time.monotonic() + 10
    while not all(h.outside(sock).exists() for h in pair.hosts):
        assert time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.05)
    return sock


#: Which host's disk the guest's /dev/vda is: caches dropped first, so the read reaches NBD.
_WHOSE_DISK = "echo 3 > /proc/sys/vm/drop_caches; head -c 6 /dev/vda; echo"


def test_live_migration_moves_the_guest(pair: LibvirtPair, guest: Guest) -> None:
    import libvirt

    start = time.monotonic()
    shell = guest.attach(pair.a.outside(guest.console), booting=True)
    TIMINGS["boot_s"] = round(time.monotonic() - start, 2)
    token = secrets.token_hex(8)
    before = float(shell.check(f"echo {token} > /tmp/token; cut -d' ' -f1 /proc/uptime"))
    channel_a = _memd_channel(guest.domain.XMLDesc(0))
    assert pair.a.outside(channel_a).exists()
    # A disk hot-plugged the way memd plugs its swap disk: NBD on a unix socket whose path
    # is the same on both hosts.
    disk_socket = _serve_disks(pair)
    guest.domain.attachDeviceFlags(
        swap_disk_xml(str(disk_socket), "vdb", 5), libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    assert shell.check(f"sleep 1; {_WHOSE_DISK}").strip() == "host-a"

    # What an operator types on host a: the source libvirtd connects to b's over TCP.
    start = time.monotonic()
    pair.a.virsh("migrate", "--live", "--p2p", guest.name, pair.b.tcp_uri)
    TIMINGS["migrate_a_to_b_s"] = round(time.monotonic() - start, 2)

    moved = guest.conn_b.lookupByName(guest.name)
    assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(libvirt.libvirtError) as gone:
        guest.conn_a.lookupByName(guest.name)
    assert gone.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN

    start = time.monotonic()
    shell = guest.attach(pair.b.outside(guest.console), booting=False)
    after = shell.check("cat /tmp/token; cut -d' ' -f1 /proc/uptime").split()
    TIMINGS["reattach_s"] = round(time.monotonic() - start, 2)
    assert after[0] == token, "the guest on b is not the guest that ran on a"
    assert float(after[1]) > before, "the guest's uptime restarted: it was booted, not moved"
    # The same socket path now reaches b's disk server, and the memd channel socket is b's
    # own file (under b's /var/lib/libvirt).
    assert shell.check(_WHOSE_DISK).strip() == "host-b"
    channel_b = _memd_channel(moved.XMLDesc(0))
    assert pair.b.outside(channel_b).exists()
    assert not pair.a.outside(channel_a).exists()
    # The source's QEMU is gone: its log says it was migrated out.
    assert "shutting down" in pair.a.qemu_log(guest.name).read_text()

    # And back, through the API: the pair is symmetric.
    TIMINGS["migrate_b_to_a_s"] = round(pair.migrate(guest.name, to=pair.a), 2)
    guest.domain = guest.conn_a.lookupByName(guest.name)
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    shell = guest.attach(pair.a.outside(guest.console), booting=False)
    assert shell.check(f"cat /tmp/token; {_WHOSE_DISK}").split() == [token, "host-a"]
    with pytest.raises(libvirt.libvirtError):
        guest.conn_b.lookupByName(guest.name)


def _memd_channel(xml: str) -> str:
    from hypervisor.domain_xml import find_memd_channel

    spec = find_memd_channel(xml)
    assert spec is not None and spec.path, xml
    return spec.path


def test_cancelled_migration_leaves_the_guest_on_the_source(
    pair: LibvirtPair, guest: Guest
) -> None:
    import libvirt

    shell = guest.attach(pair.a.outside(guest.console), booting=True)
    token = secrets.token_hex(8)
    shell.check(f"echo {token} > /tmp/token")
    # 4 MiB/s: the 256 MiB guest would take a minute, so the job is surely still copying
    # when it is aborted.
    failure: list[libvirt.libvirtError] = []

    def migrate() -> None:
        try:
            pair.migrate(guest.name, to=pair.b, params={libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 4})
        except libvirt.libvirtError as err:
            failure.append(err)

    worker = threading.Thread(target=migrate)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while guest.domain.jobStats().get("memory_processed", 0) < 1 << 20:
            assert time.monotonic() < deadline, "the migration never started copying"
            time.sleep(0.05)
        guest.domain.abortJob()
    finally:
        worker.join(60)
    assert failure, "the migration completed although it was aborted"
    assert failure[0].get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED, failure[0]

    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(libvirt.libvirtError):
        guest.conn_b.lookupByName(guest.name)
    assert shell.check("cat /tmp/token").strip() == token


def test_sweep_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no live process now
    name = f"lvpair-{dead.pid}x1-a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
    try:
        # `ip netns exec` enters the namespace only after it starts: sweep once the orphan
        # is inside (a sweep before that found nothing to kill: an intermittent failure).
        deadline = time.monotonic() + 10
        while str(orphan.pid) not in _netns_pids(name):
            assert time.monotonic() < deadline, "the orphan never entered its namespace"
            time.sleep(0.02)
        assert name in sweep_stale()
        assert orphan.wait(10) == -signal.SIGKILL
        assert (
            name
            not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
    finally:
        orphan.kill()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _netns_pids(name: str) -> list[str]:
    found = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return found.stdout.split()
