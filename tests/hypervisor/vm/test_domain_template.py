"""The libvirt domain template (vm-images/domain.xml.in) on a real libvirtd: a TCG guest with the
memd channel at a libvirt-chosen socket and a harness serial port (ttyS1, a unix socket) the shell
helper can drive. ``virsh console`` and ``virsh shutdown``:
tests/hypervisor/vm/test_virsh_habits.py."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths, render_domain_xml

from .console import GuestShell

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]


def test_rendered_xml_validates_against_the_libvirt_schema(
    vm_image: ImagePaths, tmp_path: Path
) -> None:
    xml = render_domain_xml(vm_image, name="memd-schema", console_socket=tmp_path / "c.sock")
    (tmp_path / "dom.xml").write_text(xml)
    try:
        proc = subprocess.run(
            ["virt-xml-validate", str(tmp_path / "dom.xml"), "domain"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("virt-xml-validate not installed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"name='{CHANNEL_NAME}'" in xml and "<domain type='qemu'>" in xml
    # virsh console opens console0, serial port 0: a pty; the harness socket is serial port 1.
    assert re.search(r"<console type='pty'>\s*<target type='serial' port='0'/>", xml), xml
    assert re.search(
        r"<serial type='unix'>\s*<source mode='bind' path='[^']*c\.sock'/>\s*"
        r"<target port='1'/>",
        xml,
    ), xml


@pytest.fixture
def libvirt_domain(
    vm_image: ImagePaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Path]]:
    libvirt = pytest.importorskip("libvirt")
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as e:
        pytest.skip(f"no libvirtd: {e}")
    workdir = tmp_path_factory.mktemp("lv")
    workdir.chmod(0o777)  # QEMU may run as libvirt-qemu and must create the console socket
    console = workdir / "console.sock"
    xml = render_domain_xml(
        vm_image,
        name=f"memd-tpl-{uuid.uuid4().hex[:8]}",
        console_socket=console,
        append="memd.daemon=0",  # the test writes to org.memd.0 itself: no daemon holding it
    )
    # Paused start: the console is attached before the guest prints anything.
    domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        yield domain, console
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()
        conn.close()


def test_template_boots_with_channel_and_console(
    libvirt_domain: tuple[Any, Path], tmp_path: Path
) -> None:
    domain, console = libvirt_domain
    shell = GuestShell(console, tmp_path / "console.log")
    try:
        domain.resume()
        shell.wait_ready(timeout=120)
        live = domain.XMLDesc(0)
        match = re.search(
            r"<channel type='unix'>\s*<source mode='bind' path='([^']+)'/>\s*"
            rf"<target type='virtio' name='{re.escape(CHANNEL_NAME)}'",
            live,
        )
        assert match, live
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
            host.settimeout(30)
            host.connect(match.group(1))
            shell.check(f"printf via-libvirt > /dev/virtio-ports/{CHANNEL_NAME}")
            data = b""
            while len(data) < len(b"via-libvirt"):
                chunk = host.recv(64)
                assert chunk
                data += chunk
            assert data == b"via-libvirt"
    finally:
        shell.close()
