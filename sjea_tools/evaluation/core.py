"""Evaluation of a stacked model, level by level: linear probe, weighted k-NN, collapse checks,
and how coarse or fine the neighbourhoods of each level are.

The metric functions at the top are pure (arrays in, numbers out) and tested on their own.
`evaluate_run` computes features once per split with the encoder in eval mode, then applies
them; `evaluation.store.evaluate_store` does the same on the embeddings an HDF5 store holds.

Protocol (method.md): features are the representations Y[k]; the bank of the k-NN and the
training set of the probe are the dataset's train split, the queries its test split.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import SjeaError
from ..levels import parse_levels
from ..progress import Counter, ProgressFn
from ..workers import end_with_this_process
from .hierarchy_measures import H_AP_DEPTH, TOP_K_DISTANCE, TREE, hierarchy_measures

EVAL_FILE = "eval.json"
KNN_K = 200
KNN_TEMPERATURE = 0.1
PRECISION_K = 10
HIERARCHY_SETTINGS = {"tree": TREE, "h_ap_relevance": "same class 1, same coarse group 0.5, else 0",
                      "h_ap_depth": H_AP_DEPTH, "distance_k": list(TOP_K_DISTANCE),
                      "mistake_severity": "mean tree distance of the top-1 neighbour's class over the top-1 mistakes",
                      "sources": "Bertinetto et al., Making Better Mistakes, CVPR 2020; Ramzi et al., HAPPIER, ECCV 2022"}


# --- pure metric functions ------------------------------------------------------------------------

def weighted_vote(neighbour_labels: np.ndarray, similarities: np.ndarray, num_classes: int,
                  temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Each neighbour votes for its class with weight exp(sim / T); the heaviest class wins."""
    weights = np.exp(similarities.astype(np.float64) / temperature)
    votes = np.zeros((len(neighbour_labels), num_classes))
    np.add.at(votes, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), weights)
    return votes.argmax(axis=1)


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Weighted k-NN top-1 accuracy in percent (cosine similarity, vote weight exp(sim/T))."""
    from ..vectors import cosine_top_k

    sims, ids = cosine_top_k(queries, bank, k)  # blocked by FAISS: bounded memory
    return knn_accuracy_from_neighbours(ids, sims, bank_labels, query_labels, temperature)


def knn_accuracy_from_neighbours(ids: np.ndarray, sims: np.ndarray, bank_labels: np.ndarray,
                                 query_labels: np.ndarray, temperature: float = KNN_TEMPERATURE) -> float:
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    pred = weighted_vote(bank_labels[ids], sims, num_classes, temperature)
    return float(100.0 * (pred == query_labels).mean())


def knn_k_for(bank_labels: np.ndarray, cap: int = KNN_K) -> int:
    """k of the k-NN for a labelled bank: the smallest class's size in the bank, at most `cap`, at least 1.

    A k larger than a class lets other classes outvote a query's own (k = 200 over classes of 48)."""
    counts = np.bincount(np.asarray(bank_labels, dtype=np.int64))
    counts = counts[counts > 0]
    return int(max(1, min(cap, counts.min()))) if len(counts) else 1


KNN_K_RULE = "k = the smallest class's size in the bank, at most 200, at least 1"


