"""Recall@k against exact search: the probe (stored rows as queries, their exact top-k) and the
tuning of nprobe / efSearch up to the target."""

from __future__ import annotations

import numpy as np

from ..vectors import exact_rerank, exact_top_k
from .choose import SEARCH_PARAM
from .load import set_search_params

TARGET_RECALL = 0.95
RECALL_SAMPLE = 1000
# A doubling of nprobe/efSearch that gains less recall than this is undone: tuning stops there.
MIN_GAIN = 0.002


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (both (q, k) id arrays)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def recall_probe(vectors: np.ndarray, k: int = 10, sample: int = RECALL_SAMPLE, seed: int = 0) -> dict:
    """The queries recall is measured with (up to `sample` stored rows) and their exact top-k:
    {"rows", "queries", "ids", "scores"}. Saved beside the index, so a growth extends the truth
    with the added rows only instead of searching every stored row again."""
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    scores, ids = exact_top_k(queries, vectors, min(k, n))
    return {"rows": rows.astype(np.int64), "queries": queries, "ids": ids.astype(np.int64),
            "scores": scores.astype(np.float32)}


def tune_and_measure(index, vectors: np.ndarray, spec: dict, k: int = 10, sample: int = RECALL_SAMPLE,
                     target: float = TARGET_RECALL, seed: int = 0, tune: bool = True, probe: dict | None = None,
                     get_rows=None, settled: float | None = None) -> dict:
    """recall@k of index against exact search on up to `sample` stored vectors.

    For IVF (nprobe) and HNSW (efSearch) the search parameter is doubled until the recall reaches
    `target` (what autofaiss does), unless the parameter was forced; spec["search_params"] is updated.
    A doubling that gains less than MIN_GAIN is undone (PQ's ceiling, or ties among equal vectors:
    a larger setting only slows every search). `settled`: the recall below target at which the
    current setting was already tuned (a growth): no doubling is tried while the recall stays there.
    A growth passes its `probe` (recall_probe, extended) and `get_rows` (sorted ids -> vectors, for
    the exact re-scoring of compressed indexes) instead of `vectors`. The probe is returned too,
    with the index's answers at the setting kept ("found_ids", "found_scores": k x rerank wide,
    before re-scoring): a delta part's growth merges its own exact answers into them (grow_by_part)
    instead of searching the base again.
    """
    probe = probe if probe is not None else recall_probe(vectors, k, sample, seed)
    get_rows = get_rows or (lambda ids: vectors[ids])
    queries, truth, n = probe["queries"], probe["ids"], int(index.ntotal)
    k = truth.shape[1]
    name = SEARCH_PARAM.get(spec["kind"])
    limit = {"efSearch": 2048, "nprobe": spec["params"].get("nlist", 1)}.get(name, 0)
    tried: list[dict] = []
    rerank = spec.get("rerank", 1)
    previous = None  # (setting, recall, answers) before the last doubling
    while True:
        answers = index.search(queries, min(n, k * rerank))
        found = answers[1]
        if rerank > 1:  # what search does for compressed indexes: exact re-scoring of more candidates
            _, found = exact_rerank(queries, found, get_rows, k)
        recall = recall_at_k(found, truth)
        value = spec["search_params"].get(name) if name else None
        if name:
            tried.append({name: value, "recall": round(recall, 4)})
        if previous is not None and recall - previous[1] < MIN_GAIN:  # more probing stopped helping
            value, recall, answers = previous
            spec["search_params"][name] = value
            set_search_params(index, spec["search_params"])
            break
        # Stop at the target, at the limit, or where this setting was already tuned (a growth).
        if (not tune or name is None or recall >= target or value >= limit
                or (settled is not None and recall >= settled)):
            break
        previous = (value, recall, answers)
        spec["search_params"][name] = min(limit, value * 2)
        set_search_params(index, spec["search_params"])
    probe = {**probe, "found_ids": answers[1].astype(np.int64), "found_scores": answers[0].astype(np.float32)}
    return {"recall_at_k": recall, "k": k, "sample": len(queries), "target": target, "tried": tried,
            "probe": probe}


def probe_recall(probe: dict, rerank: int, get_rows) -> float:
    """recall@k of the index's stored answers against the probe's truth, re-scored exactly from
    the stored vectors where the index is compressed (what search does)."""
    k = probe["ids"].shape[1]
    found = probe["found_ids"]
    if rerank > 1:
        _, found = exact_rerank(probe["queries"], found, get_rows, k)
    return recall_at_k(found, probe["ids"])

