"""The put entries for decoder-validated input equal the public, validating ones.

``TmemHost.put_batch_prevalidated`` / ``put_prevalidated`` skip the argument checks the
guest protocol's decoder already made and take pages as buffers (views of the frame)
instead of ``bytes``.  For every valid input they must do exactly what ``put_batch`` /
``put`` do — same results, same errors, same pages afterwards, same counters — and
they must keep no reference to the caller's buffers; the public entries keep refusing
what they refused.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memd.errors import InvalidArgument, TmemError
from tests.tmem.fake_log import FakeLog
from tmem.host import TmemHost
from tmem.store import ZERO_HASH, hash_pages
from tmem.types import PAGE_SIZE, PageBuffer, PoolFlag

Handle = tuple[tuple[int, int, int], int]

RANDOM_PAGE = os.urandom(PAGE_SIZE)
CONTENTS = [
    bytes(PAGE_SIZE),
    b"a" * PAGE_SIZE,
    b"ab" * 2048,
    bytes(range(256)) * 16,
    RANDOM_PAGE,
    bytes(PAGE_SIZE - 1) + b"\x01",
]

handles = st.tuples(
    st.sampled_from([(0, 0, 1), (0, 0, 2), (2**64 - 1, 5, 5)]),
    st.sampled_from([0, 1, 2, 63, 64, 2**32 - 1]),
)
batches = st.lists(
    st.lists(st.tuples(handles, st.sampled_from(range(len(CONTENTS)))), min_size=1, max_size=24),
    max_size=6,
)


def as_buffer(page: bytes, kind: int) -> PageBuffer:
    """The page as bytes, a bytearray, or a view into a larger buffer (as a frame's
    payload holds it)."""
    if kind == 0:
        return page
    if kind == 1:
        return bytearray(page)
    frame = bytearray(b"\xee" * 40 + page + b"\xee" * 40)
    return memoryview(frame).toreadonly()[40 : 40 + PAGE_SIZE]


def _outcome(results: list[TmemError | None] | Exception) -> object:
    if isinstance(results, Exception):
        return (type(results), str(results))
    return [None if r is None else (type(r), str(r)) for r in results]


def _host(kind: str, cap: int | None, persistent: bool) -> tuple[TmemHost, int]:
    host = TmemHost(budget_bytes=64 << 20, log=FakeLog() if kind == "log" else None)
    host.add_client("vm", dedup=True, cap_pages=cap)
    host.add_client("other", dedup=True)
    pool = host.new_pool("vm", PoolFlag.PERSISTENT if persistent else PoolFlag.EPHEMERAL)
    # Another guest's copies of some contents: cross-guest dedup pins them.
    other = host.new_pool("other", PoolFlag.PERSISTENT)
    host.put_batch("other", other, [((9, 9, 9), i) for i in range(3)], CONTENTS[:3])
    return host, pool


@settings(max_examples=120, deadline=None)
@given(
    batches,
    st.sampled_from(["memory", "log"]),
    st.sampled_from([None, 5, 40]),
    st.booleans(),
    st.sampled_from([0, 1, 2]),
    st.integers(0, 8),
)
def test_prevalidated_batch_equals_put_batch(
    batch_list: list[list[tuple[Handle, int]]],
    kind: str,
    cap: int | None,
    persistent: bool,
    buffer_kind: int,
    freeze_at: int,
) -> None:
    public, pool_p = _host(kind, cap, persistent)
    trusted, pool_t = _host(kind, cap, persistent)
    for i, batch in enumerate(batch_list):
        if i == freeze_at:  # a frozen client refuses puts on both paths alike
            public.freeze("vm")
            trusted.freeze("vm")
        hs = [h for h, _ in batch]
        pages = [CONTENTS[c] for _, c in batch]
        pool = pool_p if i != 3 else 7  # batch 3 names a pool that does not exist
        got: list[TmemError | None] | Exception
        want: list[TmemError | None] | Exception
        try:
            want = public.put_batch("vm", pool, hs, pages)
        except TmemError as err:
            want = err
        try:
            got = trusted.put_batch_prevalidated(
                "vm", pool_t if i != 3 else 7, hs, [as_buffer(p, buffer_kind) for p in pages]
            )
        except TmemError as err:
            got = err
        assert _outcome(got) == _outcome(want)
        assert trusted.audit() == []
    probe = [
        (oid, index)
        for oid in [(0, 0, 1), (0, 0, 2), (2**64 - 1, 5, 5)]
        for index in [0, 1, 2, 63, 64, 2**32 - 1]
    ]
    assert trusted.get_batch("vm", pool_t, probe) == public.get_batch("vm", pool_p, probe)
    assert [s.to_dict() for s in trusted.pool_stats()] == [s.to_dict() for s in public.pool_stats()]
    assert trusted.store_stats() == public.store_stats()


@pytest.mark.parametrize("buffer_kind", [1, 2])
def test_stored_pages_are_copies_of_the_buffers(buffer_kind: int) -> None:
    """Pages put from buffers come back byte-exact after the buffers are overwritten
    (the agent's receive memory is reused): tmem keeps no view of them — including a
    page lz4 cannot shrink, which is stored raw."""
    for log in (None, FakeLog()):
        host = TmemHost(budget_bytes=64 << 20, log=log)
        host.add_client("vm")
        pool = host.new_pool("vm", PoolFlag.PERSISTENT)
        frame = bytearray(b"".join(CONTENTS))
        view = memoryview(frame)
        pages: list[PageBuffer] = [
            (
                view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                if buffer_kind == 2
                else bytearray(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            )
            for i in range(len(CONTENTS))
        ]
        hs = [((0, 0, 1), i) for i in range(len(CONTENTS))]
        assert host.put_batch_prevalidated("vm", pool, hs, pages) == [None] * len(pages)
        host.put_prevalidated("vm", pool, (0, 0, 2), 0, pages[4])
        for p in pages:
            if isinstance(p, bytearray):
                p[:] = b"\x5a" * PAGE_SIZE
        view.release()
        frame[:] = b"\x5a" * len(frame)
        assert host.get_batch("vm", pool, hs) == CONTENTS
        assert host.get("vm", pool, (0, 0, 2), 0) == RANDOM_PAGE
        assert host.audit() == []


def test_put_prevalidated_raises_as_put() -> None:
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("vm", cap_pages=0)
    pool = host.new_pool("vm", PoolFlag.PERSISTENT)
    page = memoryview(bytes(CONTENTS[1]))
    with pytest.raises(TmemError) as public:
        host.put("vm", pool, (0, 0, 1), 0, bytes(page))
    with pytest.raises(TmemError) as trusted:
        host.put_prevalidated("vm", pool, (0, 0, 1), 0, page)
    assert (type(trusted.value), str(trusted.value)) == (type(public.value), str(public.value))


@pytest.mark.parametrize(
    ("handle", "page", "valid"),
    [
        (((0, 0, 1), 0), memoryview(bytes(PAGE_SIZE + 1))[1:], True),  # control
        (((0, 0, 1), 0), memoryview(bytes(PAGE_SIZE - 1)), False),
        (((0, 0, 1), 0), bytearray(PAGE_SIZE + 1), False),
        (((0, 0, 2**64), 0), bytes(PAGE_SIZE), False),
        (((0, 0, -1), 0), bytes(PAGE_SIZE), False),
        (((0, 0, 1), 2**32), bytes(PAGE_SIZE), False),
    ],
)
def test_public_put_batch_still_validates(handle: Handle, page: PageBuffer, valid: bool) -> None:
    """The public entry keeps refusing malformed arguments, buffers included."""
    host = TmemHost(budget_bytes=64 << 20)
    host.add_client("vm")
    pool = host.new_pool("vm", PoolFlag.PERSISTENT)
    if valid:
        assert host.put_batch("vm", pool, [handle], [page]) == [None]  # type: ignore[list-item]
        return
    with pytest.raises(InvalidArgument):
        host.put_batch("vm", pool, [handle], [page])  # type: ignore[list-item]


def test_zero_pages_found_in_any_buffer() -> None:
    """hash_pages tells zero pages the same way for bytes and for views (which it
    compares with memcmp, not item by item)."""
    pages = [bytes(PAGE_SIZE), CONTENTS[5], CONTENTS[1]]
    as_bytes = hash_pages(pages)
    assert as_bytes[0] == ZERO_HASH and ZERO_HASH not in as_bytes[1:]
    for kind in (1, 2):
        assert hash_pages([as_buffer(p, kind) for p in pages]) == as_bytes
