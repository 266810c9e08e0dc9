"""Hierarchical search: the coarse level chooses the region, the fine level ranks inside it.

Definition (docs/search.md says what it buys): the store's cluster tree is k-means on the coarse
level, then k-means inside each cluster on the next level. A query goes to its nearest coarse
cluster (`probes` of them, plus every cluster within `margin` cosine of the nearest: the soft gate,
widened until they hold at least k rows); only rows of those clusters
can be returned, whatever their fine-level score: that is the decision the fine stage cannot undo.
Inside the gate the hits are ordered by the fine (last) level, either by score alone
(`within="score"`) or sub-cluster by sub-cluster, the query's own first (`within="groups"`).
Every hit carries its node at each depth, so the output keeps the grouping.

Which level is coarse is measured, not assumed (`clusters.coarse_order`, when the tree is built):
each level of a sample is split into the same number of k-means clusters, and the level whose
clusters keep the most of each row's own nearest neighbours (neighbourhood agreement) is the
coarse one: its space falls into regions.

Pure: arrays and the tree dict of `clusters.build_tree` in, arrays out.
"""

from __future__ import annotations

import numpy as np

from .errors import SjeaError
from .vectors import l2_normalize

WITHIN = ("score", "groups")
MAX_MARGIN = 2.0  # cosines differ by at most 2: a margin of 2 gates every cluster


def check_margin(margin: float) -> None:
    if not (np.isfinite(margin) and 0 <= margin <= MAX_MARGIN):
        raise SjeaError(f"--margin must be a cosine difference from 0 to {MAX_MARGIN:g} (0: the hard gate), "
                        f"not {margin}.")


def members_by_node(assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows sorted by node, start offset of each node) for one depth's assignment column."""
    rows = np.argsort(assign, kind="stable")
    starts = np.searchsorted(assign[rows], np.arange(assign.max() + 2))
    return rows, starts


def gates(tree: dict, q0: np.ndarray, k: int, probes: int, margin: float = 0.0) -> list[tuple[int, ...]]:
    """Per query, the coarse clusters its answer may come from: the `probes` nearest, every other one
    whose centroid cosine is within `margin` of the nearest's (the soft gate), then more (nearest
    first) until they hold at least k rows."""
    sims = l2_normalize(q0) @ tree["centroids_0"].T
    sizes = tree["size_0"]
    out = []
    for row, s in zip(np.argsort(-sims, axis=1, kind="stable"), sims):
        total = np.cumsum(sizes[row])
        within = int((s >= s[row[0]] - margin).sum()) if margin > 0 else 1
        need = max(probes, within, int(np.searchsorted(total, min(k, total[-1]))) + 1)
        out.append(tuple(sorted(int(c) for c in row[:need])))
    return out


def gated_search(queries: list[np.ndarray], get_rows, tree: dict, k: int, probes: int = 1,
                 within: str = "score", margin: float = 0.0) -> dict:
    """Search inside each query's coarse cluster(s). queries[d] (q, dim_d) are the query vectors at
    the tree's depth d; get_rows(sorted ids) -> unit vectors of the last depth's level.

    Returns {"ids" (q, k) -1 padded, "scores" (q, k) cosines at the last depth (nan for padding),
    "nodes" (q, k, depths) each hit's node per depth, "path" (q, depths) the query's nodes,
    "gate" [tuple of clusters], "gate_rows" (q,) rows the gate held}.
    """
    from .clusters import query_paths

    if k <= 0 or probes <= 0:
        raise SjeaError(f"k and probes must be at least 1, not {k} and {probes}.")
    check_margin(margin)
    if within not in WITHIN:
        raise SjeaError(f"within must be one of {', '.join(WITHIN)}, not '{within}'.")
    assign = tree["assign"]
    depths = assign.shape[1]
    path = query_paths(tree, queries)
    gate = gates(tree, queries[0], k, probes, margin)
    if "members_0" not in tree:  # cached in the tree: a held tree (server, benchmark) sorts its rows once
        tree["members_0"] = members_by_node(assign[:, 0])
    rows_sorted, starts = tree["members_0"]
    q_last = l2_normalize(queries[-1])
    nq = len(q_last)
    ids = np.full((nq, k), -1, np.int64)
    scores = np.full((nq, k), np.nan, np.float32)
    gate_rows = np.zeros(nq, np.int64)
    for g in sorted(set(gate)):  # queries sharing a gate read its rows once
        qs = [i for i in range(nq) if gate[i] == g]
        rows = np.sort(np.concatenate([rows_sorted[starts[c]:starts[c + 1]] for c in g]))
        # einsum, not queries @ rows.T: BLAS's threads on a busy machine made that product of one query
        # with a 3,348 x 512 gate take 6-8 ms, einsum (one thread) 0.6 ms (measured, 2 cores, load 4)
        sims = np.einsum("qd,nd->qn", q_last[qs], get_rows(rows))
        for j, qi in enumerate(qs):
            top = rank_in_gate(sims[j], assign[rows], path[qi], tree, queries, qi, within)[:k]
            ids[qi, :len(top)] = rows[top]
            scores[qi, :len(top)] = sims[j, top]
            gate_rows[qi] = len(rows)
    nodes = np.where(ids[..., None] >= 0, assign[np.maximum(ids, 0)], -1)
    return {"ids": ids, "scores": scores, "nodes": nodes, "path": path, "gate": gate, "gate_rows": gate_rows,
            "depths": depths}


def rank_in_gate(sims: np.ndarray, nodes: np.ndarray, path: np.ndarray, tree: dict, queries, qi: int,
                 within: str) -> np.ndarray:
    """Positions of the gate's rows in result order: by score, or by sub-cluster (the one whose
    centroid is nearest the query first, as the query's own path chose it) and by score inside."""
    if within == "score" or nodes.shape[1] < 2:
        return np.argsort(-sims, kind="stable")
    leaf = nodes[:, -1]
    d = nodes.shape[1] - 1
    q = l2_normalize(queries[d][qi:qi + 1])[0]
    closeness = tree[f"centroids_{d}"][leaf] @ q  # one value per row: its sub-cluster's closeness
    closeness = np.where(leaf == path[-1], np.inf, closeness)  # the query's own sub-cluster leads
    return np.lexsort((-sims, leaf, -closeness))
