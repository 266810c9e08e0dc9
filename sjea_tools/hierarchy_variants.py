"""Hierarchical search beyond the hard one-cluster gate (issue 21): pure functions on arrays.

The hard gate of `hierarchy.gated_search` is IVF with nprobe 1 on the coarse level's clusters: a
true neighbour just across a boundary is lost. What the sources say works, each a small function:

- soft gate (`soft_gates`): every coarse cluster whose centroid cosine is within `margin` of the
  query's best one (at most `max_probes`, widened nearest first until the gate holds k rows), the
  per-query pruning of SPANN (NeurIPS 2021) with a cosine margin in place of its distance ratio;
- boundary rows (`boundary_lists`): a row is listed in its nearest cluster and in up to `copies` - 1
  more whose centroid is within `margin` of its nearest (SPANN's closure assignment), so a query
  gated to one side still finds it; `gated_top_k` returns each row once however often it is listed;
- mixed re-rank (`mixed_rerank`): candidates re-ranked by a weighted sum of the levels' cosines,
  weights chosen on a held-out split (`tune_weight`), never on the test queries;
- spread order (`spread_order`): a browsing order that takes each sub-cluster's best hit, then
  each one's second, ..., so the top k covers the sub-clusters the candidates fall in.

Every top-k is (scores, ids), FAISS's order; -1 pads ids, -inf their scores.
"""

from __future__ import annotations

import numpy as np

from .errors import SjeaError
from .vectors import best_k


def soft_gates(sims: np.ndarray, sizes: np.ndarray, k: int, margin: float, max_probes: int) -> np.ndarray:
    """(q, width) coarse clusters per query, nearest first, -1 padded: those whose cosine (sims, (q, m):
    query to centroid) is within `margin` of the query's best, at most `max_probes`, plus the next
    nearest until the clusters hold at least k rows (sizes (m,): rows per cluster)."""
    if margin < 0 or max_probes < 1 or k < 1:
        raise SjeaError(f"margin must be >= 0, max_probes and k >= 1 (not {margin}, {max_probes}, {k}).")
    width = min(sims.shape[1], max_probes)
    if width < sims.shape[1]:  # only the max_probes nearest can be gated: partition, sort those (5x faster at 1,024)
        order = np.argpartition(-sims, width - 1, axis=1)[:, :width]
        order = np.take_along_axis(order, np.argsort(-np.take_along_axis(sims, order, 1), axis=1, kind="stable"), 1)
        if (np.asarray(sizes)[order].sum(axis=1) < min(k, int(np.sum(sizes)))).any():
            order = np.argsort(-sims, axis=1, kind="stable")  # some gate must widen past them to hold k rows
    else:
        order = np.argsort(-sims, axis=1, kind="stable")
    ranked = np.take_along_axis(sims, order, 1)
    total = np.cumsum(np.asarray(sizes)[order], axis=1)
    need = (total < np.minimum(k, total[:, -1:])).sum(axis=1) + 1  # clusters to reach k rows
    within = (ranked >= ranked[:, :1] - margin).sum(axis=1)
    count = np.maximum(np.minimum(within, max_probes), need)
    width = int(count.max())
    return np.where(np.arange(width) < count[:, None], order[:, :width], -1)


