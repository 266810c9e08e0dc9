"""Evaluation of an HDF5 store, with or without labels, beside the floors a trained model must beat.

Label-free, on a bounded seeded sample of the store's own images (decoded by the one decoder at the
store's preprocess, `data.preprocess.file_pixels`): each image gets one augmented copy (COPY_VIEW,
mild), and three feature maps are scored under one protocol, per level:
- "trained": the store's rows of the sampled images, copies embedded by the store's model;
- "random init": the same architecture, seeded fresh weights, BatchNorm calibrated on the sample;
- "pixels": the preprocessed images as flat vectors in [0, 1], centred by the sample's mean.
Measures: retrieval of the copies among the sample's originals (recall@1, @10, mean rank), alignment
and uniformity (Wang & Isola 2020, metrics.py) and RankMe.

With folder labels: core.evaluate_features on the stored rows (k from class sizes, core.knn_k_for),
and k-NN of the three feature maps on the decoded sample over SPLITS seeded splits, with a paired
bootstrap of trained minus random init (and minus pixels) that says when the difference is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.augment import ViewSettings
from ..errors import SjeaError
from ..levels import parse_levels
from ..progress import Counter, ProgressFn
from .core import (KNN_K_RULE, KNN_TEMPERATURE, calibrate_batchnorm, evaluate_features, knn_k_for, random_subset,
                   seeded_split, weighted_vote)

STORE_EVAL_ROWS = 100_000  # default sample of a store's labelled rows: bounded time and memory
SAMPLE_ROWS = 1000  # images decoded for the label-free measures and floors: about a minute on a CPU
SPLITS = 3
BOOTSTRAP_RESAMPLES = 1000
COPY_VIEW = ViewSettings(crop_scale=(0.5, 1.0), flip_p=0.5, jitter=(0.2, 0.2, 0.2, 0.05), jitter_p=0.8,
                         grayscale_p=0.0)
COPY_RECIPE = ("random resized crop of the model-size image (area 0.5-1, aspect 3/4-4/3), horizontal flip p=0.5, "
               "colour jitter (brightness, contrast, saturation 0.2, hue 0.05) p=0.8; no grey, blur or solarize")
PIXELS = "pixels"
TRAINED, RANDOM = "trained", "random init"
BATCH = 256


# --- the sample and its copies ---------------------------------------------------------------------

def decode_sample(store, size: int | None, seed: int, progress: ProgressFn | None = None):
    """(rows, uint8 (n, S, S, 3) pixels, skipped [(path, reason)]) of a seeded sample of the store's
    images, decoded as the store decoded them; rows whose file is gone or unreadable are skipped."""
    from ..data.images import describe_error
    from ..data.preprocess import file_pixels

    root, paths, spec = Path(store.root), store.paths, store.preprocess
    rows = random_subset(store.n, size, seed)
    kept, pixels, skipped = [], [], []
    done = Counter(progress, "decoding the sample", len(rows))
    for r in rows:
        try:
            pixels.append(file_pixels(root / paths[r], spec))
            kept.append(int(r))
        except Exception as e:  # noqa: BLE001 - every decoder raises its own types
            skipped.append((paths[r], describe_error(e)))
        done.advance()
    shape = (0, spec.image_size, spec.image_size, 3)
    return np.asarray(kept, dtype=np.int64), (np.stack(pixels) if pixels else np.zeros(shape, np.uint8)), skipped


def augmented_copies(pixels: np.ndarray, seed: int, view: ViewSettings = COPY_VIEW) -> np.ndarray:
    """One augmented copy of each uint8 (n, S, S, 3) image, as uint8 at the same size (what a saved
    copy would be), batched through data.augment with a seeded generator."""
    from ..data.augment import augment_float

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(pixels), BATCH):
        x = torch.from_numpy(np.ascontiguousarray(pixels[start:start + BATCH])).permute(0, 3, 1, 2).float() / 255.0
        y = augment_float(x, view, pixels.shape[1], g)
        out.append((y.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else pixels.copy()


def embed_batches(emb, pixels: np.ndarray, progress: ProgressFn | None, task: str) -> list[np.ndarray]:
    """One (n, dim) array per level of the embedder's levels, `BATCH` images at a time."""
    parts: list[list[np.ndarray]] = [[] for _ in emb.levels]
    done = Counter(progress, task, len(pixels))
    for start in range(0, len(pixels), BATCH):
        for part, y in zip(parts, emb.embed_pixels(pixels[start:start + BATCH])):
            part.append(y)
        done.advance(min(BATCH, len(pixels) - start))
    return [np.concatenate(p) for p in parts]