def precision_at_k(ids: np.ndarray, bank_labels: np.ndarray, query_labels: np.ndarray, k: int = PRECISION_K) -> float:
    """Mean fraction, in percent, of each query's first k neighbours that share its label."""
    top = bank_labels[ids[:, :k]]
    return float(100.0 * (top == query_labels[:, None]).mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 epochs: int = 20, lr: float = 0.2, batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0) -> dict[str, float]:
    """Top-1 and top-5 test accuracy (percent) of one linear layer trained on frozen features.

    SGD with momentum 0.9 and a per-step cosine schedule. Features are standardised with the
    training set's mean and std first (an affine map, so the classifier stays linear); this is
    what makes one learning rate work for features of any scale.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    xtr = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    xte = torch.from_numpy(np.asarray(test_x, dtype=np.float32))
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    yte = torch.from_numpy(np.asarray(test_y, dtype=np.int64))

    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1 / math.sqrt(xtr.shape[1])
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(layer(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = layer(xte)
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    return {"top1": round(float(100.0 * (top5[:, 0] == yte).double().mean()), 4),
            "top5": round(float(100.0 * (top5 == yte[:, None]).any(dim=1).double().mean()), 4)}


def collapse_stats(features: np.ndarray) -> dict[str, float]:
    """RankMe effective rank and mean per-dimension std of L2-normalised rows (metrics.py)."""
    from ..metrics import effective_rank, mean_std

    t = torch.from_numpy(np.asarray(features, dtype=np.float32))
    return {"effective_rank": effective_rank(t), "mean_std": mean_std(t)}


def retrieval_scores(ids: np.ndarray, sims: np.ndarray, bank_labels: np.ndarray, query_labels: np.ndarray,
                     k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> dict[str, float]:
    """k-NN top-1 (first k neighbours) and precision@10 from one neighbour list, best first."""
    return {"knn_top1": knn_accuracy_from_neighbours(ids[:, :k], sims[:, :k], bank_labels, query_labels, temperature),
            "precision_at_10": precision_at_k(ids, bank_labels, query_labels, PRECISION_K)}


# --- samples and splits --------------------------------------------------------------------------------

def random_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of `limit` rows drawn with a fixed seed (all rows when limit is None).

    Drawn at random rather than the first rows: image folders are sorted by class.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise SjeaError(f"a sample limit must be 1 or more (got {limit}).")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def seeded_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows), each sorted: a seeded random `test_fraction` (at least one row) is test."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --- evaluating feature sets --------------------------------------------------------------------------

def evaluate_features(train_feats: Sequence[np.ndarray], train_labels: np.ndarray, test_feats: Sequence[np.ndarray],
                      test_labels: np.ndarray, levels: Sequence[int], coarse: tuple[np.ndarray, list[str]] | None = None,
                      probe_epochs: int = 20, probe_lr: float = 0.2, seed: int = 0, k: int = KNN_K,
                      temperature: float = KNN_TEMPERATURE) -> dict:
    """Every metric for every level, from cached features; `coarse` = (fine->coarse map, names)."""
    from ..vectors import cosine_top_k

    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    if len(np.unique(train_labels)) < 2:
        raise SjeaError("the training split holds fewer than 2 classes; evaluate on more images (raise --max-train).")
    label_sets = {"fine": (train_labels, test_labels)}
    if coarse is not None:
        fine_to_coarse = coarse[0]
        label_sets = {"coarse": (fine_to_coarse[train_labels], fine_to_coarse[test_labels]), **label_sets}
    per_level = []
    depth = neighbour_depth(k)
    for level, ftr, fte in zip(levels, train_feats, test_feats):
        probe = linear_probe(ftr, train_labels, fte, test_labels, epochs=probe_epochs, lr=probe_lr, seed=seed)
        sims, ids = cosine_top_k(fte, ftr, depth)
        row = {"level": int(level), "dim": int(ftr.shape[1]),
               "linear_top1": probe["top1"], "linear_top5": probe["top5"],
               "knn_top1": knn_accuracy_from_neighbours(ids[:, :k], sims[:, :k], train_labels, test_labels, temperature),
               **collapse_stats(fte)}
        if coarse is not None:
            row["hierarchy"] = {**{name: retrieval_scores(ids, sims, ytr, yte, k, temperature)
                                   for name, (ytr, yte) in label_sets.items()},
                                "measures": hierarchy_measures(ids, train_labels, test_labels, coarse[0])}
        per_level.append(row)
    result = {"levels": per_level}
    if coarse is not None:
        result["coarse_names"] = coarse[1]
        result["hierarchy_measures"] = HIERARCHY_SETTINGS
        if len(levels) > 1:
            result["hierarchical_search"] = hierarchical_scores(train_feats, test_feats, levels, label_sets, k, temperature,
                                                                coarse[0])
    return result


def hierarchical_scores(train_feats, test_feats, levels, label_sets, k, temperature, fine_to_coarse) -> list[dict]:
    """The same retrieval scores through `search.hierarchical_search`, both ways up the stack.

    Cluster-gated (sjea_tools.hierarchy): hits come from the query's cluster at the first level of
    `order` and are ranked by the last; the vote weights are the similarities at that last level.
    Each order also gets the hierarchy measures (hierarchy_measures.py) of its hits.
    """
    from ..search import hierarchical_search

    positions = list(range(len(levels)))
    bases = list(train_feats)
    depth = neighbour_depth(k)
    train_fine, test_fine = label_sets["fine"]
    out = []
    for order in (positions, positions[::-1]):
        scores, ids = hierarchical_search(list(test_feats), bases, k=depth, order=order)  # chunked inside
        sims = scores[:, :, order[-1]]
        out.append({"order": [int(levels[i]) for i in order],
                    **{name: retrieval_scores(ids, sims, ytr, yte, k, temperature) for name, (ytr, yte) in label_sets.items()},
                    "measures": hierarchy_measures(ids, train_fine, test_fine, fine_to_coarse)})
    return out


def neighbour_depth(k: int) -> int:
    """How many neighbours one search returns: enough for the k-NN, precision@10 and the hierarchy measures."""
    return max(k, PRECISION_K, H_AP_DEPTH, max(TOP_K_DISTANCE))


def features_hierarchy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                       fine_to_coarse: np.ndarray) -> dict:
    """The hierarchy measures of one feature map (cosine neighbours), e.g. a pixel floor."""
    from ..vectors import cosine_top_k

    _, ids = cosine_top_k(queries, bank, max(H_AP_DEPTH, max(TOP_K_DISTANCE)))
    return hierarchy_measures(ids, bank_labels, query_labels, fine_to_coarse)


# --- features of a model ------------------------------------------------------------------------------

def extract_features(model, data, levels: Sequence[int] | None = None, batch_size: int = 256,
                     progress: ProgressFn | None = None, task: str = "features") -> list[np.ndarray]:
    """Representations Y[k] of every image of `data` (an ImageData), model in eval mode, in order;
    images done are reported to `progress` under `task`."""
    from ..data import PixelDataset, normalize_pixels

    levels = list(range(model.num_levels)) if levels is None else list(levels)
    model.eval()
    device = next(model.parameters()).device
    workers = 0 if data.pixels is not None else 2  # folders decode files; in-memory pixels do not
    loader = torch.utils.data.DataLoader(PixelDataset(data, model.image_size), batch_size=batch_size,
                                         shuffle=False, num_workers=workers,
                                         worker_init_fn=end_with_this_process())
    out: list[list[np.ndarray]] = [[] for _ in levels]
    done = Counter(progress, task, len(data))
    with torch.no_grad():
        for pixels, _ in loader:
            x = normalize_pixels(pixels.to(device), model.mean, model.std)
            for k, y in enumerate(model.forward_levels(x, levels)):
                out[k].append(y.float().cpu().numpy())
            done.advance(len(pixels))
    return [np.concatenate(chunks) for chunks in out]


def calibrate_batchnorm(model, data, batches: int = 20, batch_size: int = 256, seed: int = 0) -> None:
    """Running BatchNorm statistics from real images, no weight changes (for random-init baselines)."""
    from ..data import PixelDataset, normalize_pixels

    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(PixelDataset(data, model.image_size), batch_size=batch_size,
                                         shuffle=True, generator=gen)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    device = next(model.parameters()).device
    model.train()
    with torch.no_grad():
        for i, (pixels, _) in enumerate(loader):
            if i >= batches:
                break
            model.forward_train(normalize_pixels(pixels.to(device), model.mean, model.std))
    model.eval()


def load_eval_splits(dataset: str, data_dir: str | None, seed: int, test_fraction: float = 0.2):
    """(train, test) ImageData with labels: the official splits, or a seeded split of a folder."""
    from ..data import load_dataset

    if dataset in ("fashion-mnist", "cifar10", "cifar100", "stl10"):
        # "labeled": STL-10's labelled training split (its "train" is the unlabelled one).
        train, test = load_dataset(dataset, data_dir, "labeled"), load_dataset(dataset, data_dir, "test")
    else:
        folder = load_dataset(dataset, data_dir)
        if folder.labels is None:
            raise SjeaError(f"{dataset} has no labels: evaluation needs one sub-folder per class "
                            "(e.g. photos/cat/1.jpg, photos/dog/2.jpg).")
        tr, te = seeded_split(len(folder), test_fraction, seed)
        train, test = folder.subset(tr), folder.subset(te)
    for split, data in (("train", train), ("test", test)):
        if data.labels is None:
            raise SjeaError(f"the {split} split of {dataset} has no labels; evaluation needs labelled images.")
    return train, test


def eval_dataset(cfg, dataset: str | None, data_dir: str | None) -> tuple[str, str | None]:
    """The dataset named, else the run's own; the run's --data-dir applies to its own dataset only."""
    dataset = dataset or cfg.data.dataset
    if data_dir is None and dataset == cfg.data.dataset:
        data_dir = cfg.data.data_dir
    return dataset, data_dir


def coarse_of(data) -> tuple[np.ndarray, list[str]] | None:
    """The dataset's fine -> coarse map (CIFAR-100 superclasses, Fashion-MNIST groups), if any."""
    if data.coarse_labels is not None and data.labels is not None:
        n_fine = len(data.class_names) if data.class_names else int(data.labels.max()) + 1
        fine_to_coarse = np.zeros(n_fine, dtype=np.int64)
        fine_to_coarse[data.labels] = data.coarse_labels
        return fine_to_coarse, list(data.coarse_names)
    from ..data import coarse_from_class_names

    return coarse_from_class_names(data.class_names)


