"""The hierarchical variants of issue 21 measured for quality on the arrays of bench_hierarchical.py.

Variants (sjea_tools.hierarchy_variants), all on centred unit vectors, tree = the measured one:
  - soft gate: the coarse clusters within MARGIN of the query's best (at most MAX_PROBES), over lists
    where a row within MARGIN of a second centroid is listed there too; ranked by the fine level;
  - mixed re-rank: candidates = the union of every level's exact top DEPTH, ranked by
    (1 - w) * fine cosine + w * coarse cosine, w chosen on the held-out split (training images
    outside the bank as queries), never on the test queries;
  - soft gate + mixed: the soft gate's top DEPTH re-ranked the same way (its own w, same split);
  - mixed + spread: the mixed top 10 in the browsing order of `spread_order` over the tree's
    sub-clusters (hits 11-DEPTH unchanged).
"""

from __future__ import annotations

import numpy as np

from sjea_tools.hierarchy_variants import (boundary_lists, gated_top_k, mixed_rerank, soft_gates, spread,
                                           tune_weight, union_candidates)
from sjea_tools.vectors import exact_scores

MARGIN = 0.05  # cosine margin of the soft gate and of the boundary lists (centred vectors)
MAX_PROBES = 8
COPIES = 2


def variant_methods(bank, qv, tv, deep, f, levels, order, tree, methods, measure, tree_measures, k, depth) -> dict:
    """Adds the variants' rows to `methods` (same measures as the other rows); returns their settings."""
    from sjea_tools.vectors import cosine_top_k

    c, fine = order[0], order[-1]
    lists = boundary_lists(bank[c], tree["centroids_0"], MARGIN, COPIES)
    sizes = np.diff(lists[1])

    def soft(q, n_hits):
        gates = soft_gates(q[c] @ tree["centroids_0"].T, sizes, n_hits, MARGIN, MAX_PROBES)
        _, ids, searched = gated_top_k(q[fine], lambda r: bank[fine][r], lists, gates, n_hits)
        return ids, searched

    def level_scores(q, ids):
        return np.stack([exact_scores(q[j], ids, lambda r, j=j: bank[j][r]) for j in range(len(q))], axis=2)

    def weights(w):
        out = np.zeros(len(levels), np.float32)
        out[fine], out[c] = 1 - w, w
        return out

    def precision(ids, labels):  # the mean of the four precision measures: what the weight is chosen by
        m = measure(ids, {**f, "query_labels": labels})
        return np.mean([m["fine_p10"], m["fine_map10"], m["coarse_p10"], m["coarse_map10"]])

    # held-out split: candidates for its queries the same two ways
    t_union = union_candidates(*[cosine_top_k(tv[j], bank[j], depth)[1] for j in range(len(levels))])
    t_soft, _ = soft(tv, depth)
    t_ls_union, t_ls_soft = level_scores(tv, t_union), level_scores(tv, t_soft)
    w_union, tried_union = tune_weight(
        lambda w: precision(mixed_rerank(t_ls_union, t_union, weights(w), k)[1], f["tune_labels"]))
    w_soft, tried_soft = tune_weight(
        lambda w: precision(mixed_rerank(t_ls_soft, t_soft, weights(w), k)[1], f["tune_labels"]))

    per_level = {lv: deep[lv][:, :k] for lv in levels}
    soft_ids, searched = soft(qv, depth)
    methods["hier. soft gate (score)"] = {**measure(soft_ids[:, :k], f, per_level), **tree_measures(soft_ids, f),
                                          "gate_rows": int(np.median(searched))}
    union = union_candidates(*[deep[lv] for lv in levels])
    _, mixed_ids = mixed_rerank(level_scores(qv, union), union, weights(w_union), depth)
    methods[f"hier. mixed re-rank (w = {w_union:.1f})"] = {**measure(mixed_ids[:, :k], f, per_level),
                                                            **tree_measures(mixed_ids, f)}
    _, soft_mixed = mixed_rerank(level_scores(qv, soft_ids), soft_ids, weights(w_soft), depth)
    methods[f"hier. soft gate + mixed (w = {w_soft:.1f})"] = {**measure(soft_mixed[:, :k], f, per_level),
                                                               **tree_measures(soft_mixed, f),
                                                               "gate_rows": int(np.median(searched))}
    leaf = tree["assign"][:, -1]
    top_s = np.zeros(mixed_ids[:, :k].shape, np.float32)  # spread needs only the order, not the scores
    _, spread_ids = spread(top_s, mixed_ids[:, :k], leaf[np.maximum(mixed_ids[:, :k], 0)], k)
    spread_deep = np.concatenate([spread_ids, mixed_ids[:, k:]], axis=1)
    methods[f"hier. mixed + spread (w = {w_union:.1f})"] = {**measure(spread_ids, f, per_level),
                                                             **tree_measures(spread_deep, f)}
    return {"margin": MARGIN, "max_probes": MAX_PROBES, "copies": COPIES, "w_mixed": w_union, "w_soft_mixed": w_soft,
            "tried_mixed": tried_union, "tried_soft_mixed": tried_soft,
            "list_rows": int(len(lists[0])), "bank_rows": int(len(bank[0]))}