def store_embedders(store, device: str, seed: int, pixels: np.ndarray, random_init: bool):
    """(the store's model, the same architecture at random init or None, a note or None)."""
    from ..data import ImageData
    from ..embed.backends import Embedder
    from ..models import random_init as fresh_model

    onnx = Path(store.attrs.get("model_source", "")).suffix == ".onnx"
    emb = Embedder.for_store(store, backend="auto" if onnx else "torch", device=device)
    if not random_init:
        return emb, None, None
    if onnx:
        return emb, None, "no random-init row: the store's model is an ONNX file (its architecture needs the run folder)"
    torch.manual_seed(seed)
    model = fresh_model(emb.model).to(emb.device)
    calibrate_batchnorm(model, ImageData("sample", pixels=pixels), seed=seed)
    centres = whitenings = None
    if emb.centred:  # treated as the stored rows are: centred (and whitened), by its own statistics over the sample
        from ..trainers.centring import level_centring

        means, whitening = level_centring(model, pixels, emb.device, seed=seed)
        centres = [means[k].cpu().numpy() for k in emb.levels]
        if emb.whitenings is not None:
            whitenings = [None if whitening[k] is None else whitening[k].numpy() for k in emb.levels]
    rand = Embedder(backend="torch", levels=emb.levels, dims=emb.dims, preprocess=emb.preprocess,
                    model_id="random-init", source=emb.source, device=emb.device, normalize=emb.normalize, model=model,
                    centres=centres, whitenings=whitenings)
    return emb, rand, None


def sample_features(store, levels, rows, pixels, copies, seed, device, floors, progress):
    """{name: (originals per level, copies per level, levels)} for the trained model, random init
    and pixels (the last two only with `floors`), and a note when a row had to be left out."""
    from ..baselines import centre, pixel_features
    from ..data import ImageData

    emb, rand, note = store_embedders(store, device, seed, pixels, floors)
    pick = [emb.levels.index(lv) for lv in levels]
    stored = [np.asarray(store.read_embeddings(lv, rows=rows), dtype=np.float32) for lv in levels]
    copies_trained = embed_batches(emb, copies, progress, "embedding copies (trained)")
    feats = {TRAINED: (stored, [copies_trained[i] for i in pick], list(levels))}
    if rand is not None:
        orig = embed_batches(rand, pixels, progress, "embedding originals (random init)")
        cop = embed_batches(rand, copies, progress, "embedding copies (random init)")
        feats[RANDOM] = ([orig[i] for i in pick], [cop[i] for i in pick], list(levels))
    if floors:
        bank, cop = centre(pixel_features(ImageData("sample", pixels=pixels)),
                           pixel_features(ImageData("copies", pixels=copies)))
        feats[PIXELS] = ([bank], [cop], [None])
    return feats, note


# --- measures ---------------------------------------------------------------------------------------

def label_free_rows(feats: dict) -> list[dict]:
    """One row of label-free measures per feature map and level."""
    from ..metrics import alignment, copy_retrieval, effective_rank, uniformity

    rows = []
    for name, (banks, copies, levels) in feats.items():
        for level, bank, cop in zip(levels, banks, copies):
            rows.append({"features": name, "level": level, "dim": int(bank.shape[1]),
                         **{f"copy_{k}": round(v, 4) for k, v in copy_retrieval(bank, cop).items()},
                         "alignment": round(alignment(bank, cop), 4), "uniformity": round(uniformity(bank), 4),
                         "effective_rank": round(effective_rank(torch.from_numpy(bank)), 2)})
    return rows


