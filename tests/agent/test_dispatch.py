"""The dispatcher on its sans-I/O seam: request bytes in, reply bytes out.

No socket and no event loop: a :class:`Guest` encodes requests into the bytes a guest
would send, feeds them to a real :class:`~memd.wire.FrameDecoder` (as the agent's server
does), hands the decoder's output to :meth:`Dispatcher.handle_all` and decodes the
reply bytes it gets back with a second decoder, as the guest client would.  Behind the
dispatcher is a real in-memory :class:`~tmem.host.TmemHost`.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd import wire
from memd.agent.dispatch import HOST_CAPABILITIES, Dispatcher, GuestState
from memd.vocab import MAX_BATCH, PAGE_SIZE
from memd.wire import Capability, ErrorReply, Op, Status
from tmem.host import TmemHost

OID = (1, 2, 3)
BOOT_ID = bytes(range(16))


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


class Guest:
    """One guest's side of the conversation with a dispatcher, in bytes."""

    def __init__(self, dispatcher: Dispatcher, name: str = "vm1") -> None:
        self.dispatcher = dispatcher
        self.state = GuestState(name)
        self.decoder = wire.FrameDecoder()  # the host's decoder for this channel
        self.next_id = 1

    def request_bytes(self, op: Op, msg: Any, request_id: int | None = None) -> bytes:
        if request_id is None:
            request_id, self.next_id = self.next_id, self.next_id + 1
        return wire.encode_request(request_id, msg)

    def send(self, data: bytes) -> list[wire.Frame]:
        """Feed bytes to the host; → the reply frames it wrote back, in order."""
        out = b"".join(self.dispatcher.handle_all(self.state, self.decoder.feed(data)))
        frames = wire.FrameDecoder().feed(out)
        assert all(isinstance(f, wire.Frame) and f.is_reply for f in frames), frames
        return [f for f in frames if isinstance(f, wire.Frame)]

    def call(self, op: Op, msg: Any) -> Any:
        """One request → its decoded reply (a reply message or an ErrorReply)."""
        data = self.request_bytes(op, msg)
        request_id = self.next_id - 1
        (frame,) = self.send(data)
        assert (frame.op, frame.request_id) == (op, request_id)
        return wire.decode_reply(frame)

    def ok(self, op: Op, msg: Any) -> Any:
        reply = self.call(op, msg)
        assert not isinstance(reply, ErrorReply), reply
        return reply

    def status(self, op: Op, msg: Any) -> Status:
        reply = self.call(op, msg)
        return Status.OK if not isinstance(reply, ErrorReply) else reply.status

    def hello(
        self, capabilities: int = int(HOST_CAPABILITIES), boot_id: bytes = BOOT_ID
    ) -> wire.HelloReply:
        reply = self.ok(Op.HELLO, wire.HelloRequest(1, 1, capabilities, boot_id))
        assert isinstance(reply, wire.HelloReply)
        return reply

    def new_pool(self, flags: int = int(wire.PoolFlag.PERSISTENT)) -> int:
        pool: int = self.ok(Op.NEW_POOL, wire.NewPoolRequest(flags)).pool
        return pool


@pytest.fixture
def tmem() -> TmemHost:
    return TmemHost(budget_bytes=16 << 20)


@pytest.fixture
def guest(tmem: TmemHost) -> Guest:
    g = Guest(Dispatcher(tmem))
    g.hello()
    return g


# --- session: SYNC, HELLO, NEED_HELLO -----------------------------------------------------


def test_sync_is_answered_before_hello_with_the_same_nonce(tmem: TmemHost) -> None:
    g = Guest(Dispatcher(tmem))
    (frame,) = g.send(wire.RESYNC_MARKER + g.request_bytes(Op.SYNC, wire.SyncRequest(42)))
    assert frame.version == wire.PROTOCOL_VERSION and frame.status == Status.OK
    assert wire.decode_reply(frame) == wire.SyncReply(42)


