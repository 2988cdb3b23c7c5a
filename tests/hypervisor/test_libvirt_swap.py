"""`memd attach VM --swap SIZE` / `memd detach VM --swap` on a real libvirtd.

The domain (64 MiB, no OS: SeaBIOS idles) gets a memd swap disk hot-plugged as a
``<disk type='network'>`` with an NBD unix-socket source; QEMU (user libvirt-qemu)
connects to memd at once.  Checked: the socket belongs to that QEMU's uid/gid with mode
0600, another process of the same uid is refused (SO_PEERCRED pid check) and a process of
another uid cannot even open it, QEMU's writes land in the guest's tmem pool, detach
unplugs and stops serving.
"""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt")

from hypervisor.domain_xml import SWAP_SERIAL, find_swap_disk, swap_disk_xml
from hypervisor.libvirt_host import LibvirtHost
from memd.agent import control
from memd.agent.commands import CommandArgs, GuestsArgs
from memd.errors import MemdError
from memd.libvirt_cli import attach_swap, detach_swap
from tests.nbd.conftest import SwapAgent

pytestmark = [pytest.mark.libvirt, pytest.mark.root]
_names = itertools.count()

#: Connects as another process and says whether the server greeted it.
_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied"); sys.exit()
data = s.recv(18)
print("greeted" if data.startswith(b"NBDMAGIC") else "refused")
"""


@pytest.fixture
def running_domain(host: LibvirtHost) -> Iterator[str]:
    name = f"memd-pytest-swap-{os.getpid()}-{next(_names)}"
    host._conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<features><acpi/></features>"  # PCI hot-plug needs ACPI on the pc machine
        "<devices><memballoon model='none'/></devices></domain>"
    )
    dom = host._conn.lookupByName(name)
    dom.create()
    try:
        yield name
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.fixture
def nbd_dir() -> Iterator[Path]:
    """A directory libvirt-qemu can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="memd-nbd-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        for f in path.iterdir():
            f.unlink()
        path.rmdir()


def _probe(path: str, uid: int, gid: int) -> str:
    # Debian's python3: the project's (pyenv, under /root) is not readable by other users
    return subprocess.run(
        ["/usr/bin/python3", "-c", _PROBE, path],
        user=uid,
        group=gid,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


def test_swap_disk_xml_round_trip() -> None:
    xml = swap_disk_xml("/run/memd-nbd/a'b.swap", "vdc", 30)
    spec = find_swap_disk(f"<domain><devices>{xml}</devices></domain>")
    assert spec is not None and SWAP_SERIAL in xml
    assert (spec.target, spec.socket, spec.reconnect_delay) == ("vdc", "/run/memd-nbd/a'b.swap", 30)


def test_attach_and_detach_swap_on_a_running_domain(
    host: LibvirtHost, running_domain: str, nbd_dir: Path, tmp_path: Path
) -> None:
    name = running_domain
    agent = SwapAgent(tmp_path)
    try:

        def call(request: CommandArgs) -> Any:
            return control.request(request, path=str(tmp_path / "control.sock"))

        result = attach_swap(None, name, 64 << 20, call, nbd_dir=nbd_dir)
        path = result["path"]
        uid, gid = host.qemu_ids(name)
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o600)
        assert result["target"].startswith("vd") and result["qemu_pid"] == host.qemu_pid(name)
        server = agent.app.swap.disks[name]
        deadline = time.monotonic() + 30
        while server.sessions < 1:  # QEMU opens the NBD connection at hot-plug
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Same uid as QEMU, another process: refused.  Another uid: the socket is closed
        # to it.  Root (operator tools): served.
        assert _probe(path, uid, gid) == "refused"
        assert _probe(path, 65534, 65534) == "denied"
        assert _probe(path, 0, 0) == "greeted"
        assert server.refused >= 1

        # QEMU writes through the disk: the pages land in the guest's tmem pool.
        spec = host.swap_disk(name)
        assert spec is not None and spec.socket == path
        mon = host.monitor(name)
        alias = _disk_alias(host, name)
        # the BlockBackend is on the virtio device inside the PCI proxy libvirt names
        out = mon.hmp(
            f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "write -P 0x5a 0 64k"'
        )
        assert "rror" not in out, out
        assert server.describe()["pages"] == 16
        row = {r["name"]: r for r in agent.app.handlers.guests(GuestsArgs())}[name]
        assert row["swap"]["qemu_pid"] == host.qemu_pid(name)

        detached = detach_swap(None, name, call)
        assert detached["detached"] == name and detached["target"] == spec.target
        assert name not in agent.app.swap.disks and not os.path.exists(path)
    finally:
        agent.close()


def _disk_alias(host: LibvirtHost, name: str) -> str:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(host._conn.lookupByName(name).XMLDesc(0))
    for disk in root.iterfind("devices/disk"):
        if disk.findtext("serial") == SWAP_SERIAL:
            alias = disk.find("alias")
            assert alias is not None
            return str(alias.get("name"))
    raise AssertionError("no swap disk")


def test_attach_swap_to_a_domain_that_is_not_running(
    host: LibvirtHost, tmp_path: Path, nbd_dir: Path
) -> None:
    agent = SwapAgent(tmp_path)
    calls: list[str] = []

    def call(request: CommandArgs) -> Any:
        calls.append(request.command)
        return control.request(request, path=str(tmp_path / "control.sock"))

    try:
        with pytest.raises(MemdError, match="does not exist"):
            attach_swap(None, "memd-pytest-no-such-domain", 1 << 20, call, nbd_dir=nbd_dir)
        assert calls == [] and agent.app.swap.disks == {}
    finally:
        agent.close()