def evaluate_run(run=None, dataset: str | None = None, data_dir: str | None = None, max_train: int | None = None,
                 max_test: int | None = None, levels=None, probe_epochs: int = 20,
                 probe_lr: float = 0.2, batch_size: int = 256, seed: int = 0, random_init: bool = False,
                 device: str = "cpu", out: str | Path | None = None, save_features: bool = False,
                 progress: ProgressFn | None = None, baselines: bool = False) -> dict:
    """Evaluate a run's model on a labelled dataset (default: the one it was trained on).

    Writes eval.json in the run folder (eval-random-init.json for the random-init baseline) and
    returns the same dictionary. `random_init=True` evaluates the run's architecture with fresh
    weights (BatchNorm statistics from training images): the floor a trained model must beat.
    `levels`: None/'all', 1, '0,1' or [0, 1] (sjea_tools.levels). Silent unless given `progress`.
    `baselines=True` adds raw- and centred-pixel rows under the same k-NN and probe, and the
    centred k-NN of every level (baselines.py).
    """
    from ..models import random_init as fresh_model
    from ..io import atomic_write_text, check_writable
    from ..runs import find_run, load_model, model_id

    run_dir = find_run(run)
    out_path = Path(out) if out else run_dir / ("eval-random-init.json" if random_init else EVAL_FILE)
    check_writable(out_path)
    model = load_model(run_dir, device=device)
    source_id = model_id(model)
    dataset, data_dir = eval_dataset(model.cfg, dataset, data_dir)
    levels = parse_levels(levels, model.num_levels)
    t0 = time.perf_counter()
    train, test = load_eval_splits(dataset, data_dir, seed)
    train = train.subset(random_subset(len(train), max_train, seed))
    test = test.subset(random_subset(len(test), max_test, seed + 1))
    if random_init:
        torch.manual_seed(seed)
        model = fresh_model(model).to(device)
        calibrate_batchnorm(model, train, batch_size=batch_size, seed=seed)
    train_feats = extract_features(model, train, levels, batch_size, progress, "train features")
    test_feats = extract_features(model, test, levels, batch_size, progress, "test features")
    t_features = time.perf_counter() - t0
    result = evaluate_features(train_feats, train.labels, test_feats, test.labels, levels, coarse_of(train),
                               probe_epochs=probe_epochs, probe_lr=probe_lr, seed=seed)
    if baselines:
        from ..baselines import baseline_results

        probe = lambda a, b, c, d: linear_probe(a, b, c, d, epochs=probe_epochs, lr=probe_lr, seed=seed)  # noqa: E731
        coarse = coarse_of(train)
        hierarchy = None if coarse is None else (
            lambda a, b, c, d: features_hierarchy(a, b, c, d, coarse[0]))  # noqa: E731
        result["baselines"] = baseline_results(train, test, train_feats, test_feats, levels, knn_accuracy, probe,
                                               hierarchy)
    result = {
        "source": "run", "run": str(Path(run_dir).resolve()), "model_id": source_id,
        "weights": "random-init" if random_init else "trained", "dataset": dataset, "class_names": train.class_names,
        "n_train": len(train), "n_test": len(test),
        "settings": {"knn_k": KNN_K, "knn_temperature": KNN_TEMPERATURE, "probe_epochs": probe_epochs,
                     "probe_lr": probe_lr, "seed": seed, "features": "representation Y[k], eval mode"},
        **result,
        "seconds": {"features": round(t_features, 2), "total": round(time.perf_counter() - t0, 2)},
        "output": str(out_path),
    }
    if random_init and 0 in levels and model.onnx_level0:
        result["note"] = ("level 0 is a frozen ONNX graph (sjea train --from FILE.onnx) and has no random "
                          "initialisation: its random-init row is the trained graph; only the levels above are a floor")
    if save_features:
        feat_path = out_path.with_suffix(".features.npz")
        save_feature_file(feat_path, levels, train_feats, train.labels, test_feats, test.labels)
        result["features_file"] = str(feat_path)
    atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
    return result


def save_feature_file(path: Path, levels, train_feats, train_labels, test_feats, test_labels) -> None:
    import io

    from ..io import atomic_write_bytes

    arrays = {"levels": np.asarray(levels), "train_labels": train_labels, "test_labels": test_labels}
    for level, a, b in zip(levels, train_feats, test_feats):
        arrays[f"train_level{level}"], arrays[f"test_level{level}"] = a, b
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