def test_every_op_but_hello_and_sync_needs_hello_first(tmem: TmemHost) -> None:
    g = Guest(Dispatcher(tmem))
    assert g.status(Op.NEW_POOL, wire.NewPoolRequest(0)) == Status.NEED_HELLO
    assert g.status(Op.LIST_POOLS, wire.ListPoolsRequest()) == Status.NEED_HELLO
    assert not tmem.has_client("vm1")  # nothing happened on the host
    g.hello()
    assert g.status(Op.LIST_POOLS, wire.ListPoolsRequest()) == Status.OK


def test_sync_forgets_the_hello_but_not_the_pools(guest: Guest) -> None:
    pool = guest.new_pool()
    guest.ok(Op.PUT, wire.PutRequest(pool, OID, 0, page(1)))
    guest.ok(Op.SYNC, wire.SyncRequest(7))
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.NEED_HELLO
    guest.hello()  # the same boot id: only the guest agent restarted
    assert bytes(guest.ok(Op.GET, wire.GetRequest(pool, OID, 0)).page) == page(1)


def test_hello_grants_the_subset_and_announces_the_limits(tmem: TmemHost) -> None:
    g = Guest(Dispatcher(tmem))  # no sharing manager: SHARING is not granted
    asked = int(Capability.BATCH | Capability.SHARING | Capability.DEDUP_OPT_IN) | 0x8000
    reply = g.hello(asked)
    assert reply.version == 1
    assert reply.capabilities == Capability.BATCH | Capability.DEDUP_OPT_IN
    assert (reply.max_batch, reply.max_payload, reply.max_gfns, reply.page_size) == (
        MAX_BATCH,
        wire.MAX_PAYLOAD,
        wire.MAX_GFNS,
        PAGE_SIZE,
    )


def test_hello_without_a_common_version_is_VERSION(tmem: TmemHost) -> None:
    g = Guest(Dispatcher(tmem))
    reply = g.call(Op.HELLO, wire.HelloRequest(2, 3, 0, BOOT_ID))
    assert isinstance(reply, ErrorReply) and reply.status == Status.VERSION
    assert g.state.version is None


def test_a_new_boot_id_drops_the_old_boots_pools(guest: Guest) -> None:
    pool = guest.new_pool()
    guest.hello(boot_id=bytes(16))
    assert guest.state.reboots == 1
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.NO_POOL


# --- the tmem ops -------------------------------------------------------------------------


def test_put_get_flush_round_trip(guest: Guest) -> None:
    pool = guest.new_pool()
    assert guest.ok(Op.PUT, wire.PutRequest(pool, OID, 5, page(9))) == wire.EmptyReply()
    assert bytes(guest.ok(Op.GET, wire.GetRequest(pool, OID, 5)).page) == page(9)
    guest.ok(Op.FLUSH_PAGE, wire.FlushPageRequest(pool, OID, 5))
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 5)) == Status.NOT_FOUND
    # Flushing a page that is not there is not an error (docs/protocol.md).
    assert guest.status(Op.FLUSH_PAGE, wire.FlushPageRequest(pool, OID, 5)) == Status.OK


def test_flush_object_removes_every_page_of_the_object(guest: Guest) -> None:
    pool = guest.new_pool()
    for index in range(3):
        guest.ok(Op.PUT, wire.PutRequest(pool, OID, index, page(index + 1)))
    guest.ok(Op.PUT, wire.PutRequest(pool, (9, 9, 9), 0, page(7)))
    guest.ok(Op.FLUSH_OBJECT, wire.FlushObjectRequest(pool, OID))
    assert [guest.status(Op.GET, wire.GetRequest(pool, OID, i)) for i in range(3)] == [
        Status.NOT_FOUND
    ] * 3
    assert guest.status(Op.GET, wire.GetRequest(pool, (9, 9, 9), 0)) == Status.OK


def test_ephemeral_get_is_exclusive(guest: Guest) -> None:
    pool = guest.new_pool(0)
    guest.ok(Op.PUT, wire.PutRequest(pool, OID, 0, page(3)))
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.OK
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.NOT_FOUND


