"""Pure search functions on arrays: exact top-k, the hierarchical funnel, stage sizes."""

from __future__ import annotations

import numpy as np
import pytest

from sjea_tools.errors import SjeaError
from sjea_tools.search import cosine_top_k, hierarchical_search, stage_sizes


def two_levels(n=500, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 16)).astype(np.float32)
    b = np.tanh(a @ rng.standard_normal((16, 8)).astype(np.float32)) + 0.1 * rng.standard_normal((n, 8)).astype(np.float32)
    return [a, b]


def test_cosine_top_k_matches_brute_force():
    a, _ = two_levels()
    ids, scores = cosine_top_k(a[:5], a, 7)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = an[:5] @ an.T
    assert np.array_equal(ids, np.argsort(-sims, axis=1)[:, :7])
    assert np.allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :7], atol=1e-5)


def test_hierarchical_self_query_first_with_scores_at_every_level():
    bases = two_levels()
    q = [b[10:13] for b in bases]
    ids, scores = hierarchical_search(q, bases, k=5, order=[0, 1])
    assert ids.shape == (3, 5) and scores.shape == (3, 5, 2)
    assert list(ids[:, 0]) == [10, 11, 12]
    assert np.all(scores[:, 0, :] > 0.999)
    assert np.all(np.diff(scores[:, :, 1], axis=1) <= 1e-6)  # ranked by the last level


def test_hierarchical_with_full_candidates_equals_last_level_search():
    bases = two_levels(n=200)
    q = [b[:4] for b in bases]
    ids, _ = hierarchical_search(q, bases, k=5, factor=1000, order=[0, 1])  # every row is a candidate
    exact, _ = cosine_top_k(q[1], bases[1], 5)
    assert np.array_equal(ids, exact)


def test_hierarchical_candidates_come_from_first_level():
    bases = two_levels(n=300)
    q = [b[:2] for b in bases]
    ids, _ = hierarchical_search(q, bases, k=3, factor=2, order=[0, 1])
    first, _ = cosine_top_k(q[0], bases[0], 6)
    assert all(set(i) <= set(f) for i, f in zip(ids, first))
    ids_rev, _ = hierarchical_search(q, bases, k=3, factor=2, order=[1, 0])
    first_rev, _ = cosine_top_k(q[1], bases[1], 6)
    assert all(set(i) <= set(f) for i, f in zip(ids_rev, first_rev))


def test_default_order_is_top_level_first():
    # The evaluation measured the stacked level as the coarser one (docs/reproduction.md).
    bases = two_levels(n=300)
    q = [b[:2] for b in bases]
    default = hierarchical_search(q, bases, k=3, factor=2)
    explicit = hierarchical_search(q, bases, k=3, factor=2, order=[1, 0])
    assert np.array_equal(default[0], explicit[0]) and np.allclose(default[1], explicit[1])


def test_stage_sizes_funnel():
    assert stage_sizes(10, 10, 2, 10_000) == [100, 10]
    assert stage_sizes(10, 10, 3, 10_000) == [100, 32, 10]
    assert stage_sizes(10, 10, 2, 50) == [50, 10]


@pytest.mark.parametrize("kwargs,needle", [({"k": 0}, "at least 1"), ({"k": 3, "order": [0, 0]}, "repeats a level"),
                                           ({"k": 3, "order": [0, 5]}, "level 5 does not exist"),
                                           ({"k": 3, "order": [1]}, "at least 2"), ({"k": 3, "factor": 0.5}, "factor")])
def test_bad_arguments(kwargs, needle):
    bases = two_levels(n=50)
    with pytest.raises(SjeaError, match=needle):
        hierarchical_search([b[:1] for b in bases], bases, **kwargs)
