"""Pure functions on feature matrices: collapse checks and retrieval scores."""

from __future__ import annotations

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
