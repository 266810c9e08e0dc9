"""Floors a trained model must beat, under the very protocol it is evaluated with.

- raw pixels: every image as its flat vector of pixel values in [0, 1] (grayscale images once,
  colour images with their three channels);
- centred pixels: the same vectors minus the training split's mean vector (cosine k-NN on
  centred vectors is a different and, on Fashion-MNIST, a much stronger floor than on raw ones).

`centre(train, test)` applies the second idea to any features: subtract the training mean from
both splits. The evaluation uses it as a second k-NN protocol for model *and* pixels alike.
"""

from __future__ import annotations

import numpy as np

PIXEL_BASELINES = ("raw pixels", "centred pixels")


def pixel_features(data) -> np.ndarray:
    """Flat float32 pixel vectors (N, D) in [0, 1] of an in-memory ImageData (uint8 N,H,W,3)."""
    px = data.pixels
    if px is None:
        raise ValueError("pixel baselines need in-memory pixels (a benchmark dataset, not a folder)")
    if px.shape[-1] == 3 and np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2]):
        px = px[..., :1]  # grayscale stored as RGB: count each pixel once
    return px.reshape(len(px), -1).astype(np.float32) / 255.0


def centre(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits minus the training split's mean vector."""
    mean = train.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    return train - mean, test - mean


def pixel_baseline_features(train_data, test_data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"raw pixels": (train, test), "centred pixels": (train, test)} feature pairs."""
    tr, te = pixel_features(train_data), pixel_features(test_data)
    return {"raw pixels": (tr, te), "centred pixels": centre(tr, te)}