def test_list_pools_and_destroy_pool(guest: Guest) -> None:
    persistent, ephemeral = guest.new_pool(), guest.new_pool(0)
    guest.ok(Op.PUT, wire.PutRequest(persistent, OID, 0, page(1)))
    pools = guest.ok(Op.LIST_POOLS, wire.ListPoolsRequest()).pools
    assert {(p.pool, p.flags, p.pages) for p in pools} == {
        (persistent, wire.PoolFlag.PERSISTENT, 1),
        (ephemeral, 0, 0),
    }
    guest.ok(Op.DESTROY_POOL, wire.DestroyPoolRequest(persistent))
    assert guest.status(Op.GET, wire.GetRequest(persistent, OID, 0)) == Status.NO_POOL
    assert [p.pool for p in guest.ok(Op.LIST_POOLS, wire.ListPoolsRequest()).pools] == [ephemeral]


def test_new_pool_refusals(guest: Guest) -> None:
    assert guest.status(Op.NEW_POOL, wire.NewPoolRequest(0, page_size=8192)) == Status.INVALID
    # A shared pool the host did not authorise: refused, never a private downgrade.
    shared = wire.NewPoolRequest(int(wire.PoolFlag.SHARED), uuid=os.urandom(16))
    assert guest.status(Op.NEW_POOL, shared) == Status.DENIED
    assert guest.ok(Op.LIST_POOLS, wire.ListPoolsRequest()).pools == []


def test_stats_reports_the_guests_counters(guest: Guest) -> None:
    guest.new_pool()
    stats = guest.ok(Op.STATS, wire.StatsRequest()).stats
    assert stats["requests"] == guest.state.requests == 3
    assert stats["errors"] == 0 and stats["bad_frames"] == 0


# --- batches ------------------------------------------------------------------------------


def test_put_batch_gives_a_status_per_page(tmem: TmemHost) -> None:
    g = Guest(Dispatcher(tmem, guest_cap_pages=3))
    g.hello()
    pool = g.new_pool()
    handles = [(OID, i) for i in range(5)]
    reply = g.ok(Op.PUT_BATCH, wire.PutBatchRequest(pool, handles, [page(i + 1) for i in range(5)]))
    assert list(reply.statuses) == [Status.OK] * 3 + [Status.NO_SPACE] * 2
    got = g.ok(Op.GET_BATCH, wire.GetBatchRequest(pool, handles))
    assert list(got.statuses) == [Status.OK] * 3 + [Status.NOT_FOUND] * 2
    assert [None if p is None else bytes(p) for p in got.pages] == [
        page(1),
        page(2),
        page(3),
        None,
        None,
    ]


def test_a_batch_that_fails_as_a_whole_has_the_frame_status(guest: Guest) -> None:
    request = wire.PutBatchRequest(9, [(OID, 0)], [page(1)])
    assert guest.status(Op.PUT_BATCH, request) == Status.NO_POOL
    assert guest.status(Op.GET_BATCH, wire.GetBatchRequest(9, [(OID, 0)])) == Status.NO_POOL


def test_pipelined_requests_get_replies_in_order(guest: Guest) -> None:
    pool = guest.new_pool()
    data = b"".join(
        guest.request_bytes(Op.PUT, wire.PutRequest(pool, OID, i, page(i)), request_id=100 + i)
        for i in range(4)
    )
    data += guest.request_bytes(Op.GET, wire.GetRequest(pool, OID, 3), request_id=200)
    frames = guest.send(data)
    assert [f.request_id for f in frames] == [100, 101, 102, 103, 200]
    assert bytes(wire.decode_reply(frames[-1]).page) == page(3)  # type: ignore[union-attr]


