"""Row-vector helpers shared by embedding, indexing, clustering, search and evaluation.

Every top-k here returns (scores, ids), the order FAISS's search returns."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm as C-contiguous float32 (rows of zeros stay zero); the norms are
    accumulated in float64 so that float16 or huge inputs do not lose precision."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    return x / np.maximum(norm, eps)[:, None]


def centre_and_normalize(x: np.ndarray, centre: np.ndarray | None, whitening: np.ndarray | None = None) -> np.ndarray:
    """Rows minus a fixed centre (the model's mean representation of the level, computed at the end
    of training), times the level's whitening matrix when it has one, then scaled to unit L2 norm:
    what stores and queries hold, so that the cosine of a random pair is near 0 and that of an image
    with itself 1. `centre` None: l2_normalize alone (a model or store from before centring).

    The product is taken in float64 and rounded once to float32: BLAS sums in an order that
    depends on the batch's shape, and in float64 that difference stays far below float32's
    rounding, so a query embedded alone matches its stored row to float32 rounding (self-score 1
    within 1e-6). Measured cost on
    2 cores: 1.5 s per 100,000 rows of 512 (0.3 s in float32), about a fifth of what embedding those
    rows takes on a CPU."""
    x = np.asarray(x, dtype=np.float32)
    if centre is not None:
        centre = np.asarray(centre, dtype=np.float32).reshape(-1)
        if centre.shape[0] != x.shape[1]:
            raise ValueError(f"centre of width {centre.shape[0]} for rows of width {x.shape[1]}")
        x = x - centre
    if whitening is not None:
        whitening = np.asarray(whitening, dtype=np.float32)
        if whitening.shape != (x.shape[1], x.shape[1]):
            raise ValueError(f"whitening of shape {whitening.shape} for rows of width {x.shape[1]}")
        x = (x.astype(np.float64) @ whitening.astype(np.float64)).astype(np.float32)
    return l2_normalize(x)


def matrix_digest(matrix: np.ndarray) -> str:
    """sha256 of a float32 matrix's C-order bytes: how a store names the whitening its rows had,
    without holding the (d, d) matrix (the model carries it)."""
    from .io import sha256_bytes

    return sha256_bytes(np.ascontiguousarray(matrix, dtype="<f4").tobytes())


def exact_scores(queries: np.ndarray, ids: np.ndarray, get_rows) -> np.ndarray:
    """Inner product of each query (q, d) with the stored vectors of its ids (q, m), float32.

    get_rows(sorted unique ids) -> their vectors (normalised for cosine). Each stored row is read
    once however many queries name it. Ids of -1 (FAISS pads with them when it found fewer than m)
    score -inf, so they rank last.
    """
    valid = np.unique(ids[ids >= 0])
    if not len(valid):
        return np.full(ids.shape, -np.inf, np.float32)
    table = get_rows(valid)
    pos = np.searchsorted(valid, np.where(ids >= 0, ids, valid[0]))
    scores = np.einsum("qd,qmd->qm", np.asarray(queries, dtype=np.float32), table[pos])
    return np.where(ids >= 0, scores, -np.inf).astype(np.float32)


def exact_top_k(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (q, min(k, n)) of each query's exact top-k in base (n, d) by inner product
    (normalise both for cosine: cosine_top_k). FAISS's brute force, blocked, so memory stays bounded
    whatever the number of queries; measured 2x faster than numpy's matmul + argpartition on
    1000 x 100,000 x 512 (2.1 s vs 4.3 s, 2 cores), with the same ids and scores."""
    import faiss

    base = np.ascontiguousarray(base, dtype=np.float32)
    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), base, min(k, len(base)),
                     metric=faiss.METRIC_INNER_PRODUCT)


def cosine_top_k(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (q, k) of the exact top-k by cosine."""
    return exact_top_k(l2_normalize(queries), l2_normalize(base), k)


def exact_rerank(queries: np.ndarray, candidates: np.ndarray, get_rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate ids (q, m) by `exact_scores`: (scores (q, k), ids (q, k))."""
    return best_k(exact_scores(queries, candidates, get_rows), candidates, k)


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k highest-scoring ids (q, m) -> (scores (q, k), ids (q, k)); equal scores keep
    their order in the row."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merge_top_k(scores_a, ids_a, scores_b, ids_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (q, *) candidate lists by score: (scores, ids); ties keep the first list's."""
    return best_k(np.concatenate([scores_a, scores_b], 1), np.concatenate([ids_a, ids_b], 1), k)
