"""Untrusted NBD clients on real sockets: garbage, oversize lengths, reads past the end,
disconnects mid-request, too many connections, slow handshakes.  After each, the agent
is up and the other guests' disks keep working; one socket never reaches another
guest's pages, and a guest's channel never reaches its own disk's pool."""

from __future__ import annotations

import os
import socket
import stat
import struct
import time

import pytest

from memd.agent.commands import GuestsArgs
from memd.errors import NoSuchPool
from memd.guest.client import GuestClient
from memd.nbd import server as nbd_server
from memd.nbd.export import DISK_OID, DISK_POOL_ID
from memd.nbd.proto import MAX_PAYLOAD
from tests.nbd.conftest import SwapAgent
from tests.nbd.rawclient import RawNbd

PAGE = 4096
EINVAL, ENOSPC = 22, 28


def healthy(path: str, offset: int = 0, fill: int = 0x33) -> None:
    """A fresh connection writes and reads back one page."""
    c = RawNbd(path)
    c.connect()
    assert c.write(offset, bytes([fill]) * PAGE) == 0
    assert c.read(offset, PAGE) == (0, bytes([fill]) * PAGE)
    c.close()


def test_socket_is_0600_and_owned_by_the_agent(swap_agent: SwapAgent) -> None:
    st = os.stat(swap_agent.add_disk("vm1"))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n" * 4,  # not even the client flags are right
        struct.pack(">I", 3) + os.urandom(64),  # options without IHAVEOPT
        struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, 0xFFFFFFFF),  # 4 GiB option
    ],
)
def test_handshake_garbage_closes_that_connection_only(
    swap_agent: SwapAgent, garbage: bytes
) -> None:
    bad, good = swap_agent.add_disk("bad"), swap_agent.add_disk("good")
    c = RawNbd(bad)
    c.recv_exact(18)
    c.sock.sendall(garbage)
    assert c.closed_by_peer()
    healthy(bad)
    healthy(good)
    assert swap_agent.app.swap.disks["bad"].protocol_errors == 1


def test_transmission_garbage_and_oversize_write_close_the_connection(
    swap_agent: SwapAgent,
) -> None:
    path = swap_agent.add_disk("vm1")
    c = RawNbd(path)
    c.connect()
    assert c.write(0, b"\x11" * PAGE) == 0
    c.sock.sendall(b"\xde\xad\xbe\xef" * 7)  # bad request magic
    assert c.closed_by_peer()
    c = RawNbd(path)
    c.connect()
    c.send_request(1, 0, MAX_PAYLOAD + PAGE)  # the server must not wait for 32 MiB + 4 KiB
    assert c.closed_by_peer()
    c = RawNbd(path)
    c.connect()
    c.send_request(1, 0, 0xFFFFFFFF)
    assert c.closed_by_peer()
    healthy(path, PAGE)
    c = RawNbd(path)
    c.connect()
    assert c.read(0, PAGE) == (0, b"\x11" * PAGE)


def test_bad_requests_get_errors_and_the_connection_goes_on(swap_agent: SwapAgent) -> None:
    size = 64 << 20
    path = swap_agent.add_disk("vm1", size)
    c = RawNbd(path)
    assert c.connect() == size
    assert c.read(size - PAGE, 2 * PAGE)[0] == EINVAL  # past the end
    assert c.read(size + PAGE, 1)[0] == EINVAL
    assert c.read(0, MAX_PAYLOAD + 1)[0] == EINVAL  # oversize read
    assert c.read(2**64 - PAGE, 2 * PAGE)[0] == EINVAL  # offset + length wraps
    assert c.write(size - 1, b"xy") == ENOSPC  # write past the end (payload consumed)
    for cmd in (5, 7, 8, 99):  # CACHE, BLOCK_STATUS, RESIZE: not advertised; unknown
        c.send_request(cmd, 0, PAGE, cookie=cmd)
        assert c.reply()[:2] == (EINVAL, cmd)
    c.send_request(0, 0, PAGE, cookie=3, flags=0x4)  # DF without structured replies
    assert c.reply()[:2] == (EINVAL, 3)
    c.send_request(6, size - PAGE, 2 * PAGE, cookie=4)  # WRITE_ZEROES past the end
    assert c.reply()[:2] == (ENOSPC, 4)
    assert c.write(0, b"\x42" * 100) == 0 and c.read(0, 100) == (0, b"\x42" * 100)
    assert swap_agent.app.swap.disks["vm1"].describe()["errors"] == 11


def test_disconnect_mid_request_stores_nothing(swap_agent: SwapAgent) -> None:
    path = swap_agent.add_disk("vm1")
    c = RawNbd(path)
    c.connect()
    c.send_request(1, 0, 2 * PAGE, data=b"\x99" * (PAGE + 10))  # payload cut short
    c.close()
    c = RawNbd(path)
    c.connect()
    c.sock.sendall(struct.pack(">IHH", 0x25609513, 0, 0))  # half a header
    c.close()
    time.sleep(0.2)
    assert swap_agent.app.swap.disks["vm1"].disk.stats("vm1").pages == 0
    healthy(path)
    deadline = time.monotonic() + 5
    while swap_agent.app.swap.disks["vm1"].connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert swap_agent.app.swap.disks["vm1"].connections == set()


