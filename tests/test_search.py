"""Pure search functions on arrays: exact top-k and the cluster-gated hierarchical search."""

from __future__ import annotations

import numpy as np
import pytest

from sjea_tools.errors import SjeaError
from sjea_tools.search import hierarchical_search
from sjea_tools.vectors import cosine_top_k


def two_levels(n=500, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 16)).astype(np.float32)
    b = np.tanh(a @ rng.standard_normal((16, 8)).astype(np.float32)) + 0.1 * rng.standard_normal((n, 8)).astype(np.float32)
    return [a, b]


def test_cosine_top_k_matches_brute_force():
    a, _ = two_levels()
    scores, ids = cosine_top_k(a[:5], a, 7)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = an[:5] @ an.T
    assert np.array_equal(ids, np.argsort(-sims, axis=1)[:, :7])
    assert np.allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :7], atol=1e-5)


def test_hierarchical_self_query_first_with_scores_at_every_level():
    bases = two_levels()
    q = [b[10:13] for b in bases]
    scores, ids = hierarchical_search(q, bases, k=5, order=[0, 1])
    assert ids.shape == (3, 5) and scores.shape == (3, 5, 2)
    assert list(ids[:, 0]) == [10, 11, 12]
    assert np.all(scores[:, 0, :] > 0.999)
    assert np.all(np.diff(scores[:, :, 1], axis=1) <= 1e-6)  # ranked by the fine (last) level


def grouped(n=1200, seed=0):
    """Level 0 sees 4 well-separated kinds, level 1 sees 12 sub-kinds whose neighbours cross kinds:
    the two levels disagree about who is near whom."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, n)
    sub = rng.integers(0, 3, n)
    top = rng.standard_normal((4, 16)).astype(np.float32) * 5
    lvl0 = top[kind] + rng.standard_normal((n, 16)).astype(np.float32)
    subs = rng.standard_normal((3, 8)).astype(np.float32) * 3  # sub-kind shared across kinds at level 1
    lvl1 = subs[sub] + 0.3 * rng.standard_normal((4, 8)).astype(np.float32)[kind] + rng.standard_normal((n, 8)).astype(np.float32)
    return [lvl0, lvl1], kind


def test_the_coarse_cluster_decides_what_the_fine_level_cannot_undo():
    bases, kind = grouped()
    q = [b[:40] for b in bases]
    _, ids = hierarchical_search(q, bases, k=10, order=[0, 1], sizes=[4, 3])
    _, fine = cosine_top_k(q[1], bases[1], 10)
    assert np.all(kind[ids] == kind[:40, None])  # every hit from the query's own kind
    assert (kind[fine] != kind[:40, None]).mean() > 0.3  # level 1 alone crosses kinds
    assert np.mean([set(a) != set(b) for a, b in zip(ids.tolist(), fine.tolist())]) > 0.9


def test_measured_order_puts_the_clustered_level_first():
    from sjea_tools.clusters import coarse_order, default_sizes

    bases, _ = grouped()
    order, agreement = coarse_order(bases, 4)
    assert order == [0, 1] and agreement[0] > agreement[1]
    _, default = hierarchical_search([b[:5] for b in bases], bases, k=3, sizes=[4, 3])
    _, explicit = hierarchical_search([b[:5] for b in bases], bases, k=3, order=[0, 1], sizes=[4, 3])
    assert np.array_equal(default, explicit) and default_sizes(1200, 2)[0] > 4


def test_groups_put_the_querys_own_sub_cluster_first():
    from sjea_tools.clusters import build_tree
    from sjea_tools.hierarchy import gated_search
    from sjea_tools.vectors import l2_normalize

    bases, _ = grouped()
    unit = [l2_normalize(b) for b in bases]
    tree = build_tree(unit, [4, 3])
    got = gated_search([u[:20] for u in unit], lambda rows: unit[1][rows], tree, 250, within="groups")
    for nodes, path in zip(got["nodes"], got["path"]):
        leaf = nodes[:, -1]
        own = leaf == path[-1]
        first_other = int(np.argmax(~own))
        assert first_other > 0 and not own[first_other:].any()  # own sub-cluster first, then the others
        changes = np.flatnonzero(np.diff(leaf)) + 1
        assert len(set(leaf.tolist())) == len(changes) + 1  # each group contiguous


def test_gate_widens_until_it_holds_k_rows():
    from sjea_tools.clusters import build_tree
    from sjea_tools.hierarchy import gated_search
    from sjea_tools.vectors import l2_normalize

    bases, _ = grouped(n=300)
    unit = [l2_normalize(b) for b in bases]
    tree = build_tree(unit, [4, 3])
    got = gated_search([u[:3] for u in unit], lambda rows: unit[1][rows], tree, 200)
    assert all(len(g) >= 2 for g in got["gate"]) and np.all(got["ids"] >= 0)
    assert np.all(got["gate_rows"] >= 200)


@pytest.mark.parametrize("kwargs,needle", [({"k": 0}, "at least 1"), ({"k": 3, "order": [0, 0]}, "repeats a level"),
                                           ({"k": 3, "order": [0, 5]}, "level 5 does not exist"),
                                           ({"k": 3, "order": [1]}, "at least 2"),
                                           ({"k": 3, "within": "sideways"}, "within must be one of")])
def test_bad_arguments(kwargs, needle):
    bases = two_levels(n=50)
    with pytest.raises(SjeaError, match=needle):
        hierarchical_search([b[:1] for b in bases], bases, **kwargs)
