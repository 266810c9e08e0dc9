"""The training recipe of an image folder, chosen from the folder itself: image size from the
photos' sizes, mean/std and colour mode measured on a sample, batch and epochs from the count.

The presets were tuned on Fashion-MNIST (60,000 grey 28 px images); a user's folder of a few
hundred large colour photos needs other numbers, and `sjea train --dry-run` shows them before
anything runs. `resolve_recipe` only fills what the user left open (`fixed` names what they set).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..config import RunConfig, dataset_stats
from .datasets import ImageData
from .images import describe_error

# Runs shorter than this rarely learn anything: in docs/recipe_search.md the 234-step runs (trials
# 1-5, one epoch of 60,000 at batch 256) all scored 1.6-4.4 k-NN points *below* random init, and the
# fewest steps measured above it was 468 (curve c32std at epoch 1: +2.35).
MIN_STEPS_TO_LEARN = 468
MIN_STEPS_PER_EPOCH = 8  # below this, an epoch is a handful of batches: halve the batch first
MIN_AUTO_BATCH = 16  # VICReg's variance and covariance terms are estimated on the batch
MAX_AUTO_EPOCHS = 300  # the longest schedule of the presets (stl10-paper)
SAMPLE = 256  # images decoded to measure size, colour and mean/std (evenly spaced, so deterministic)


@dataclass
class FolderFacts:
    """What the sample of a folder showed, and the recipe choices made from it (`notes`)."""

    count: int
    sampled: int
    median_short_side: int | None
    colour_mode: str  # "RGB" or "grayscale" (every sampled image has three equal channels)
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    decode_s_per_image: float | None  # measured while decoding the sample at the model's size
    unreadable_in_sample: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def sample_rows(n: int, k: int = SAMPLE) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, k))}) if n else []


def _short_sides(data: ImageData, rows: list[int], bad: dict[str, str]) -> list[int]:
    """Short sides read from the file headers (no pixels decoded)."""
    from PIL import Image

    sides = []
    for i in rows:
        try:
            with Image.open(data.paths[i]) as img:
                sides.append(min(img.size))
        except Exception as e:  # noqa: BLE001  any unreadable file is recorded, not raised
            bad[data.paths[i]] = describe_error(e)
    return sides


def choose_image_size(median_short_side: int) -> int:
    """The folder default (64 px, a CPU-sized input) unless the images are smaller: then theirs."""
    return int(max(16, min(dataset_stats("folder")["size"], median_short_side)))


def measure_folder(data: ImageData, image_size: int | None) -> FolderFacts:
    """Sizes, colour mode, mean/std and decode cost from an evenly spaced sample of the folder."""
    from .preprocess import file_pixels

    rows, bad = sample_rows(len(data)), {}
    sides = _short_sides(data, rows, bad)
    median = int(np.median(sides)) if sides else None
    size = image_size or (choose_image_size(median) if median else dataset_stats("folder")["size"])
    pixels, start = [], time.perf_counter()
    for i in rows:
        if data.paths[i] in bad:
            continue
        try:
            pixels.append(file_pixels(data.paths[i], size))
        except (OSError, ValueError) as e:
            bad[data.paths[i]] = describe_error(e)
    seconds = time.perf_counter() - start
    if not pixels:
        return FolderFacts(len(data), len(rows), median, "RGB", None, None, None, bad)
    px = np.stack(pixels).astype(np.float64) / 255.0
    grey = bool((px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all())
    mean = tuple(round(float(v), 4) for v in px.mean(axis=(0, 1, 2)))
    std = tuple(round(max(float(v), 1e-3), 4) for v in px.std(axis=(0, 1, 2)))
    return FolderFacts(len(data), len(rows), median, "grayscale" if grey else "RGB", mean, std,
                       seconds / len(pixels), bad)


def resolve_recipe(cfg: RunConfig, data: ImageData, fixed: set[str] = frozenset(),
                   world_size: int = 1) -> tuple[RunConfig, FolderFacts | None]:
    """`cfg` with image size, mean and std filled (never left null), and for an image folder the
    batch and epochs chosen from its count where `fixed` (dotted keys the user set) leaves them
    open. Benchmark datasets take their published statistics; folders are measured."""
    d = cfg.data
    if d.image_size and d.mean and d.std and {"train.batch_size", "train.epochs"} <= set(fixed):
        return cfg, None  # nothing left open: no need to read the folder
    if data.paths is None:
        stats = dataset_stats(d.dataset)
        return replace(cfg, data=replace(d, image_size=d.image_size or stats["size"], mean=d.mean or stats["mean"],
                                         std=d.std or stats["std"])), None
    facts = measure_folder(data, d.image_size)
    notes = facts.notes
    size = d.image_size
    if size is None:
        size = choose_image_size(facts.median_short_side) if facts.median_short_side else dataset_stats("folder")["size"]
        notes.append(f"image_size {size}: median short side {facts.median_short_side} px, trained at most at "
                     f"{dataset_stats('folder')['size']} px" if facts.median_short_side else f"image_size {size}")
    mean, std = d.mean, d.std
    if mean is None or std is None:
        fallback = dataset_stats("folder")
        mean, std = mean or facts.mean or fallback["mean"], std or facts.std or fallback["std"]
        notes.append(f"mean/std measured on {facts.sampled - len(facts.unreadable_in_sample)} sampled images "
                     f"({facts.colour_mode})")
    t = _count_recipe(cfg, facts.count, fixed, world_size, notes)
    return replace(cfg, data=replace(d, image_size=size, mean=mean, std=std), train=t), facts


def _count_recipe(cfg: RunConfig, n: int, fixed: set[str], world_size: int, notes: list[str]):
    """Batch halved until an epoch has MIN_STEPS_PER_EPOCH steps, epochs raised to reach
    MIN_STEPS_TO_LEARN (at most MAX_AUTO_EPOCHS), each only when the user did not set it."""
    t = cfg.train
    batch, epochs = t.batch_size, t.epochs
    if "train.batch_size" not in fixed:
        while batch > MIN_AUTO_BATCH and n // (batch * world_size) < MIN_STEPS_PER_EPOCH:
            batch //= 2
        while batch > 2 and n < batch * world_size:
            batch //= 2
        if batch != t.batch_size:
            notes.append(f"batch_size {batch}: {n} images give {n // (t.batch_size * world_size)} step(s) per "
                         f"epoch at the preset's {t.batch_size}")
    per_epoch = n // (batch * world_size)
    if "train.epochs" not in fixed and per_epoch and per_epoch * epochs < MIN_STEPS_TO_LEARN:
        wanted = min(MAX_AUTO_EPOCHS, math.ceil(MIN_STEPS_TO_LEARN / per_epoch))
        if wanted > epochs:
            notes.append(f"epochs {wanted}: {per_epoch} steps per epoch, and runs under {MIN_STEPS_TO_LEARN} steps "
                         "rarely beat random init (docs/recipe_search.md)")
            epochs = float(wanted)
    return replace(t, batch_size=batch, epochs=epochs)


def plan_steps(n: int, cfg: RunConfig, world_size: int = 1) -> dict:
    """Steps per epoch and in all, as the trainer counts them, and whether that is too short."""
    per_epoch = n // (cfg.train.batch_size * world_size)
    total = math.ceil(cfg.train.epochs * per_epoch)
    stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    return {"images": n, "steps_per_epoch": per_epoch, "total_steps": total, "stop_step": stop,
            "too_short": stop < MIN_STEPS_TO_LEARN}


def too_short_warning(stop_step: int) -> str:
    return (f"{stop_step} steps is likely too short to learn: runs under {MIN_STEPS_TO_LEARN} steps scored below "
            "random init in docs/recipe_search.md; raise --epochs or lower --batch-size.")
