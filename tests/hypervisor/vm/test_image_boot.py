"""Smoke test of the guest image and the harness on a real TCG guest.

One guest is booted for the module (booting costs seconds under TCG); the reboot test runs last.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.vmimage import CHANNEL_NAME, ImagePaths, qemu_argv

from .harness import GuestCommandError, GuestVM

pytestmark = pytest.mark.vm

EXTRA_PORT = "org.memd.test"


@pytest.fixture(scope="module")
def guest(vm_image: ImagePaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    # memd.daemon=0: no guest daemon holding org.memd.0, which these tests open directly.
    vm = GuestVM(
        vm_image,
        tmp_path_factory.mktemp("boot"),
        name="smoke",
        ports=(CHANNEL_NAME, EXTRA_PORT),
        append="memd.daemon=0",
    )
    with vm:
        yield vm


def _port_device(guest: GuestVM, name: str) -> str:
    """/dev/vportNpM of the port called ``name``, found the way the guest agent finds it."""
    listing = guest.check(
        "for p in /sys/class/virtio-ports/*; do echo $(cat $p/name) ${p##*/}; done"
    )
    ports: dict[str, str] = {}
    for line in listing.splitlines():
        port_name, _, device = line.partition(" ")
        ports[port_name] = device
    assert name in ports, listing
    return f"/dev/{ports[name]}"


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "host socket closed"
        data += chunk
    return data


def test_guest_boots_to_a_shell_and_reports_boot_time(guest: GuestVM) -> None:
    assert guest.boot_uptime is not None and guest.boot_uptime < 60
    assert guest.check("uname -r").startswith("6.")
    assert guest.check("cat /proc/meminfo").startswith("MemTotal:")


def test_run_returns_exact_stdout_stderr_and_status(guest: GuestVM) -> None:
    result = guest.run("printf 'a\\r\\nb'; echo oops >&2; exit 7")
    assert (result.status, result.stdout_bytes, result.stderr) == (7, b"a\r\nb", "oops\n")
    long_script = "\n".join(f"echo line{i}" for i in range(600))  # several console batches
    assert guest.check(long_script).splitlines() == [f"line{i}" for i in range(600)]
    with pytest.raises(GuestCommandError):
        guest.check("false")
    assert guest.check("echo still alive") == "still alive\n"


def test_file_round_trip_is_byte_exact(guest: GuestVM) -> None:
    data = os.urandom(40_000)
    guest.write_file("/tmp/blob", data)
    assert guest.read_file("/tmp/blob") == data


def test_virtio_ports_are_named_and_linked(guest: GuestVM) -> None:
    assert guest.check("ls /dev/vport*").split() == ["/dev/vport0p1", "/dev/vport0p2"]
    device = _port_device(guest, CHANNEL_NAME)
    link = guest.check(f"readlink -f /dev/virtio-ports/{CHANNEL_NAME}").strip()
    assert link == device


def test_guest_agent_is_installed(guest: GuestVM) -> None:
    guest.check("python3 -c 'import memd.guest, memd.wire, memd.errors'")
    assert guest.check("command -v memd-guest").strip() == "/usr/bin/memd-guest"
    result = guest.run("memd-guest --help")
    assert result.status == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_guest_writes_reach_the_host_socket_and_back(guest: GuestVM) -> None:
    device = _port_device(guest, CHANNEL_NAME)
    with guest.connect_port() as host:
        guest.check(f"printf hello > {device}")
        assert _recv_exactly(host, 5) == b"hello"
        # Host → guest, binary, through python3 in the guest (the agent's own route).
        payload = bytes(range(256)) * 16
        host.sendall(payload)
        script = (
            f"import os; fd = os.open('{device}', os.O_RDONLY); buf = b''\n"
            f"while len(buf) < {len(payload)}: buf += os.read(fd, 65536)\n"
            "os.write(1, buf)"
        )
        guest.write_file("/tmp/readport.py", script.encode())
        assert guest.check_bytes("python3 /tmp/readport.py", timeout=60) == payload


def test_hotplugged_port_gets_its_link(guest: GuestVM, tmp_path: Path) -> None:
    path = tmp_path / "hot.sock"
    guest.qmp(
        "chardev-add",
        id="hot0",
        backend={
            "type": "socket",
            "data": {
                "addr": {"type": "unix", "data": {"path": str(path)}},
                "server": True,
                "wait": False,
            },
        },
    )
    guest.qmp(
        "device_add",
        driver="virtserialport",
        bus="vserial0.0",
        chardev="hot0",
        name="org.memd.hot",
        id="hotport",
    )
    guest.check(
        "i=0; until [ -e /dev/virtio-ports/org.memd.hot ]; do"
        " i=$((i+1)); [ $i -gt 50 ] && exit 1; sleep 0.1; done"
    )


def test_qemu_argv_is_the_documented_command_line(guest: GuestVM) -> None:
    argv = qemu_argv(
        guest.image, name="x", console_socket=Path("/run/c.sock"), qmp_socket=Path("/run/q.sock")
    )
    joined = " ".join(argv)
    assert "-accel tcg" in joined and "-m 256" in joined
    assert f"virtserialport,bus=vserial0.0,chardev=vport0,name={CHANNEL_NAME}" in joined
    assert "path=/run/x.memd.sock,server=on,wait=off" in joined


def test_host_socket_is_a_plain_unix_stream(guest: GuestVM) -> None:
    with guest.connect_port(EXTRA_PORT) as host:
        assert host.family == socket.AF_UNIX


def test_reboot_comes_back_with_the_port(guest: GuestVM) -> None:
    guest.check("echo before > /tmp/marker")
    guest.reboot()
    assert guest.run("cat /tmp/marker").status != 0  # fresh initramfs: state is gone
    uptime = float(guest.check("cut -d' ' -f1 /proc/uptime"))
    assert uptime < 120
    assert _port_device(guest, CHANNEL_NAME) == "/dev/vport0p1"
    with guest.connect_port() as host:
        guest.check(f"printf back > /dev/virtio-ports/{CHANNEL_NAME}")
        assert _recv_exactly(host, 4) == b"back"