def test_pages_put_from_a_reused_receive_buffer_are_stored_byte_exact(
    guest: Guest, tmem: TmemHost
) -> None:
    """The agent decodes frames out of one receive buffer it reuses for every read, and
    the dispatcher hands tmem views of the payload, not copies: what is stored must not
    change when that memory is overwritten.  Zero, compressible, duplicate and
    incompressible (stored raw) pages."""
    pool = guest.new_pool()
    contents = [bytes(PAGE_SIZE), page(7), page(7), os.urandom(PAGE_SIZE), b"memd " * 819 + b"!"]
    handles = [(OID, i) for i in range(len(contents))]
    frames = [
        guest.request_bytes(Op.PUT_BATCH, wire.PutBatchRequest(pool, handles, contents)),
        guest.request_bytes(Op.PUT, wire.PutRequest(pool, OID, 99, contents[3])),
    ]
    scratch = bytearray(len(frames[0]) + 64)  # as memd.agent.connection.ScratchBuffer
    replies: list[bytes] = []
    for data in frames:
        scratch[: len(data)] = data
        replies.append(
            b"".join(
                guest.dispatcher.handle_all(
                    guest.state, guest.decoder.feed(memoryview(scratch)[: len(data)])
                )
            )
        )
        scratch[:] = b"\xa5" * len(scratch)  # the next read lands in the same memory
    frames_back = [
        f for r in replies for f in wire.FrameDecoder().feed(r) if isinstance(f, wire.Frame)
    ]
    assert [wire.decode_reply(f) for f in frames_back] == [
        wire.PutBatchReply([Status.OK] * len(contents)),
        wire.PutReply(),
    ]
    assert tmem.get_batch("vm1", pool, handles) == contents
    assert tmem.get("vm1", pool, OID, 99) == contents[3]
    assert tmem.audit() == []


def test_handle_all_returns_the_replies_as_parts_of_one_write(guest: Guest) -> None:
    """handle_all gives the reply bytes as parts (a GET_BATCH reply's pages unjoined);
    written in order they are exactly the replies handle() gives frame by frame."""
    pool = guest.new_pool()
    handles = [(OID, i) for i in range(3)]
    guest.ok(Op.PUT_BATCH, wire.PutBatchRequest(pool, handles, [page(i) for i in range(3)]))
    data = (
        guest.request_bytes(Op.GET_BATCH, wire.GetBatchRequest(pool, handles))
        + guest.request_bytes(Op.GET, wire.GetRequest(pool, OID, 9))
        + guest.request_bytes(Op.LIST_POOLS, wire.ListPoolsRequest())
    )
    items = wire.FrameDecoder().feed(data)
    parts = guest.dispatcher.handle_all(guest.state, items)
    assert len(parts) > 3  # header, statuses and pages of GET_BATCH are separate parts
    one_by_one = [
        guest.dispatcher.handle(guest.state, f) for f in items if isinstance(f, wire.Frame)
    ]
    assert b"".join(parts) == b"".join(one_by_one)
    got = wire.decode_reply(wire.FrameDecoder().feed(one_by_one[0])[0])  # type: ignore[arg-type]
    assert isinstance(got, wire.GetBatchReply)
    assert [bytes(p) for p in got.pages if p is not None] == [page(i) for i in range(3)]


# --- errors become statuses ---------------------------------------------------------------


def test_a_frozen_guests_puts_are_FROZEN(guest: Guest, tmem: TmemHost) -> None:
    pool = guest.new_pool()
    tmem.freeze("vm1")
    assert guest.status(Op.PUT, wire.PutRequest(pool, OID, 0, page(1))) == Status.FROZEN
    reply = guest.ok(Op.PUT_BATCH, wire.PutBatchRequest(pool, [(OID, 1)], [page(1)]))
    assert list(reply.statuses) == [Status.FROZEN]


def test_a_guest_reaches_only_its_own_pools(tmem: TmemHost) -> None:
    dispatcher = Dispatcher(tmem)
    a, b = Guest(dispatcher, "a"), Guest(dispatcher, "b")
    a.hello()
    b.hello()
    pool = a.new_pool()
    a.ok(Op.PUT, wire.PutRequest(pool, OID, 0, page(1)))
    assert b.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.NO_POOL


def test_the_swap_disks_pool_is_not_reachable_from_the_channel(guest: Guest) -> None:
    pool = guest.new_pool()
    guest.dispatcher.disk_pools["vm1"] = pool
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.NO_POOL
    assert guest.ok(Op.LIST_POOLS, wire.ListPoolsRequest()).pools == []


