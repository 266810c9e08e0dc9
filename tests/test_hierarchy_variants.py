"""The hierarchical search variants (sjea_tools.hierarchy_variants) on small hand-checkable arrays."""

import numpy as np
import pytest

from sjea_tools.errors import SjeaError
from sjea_tools.hierarchy_variants import (boundary_lists, dedup_top_k, gate_rows, gated_top_k, mixed_rerank,
                                           mixed_scores, soft_gates, spread, spread_order, tune_weight,
                                           union_candidates)
from sjea_tools.vectors import l2_normalize


def test_soft_gate_picks_the_clusters_within_the_margin():
    sims = np.array([[0.9, 0.85, 0.5, 0.88],    # within 0.05 of 0.9: clusters 0, 3, 1
                     [0.1, 0.9, 0.2, 0.3]])     # only cluster 1
    sizes = np.array([100, 100, 100, 100])
    g = soft_gates(sims, sizes, k=10, margin=0.05, max_probes=4)
    assert g.tolist() == [[0, 3, 1], [1, -1, -1]]
    # max_probes caps it
    assert soft_gates(sims, sizes, 10, 0.05, 2).tolist() == [[0, 3], [1, -1]]
    # margin 0 is the hard gate
    assert soft_gates(sims, sizes, 10, 0.0, 4).tolist() == [[0], [1]]


def test_soft_gate_widens_until_it_holds_k_rows():
    sims = np.array([[0.9, 0.1, 0.5]])
    g = soft_gates(sims, np.array([3, 10, 4]), k=5, margin=0.0, max_probes=1)
    assert g.tolist() == [[0, 2]]  # 3 rows are not 5: the next nearest (2) joins
    with pytest.raises(SjeaError):
        soft_gates(sims, np.array([3, 10, 4]), k=5, margin=-0.1, max_probes=1)


def test_boundary_rows_are_listed_in_two_clusters():
    cents = np.eye(2, dtype=np.float32)
    x = l2_normalize(np.array([[1.0, 0.0], [1.0, 0.98], [0.0, 1.0], [0.2, 1.0]]))
    rows, starts = boundary_lists(x, cents, margin=0.05, copies=2)
    lists = [rows[starts[c]:starts[c + 1]].tolist() for c in range(2)]
    assert lists == [[0, 1], [1, 2, 3]]  # row 1 sits on the boundary: in both
    rows, starts = boundary_lists(x, cents, margin=0.0, copies=2)
    assert [rows[starts[c]:starts[c + 1]].tolist() for c in range(2)] == [[0, 1], [2, 3]]


def test_boundary_row_is_returned_once():
    cents = np.eye(2, dtype=np.float32)
    x = l2_normalize(np.array([[1.0, 0.0], [1.0, 0.98], [0.0, 1.0]]))
    lists = boundary_lists(x, cents, margin=0.05, copies=2)
    assert gate_rows(lists, (0, 1)).tolist() == [0, 1, 2]
    q = l2_normalize(np.array([[1.0, 1.0]]))
    scores, ids, searched = gated_top_k(q, lambda r: x[r], lists, np.array([[0, 1]]), k=3)
    assert sorted(ids[0].tolist()) == [0, 1, 2] and searched.tolist() == [3]
    assert ids[0, 0] == 1 and np.isclose(scores[0, 0], float(x[1] @ q[0]))
    # a gate of one cluster searches only its rows; k beyond them pads
    scores, ids, _ = gated_top_k(q, lambda r: x[r], lists, np.array([[0, -1]]), k=3)
    assert ids[0].tolist() == [1, 0, -1] and np.isinf(scores[0, 2])


def test_dedup_keeps_the_first_occurrence():
    s = np.array([[0.9, 0.9, 0.8, 0.7]], np.float32)
    i = np.array([[5, 5, 3, 5]])
    ds, di = dedup_top_k(s, i, 3)
    assert di.tolist() == [[5, 3, -1]] and ds[0, :2].tolist() == pytest.approx([0.9, 0.8])


def test_union_candidates_keeps_first_order_and_pads():
    assert union_candidates(np.array([[3, 1]]), np.array([[1, 7]])).tolist() == [[3, 1, 7, -1]]


