"""The cluster tree on arrays: sizes add up, children sit inside parents, query paths follow rows."""

from __future__ import annotations

import numpy as np

from sjea_tools.clusters import build_tree, default_sizes, query_paths


def hierarchy(seed=0):
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((4, 16)).astype(np.float32) * 4
    sub = top[:, None, :] + rng.standard_normal((4, 3, 16)).astype(np.float32) * 1.5
    which = rng.integers(0, 12, 1200)
    lvl0 = top[which // 3] + 0.3 * rng.standard_normal((1200, 16)).astype(np.float32)
    lvl1 = sub.reshape(12, 16)[which] + 0.2 * rng.standard_normal((1200, 16)).astype(np.float32)
    return [lvl0, lvl1], which


def test_default_sizes_follow_row_count():
    assert default_sizes(10_000, 2) == [22, 8]
    assert default_sizes(1_000_000, 2) == [64, 16]
    assert default_sizes(10, 1) == [2]


def test_tree_recovers_hierarchy_and_is_consistent():
    levels, which = hierarchy()
    tree = build_tree(levels, [4, 3])
    assign = tree["assign"]
    assert tree["size_0"].sum() == 1200 and tree["size_1"].sum() == 1200
    # every row's level-1 node is a child of its level-0 node
    assert np.array_equal(tree["parent_1"][assign[:, 1]], assign[:, 0])
    # level-0 clusters are the four true groups (purity 1)
    for c in range(len(tree["size_0"])):
        assert len(set((which[assign[:, 0] == c] // 3).tolist())) == 1
    # examples are members of their node
    for c, ex in enumerate(tree["examples_0"]):
        assert all(assign[e, 0] == c for e in ex if e >= 0)
    paths = query_paths(tree, [levels[0][:50], levels[1][:50]])
    assert (paths == assign[:50]).mean() >= 0.95
