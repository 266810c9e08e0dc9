"""Pure functions on feature matrices: collapse checks, label-free measures (alignment, uniformity,
retrieval of augmented copies) and a paired bootstrap."""

from __future__ import annotations

import numpy as np
import torch


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp of the entropy of the normalised singular values of an (N, D) matrix."""
    s = torch.linalg.svdvals(features.double())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def mean_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension standard deviation of L2-normalised rows.

    Normalised rows make the number comparable across layers: a collapsed level gives ~0,
    a well-spread D-dimensional one about 1/sqrt(D).
    """
    f = torch.nn.functional.normalize(features.double(), dim=1)
    return float(f.std(dim=0).mean())


# --- label-free measures of an embedding (numpy rows in, numbers out) --------------------------------

def _unit(x) -> np.ndarray:
    from .vectors import l2_normalize

    return l2_normalize(np.asarray(x, dtype=np.float32)).astype(np.float64)


def alignment(x, y) -> float:
    """Wang & Isola (2020) alignment: mean of ||f(x) - f(x+)||^2 over positive pairs (row i of `x`
    with row i of `y`), on L2-normalised rows: 0 for identical pairs, 4 for opposite ones. Lower is better."""
    diff = _unit(x) - _unit(y)
    return float(np.einsum("ij,ij->i", diff, diff).mean())


def uniformity(x, t: float = 2.0) -> float:
    """Wang & Isola (2020) uniformity: log E exp(-t ||f(x) - f(y)||^2) over all pairs of distinct rows,
    L2-normalised: 0 when every row is the same point, lower (more negative) when rows spread out.
    Quadratic in rows: meant for a bounded sample (a few thousand)."""
    u = _unit(x)
    if len(u) < 2:
        raise ValueError("uniformity needs at least 2 rows")
    sq = np.clip(2.0 - 2.0 * (u @ u.T), 0.0, None)[np.triu_indices(len(u), 1)]
    a = -t * sq
    top = a.max()
    return float(top + np.log(np.exp(a - top).mean()))  # log-mean-exp without underflow


def copy_ranks(originals, copies, chunk: int = 1024) -> np.ndarray:
    """For each copy i, the rank of its original (row i of `originals`) among all originals by cosine
    similarity: 1 = its nearest. Ties count against it (a collapsed embedding ranks every original last)."""
    bank, q = _unit(originals), _unit(copies)
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ bank.T
        own = sims[np.arange(len(sims)), np.arange(start, start + len(sims))]
        ranks[start:start + chunk] = (sims >= own[:, None]).sum(axis=1)
    return ranks


def copy_retrieval(originals, copies, ks=(1, 10)) -> dict[str, float]:
    """Retrieval of augmented copies: recall@k (percent of copies whose original is within the first
    k of all originals) for each k, and the mean rank of the original."""
    ranks = copy_ranks(originals, copies)
    out = {f"recall_at_{k}": float(100.0 * (ranks <= k).mean()) for k in ks}
    out["mean_rank"] = float(ranks.mean())
    return out


def paired_bootstrap(a, b, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of a - b (per-item scores of two methods on the same items) and its seeded bootstrap
    confidence interval at `level` (items resampled with replacement, the pairs kept together)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(d.mean()), "low": float(lo), "high": float(hi)}