def knn_correct(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                k: int) -> np.ndarray:
    """Per query, whether the weighted cosine k-NN (T = 0.1) predicts its label."""
    from ..vectors import cosine_top_k

    sims, ids = cosine_top_k(queries, bank, k)  # the one top-k call of this module
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return weighted_vote(bank_labels[ids], sims, num_classes, KNN_TEMPERATURE) == query_labels


def labelled_floors(feats: dict, labels: np.ndarray, test_fraction: float, seed: int) -> dict:
    """k-NN top-1 of every feature map over SPLITS seeded splits of the labelled sample, and per level
    a paired bootstrap of trained minus random init and minus pixels over the pooled queries."""
    from ..baselines import centre
    from ..metrics import paired_bootstrap

    correct: dict[tuple, list[np.ndarray]] = {}
    ks = []
    for s in range(SPLITS):
        tr, te = seeded_split(len(labels), test_fraction, seed + s)
        k = knn_k_for(labels[tr])
        ks.append(k)
        for name, (banks, _, levels) in feats.items():
            for level, f in zip(levels, banks):
                ftr, fte = (centre(f[tr], f[te]) if name == PIXELS else (f[tr], f[te]))
                correct.setdefault((name, level), []).append(knn_correct(ftr, labels[tr], fte, labels[te], k))
    rows = [{"features": name, "level": level, "knn_top1": round(float(100 * np.concatenate(c).mean()), 2),
             "knn_top1_splits": [round(float(100 * x.mean()), 2) for x in c]} for (name, level), c in correct.items()]
    verdicts = []
    for level in feats[TRAINED][2]:
        mine = np.concatenate(correct[(TRAINED, level)])
        for other, olevel in ((RANDOM, level), (PIXELS, None)):
            if (other, olevel) in correct:
                d = paired_bootstrap(mine, np.concatenate(correct[(other, olevel)]), BOOTSTRAP_RESAMPLES, seed)
                verdicts.append(verdict(level, other, {key: round(100 * v, 2) for key, v in d.items()}))
    return {"k": ks, "k_rule": KNN_K_RULE, "splits": SPLITS, "test_fraction": test_fraction, "rows": rows,
            "verdicts": verdicts}


def verdict(level: int, other: str, diff: dict) -> dict:
    """Whether the trained level beats `other`: only when the 95% interval of the difference excludes 0."""
    span = f"{diff['mean']:+.1f} points (95% CI {diff['low']:+.1f} to {diff['high']:+.1f})"
    if diff["low"] > 0:
        line, state = f"level {level}: trained beats {other} on k-NN by {span}", "better"
    elif diff["high"] < 0:
        line, state = f"level {level}: trained is WORSE than {other} on k-NN by {span}", "worse"
    else:
        line, state = (f"level {level}: labels cannot separate trained from {other}: {span} is within noise", "within noise")
    return {"level": level, "versus": other, "difference": diff, "state": state, "line": line}


# --- the command ------------------------------------------------------------------------------------

def stored_labelled(store, levels, max_rows, test_fraction, probe_epochs, probe_lr, seed) -> dict | None:
    """core.evaluate_features on the store's own labelled rows (None for a store without labels)."""
    from ..data import coarse_from_class_names

    if store.labels is None:
        return None
    labels = np.asarray(store.labels, dtype=np.int64)
    rows = np.flatnonzero(labels >= 0)  # rows without a class (images outside the class folders) stay out
    rows = rows[random_subset(len(rows), max_rows, seed)]
    if len(rows) < 10:
        raise SjeaError(f"{store.path} has only {len(rows)} labelled rows; evaluation needs at least 10.")
    feats = [np.asarray(store.read_embeddings(level, rows=rows), dtype=np.float32) for level in levels]
    labels = labels[rows]
    tr, te = seeded_split(len(rows), test_fraction, seed)
    k = knn_k_for(labels[tr])
    names = list(store.label_names) if store.label_names is not None else None
    result = evaluate_features([f[tr] for f in feats], labels[tr], [f[te] for f in feats], labels[te], levels,
                               coarse_from_class_names(names), probe_epochs=probe_epochs, probe_lr=probe_lr,
                               seed=seed, k=k)
    return {"class_names": names, "n_train": int(len(tr)), "n_test": int(len(te)), "test_rows": rows[te].tolist(),
            "knn_k": k, **result}


