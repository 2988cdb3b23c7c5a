"""The bytes on the wire are pinned: one request, one OK reply and one error reply of every
op hash to the digest the single-module codec (before the package split) produced.  A guest
image built from an older tree must keep talking to this host, and vice versa."""

from __future__ import annotations

import hashlib

from memd import wire
from memd.wire import Op

DIGEST = "fa1b8d96c58eaa8d3dc0f8db632d060d74212b8903484c4b73d0ceb3d89dbfce"
PAGE = bytes(range(256)) * 16


def _messages() -> tuple[dict[Op, wire.Request], dict[Op, wire.Reply]]:
    handles = [((1, 2, 3), 4), ((5, 6, 7), 8)]
    requests: dict[Op, wire.Request] = {
        Op.HELLO: wire.HelloRequest(1, 1, 7, bytes(range(16))),
        Op.SYNC: wire.SyncRequest(0x1122334455667788),
        Op.NEW_POOL: wire.NewPoolRequest(1, bytes(16)),
        Op.DESTROY_POOL: wire.DestroyPoolRequest(3),
        Op.PUT: wire.PutRequest(1, (1, 2, 3), 4, PAGE),
        Op.GET: wire.GetRequest(1, (1, 2, 3), 4),
        Op.FLUSH_PAGE: wire.FlushPageRequest(1, (1, 2, 3), 4),
        Op.FLUSH_OBJECT: wire.FlushObjectRequest(1, (1, 2, 3)),
        Op.PUT_BATCH: wire.PutBatchRequest(1, handles, [PAGE, PAGE[::-1]]),
        Op.GET_BATCH: wire.GetBatchRequest(1, handles),
        Op.LIST_POOLS: wire.ListPoolsRequest(),
        Op.NOMINATE: wire.NominateRequest([1, 2, 3]),
        Op.SHARE_QUERY: wire.ShareQueryRequest([4, 5]),
        Op.ABOUT_TO_WRITE: wire.AboutToWriteRequest(9),
        Op.STATS: wire.StatsRequest(),
        Op.MEM_REPORT: wire.MemReportRequest(100, 50, 10, 5, 1234, 56, 0),
        Op.RANGE_NOMINATE: wire.RangeNominateRequest(7, 0x1000, 0x2000),
        Op.RANGE_QUERY: wire.RangeQueryRequest(7, 0x1000, 0x2000),
    }
    replies: dict[Op, wire.Reply] = {
        Op.HELLO: wire.HelloReply(1, 7, 128, 1 << 20, 4096),
        Op.SYNC: wire.SyncReply(0x1122334455667788),
        Op.NEW_POOL: wire.NewPoolReply(3),
        Op.DESTROY_POOL: wire.DestroyPoolReply(),
        Op.PUT: wire.PutReply(),
        Op.GET: wire.GetReply(PAGE),
        Op.FLUSH_PAGE: wire.FlushPageReply(),
        Op.FLUSH_OBJECT: wire.FlushObjectReply(),
        Op.PUT_BATCH: wire.PutBatchReply([0, 2]),
        Op.GET_BATCH: wire.GetBatchReply([0, 1], [PAGE, None]),
        Op.LIST_POOLS: wire.ListPoolsReply([wire.PoolInfo(1, 1, bytes(range(16)), 99)]),
        Op.NOMINATE: wire.NominateReply([wire.NominateResult(0, 77), wire.NominateResult(13, 0)]),
        Op.SHARE_QUERY: wire.ShareQueryReply([wire.ShareInfo(3, 2)]),
        Op.ABOUT_TO_WRITE: wire.AboutToWriteReply(),
        Op.STATS: wire.StatsReply({"pages": 12, "name": "g"}),
        Op.MEM_REPORT: wire.MemReportReply(),
        Op.RANGE_NOMINATE: wire.RangeNominateReply([wire.RangeNominateItem(5, 0, 9)]),
        Op.RANGE_QUERY: wire.RangeQueryReply([wire.RangeQueryItem(5, 1, 1)]),
    }
    return requests, replies


def test_every_op_encodes_to_the_pinned_bytes() -> None:
    requests, replies = _messages()
    digest = hashlib.sha256()
    for op in Op:
        digest.update(wire.encode_request(1000 + op, requests[op]))
        digest.update(wire.encode_reply(2000 + op, replies[op]))
        digest.update(wire.encode_error(op, 3000 + op, wire.Status.NO_POOL, "no"))
    assert digest.hexdigest() == DIGEST
