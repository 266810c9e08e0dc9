"""One level's index file: built over its vectors, tuned and measured, written atomically with
its recall probe beside it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..io import atomic_path, atomic_write
from ..progress import Counter, ProgressFn
from .choose import factory_string
from .load import set_search_params
from .recall import RECALL_SAMPLE, tune_and_measure
from .sidecar import PROBE_SUFFIX


def build_index(vectors: np.ndarray, spec: dict, progress: ProgressFn | None = None, task: str = "adding vectors",
                seed: int = 0, chunk: int = 50_000):
    """A FAISS inner-product index over vectors (normalise them first for cosine); reports the
    vectors added to `progress` under `task`."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(x.shape[1], factory_string(spec), faiss.METRIC_INNER_PRODUCT)
    if spec["kind"] == "hnsw":
        index.hnsw.efConstruction = int(spec["params"]["ef_construction"])
    if spec["kind"] == "ivf-pq":
        index.do_polysemous_training = False  # doubles training time; search never uses it
    if not index.is_trained:
        # IVF k-means trains on a sample: 256 points per list is what FAISS itself uses at most.
        per_list = 256
        n_train = min(len(x), per_list * spec["params"]["nlist"])
        rows = np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))
        index.train(x[rows])
    add_vectors(index, x, progress, task, chunk)
    set_search_params(index, spec["search_params"])
    return index


def add_vectors(index, vectors: np.ndarray, progress: ProgressFn | None, task: str, chunk: int = 50_000) -> None:
    added = Counter(progress, task, len(vectors))
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))
        added.advance(min(chunk, len(vectors) - start))


def build_level_file(vectors: np.ndarray, spec: dict, path: Path, sample: int = RECALL_SAMPLE, tune: bool = True,
                     progress: ProgressFn | None = None, task: str = "adding vectors") -> dict:
    """Build, tune and measure one level's index, write it (and its recall probe) atomically; its
    sidecar entry."""
    t0 = time.perf_counter()
    index = build_index(vectors, spec, progress=progress, task=task)
    build_seconds = time.perf_counter() - t0
    measured = tune_and_measure(index, vectors, spec, sample=sample, tune=tune)
    return save_level(index, spec, measured, path, build_seconds)


def save_level(index, spec: dict, measured: dict, path: Path, seconds: float) -> dict:
    """Write a level's index to `path` and its recall probe beside it, each atomically (new names:
    readers keep the old files until the sidecar is replaced); the level's sidecar entry."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    probe_path = path.with_suffix(PROBE_SUFFIX)
    atomic_write(probe_path, lambda f: np.savez(f, **measured["probe"]))
    return {"file": path.name, "probe": probe_path.name, "kind": spec["kind"], "params": spec["params"],
            "search_params": spec["search_params"], "rerank": spec.get("rerank", 1), "dim": int(index.d),
            "reason": spec["reason"], "recall_at_10": round(measured["recall_at_k"], 4), "recall_k": measured["k"],
            "recall_sample": measured["sample"], "recall_tuning": measured["tried"],
            "build_seconds": round(seconds, 3), "bytes": path.stat().st_size, "base_rows": int(index.ntotal)}

