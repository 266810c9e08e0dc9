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


def is_grey(pixels) -> bool:
    """Whether every image of a (N, H, W, 3) pixel batch, numpy or torch, has three equal channels."""
    return pixels.shape[-1] == 3 and bool(
        ((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])).all())


def pixel_features(data) -> np.ndarray:
    """Flat float32 pixel vectors (N, D) in [0, 1] of an in-memory ImageData (uint8 N,H,W,3)."""
    px = data.pixels
    if px is None:
        raise ValueError("pixel baselines need in-memory pixels (a benchmark dataset, not a folder)")
    if is_grey(px):
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


def baseline_results(train_data, test_data, train_feats, test_feats, levels, knn_accuracy, probe,
                     hierarchy=None) -> dict:
    """The pixel rows under the model's own protocol (k-NN as is and centred, the same cheap probe,
    and the hierarchy measures when the labels have coarse groups), and the model's levels under the
    centred k-NN as well, so every number has its floor beside it.

    `knn_accuracy(bank, bank_labels, queries, query_labels)`, `probe(train_x, train_y, test_x, test_y)`
    and `hierarchy(bank, bank_labels, queries, query_labels)` (or None) are the evaluation's own
    functions (passed in: this module stays free of project imports)."""
    ytr, yte = np.asarray(train_data.labels), np.asarray(test_data.labels)
    model = []
    for level, ftr, fte in zip(levels, train_feats, test_feats):
        ctr, cte = centre(ftr, fte)
        model.append({"level": int(level), "knn_top1_centred": knn_accuracy(ctr, ytr, cte, yte)})
    if train_data.pixels is None or test_data.pixels is None:
        return {"model": model, "pixels": [], "note": "pixel baselines need in-memory pixels (not an image folder)"}
    raw_tr, raw_te = pixel_features(train_data), pixel_features(test_data)
    if raw_tr.shape[1] != raw_te.shape[1]:
        return {"model": model, "pixels": [], "note": "train and test images differ in size"}
    ctr, cte = centre(raw_tr, raw_te)
    raw_knn, centred_knn = knn_accuracy(raw_tr, ytr, raw_te, yte), knn_accuracy(ctr, ytr, cte, yte)
    pixels = []
    # Centring twice changes nothing: the centred-pixels row has one k-NN value for both protocols.
    for name, (tr, te), knn in (("raw pixels", (raw_tr, raw_te), raw_knn), ("centred pixels", (ctr, cte), centred_knn)):
        scores = probe(tr, ytr, te, yte)
        pixels.append({"features": name, "dim": int(tr.shape[1]), "knn_top1": knn, "knn_top1_centred": centred_knn,
                       "linear_top1": scores["top1"], "linear_top5": scores["top5"]})
        if hierarchy is not None:
            pixels[-1]["hierarchy"] = hierarchy(tr, ytr, te, yte)
    return {"model": model, "pixels": pixels}