def test_client_that_does_not_read_replies_is_throttled_not_buffered(swap_agent: SwapAgent) -> None:
    path = swap_agent.add_disk("vm1")
    c = RawNbd(path, timeout=2.0)
    c.connect()
    c.sock.setblocking(False)
    sent = 0
    request = struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 1 << 20)  # 1 MiB reads
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sent += c.sock.send(request)
        except BlockingIOError:
            break  # the server stopped reading: it does not buffer without bound
    assert time.monotonic() < deadline, "the server kept reading requests it cannot answer"
    # It stops reading after a read or two (256 KiB each) once replies back up; without
    # that it would take 33 MiB of requests (READ_HIGH_WATER), over a million of them.
    assert sent < 1 << 20
    c.close()
    healthy(path)


def test_too_many_connections_are_refused(swap_agent: SwapAgent) -> None:
    path = swap_agent.add_disk("vm1")
    held = [RawNbd(path) for _ in range(nbd_server.MAX_CONNECTIONS)]
    for c in held:
        c.recv_exact(18)
    extra = RawNbd(path)
    assert extra.closed_by_peer()
    for c in held:
        c.close()
    time.sleep(0.2)
    healthy(path)


def test_slow_handshake_is_hung_up_on(
    swap_agent: SwapAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbd_server, "HANDSHAKE_SECONDS", 0.3)
    path = swap_agent.add_disk("vm1")
    c = RawNbd(path, timeout=3.0)
    c.recv_exact(18)
    assert c.closed_by_peer()


def test_each_socket_reaches_its_own_guest_only(swap_agent: SwapAgent) -> None:
    a, b = swap_agent.add_disk("vm-a"), swap_agent.add_disk("vm-b")
    healthy(a, 0, 0xAA)
    healthy(b, 0, 0xBB)
    c = RawNbd(b)
    c.greet()
    assert c.option(7, struct.pack(">I", 4) + b"vm-a" + b"\0\0")[-1][0] == 0x80000006
    assert c.option(3) == [(2, struct.pack(">I", 4) + b"vm-b"), (1, b"")]  # lists its own
    assert c.go(b"vm-b") == 64 << 20
    assert c.read(0, PAGE) == (0, b"\xbb" * PAGE)
    host = swap_agent.app.tmem
    assert host.get("vm-a", DISK_POOL_ID, DISK_OID, 0) == b"\xaa" * PAGE


def test_the_guests_channel_cannot_name_its_disk_pool_and_a_reboot_keeps_the_disk(
    swap_agent: SwapAgent,
) -> None:
    disk = swap_agent.add_disk("vm1")
    healthy(disk, 0, 0x5C)
    chan = str(swap_agent.tmp / "vm1.chan")
    swap_agent.loop.run(swap_agent.app.agent.add_channel("vm1", chan, mode="listen"))
    guest = GuestClient.for_unix_socket(
        chan, boot_id=os.urandom(16), timeout=5.0, reconnect_timeout=5.0
    )
    guest.connect()
    assert guest.new_pool(persistent=True) == 0
    assert [p.pool for p in guest.list_pools()] == [0]
    with pytest.raises(NoSuchPool):
        guest.get(DISK_POOL_ID, DISK_OID, 0)
    with pytest.raises(NoSuchPool):
        guest.put(DISK_POOL_ID, DISK_OID, 0, bytes(PAGE))
    with pytest.raises(NoSuchPool):
        guest.destroy_pool(DISK_POOL_ID)
    guest.close()
    rebooted = GuestClient.for_unix_socket(
        chan, boot_id=os.urandom(16), timeout=5.0, reconnect_timeout=5.0
    )
    rebooted.connect()  # new boot id: the guest's own pools go, its disk stays
    assert rebooted.list_pools() == []
    rebooted.close()
    c = RawNbd(disk)
    c.connect()
    assert c.read(0, PAGE) == (0, b"\x5c" * PAGE)
    rows = {r["name"]: r for r in swap_agent.app.handlers.guests(GuestsArgs())}
    assert rows["vm1"]["swap"]["pages"] == 1 and rows["vm1"]["pools"] == 0


def test_stale_socket_file_is_replaced_but_a_live_one_is_not(swap_agent: SwapAgent) -> None:
    path = str(swap_agent.tmp / "stale.nbd")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # a socket file nobody serves (an agent killed with -9)
    swap_agent.loop.run(swap_agent.app.swap.add("vm1", path, 1 << 20))
    healthy(path)
    from memd.errors import BackendError

    with pytest.raises(BackendError, match="already serves"):
        swap_agent.loop.run(swap_agent.app.swap.add("vm2", path, 1 << 20))
    healthy(path)
