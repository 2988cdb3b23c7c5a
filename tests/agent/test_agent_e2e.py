"""The host agent over real unix sockets: many guests, isolation, hostile bytes, resync."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid

import pytest

from memd import wire
from memd.agent.commands import AuditArgs
from memd.errors import AccessDenied, InvalidArgument, NoSuchPool
from memd.wire import ALL_CAPABILITIES, Capability, Op, Status
from tests.agent.conftest import RunningAgent


def _page(seed: int) -> bytes:
    """Half pattern (compressible), half seeded noise: distinct per seed, repeatable."""
    return seed.to_bytes(4, "little") * 600 + random.Random(seed).randbytes(1696)


def test_concurrent_guests_get_back_exactly_what_they_put(agent: RunningAgent) -> None:
    paths = {f"g{i}": agent.add_guest(f"g{i}") for i in range(6)}
    failures: list[str] = []

    def guest(name: str) -> None:
        try:
            with agent.client(paths[name]) as c:
                c.connect()
                pool = c.new_pool(persistent=True)
                pages = [_page(i) for i in range(300)]
                statuses = c.put_batch(pool, [(7, i, p) for i, p in enumerate(pages)])
                assert statuses == [Status.OK] * 300
                assert c.get_batch(pool, [(7, i) for i in range(300)]) == pages
                for i in range(0, 300, 10):  # unbatched, pipelined in the client
                    assert c.get(pool, 7, i) == pages[i]
        except Exception as err:
            failures.append(f"{name}: {err!r}")

    threads = [threading.Thread(target=guest, args=(n,)) for n in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert agent.app.handlers.audit(AuditArgs())["clean"]
    assert agent.app.tmem.store_stats().pages == 6 * 300


def test_a_guest_can_never_reach_another_guests_pools(agent: RunningAgent) -> None:
    a, b = agent.add_guest("a"), agent.add_guest("b")
    with agent.client(a) as ca, agent.client(b) as cb:
        ca.connect()
        cb.connect()
        pa = ca.new_pool(persistent=True)
        for _extra in range(3):
            ca.new_pool()
        ca.put(pa, 1, 0, _page(1))
        # b names a's pool id and handle: b has no such pool.
        for pool in range(4):
            with pytest.raises(NoSuchPool):
                cb.get(pool, 1, 0)
            with pytest.raises(NoSuchPool):
                cb.flush_object(pool, 1)
        pb = cb.new_pool(persistent=True)
        assert pb == pa  # same local number, different pool
        assert cb.get(pb, 1, 0) is None
        assert ca.get(pa, 1, 0) == _page(1)


def test_shared_pool_needs_operator_authorisation(agent: RunningAgent) -> None:
    from memd.agent import control

    key = uuid.uuid4()
    a, b = agent.add_guest("a"), agent.add_guest("b")
    with agent.client(a) as ca, agent.client(b) as cb:
        ca.connect()
        cb.connect()
        with pytest.raises(AccessDenied):
            ca.new_pool(shared_uuid=key.bytes)
        for guest in ("a", "b"):
            control.call("authorize", {"guest": guest, "uuid": str(key)}, path=agent.control)
        pa = ca.new_pool(shared_uuid=key.bytes)
        pb = cb.new_pool(shared_uuid=key.bytes)
        ca.put(pa, 5, 5, _page(5))
        assert cb.get(pb, 5, 5) == _page(5)


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(5)
    return s


def _read_frames(sock: socket.socket, n: int) -> list[wire.Frame]:
    decoder = wire.FrameDecoder()
    frames: list[wire.Frame] = []
    while len(frames) < n:
        data = sock.recv(65536)
        assert data, "agent closed the connection"
        frames += [f for f in decoder.feed(data) if isinstance(f, wire.Frame)]
    return frames


def _hello() -> bytes:
    return wire.encode_request(1, wire.HelloRequest(1, 1, 0, bytes(16)))


def test_requests_before_hello_are_refused(agent: RunningAgent) -> None:
    path = agent.add_guest("g")
    with _raw(path) as s:
        s.sendall(wire.encode_request(9, wire.ListPoolsRequest()))
        (reply,) = _read_frames(s, 1)
        assert (reply.request_id, reply.status) == (9, Status.NEED_HELLO)


def test_garbage_and_malformed_frames_get_errors_not_a_dead_agent(agent: RunningAgent) -> None:
    hostile, good = agent.add_guest("hostile"), agent.add_guest("good")
    with _raw(hostile) as s:
        s.sendall(_hello())
        _read_frames(s, 1)
        s.sendall(os.urandom(5000))  # line noise
        s.sendall(wire.encode_frame(0x7E, 2, b"?"))  # unknown opcode
        put = bytearray(
            wire.encode_request(3, wire.PutRequest(0, (1, 2, 3), 0, bytes(wire.PAGE_SIZE)))
        )
        s.sendall(wire.encode_frame(Op.GET, 4, b"\x00" * 5))  # payload too short for GET
        s.sendall(bytes(put[: wire.HEADER_SIZE + 100]))  # cut mid-frame ...
        s.sendall(wire.encode_request(5, wire.SyncRequest(0xABC)))
        replies = {f.request_id: f for f in _read_frames(s, 2) if f.request_id in (2, 4, 5)}
        while 5 not in replies:
            replies.update({f.request_id: f for f in _read_frames(s, 1)})
        assert replies[5].status == Status.OK
        assert wire.decode_reply(replies[5]) == wire.SyncReply(0xABC)
    with agent.client(good) as c:  # the other guest never noticed
        c.connect()
        pool = c.new_pool()
        c.put(pool, 1, 1, _page(2))
        assert c.get(pool, 1, 1) == _page(2)
    assert agent.app.agent.guests["hostile"].bad_frames > 0


def test_unknown_opcode_gets_unsupported(agent: RunningAgent) -> None:
    path = agent.add_guest("g")
    with _raw(path) as s:
        s.sendall(_hello())
        _read_frames(s, 1)
        s.sendall(wire.encode_frame(0x7E, 77, b""))
        (reply,) = _read_frames(s, 1)
        assert (reply.request_id, reply.status) == (77, Status.UNSUPPORTED_OP)


def test_a_flood_of_corrupt_frames_disconnects_only_that_guest(agent: RunningAgent) -> None:
    bad, good = agent.add_guest("bad"), agent.add_guest("good")
    with agent.client(good) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        with _raw(bad) as s:
            s.sendall(_hello())
            _read_frames(s, 1)
            malformed = wire.encode_frame(Op.GET, 9, b"\x00" * 5)  # checksums fine, shape not
            try:
                for _ in range(200):
                    s.sendall(malformed)
                deadline = time.time() + 5
                while time.time() < deadline and s.recv(4096):
                    pass
            except OSError:
                pass  # the agent hung up on us: expected
        assert agent.app.agent.channels["bad"].last_error == "too many corrupt frames"
        c.put(pool, 1, 1, _page(3))
        assert c.get(pool, 1, 1) == _page(3)


def test_client_resyncs_after_connection_cut_mid_frame(agent: RunningAgent) -> None:
    path = agent.add_guest("g")
    with agent.client(path) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        c.put(pool, 1, 0, _page(4))
        # Cut the agent's side of the connection while a half frame sits in its buffer.
        channel = agent.app.agent.channels["g"]
        with _raw(path) as s:  # a second opener replaces the first (one peer per port)
            s.sendall(_hello()[:10])
            deadline = time.time() + 5
            while channel.sessions < 2 and time.time() < deadline:
                time.sleep(0.01)
        assert c.get(pool, 1, 0) == _page(4)  # reconnects, resyncs, retries
        assert c.connects >= 2


def test_reboot_drops_the_guests_pools(agent: RunningAgent) -> None:
    path = agent.add_guest("g")
    with agent.client(path, boot_id=b"A" * 16) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        c.put(pool, 1, 0, _page(5))
    with agent.client(path, boot_id=b"A" * 16) as c:  # same boot: same pools
        c.connect()
        assert c.get(pool, 1, 0) == _page(5)
    with agent.client(path, boot_id=b"B" * 16) as c:  # rebooted: nothing stale survives
        c.connect()
        assert c.list_pools() == []
        with pytest.raises(NoSuchPool):
            c.get(pool, 1, 0)
    assert agent.app.agent.guests["g"].reboots == 1


def test_guest_sharing_requests_touch_only_its_own_memory(agent: RunningAgent) -> None:
    a, _b = agent.add_guest("a", 64), agent.add_guest("b", 64)
    machine, sharing = agent.app.machine, agent.app.sharing
    assert machine is not None and sharing is not None
    for guest in ("a", "b"):
        machine.write(sharing.domid(guest), 3, b"same content")
    # Both consent to cross-guest merging (sharing.consent): HELLO with DEDUP_OPT_IN.
    consenting = ALL_CAPABILITIES | int(Capability.DEDUP_OPT_IN)
    with agent.client(_b, capabilities=consenting) as cb:
        cb.connect()
    with agent.client(a, capabilities=consenting) as ca:
        ca.connect()
        sharing.scan()
        ca.connect()
        (info,) = ca.share_query([3])
        assert (wire.ShareState(info.state), info.share_count) == (wire.ShareState.SHARED, 2)
        results = ca.nominate([5, 10_000])  # 10_000 is past a's RAM
        assert [r.status for r in results] == [Status.OK, Status.INVALID]
        ca.about_to_write(3)
        assert wire.ShareState(ca.share_query([3])[0].state) == wire.ShareState.PRIVATE
        with pytest.raises(InvalidArgument) as err:
            ca.about_to_write(1 << 40)
        assert err.value.fields["status"] == Status.INVALID
    assert machine.read(sharing.domid("b"), 3).startswith(b"same content")
    assert agent.app.handlers.audit(AuditArgs())["clean"]


def test_one_guest_cannot_fill_the_store_for_the_others(agent: RunningAgent) -> None:
    greedy, modest = agent.add_guest("greedy"), agent.add_guest("modest")
    cap = agent.app.dispatcher.guest_cap_pages
    assert cap is not None and cap > 0
    with agent.client(greedy) as g, agent.client(modest) as m:
        g.connect()
        m.connect()
        gp = g.new_pool(persistent=True)
        statuses = g.put_batch(gp, [(1, i, _page(i)) for i in range(cap + 50)])
        assert statuses.count(Status.OK) == cap  # the rest: NO_SPACE, cleanly
        assert set(statuses[cap:]) == {Status.NO_SPACE}
        mp = m.new_pool(persistent=True)
        assert m.put_batch(mp, [(1, i, _page(10_000 + i)) for i in range(100)]) == (
            [Status.OK] * 100
        )
        assert g.get(gp, 1, 0) == _page(0)  # acknowledged pages all still there
    assert agent.app.handlers.audit(AuditArgs())["clean"]


def test_restart_on_the_store_keeps_pools_pages_boot_ids_and_counters(agent: RunningAgent) -> None:
    path = agent.add_guest("g")
    with agent.client(path, boot_id=b"A" * 16) as c:
        c.connect()
    with agent.client(path, boot_id=b"B" * 16) as c:  # one reboot
        c.connect()
        pool = c.new_pool(persistent=True)
        eph = c.new_pool()
        c.put(pool, 1, 0, _page(6))
        c.put(eph, 1, 0, _page(7))
    agent.app.persistence.save_opted_out(["vm-x"])  # what an operator's `memd optout` saves
    fresh = agent.restart()
    guest = fresh.agent.guests["g"]
    assert (guest.boot_id, guest.reboots) == (b"B" * 16, 1)
    assert fresh.real.opted_out() == {"vm-x"}
    assert fresh.handlers.audit(AuditArgs())["clean"]
    path = agent.add_guest("g")
    with agent.client(path, boot_id=b"B" * 16) as c:  # same boot: its pools are there
        c.connect()
        assert c.get(pool, 1, 0) == _page(6)
        assert c.get(eph, 1, 0) is None  # an ephemeral page may vanish; its pool not
        assert [p.pool for p in c.list_pools()] == [pool, eph]
    with agent.client(path, boot_id=b"C" * 16) as c:  # rebooted meanwhile: nothing
        c.connect()
        assert c.list_pools() == []
    assert agent.app.agent.guests["g"].reboots == 2


def test_a_failed_store_commit_acknowledges_nothing(
    agent: RunningAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the commit of a loop turn fails, none of its replies leave: the guest's
    connection is dropped, its client reconnects and resends, and the page is there."""
    path = agent.add_guest("g")
    real_commit = agent.store.commit
    failures = [OSError("disk on fire")]

    def commit() -> None:
        if failures:
            raise failures.pop()
        real_commit()

    with agent.client(path) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        monkeypatch.setattr(agent.store, "commit", commit)
        sessions = agent.app.agent.channels["g"].sessions
        c.put(pool, 1, 0, _page(8))  # first answer lost with the connection; resent
        assert not failures and agent.app.agent.channels["g"].sessions == sessions + 1
        assert c.get(pool, 1, 0) == _page(8)
    assert agent.app.handlers.audit(AuditArgs())["clean"]
