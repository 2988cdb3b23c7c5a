"""memd.guest.client against the real host core (decoder + dispatcher + TmemHost, see
tests/support/fakehost.py): in memory (MockTransport), over a socketpair, a pty, and a real
unix socket whose server cuts replies mid-frame."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from memd import errors
from memd.guest.client import GuestClient, as_oid, read_boot_id
from memd.guest.transport import SocketTransport, find_port, list_ports
from memd.wire import (
    MAX_BATCH,
    PAGE_SIZE,
    RESYNC_MARKER,
    Buffer,
    FrameDecoder,
    GetRequest,
    Op,
    PutReply,
    PutRequest,
    ShareState,
    Status,
    SyncReply,
    decode_request,
    encode_reply,
    encode_request,
)
from tests.support.fakehost import FakeHost, FakeHostServer
from tests.support.mock_transport import MockTransport

BOOT = bytes(range(16))


def page(seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(PAGE_SIZE))


def mock_client(host: FakeHost | None = None, **kwargs: object) -> tuple[GuestClient, FakeHost]:
    host = host or FakeHost()
    transport = MockTransport(responder=host.feed)
    client = GuestClient(lambda: transport, boot_id=BOOT, reconnect_timeout=1.0, **kwargs)  # type: ignore[arg-type]
    return client, host


def test_every_call_in_memory() -> None:
    client, host = mock_client()
    hello = client.connect()
    assert hello.version == 1 and hello.max_batch == MAX_BATCH
    pool = client.new_pool(persistent=True)
    client.put(pool, 7, 0, page(1))
    assert client.get(pool, 7, 0) == page(1)
    assert client.get(pool, 7, 1) is None
    statuses = client.put_batch(pool, [(9, i, page(i)) for i in range(300)])
    assert statuses == [Status.OK] * 300
    assert host.requests["PUT_BATCH"] == 3  # split at max_batch, pipelined
    got = client.get_batch(pool, [(9, i) for i in range(299, -1, -1)] + [(10, 0)])
    assert got == [page(i) for i in range(299, -1, -1)] + [None]
    client.flush_page(pool, 9, 0)
    assert client.get(pool, 9, 0) is None
    client.flush_object(pool, (9, 0, 0))
    assert client.get_batch(pool, [(9, 5)]) == [None]
    assert [p.pool for p in client.list_pools()] == [pool]
    results = client.nominate([5, 6])
    assert [r.status for r in results] == [Status.OK, Status.OK]
    assert 0 < results[0].handle != results[1].handle
    client.about_to_write(5)
    states = [s.state for s in client.share_query([5, 6, 7])]
    assert states == [ShareState.PRIVATE, ShareState.NOMINATED, ShareState.PRIVATE]
    stats = client.stats()
    assert (stats["pools"], stats["persistent_pages"], stats["bad_frames"]) == (1, 1, 0)
    client.destroy_pool(pool)
    assert client.list_pools() == []
    assert host.corrupt == 0 and client.connects == 1


def test_error_statuses_raise_memd_errors() -> None:
    client, _ = mock_client()
    with pytest.raises(errors.NoSuchPool) as info:
        client.put(99, 1, 0, page(0))
    assert info.value.fields["status"] == Status.NO_POOL and "PUT" in str(info.value)
    with pytest.raises(errors.NoSuchPool):
        client.get(99, 1, 0)
    with pytest.raises(errors.FrameError):  # caught locally, before anything is sent
        client.put(1, 1, 0, b"short")


def test_version_refusal_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from memd.guest import client as client_module

    monkeypatch.setattr(client_module, "MIN_VERSION", 2)  # a guest from the future
    monkeypatch.setattr(client_module, "MAX_VERSION", 3)
    client, host = mock_client()
    with pytest.raises(errors.VersionError):
        client.connect()
    assert host.requests["HELLO"] == 1


def test_stale_bytes_before_the_sync_reply_are_discarded() -> None:
    host = FakeHost()
    stale = (
        b"\x00garbage"
        + encode_reply(1, SyncReply(1234))
        + encode_reply(2, PutReply())
        + page(3)[:100]
    )
    transport = MockTransport([stale], responder=host.feed)
    client = GuestClient(lambda: transport, boot_id=BOOT, sync_interval=0.01)
    pool = client.new_pool()
    client.put(pool, 1, 1, page(4))
    assert client.get(pool, 1, 1) == page(4)


def test_replies_out_of_order_are_matched_by_id() -> None:
    host = FakeHost()

    def reversed_replies(data: bytes) -> bytes:
        frames = [f for f in FrameDecoder().feed(data) if not isinstance(f, errors.FrameError)]
        replies = [host.handle(f) for f in frames]
        return b"".join(reversed(replies))

    transport = MockTransport(responder=reversed_replies)
    client = GuestClient(lambda: transport, boot_id=BOOT, max_in_flight=8)
    pool = client.new_pool()
    client.put_batch(pool, [(1, i, page(i)) for i in range(4)])
    replies = client.pipeline([GetRequest(pool, as_oid(1), i) for i in range(4)])
    assert [bytes(r.page) for r in replies] == [page(i) for i in range(4)]  # type: ignore[union-attr]


def test_socketpair() -> None:
    guest_end, host_end = socket.socketpair()
    host = FakeHost()

    def serve() -> None:
        with host_end:
            while data := host_end.recv(65536):
                host_end.sendall(host.feed(data))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with GuestClient(lambda: SocketTransport(guest_end), boot_id=BOOT) as client:
        pool = client.new_pool()
        client.put_batch(pool, [(2, i, page(i)) for i in range(200)])
        assert client.get_batch(pool, [(2, i) for i in range(200)]) == [page(i) for i in range(200)]
    thread.join(5)
    assert not thread.is_alive()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "memd.sock")


def test_server_cut_mid_reply_then_reconnect_resync_retry(sock_path: str) -> None:
    with (
        FakeHostServer(sock_path) as server,
        GuestClient.for_unix_socket(sock_path, boot_id=BOOT, timeout=5) as client,
    ):
        pool = client.new_pool(persistent=True)
        client.put(pool, 1, 0, page(1))
        server.cut_reply_of = Op.GET
        assert client.get(pool, 1, 0) == page(1)  # half a reply, EOF, reconnect, retry
        assert client.connects == 2 and server.connections == 2
        server.cut_reply_of = Op.PUT_BATCH
        assert client.put_batch(pool, [(1, i, page(i)) for i in range(3)]) == [Status.OK] * 3
        assert client.get_batch(pool, [(1, i) for i in range(3)]) == [page(i) for i in range(3)]
        assert client.connects == 3


def test_non_idempotent_call_is_not_retried(sock_path: str) -> None:
    with (
        FakeHostServer(sock_path) as server,
        GuestClient.for_unix_socket(sock_path, boot_id=BOOT) as client,
    ):
        client.connect()
        server.cut_reply_of = Op.NEW_POOL
        with pytest.raises(errors.Unavailable, match="NEW_POOL"):
            client.new_pool()
        assert len(client.list_pools()) == 1  # it was created; the caller decides
        assert client.new_pool() == client.list_pools()[-1].pool
        assert server.connections == 2


def test_host_agent_restart(sock_path: str) -> None:
    with GuestClient.for_unix_socket(sock_path, boot_id=BOOT, reconnect_timeout=5) as client:
        with FakeHostServer(sock_path):
            pool = client.new_pool()
            client.put(pool, 1, 0, page(1))
        # The agent is gone (socket removed); a new one comes up 0.3 s later.
        servers: list[FakeHostServer] = []
        starter = threading.Timer(
            0.3, lambda: servers.append(FakeHostServer(sock_path).__enter__())
        )
        starter.start()
        try:
            with pytest.raises(errors.NoSuchPool):  # reached the new agent: it lost the pool
                client.get(pool, 1, 0)
            assert client.connects == 2
            assert client.new_pool() == pool  # a fresh host: the same first pool id
        finally:
            starter.join()
            for server in servers:
                server.__exit__(None, None, None)


def test_guest_restart_mid_frame_on_a_persistent_stream(sock_path: str) -> None:
    """The host end of a virtio port outlives the guest's open/close: a guest process
    that died mid-PUT leaves the host decoder inside that frame.  The next client's
    SYNCs are swallowed as payload until the host abandons the partial frame."""
    with FakeHostServer(sock_path, persistent_stream=True, partial_timeout=0.2) as server:
        with GuestClient.for_unix_socket(sock_path, boot_id=BOOT) as first:
            pool = first.new_pool()
        dying = socket.socket(socket.AF_UNIX)
        dying.connect(sock_path)
        put = encode_request(77, PutRequest(pool, (1, 0, 0), 5, page(9)))
        dying.sendall(put[:2000])
        dying.close()
        with GuestClient.for_unix_socket(sock_path, boot_id=BOOT, sync_interval=0.1) as client:
            client.put(pool, 1, 6, page(6))
            assert client.get(pool, 1, 6) == page(6)
            assert client.get(pool, 1, 5) is None  # the torn PUT was never applied
        assert server.abandoned >= 1 and server.session.corrupt >= 1


def test_resync_marker_precedes_sync_on_the_wire() -> None:
    client, _ = mock_client()
    client.connect()
    transport = client._transport
    assert isinstance(transport, MockTransport)
    assert transport.sent.startswith(RESYNC_MARKER)
    frames = FrameDecoder().feed(bytes(transport.sent))
    ops = [decode_request(f).__class__.__name__ for f in frames if not isinstance(f, Exception)]
    assert ops[:2] == ["SyncRequest", "HelloRequest"]


def test_port_discovery_and_boot_id(tmp_path: Path) -> None:
    sysfs = tmp_path / "virtio-ports"
    for dev, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "org.memd.0")):
        (sysfs / dev).mkdir(parents=True)
        (sysfs / dev / "name").write_text(name + "\n")
    (sysfs / "vport2p1").mkdir()  # a port without a name file is ignored
    assert find_port(sysfs=str(sysfs)) == "/dev/vport1p1"
    assert list_ports(str(sysfs))["org.qemu.guest_agent.0"] == "/dev/vport0p1"
    with pytest.raises(errors.ChannelMissing, match=r"org\.memd\.0"):
        find_port(sysfs=str(tmp_path / "none"))
    boot = tmp_path / "boot_id"
    boot.write_text("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n")
    assert read_boot_id(str(boot)).hex() == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    assert read_boot_id(str(tmp_path / "missing")) == bytes(16)
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        assert read_boot_id() != bytes(16)


def test_char_device_transport_over_a_raw_pty() -> None:
    """CharDeviceTransport's os.read/os.write/select path on a real character device (a
    pty in raw mode stands in for /dev/vportNpM)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    host = FakeHost()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                os.write(master, host.feed(os.read(master, 65536)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with GuestClient.for_device(os.ttyname(slave), boot_id=BOOT) as client:
            pool = client.new_pool()
            client.put_batch(pool, [(3, i, page(i)) for i in range(20)])
            assert client.get_batch(pool, [(3, i) for i in range(20)]) == [
                page(i) for i in range(20)
            ]
    finally:
        stop.set()
        thread.join(5)
        os.close(master)
        os.close(slave)


def test_a_host_that_forgot_the_session_gets_a_new_hello_and_the_calls_again() -> None:
    """A long-lived client (the guest daemon) on a port that stayed open while the host agent
    restarted: the host answers NEED_HELLO; the client resyncs, says HELLO and resends — even
    NEW_POOL, since a NEED_HELLO request was not executed."""
    host = FakeHost()
    client = GuestClient(
        lambda: MockTransport(responder=host.feed), boot_id=BOOT, reconnect_timeout=1.0
    )
    pool = client.new_pool(persistent=True)
    connects = client.connects
    host.forget_session()  # the agent restarted; the stream did not break
    assert client.new_pool(persistent=True) == pool + 1  # once: not executed twice
    assert client.connects == connects + 1
    host.forget_session()
    assert client.put_batch(pool, [(3, i, page(i)) for i in range(200)]) == [Status.OK] * 200
    assert client.get_batch(pool, [(3, i) for i in range(200)]) == [page(i) for i in range(200)]
    assert client.connects == connects + 2


class _PartsRecorder(MockTransport):
    """Keeps the parts of every vectored write, to see which buffers reached it."""

    def __init__(self, responder: Callable[[bytes], bytes]) -> None:
        super().__init__(responder=responder)
        self.writes: list[list[object]] = []

    def send_parts(self, parts: Sequence[Buffer]) -> None:
        self.writes.append(list(parts))
        super().send_parts(parts)


def test_pages_reach_the_transport_without_a_join() -> None:
    host = FakeHost()
    transport = _PartsRecorder(host.feed)
    client = GuestClient(lambda: transport, boot_id=BOOT)
    pool = client.new_pool()
    pages = [bytearray(page(i)) for i in range(3)]
    assert client.put_batch(pool, [(1, i, p) for i, p in enumerate(pages)]) == [Status.OK] * 3
    client.put(pool, 2, 0, pages[0])
    written = [part for write in transport.writes for part in write]
    for p in pages:
        assert any(part is p for part in written)  # the caller's buffer itself
    assert client.get_batch(pool, [(1, i) for i in range(3)]) == [bytes(p) for p in pages]


def test_socket_send_parts_survives_partial_writes_and_iov_max() -> None:
    guest_end, host_end = socket.socketpair()
    guest_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    parts: list[Buffer] = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)]  # > IOV_MAX
    parts += [memoryview(page(5)), bytearray(page(6)), b""]
    expected = b"".join(parts)
    received = bytearray()

    def read() -> None:
        while len(received) < len(expected):
            chunk = host_end.recv(1000)  # slowly: the writer sees partial writes
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    transport = SocketTransport(guest_end)
    transport.send_parts(parts)
    reader.join(10)
    transport.close()
    host_end.close()
    assert bytes(received) == expected
