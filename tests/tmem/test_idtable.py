"""IdTable: open addressing with backward-shift deletion, checked against a set."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem.idtable import IdTable


def _table(keys: dict[int, int]) -> IdTable:
    return IdTable(lambda ident: keys[ident])


def _is(want: int) -> Callable[[int], bool]:
    """The match predicate for one id (a named closure: a defaulted lambda has no type)."""
    return lambda ident: ident == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 7)), max_size=400))
def test_matches_a_set_under_heavy_collisions(ops: list[tuple[bool, int, int]]) -> None:
    keys: dict[int, int] = {}  # id -> hash (only 8 distinct hashes: long probe runs)
    table = _table(keys)
    model: set[int] = set()
    for insert, ident, h in ops:
        if insert and ident not in model:
            keys[ident] = h
            table.insert(h, ident)
            model.add(ident)
        elif not insert and ident in model:
            table.remove(keys[ident], ident)
            model.discard(ident)
        assert len(table) == len(model)
    assert set(table) == model
    for ident in range(301):
        found = table.find(keys.get(ident, 0), _is(ident))
        assert (found == ident) == (ident in model)


def test_grows_and_shrinks() -> None:
    keys = {i: i * 2654435761 for i in range(10_000)}
    table = _table(keys)
    for i in range(10_000):
        table.insert(keys[i], i)
    big = table.nbytes
    for i in range(9_990):
        table.remove(keys[i], i)
    assert table.nbytes < big // 8
    assert sorted(table) == list(range(9_990, 10_000))


def test_remove_missing_raises() -> None:
    table = _table({1: 5})
    table.insert(5, 1)
    try:
        table.remove(5, 2)
    except KeyError:
        pass
    else:
        raise AssertionError("removing an absent id must raise")


def test_resize_places_runs_that_wrap_past_the_end() -> None:
    # Every id hashes to the last slot of any power-of-two table: each resize must wrap
    # the run around to the start, and every id must stay findable.
    keys = {i: (1 << 40) - 1 for i in range(300)}
    for vectorised in (False, True):
        table = IdTable(
            lambda ident: keys[ident],
            hash_many=(
                (lambda ids: np.full(len(ids), (1 << 40) - 1, dtype=np.uint64))
                if vectorised
                else None
            ),
        )
        for i in range(300):
            table.insert(keys[i], i)
        for i in range(300):
            assert table.find(keys[i], _is(i)) == i
        for i in range(0, 300, 2):
            table.remove(keys[i], i)
        assert sorted(table) == list(range(1, 300, 2))
        for i in range(1, 300, 2):
            assert table.find(keys[i], _is(i)) == i


@settings(max_examples=100, deadline=None)
@given(
    st.sets(st.integers(0, 5000), max_size=600),
    st.sets(st.integers(0, 5000), max_size=600),
    st.integers(1, 64),
)
def test_insert_many_equals_inserting_one_by_one(
    first: set[int], bulk: set[int], spread: int
) -> None:
    """The bulk load of a restart places ids exactly where find/remove look for them."""
    bulk -= first
    keys = {i: (i * 40503) % spread for i in first | bulk}  # few hashes: long runs

    def hash_many(ids: npt.NDArray[np.int32]) -> npt.NDArray[np.uint64]:
        return np.array([keys[int(i)] for i in ids], dtype=np.uint64)

    table = IdTable(lambda ident: keys[ident], hash_many=hash_many)
    for ident in first:
        table.insert(keys[ident], ident)
    table.insert_many(np.array(sorted(bulk), dtype=np.int32))
    assert len(table) == len(first | bulk) and set(table) == first | bulk
    for ident in first | bulk:
        assert table.find(keys[ident], _is(ident)) == ident
    for ident in sorted(bulk)[::2]:
        table.remove(keys[ident], ident)
    assert set(table) == first | set(sorted(bulk)[1::2])