def test_a_host_bug_costs_one_INTERNAL_reply(
    guest: Guest, tmem: TmemHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = guest.new_pool()

    def broken(*args: object) -> None:
        raise RuntimeError("boom: secret detail")

    monkeypatch.setattr(tmem, "get", broken)
    reply = guest.call(Op.GET, wire.GetRequest(pool, OID, 0))
    assert reply == ErrorReply(Status.INTERNAL, "internal error")  # no detail leaks
    assert guest.status(Op.LIST_POOLS, wire.ListPoolsRequest()) == Status.OK


def test_sharing_without_a_sharing_manager_is_DENIED(guest: Guest) -> None:
    assert guest.status(Op.NOMINATE, wire.NominateRequest([1])) == Status.DENIED
    assert guest.status(Op.ABOUT_TO_WRITE, wire.AboutToWriteRequest(1)) == Status.DENIED


def test_mem_report_needs_the_capability_and_is_validated(tmem: TmemHost) -> None:
    g = Guest(Dispatcher(tmem))
    g.hello(int(Capability.BATCH))
    report = wire.MemReportRequest(1000, 400, 0, 0, 123, 45)
    assert g.status(Op.MEM_REPORT, report) == Status.UNSUPPORTED_OP
    g.hello(int(Capability.MEM_REPORT))
    assert g.status(Op.MEM_REPORT, report) == Status.OK
    assert g.state.memory == report and g.state.mem_reports == 1
    bad = report._replace(mem_available_kib=2000)  # more available than total
    assert g.status(Op.MEM_REPORT, bad) == Status.INVALID
    assert g.state.memory == report  # the previous report stays


# --- frames that are not well-formed requests ---------------------------------------------


def test_an_unknown_opcode_is_UNSUPPORTED_OP(guest: Guest) -> None:
    (frame,) = guest.send(wire.encode_frame(0x7E, 55, b"whatever"))
    assert (frame.op, frame.request_id, frame.status) == (0x7E, 55, Status.UNSUPPORTED_OP)


def test_host_only_and_local_ops_are_UNSUPPORTED_OP(guest: Guest) -> None:
    request = wire.RangeQueryRequest(0, 0x1000, 0x1000)
    assert guest.status(Op.RANGE_QUERY, request) == Status.UNSUPPORTED_OP


def test_a_malformed_payload_is_BAD_FRAME_with_the_request_id(guest: Guest) -> None:
    pool = guest.new_pool()
    short_put = struct.pack("<II3Q", pool, 0, *OID) + b"x" * 100  # a page of 100 bytes
    (frame,) = guest.send(wire.encode_frame(Op.PUT, 66, short_put))
    assert (frame.request_id, frame.status) == (66, Status.BAD_FRAME)
    assert guest.state.bad_frames == 1
    assert guest.status(Op.GET, wire.GetRequest(pool, OID, 0)) == Status.NOT_FOUND


def test_a_frame_of_an_unspoken_version_is_VERSION(guest: Guest) -> None:
    data = wire.encode_frame(Op.LIST_POOLS, 8, b"", version=9)
    (frame,) = guest.send(data)
    assert frame.status == Status.VERSION


def test_replies_from_the_guest_and_corrupt_bytes_get_no_reply(guest: Guest) -> None:
    reply_frame = wire.encode_reply(3, wire.SyncReply(1))
    corrupt = bytearray(guest.request_bytes(Op.SYNC, wire.SyncRequest(1)))
    corrupt[10] ^= 0xFF  # the header checksum no longer matches
    assert guest.send(reply_frame + bytes(corrupt)) == []
    assert guest.state.bad_frames == 2
    # The stream is usable again at the next good frame.
    assert guest.ok(Op.SYNC, wire.SyncRequest(2)) == wire.SyncReply(2)


@settings(max_examples=150, deadline=None)
@given(
    op=st.sampled_from([int(op) for op in Op] + [0x00, 0x7F, 0xFF]),
    payload=st.one_of(
        st.binary(max_size=80), st.integers(0, 40).map(lambda n: bytes(32) + bytes(n * 128))
    ),
    hello_first=st.booleans(),
)
def test_any_request_frame_gets_exactly_one_reply_and_never_raises(
    op: int, payload: bytes, hello_first: bool
) -> None:
    guest = Guest(Dispatcher(TmemHost(budget_bytes=1 << 20)))
    if hello_first:
        guest.hello()
        guest.new_pool()
    (frame,) = guest.send(wire.encode_frame(op, 1234, payload))
    assert (frame.op, frame.request_id) == (op, 1234)
    if frame.status != Status.OK:
        assert len(frame.payload) <= wire.MAX_MESSAGE