def boundary_lists(x: np.ndarray, centroids: np.ndarray, margin: float, copies: int = 2,
                   block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Inverted lists with boundary rows listed more than once: (rows sorted by cluster, start offset of
    each cluster (m + 1,)). Row i is in its nearest cluster and in each of its next `copies` - 1 nearest
    whose cosine is within `margin` of the nearest's (x and centroids unit rows). copies=1 or margin=0:
    the plain partition."""
    if copies < 1 or margin < 0:
        raise SjeaError(f"copies must be >= 1 and margin >= 0, not {copies} and {margin}.")
    m = len(centroids)
    copies = min(copies, m)
    rows_out, clusters_out = [], []
    for s in range(0, len(x), block):
        sims = x[s:s + block] @ centroids.T
        top = np.argpartition(-sims, copies - 1, axis=1)[:, :copies] if copies < m else np.tile(np.arange(m), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, 1)
        by_score = np.argsort(-top_sims, axis=1, kind="stable")  # the nearest first (a full sort of m: slow at 1M x 1024)
        top, top_sims = np.take_along_axis(top, by_score, 1), np.take_along_axis(top_sims, by_score, 1)
        keep = top_sims >= top_sims[:, :1] - margin
        keep[:, 0] = True
        if margin == 0:
            keep[:, 1:] = False
        r, c = np.nonzero(keep)
        rows_out.append(r + s)
        clusters_out.append(top[r, c])
    rows, clusters = np.concatenate(rows_out), np.concatenate(clusters_out)
    order = np.lexsort((rows, clusters))
    return rows[order].astype(np.int64), np.searchsorted(clusters[order], np.arange(m + 1)).astype(np.int64)


def gate_rows(lists: tuple[np.ndarray, np.ndarray], gate) -> np.ndarray:
    """The sorted, distinct rows of the clusters in `gate` (ids, -1 ignored): a boundary row once."""
    rows, starts = lists
    parts = [rows[starts[c]:starts[c + 1]] for c in gate if c >= 0]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def gated_top_k(queries: np.ndarray, get_rows, lists: tuple[np.ndarray, np.ndarray], gates: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's exact top k (inner product of unit rows) among the rows of its gate's clusters:
    (scores (q, k), ids (q, k), rows searched (q,)). gates (q, width) from `soft_gates`; get_rows(sorted
    ids) -> their vectors. Queries with the same gate read its rows once."""
    nq = len(queries)
    scores = np.full((nq, k), -np.inf, np.float32)
    ids = np.full((nq, k), -1, np.int64)
    searched = np.zeros(nq, np.int64)
    keys = [tuple(sorted(int(c) for c in g if c >= 0)) for g in gates]
    by_gate: dict[tuple, list[int]] = {}
    for qi, key in enumerate(keys):
        by_gate.setdefault(key, []).append(qi)
    for key, qs in by_gate.items():
        rows = gate_rows(lists, key)
        if not len(rows):
            continue
        sims = np.einsum("qd,nd->qn", queries[qs], get_rows(rows))
        s, pos = best_k(sims, np.broadcast_to(np.arange(len(rows)), sims.shape), k)
        scores[qs, :s.shape[1]], ids[qs, :s.shape[1]] = s, rows[pos]
        searched[qs] = len(rows)
    return scores, ids, searched


def dedup_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best distinct ids of each row of a (scores, ids) list best first that may name a row twice
    (a boundary row found in two lists): its first, best, occurrence kept; -1 / -inf pad."""
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for qi in range(len(ids)):
        valid = ids[qi] >= 0
        _, first = np.unique(ids[qi][valid], return_index=True)
        keep = np.flatnonzero(valid)[np.sort(first)][:k]
        out_s[qi, :len(keep)], out_i[qi, :len(keep)] = scores[qi, keep], ids[qi, keep]
    return out_s, out_i


def union_candidates(*id_lists: np.ndarray) -> np.ndarray:
    """Per query, the distinct ids of several (q, m_i) lists in the order met, -1 padded (q, sum m_i)."""
    both = np.concatenate(id_lists, axis=1)
    out = np.full(both.shape, -1, np.int64)
    for qi, row in enumerate(both):
        valid = row[row >= 0]
        _, first = np.unique(valid, return_index=True)
        got = valid[np.sort(first)]
        out[qi, :len(got)] = got
    return out


def mixed_scores(level_scores: np.ndarray, weights) -> np.ndarray:
    """sum over levels l of weights[l] * level_scores[..., l] (level_scores (q, m, L))."""
    w = np.asarray(weights, np.float32)
    if w.shape != (level_scores.shape[-1],) or (w < 0).any() or w.sum() <= 0:
        raise SjeaError(f"weights must be {level_scores.shape[-1]} non-negative numbers, not all 0: {list(w)}.")
    return np.einsum("qml,l->qm", level_scores.astype(np.float32), w)


def mixed_rerank(level_scores: np.ndarray, ids: np.ndarray, weights, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates (ids (q, m), -1 padded) by the weighted sum of their levels' cosines:
    (mixed scores (q, k), ids (q, k))."""
    mixed = np.where(ids >= 0, mixed_scores(level_scores, weights), -np.inf)
    return best_k(mixed, ids, k)


def tune_weight(evaluate, grid=tuple(np.round(np.arange(0, 1.0001, 0.1), 2))) -> tuple[float, dict]:
    """(the grid value that scores highest by evaluate(w) -> float, {w: score}); ties keep the smallest
    w. Call it on a held-out split, never on the queries the result is reported on."""
    measured = {float(w): float(evaluate(float(w))) for w in grid}
    best = max(measured.values())
    return min(w for w, v in measured.items() if v == best), measured


def spread_order(groups: np.ndarray, k: int) -> np.ndarray:
    """Positions (q, k) of a browsing order over candidates best first whose sub-cluster is groups
    (q, m) (-1: missing candidate, left out): each sub-cluster's best, then each one's second, ...;
    inside a round, by score (position). -1 pads a row with fewer than k candidates."""
    out = np.full((len(groups), k), -1, np.int64)
    for qi, g in enumerate(groups):
        valid = np.flatnonzero(g >= 0)
        seen: dict[int, int] = {}
        round_of = np.empty(len(valid), np.int64)
        for j, p in enumerate(valid):
            round_of[j] = seen.get(int(g[p]), 0)
            seen[int(g[p])] = round_of[j] + 1
        order = valid[np.lexsort((valid, round_of))][:k]
        out[qi, :len(order)] = order
    return out


def spread(scores: np.ndarray, ids: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (q, k) of candidates best first put in `spread_order` by their sub-clusters."""
    pos = spread_order(np.where(ids >= 0, groups, -1), k)
    safe = np.maximum(pos, 0)
    return (np.where(pos >= 0, np.take_along_axis(scores, safe, 1), -np.inf).astype(np.float32),
            np.where(pos >= 0, np.take_along_axis(ids, safe, 1), -1))
