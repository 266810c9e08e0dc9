"""Hierarchy-aware retrieval measures on a two-level label tree: fine classes under coarse groups.

Pure functions: neighbour ids (q, k) best first (from `vectors.cosine_top_k` or a hierarchical
search; -1 marks a missing hit), the bank's and the queries' fine labels, and the fine -> coarse
map, in; numbers out.

The tree: the fine classes are the leaves (height 0), the coarse groups their parents (height 1),
one root above (height 2). The hierarchical distance of two classes is the height of their lowest
common ancestor (Bertinetto et al., "Making Better Mistakes", CVPR 2020): 0 for the same class,
1 for another class of the same coarse group, 2 for another group. A missing hit counts as 2: a
list that runs short is no better than one that ends in the wrong group.

- mistake severity: the mean distance of the top-1 neighbour's class over the queries whose top-1
  neighbour is of another class (the mistakes only), beside the top-1 error rate;
- average hierarchical distance of the top k, k = 1, 5, 10, 20 (the distance at k = 1 is the
  severity times the error rate);
- H-AP (Ramzi et al., HAPPIER, ECCV 2022) with relevance 1 for the same class, 0.5 for the same
  coarse group, 0 otherwise. The paper's formula, over the ranked list:
      H-rank(i) = rel(i) + sum over j ranked before i of min(rel(i), rel(j))
      H-AP      = (1 / sum of rel over the relevant items) * sum over relevant i of H-rank(i) / rank(i)
  On a list truncated to the top k the normaliser is the sum of relevance of the best possible top
  k (all same-class rows first, then same-group rows, counted from the bank's labels), so a perfect
  top k scores 100 and the value never exceeds it; with the whole bank ranked (k = bank size) it
  is the paper's H-AP exactly. Queries with no relevant row in the bank are left out of the mean.
"""

from __future__ import annotations

import numpy as np

TOP_K_DISTANCE = (1, 5, 10, 20)
H_AP_DEPTH = 100  # H-AP over each query's first 100 neighbours (H-AP@100)
MAX_DISTANCE = 2
RELEVANCE = {0: 1.0, 1: 0.5, 2: 0.0}  # hierarchical distance -> H-AP relevance
TREE = ("fine class (height 0) < coarse group (height 1) < root (height 2); distance = height of the "
        "lowest common ancestor: 0 same class, 1 same coarse group, 2 other group; a missing hit counts 2")


def hierarchical_distance(ids: np.ndarray, bank_labels: np.ndarray, query_labels: np.ndarray,
                          fine_to_coarse: np.ndarray) -> np.ndarray:
    """(q, k) int distances in the tree between each query's class and each neighbour's class."""
    ids = np.asarray(ids)
    fine_to_coarse = np.asarray(fine_to_coarse)
    hit_fine = np.asarray(bank_labels)[np.maximum(ids, 0)]
    query_fine = np.asarray(query_labels)[:, None]
    same_group = fine_to_coarse[hit_fine] == fine_to_coarse[query_fine]
    dist = np.where(hit_fine == query_fine, 0, np.where(same_group, 1, MAX_DISTANCE))
    return np.where(ids >= 0, dist, MAX_DISTANCE)


def mistake_severity(ids, bank_labels, query_labels, fine_to_coarse) -> dict:
    """Top-1 error (percent), the number of mistakes, and their mean distance (None without mistakes)."""
    top1 = hierarchical_distance(np.asarray(ids)[:, :1], bank_labels, query_labels, fine_to_coarse)[:, 0]
    wrong = top1[top1 > 0]
    return {"top1_error": float(100.0 * (top1 > 0).mean()), "mistakes": int(len(wrong)),
            "mistake_severity": float(wrong.mean()) if len(wrong) else None}


def average_distance_at_k(ids, bank_labels, query_labels, fine_to_coarse, ks=TOP_K_DISTANCE) -> dict:
    """{str(k): mean distance of each query's first k neighbours}; None where the list is shorter than k."""
    dist = hierarchical_distance(ids, bank_labels, query_labels, fine_to_coarse)
    return {str(k): (float(dist[:, :k].mean()) if k <= dist.shape[1] else None) for k in ks}


def ideal_relevance(bank_labels, query_labels, fine_to_coarse, k: int) -> np.ndarray:
    """Per query, the summed relevance of the best possible top k of the bank (the H-AP normaliser)."""
    bank_labels, query_labels = np.asarray(bank_labels), np.asarray(query_labels)
    fine_to_coarse = np.asarray(fine_to_coarse)
    per_class = np.bincount(bank_labels, minlength=len(fine_to_coarse))
    per_group = np.bincount(fine_to_coarse[bank_labels], minlength=int(fine_to_coarse.max()) + 1)
    same = per_class[query_labels]
    group = per_group[fine_to_coarse[query_labels]] - same
    n_same = np.minimum(k, same)
    return RELEVANCE[0] * n_same + RELEVANCE[1] * np.minimum(k - n_same, group)


def h_ap(ids, bank_labels, query_labels, fine_to_coarse) -> float | None:
    """Mean H-AP (percent) of the ranked lists `ids` (q, k); see the module docstring for the formula."""
    dist = hierarchical_distance(ids, bank_labels, query_labels, fine_to_coarse)
    rel = np.array([RELEVANCE[d] for d in range(MAX_DISTANCE + 1)])[dist]
    # sum_{j <= i} min(rel(i), rel(j)) = sum over relevance levels r of min(rel(i), r) * #{j <= i: rel(j) = r}
    hrank = np.zeros_like(rel)
    for r in set(RELEVANCE.values()) - {0.0}:
        hrank += np.minimum(rel, r) * np.cumsum(rel == r, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    ideal = ideal_relevance(bank_labels, query_labels, fine_to_coarse, rel.shape[1])
    keep = ideal > 0
    if not keep.any():
        return None
    per_query = (np.where(rel > 0, hrank / ranks, 0.0).sum(axis=1)[keep]) / ideal[keep]
    return float(100.0 * per_query.mean())


def hierarchy_measures(ids, bank_labels, query_labels, fine_to_coarse, h_ap_depth: int = H_AP_DEPTH) -> dict:
    """Every measure above from one neighbour list, rounded for a report."""
    ids = np.asarray(ids)
    depth = min(h_ap_depth, ids.shape[1])
    severity = mistake_severity(ids, bank_labels, query_labels, fine_to_coarse)
    hap = h_ap(ids[:, :depth], bank_labels, query_labels, fine_to_coarse)
    return {"top1_error": round(severity["top1_error"], 4), "mistakes": severity["mistakes"],
            "mistake_severity": _round(severity["mistake_severity"]),
            "avg_distance_at_k": {k: _round(v) for k, v in
                                  average_distance_at_k(ids, bank_labels, query_labels, fine_to_coarse).items()},
            "h_ap": _round(hap), "h_ap_depth": int(depth)}


def _round(value, digits: int = 4):
    return None if value is None else round(value, digits)
