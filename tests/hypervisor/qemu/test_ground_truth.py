"""sharing.ground_truth against a plain-dict reference model (hypothesis) and by example."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sharing.ground_truth import compare_ledger, compute, untracked_shared

p2ms = st.dictionaries(
    st.integers(1, 6),
    st.lists(st.integers(-1, 12), min_size=0, max_size=40),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(p2ms)
def test_matches_reference_model(raw: dict[int, list[int]]) -> None:
    truth = compute({d: np.array(v, dtype=np.int64) for d, v in raw.items()})
    ref: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for d in sorted(raw):
        for g, m in enumerate(raw[d]):
            if m >= 0:
                ref[m].append((d, g))
    assert truth.mfns.tolist() == sorted(ref)
    for m, gfns in ref.items():
        assert truth.gfns_of(m) == gfns
    assert truth.nr_shared_mfns == sum(len(v) >= 2 for v in ref.values())
    assert truth.nr_saved_mfns == sum(len(v) - 1 for v in ref.values() if len(v) >= 2)
    doms = sorted(raw)
    mat = truth.matrix()
    for i, a in enumerate(doms):
        for j, b in enumerate(doms):
            if a == b:
                want = sum(1 for v in ref.values() if sum(d == a for d, _ in v) >= 2)
            else:
                want = sum(
                    1
                    for v in ref.values()
                    if any(d == a for d, _ in v) and any(d == b for d, _ in v)
                )
            assert mat[i, j] == want
    per = truth.per_domain()
    for d in doms:
        present = [m for m in raw[d] if m >= 0]
        assert per[d]["present"] == len(present)
        assert per[d]["shared_gfns"] == sum(len(ref[m]) >= 2 for m in present)
        assert per[d]["frames"] == len(set(present))
    top = truth.top(3)
    assert truth.refs[top].tolist() == sorted((len(v) for v in ref.values()), reverse=True)[:3]


def test_ledger_comparison_lists_each_discrepancy() -> None:
    truth = compute({1: np.array([10, 11, -1, 12, 10]), 2: np.array([10, 13, 12, -1])})
    assert compare_ledger(truth, {10: [(1, 0), (1, 4), (2, 0)]}) == ([], 0)
    findings, truncated = compare_ledger(
        truth,
        {
            10: [(1, 0), (2, 0)],  # misses (1, 4)
            13: [(2, 1), (1, 1)],  # (1, 1) maps 11; 13 is mapped once
            20: [(3, 0)],  # unknown domain
        },
    )
    kinds = sorted(f["kind"] for f in findings)
    assert kinds == [
        "frame_not_shared",
        "gfn_missing_from_ledger",
        "gfn_moved",
        "gfn_unknown_domain",
    ]
    moved = next(f for f in findings if f["kind"] == "gfn_moved")
    assert (moved["domain"], moved["gfn"], moved["expected"], moved["found"]) == (1, 1, 13, 11)
    assert truncated == 0
    assert untracked_shared(truth, {10: []}) == 1  # frame 12 is shared, unknown to it
    _, truncated = compare_ledger(truth, {20: [(3, g) for g in range(5)]}, limit=2)
    assert truncated == 4  # 5 unknown-domain gfns + frame_not_shared