def test_mixed_rerank_equals_the_weighted_sum():
    level_scores = np.array([[[0.9, 0.1], [0.5, 0.9], [0.7, 0.5]]], np.float32)  # (1 query, 3 cands, 2 levels)
    ids = np.array([[10, 11, 12]])
    w = [0.6, 0.4]
    expected = 0.6 * level_scores[0, :, 0] + 0.4 * level_scores[0, :, 1]  # 0.58, 0.66, 0.62
    assert mixed_scores(level_scores, w)[0] == pytest.approx(expected)
    s, got = mixed_rerank(level_scores, ids, w, 2)
    assert got.tolist() == [[11, 12]] and s[0] == pytest.approx(np.sort(expected)[::-1][:2])
    s, got = mixed_rerank(level_scores, ids, [1, 0], 3)
    assert got.tolist() == [[10, 12, 11]]  # weight on level 0 only: its order
    s, got = mixed_rerank(level_scores, np.array([[10, -1, 12]]), w, 3)
    assert got[0, -1] == -1  # padding ranks last
    with pytest.raises(SjeaError):
        mixed_scores(level_scores, [0, 0])


def test_tune_weight_picks_the_best_and_the_smallest_on_ties():
    best, measured = tune_weight(lambda w: -(w - 0.3) ** 2)
    assert best == pytest.approx(0.3) and len(measured) == 11
    assert tune_weight(lambda w: 1.0, grid=(0.0, 0.5))[0] == 0.0


def test_spread_order_interleaves_sub_clusters():
    groups = np.array([[4, 4, 4, 7, 9, 7]])
    assert spread_order(groups, 6).tolist() == [[0, 3, 4, 1, 5, 2]]
    assert spread_order(groups, 3).tolist() == [[0, 3, 4]]
    assert spread_order(np.array([[2, -1]]), 3).tolist() == [[0, -1, -1]]
    s, ids = spread(np.array([[0.9, 0.8, 0.7]], np.float32), np.array([[1, 2, 3]]), np.array([[0, 0, 1]]), 3)
    assert ids.tolist() == [[1, 3, 2]] and s[0].tolist() == pytest.approx([0.9, 0.7, 0.8])


def test_tree_gate_adds_the_clusters_within_the_margin():
    from sjea_tools.hierarchy import gates

    # three coarse clusters on the unit circle; the query sits between 0 and 1, far from 2
    cents = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    tree = {"centroids_0": cents, "size_0": np.array([50, 50, 50])}
    q = l2_normalize(np.array([[1.0, 0.9]]))  # cosines 0.743, 0.669, -0.743
    assert gates(tree, q, 5, 1) == [(0,)]
    assert gates(tree, q, 5, 1, margin=0.1) == [(0, 1)]
    assert gates(tree, q, 5, 1, margin=2.0) == [(0, 1, 2)]
    with pytest.raises(SjeaError, match="--margin"):
        from sjea_tools.hierarchy import check_margin
        check_margin(-0.5)


def test_boundary_lists_take_the_nearest_centroids_among_many():
    cents = l2_normalize(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    x = l2_normalize(np.array([[1.0, 0.97], [-1.0, -0.1], [0.0, 1.0]]))
    rows, starts = boundary_lists(x, cents, margin=0.05, copies=2)
    lists = [rows[starts[c]:starts[c + 1]].tolist() for c in range(4)]
    assert lists == [[0], [0, 2], [1], []]  # row 0 on the 0/1 boundary; row 1 near 2 only


def test_soft_gate_with_a_cap_equals_the_full_sort_and_still_widens():
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((50, 40)).astype(np.float32)
    sizes = rng.integers(1, 5, 40)
    for k, margin, cap in ((3, 0.5, 4), (30, 0.2, 3), (10, 10.0, 6)):
        got = soft_gates(sims, sizes, k, margin, cap)
        order = np.argsort(-sims, axis=1, kind="stable")
        for row, o, s in zip(got, order, sims):
            kept = row[row >= 0]
            within = min(int((s >= s[o[0]] - margin).sum()), cap)
            need = int(np.searchsorted(np.cumsum(sizes[o]), k)) + 1
            assert kept.tolist() == o[:max(within, need)].tolist()
