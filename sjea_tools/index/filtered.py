"""Search among the rows a mask allows (sjea_tools.filters.RowFilter), on a level's loaded index."""

from __future__ import annotations

import numpy as np

from ..vectors import best_k, exact_scores, exact_top_k
from .tombstones import id_mask, ids_to_rows

# Filtered search, measured on 100,000 x 256 rows, 2 cores, k=10, one query: FAISS's own selector
# (flat 2-34 ms at any share) beat asking for more and dropping (50-940 ms, widening when the
# query's neighbours lie outside the filter); on HNSW the selector needs efSearch ~ 1/share and
# took 4.4 s at 0.1 % allowed, where reading those rows and searching them exactly took 11-230 ms.
EXACT_SHARE = 0.01


def filtered_search(index, entry: dict, queries: np.ndarray, k: int, get_rows,
                    mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (q, k) of the top k among the rows `mask` allows, -inf / -1 padded, exact scores.

    FAISS searches only the allowed rows (an IDSelectorBitmap in the search parameters: flat, IVF
    and HNSW honour it), k x the level's rerank candidates re-scored from the stored vectors
    get_rows(sorted rows) gives. An approximate index visits more to find allowed rows (efSearch,
    nprobe raised by 1 / share); a query it still leaves short is searched exactly over the allowed
    rows, so a flat index (the default up to 50,000 rows) is exact and the others never come up short.
    An approximate index with under EXACT_SHARE of its rows allowed is not asked at all: the
    allowed rows are searched exactly."""
    allowed = np.flatnonzero(mask)
    nq, want = len(queries), min(k, len(allowed))
    if want == 0:
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    if entry.get("kind") != "flat" and len(allowed) < EXACT_SHARE * len(mask):
        return exact_among(queries, allowed, get_rows, k)
    tombstones = getattr(index, "tombstones", None)
    if tombstones is not None:  # a Tombstoned level: FAISS selects among ids, never a removed one
        index, mask = index.inner, id_mask(mask, tombstones, int(index.inner.ntotal))
    candidates = selected_candidates(index, queries, k * max(1, entry.get("rerank", 1)), mask)
    if tombstones is not None:
        candidates = ids_to_rows(candidates, tombstones)
    scores, ids = best_k(*padded(exact_scores(queries, candidates, get_rows), candidates, k), k)
    short = np.flatnonzero((ids >= 0).sum(1) < want)
    if len(short):
        scores[short], ids[short] = exact_among(queries[short], allowed, get_rows, k)
    return scores, ids


def padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if ids.shape[1] >= k:
        return scores, ids
    extra = k - ids.shape[1]
    return (np.concatenate([scores, np.full((len(ids), extra), -np.inf, np.float32)], 1),
            np.concatenate([ids, np.full((len(ids), extra), -1, np.int64)], 1))


def selected_candidates(index, queries: np.ndarray, m: int, mask: np.ndarray) -> np.ndarray:
    """Ids (q, <=m) FAISS proposes among the allowed rows, over a level's base and delta parts."""
    parts = [(index.base, 0), *index.parts] if hasattr(index, "parts") else [(index, 0)]
    share = max(float(mask.mean()), 1e-6)
    x = np.ascontiguousarray(queries, dtype=np.float32)
    found = []
    for part, first in parts:
        sub = np.ascontiguousarray(mask[first:first + part.ntotal])
        if not sub.any():
            continue
        bitmap = np.packbits(sub, bitorder="little")  # bit i of byte i // 8: FAISS's bitmap order
        _, ids = part.search(x, min(m, int(sub.sum())), params=selector_params(part, sub, bitmap, m, share))
        found.append(np.where(ids >= 0, ids + first, -1))
    return np.concatenate(found, 1) if found else np.full((len(x), 1), -1, np.int64)


def selector_params(part, sub: np.ndarray, bitmap: np.ndarray, m: int, share: float):
    """FAISS search parameters that keep only `sub`'s rows, the visit widened by 1 / share."""
    import faiss

    sel = faiss.IDSelectorBitmap(len(sub), faiss.swig_ptr(bitmap))
    sel.bitmap_owner = bitmap  # the selector reads the array: keep it alive as long as it
    if hasattr(part, "hnsw"):
        ef = min(int(part.ntotal), int(np.ceil(max(part.hnsw.efSearch, m) / share)))
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(ef, m))
    else:
        ivf = faiss.try_extract_index_ivf(part)
        params = (faiss.SearchParametersIVF(sel=sel, nprobe=min(ivf.nlist, int(np.ceil(ivf.nprobe / share))))
                  if ivf is not None else faiss.SearchParameters(sel=sel))
    params.sel_owner = sel
    return params


def exact_among(queries: np.ndarray, rows: np.ndarray, get_rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k over the given rows only, padded to k."""
    scores, pos = exact_top_k(queries, get_rows(rows), k)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    out_s[:, :scores.shape[1]] = np.where(pos >= 0, scores, -np.inf)
    out_i[:, :pos.shape[1]] = np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
    return out_s, out_i
