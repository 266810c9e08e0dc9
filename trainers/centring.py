"""The centring a model carries: each level's mean representation over training images, and its
whitening matrix.

Raw cosines of L2-normalised representations are crowded near 1 (a random pair of Fashion-MNIST
images scores about 0.65 at level 0, every neighbour 0.98-0.99), because every representation
shares a large common component. Subtracting each level's mean before normalising
(`vectors.centre_and_normalize`) moves a random pair to about 0 and leaves an image with itself
at 1. Centring alone leaves neighbours crowded (level 1's median best other image 0.976): a few
directions carry most of the variance and dominate every cosine. Whitening (ZCA: each principal
direction divided by its spread, then rotated back; Jegou & Chum, ECCV 2012) evens them out:
measured by benchmarks/bench_whitening.py (docs/search.md), level 1's median best other image
0.976 -> 0.587, k-NN 81.41 -> 86.24 (level 0: 83.32 -> 89.03), beside pixels 82.38 -> 87.15 and
random init 78.74 -> 84.51 under the same transform: a better way to search, not a better model.

Both are fixed once, at the end of training (`trainer._train`, also for `sjea train --from`), and
travel with the model: model.pt (buffers `centre_K`, `whiten_K`), the ONNX metadata (`centres`,
`whitening`); every store written with it records the means (`centre_K` attributes) and the
whitening's sha256 (`whitening_K_sha256`).

`centre_run(run, out)` adds them to a run trained before they existed, as a new run folder: the
new model.pt is another model (another model id), so stores of the old one stay as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from sjea_tools.config import RunConfig
from sjea_tools.data.datasets import decode_folder, load_dataset, resize_pixels, train_split
from sjea_tools.data.preprocess import normalize_pixels
from sjea_tools.errors import SjeaError
from sjea_tools.progress import ProgressFn, report
from sjea_tools.runs import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE, load_model, save_model

# Images the means are taken over: a seeded sample of at most this many training images. The
# mean of 20,000 rows is within about 1% of a row's spread of the full set's (standard error
# 1/sqrt(20,000) = 0.007 of each feature's std), far below what moves a score's second decimal,
# and keeps this end-of-training pass to seconds on a CPU whatever the dataset's size.
CENTRE_IMAGES = 20_000
CENTRE_BATCH = 256
# A level is whitened only when the sample has at least this many images per dimension: with n / d
# = 10 a sample covariance's eigenvalues spread by (1 +- sqrt(d / n))^2 = 0.47..1.73 of the true
# ones (Marchenko-Pastur), so no direction is amplified more than ~1.5x by sampling noise; with
# fewer images (a small photo folder) the smallest directions would be noise, so the level is
# only centred.
WHITEN_IMAGES_PER_DIM = 10
# Eigenvalue floor, relative to the largest, as measured in benchmarks/bench_whitening.py: keeps
# near-empty directions from exploding.
WHITEN_EPS = 1e-6


def at_model_size(data, cfg: RunConfig, progress: ProgressFn | None = None):
    """(data with uint8 pixels at the model's size, {path: reason} of files skipped): an image
    folder is decoded (unreadable files skipped), an in-memory dataset resized when needed."""
    skipped: dict[str, str] = {}
    if data.pixels is None:
        data, skipped = decode_folder(data, cfg.image_size, cfg.data.workers, progress)
    elif data.pixels.shape[1] != cfg.image_size:
        data.pixels = resize_pixels(data.pixels, cfg.image_size)
    return data, skipped


def level_centring(model, pixels: np.ndarray, device: str | torch.device = "cpu", limit: int = CENTRE_IMAGES,
                   seed: int = 0, batch_size: int = CENTRE_BATCH, progress: ProgressFn | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """(means, whitenings): each level's mean representation Y and ZCA whitening matrix (None for a
    level with fewer than WHITEN_IMAGES_PER_DIM images per dimension) over (a seeded sample of at
    most `limit` of) `pixels`, uint8 (N, S, S, 3) at the model's size, preprocessed as embedding
    does (normalisation, no augmentation), in eval mode and float32; accumulated in float64."""
    n = len(pixels)
    if n == 0:
        raise SjeaError("no images to compute the centring means from; pass a run with training images.")
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:limit]) if n > limit else np.arange(n)
    was_training = model.training
    model.eval()
    sums = [torch.zeros(d, dtype=torch.float64) for d in model.level_dims]
    squares = [torch.zeros(d, d, dtype=torch.float64) for d in model.level_dims]
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(pixels[rows[start:start + batch_size]]))
                x = normalize_pixels(batch.to(device), model.preprocess_spec)
                for k, y in enumerate(model.forward_levels(x)):
                    y = y.float().double().cpu()
                    sums[k] += y.sum(0)
                    squares[k] += y.T @ y
                report(progress, "centring", min(start + batch_size, len(rows)), len(rows))
    finally:
        model.train(was_training)
    means = [s / len(rows) for s in sums]
    whitenings = [zca_whitening(sq / len(rows) - torch.outer(m, m))
                  if len(rows) >= WHITEN_IMAGES_PER_DIM * len(m) else None for m, sq in zip(means, squares)]
    return [m.float() for m in means], whitenings


def zca_whitening(covariance: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """The symmetric (d, d) float32 matrix W with W C W = I for covariance C (eigenvalues floored at
    eps x the largest): U diag(1 / sqrt(lambda)) U^T, which does not depend on the eigenvectors'
    signs (so not on the CPU's LAPACK)."""
    values, vectors = torch.linalg.eigh(covariance.double())
    values = values.clamp(min=0)
    scale = (values + eps * values.max()).rsqrt()
    w = (vectors * scale) @ vectors.T
    return ((w + w.T) / 2).float()


def training_pixels(cfg: RunConfig, progress: ProgressFn | None = None) -> np.ndarray:
    """The training split a run's configuration names, at its model's size (what it trained on)."""
    data = train_split(load_dataset(cfg.data.dataset, cfg.data.data_dir, "train"), cfg.data.holdout,
                       cfg.data.split_seed, cfg.data.limit)
    data, _ = at_model_size(data, cfg, progress)
    return data.pixels


def centre_run(run: str | Path, out: str | Path, limit: int = CENTRE_IMAGES, seed: int = 0, device: str = "cpu",
               progress: ProgressFn | None = None) -> Path:
    """A copy of `run` (config, summary, model) at `out` whose model.pt carries the centring means and whitening,
    computed over the run's own training images as training now does at its end. `run` is only
    read. The copy is a new model (its own model id): embed the images again with it."""
    src, out = Path(run), Path(out)
    model = load_model(src)
    if out.exists() and any(out.iterdir()):
        raise SjeaError(f"{out} already exists and is not empty; pick another folder for the centred copy.")
    model.set_centres(*level_centring(model.to(device), training_pixels(model.cfg, progress), device, limit, seed,
                                      progress=progress))
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    save_model(out, model.cpu(), model.cfg)
    return out / MODEL_FILE