def label_free_section(store, levels, sample, seed, device, floors, test_fraction, progress) -> dict:
    """The label-free measures (and labelled floors when the sample has labels) of a store's images."""
    if not Path(store.root).is_dir():
        raise SjeaError(f"the store's image folder {store.root} is not there; label-free measures need the original "
                        "images (restore the folder, or evaluate a labelled store with --no-images).")
    rows, pixels, skipped = decode_sample(store, sample, seed, progress)
    if len(rows) < 2:
        raise SjeaError(f"only {len(rows)} of the sampled images could be read from {store.root}; "
                        "label-free measures need at least 2 (check the folder, or re-embed it).")
    copies = augmented_copies(pixels, seed)
    feats, note = sample_features(store, levels, rows, pixels, copies, seed, device, floors, progress)
    out = {"sample": int(len(rows)), "sample_rule": f"seeded random rows (seed {seed}), at most {sample}",
           "skipped": [{"path": p, "error": e} for p, e in skipped], "augmentation": COPY_RECIPE,
           "bank": "the sample's originals (trained: its stored rows)", "rows": label_free_rows(feats)}
    if note:
        out["note"] = note
    if store.labels is not None:
        labels = np.asarray(store.labels, dtype=np.int64)[rows]
        keep = labels >= 0
        if keep.sum() >= 10 and len(np.unique(labels[keep])) >= 2:
            kept = {n: ([b[keep] for b in banks], [c[keep] for c in cops], lv) for n, (banks, cops, lv) in feats.items()}
            out["labelled"] = labelled_floors(kept, labels[keep], test_fraction, seed)
    return out


def evaluate_store(store_path, max_rows: int | None = STORE_EVAL_ROWS, test_fraction: float = 0.2,
                   probe_epochs: int = 20, probe_lr: float = 0.2, seed: int = 0, levels=None,
                   out: str | Path | None = None, sample: int | None = SAMPLE_ROWS, floors: bool = True,
                   images: bool = True, device: str = "cpu", progress: ProgressFn | None = None) -> dict:
    """Evaluate a store; writes <store>.eval.json beside it and returns the same dictionary.

    Labels (folder labels in /labels): the probe and k-NN of its stored rows on a seeded split.
    `images`: the label-free measures on a sample of `sample` of its images (None: all), with random
    init and pixels beside the trained model when `floors`. A store without labels needs `images`.
    `levels`: None/'all', 1, '0,1' or [0, 1] of the stored levels (sjea_tools.levels)."""
    from ..io import atomic_write_text, check_writable
    from ..store import open_store

    store_path = Path(store_path)
    out_path = Path(out) if out else store_path.with_name(store_path.name + ".eval.json")
    with open_store(store_path) as store:
        check_writable(out_path)
        if store.labels is None and not images:
            raise SjeaError(f"{store_path} holds no labels, and --no-images leaves nothing to measure; "
                            "drop --no-images to get the label-free measures.")
        levels = parse_levels(levels, store.levels)
        labelled = stored_labelled(store, levels, max_rows, test_fraction, probe_epochs, probe_lr, seed)
        free = label_free_section(store, levels, sample, seed, device, floors, test_fraction, progress) if images else None
        result = {"source": "store", "store": str(store_path.resolve()), "model_id": store.model_id,
                  "n_rows": int(store.n), "image_root": store.root}
    settings = {"seed": seed, "test_fraction": test_fraction, "features": "stored embeddings"}
    if labelled is not None:
        settings.update({"knn_k": labelled.pop("knn_k"), "knn_k_rule": KNN_K_RULE, "knn_temperature": KNN_TEMPERATURE,
                         "probe_epochs": probe_epochs, "probe_lr": probe_lr})
        result.update(labelled)
    result["settings"] = settings
    if free is not None:
        result["label_free"] = free
    result["output"] = str(out_path)
    atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
    return result
