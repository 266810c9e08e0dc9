"""Row-vector helpers shared by embedding, indexing, clustering, search and evaluation."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm as C-contiguous float32 (rows of zeros stay zero); the norms are
    accumulated in float64 so that float16 or huge inputs do not lose precision."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    return x / np.maximum(norm, eps)[:, None]
