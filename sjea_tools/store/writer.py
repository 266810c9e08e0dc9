"""Writing a complete store from blocks of rows, in one atomic step (sjea_tools.io.atomic_path)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import SjeaError
from ..io import atomic_path
from ..progress import ProgressFn, report
from .reader import COPY_ROWS, FORMAT, h5py_module

# Rows per HDF5 chunk aim at about 1 MiB, the size HDF5's chunk cache handles well.
CHUNK_BYTES = 1 << 20

RowBlocks = Iterable[tuple[list[str], dict]]


def write_store(out: str | Path, attrs: dict, row_sources: Iterable[RowBlocks], failures: list[tuple[str, str]],
                progress: ProgressFn | None = None, task: str = "writing", total: int | None = None) -> Path:
    """Write a complete store from blocks of rows (stores, journals) to a temporary file beside
    `out`, then rename it over `out`: a store on disk is always complete, and gets the mode the
    user's umask asks for. progress(task, rows written, total) after every block."""
    h5py = h5py_module()
    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        paths_ds, level_ds = _create_rows(f, attrs)
        all_paths = _append_rows(paths_ds, level_ds, row_sources, np.dtype(attrs["dtype"]), progress, task, total)
        if len(set(all_paths)) != len(all_paths):
            raise SjeaError(f"the rows for {out} name some images twice; the inputs overlap (merge each "
                            "shard once).")
        _write_labels_and_failures(f, all_paths, failures)
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
        f.attrs["format"] = FORMAT
    return out


def _create_rows(f, attrs: dict):
    """Empty resizable /paths and /level_K/embeddings datasets."""
    text = h5py_module().string_dtype("utf-8")
    dtype = np.dtype(attrs["dtype"])
    paths_ds = f.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=text, chunks=(COPY_ROWS,))
    level_ds = {}
    for k, d in zip((int(k) for k in attrs["levels"]), (int(d) for d in attrs["dims"])):
        chunk_rows = max(1, min(65536, CHUNK_BYTES // (d * dtype.itemsize)))
        level_ds[k] = f.create_group(f"level_{k}").create_dataset(
            "embeddings", shape=(0, d), maxshape=(None, d), dtype=dtype, chunks=(chunk_rows, d))
        level_ds[k].attrs["level"] = k
    return paths_ds, level_ds


def _append_rows(paths_ds, level_ds: dict, row_sources: Iterable[RowBlocks], dtype: np.dtype,
                 progress: ProgressFn | None, task: str, total: int | None) -> list[str]:
    all_paths: list[str] = []
    n = 0
    for source in row_sources:
        for paths, block in source:
            m = len(paths)
            paths_ds.resize((n + m,))
            paths_ds[n:n + m] = paths
            for k, ds in level_ds.items():
                ds.resize((n + m, ds.shape[1]))
                ds[n:n + m] = np.asarray(block[k]).astype(dtype, copy=False)
            all_paths.extend(paths)
            n += m
            report(progress, task, n, total)
    return all_paths


def _write_labels_and_failures(f, paths: list[str], failures: list[tuple[str, str]]) -> None:
    # Imported here: sjea_tools.data imports torch, which readers of a store never need.
    from ..data.datasets import folder_labels

    text = h5py_module().string_dtype("utf-8")
    labels, names = folder_labels(paths)
    if labels is not None:
        f.create_dataset("labels", data=labels)
        f.create_dataset("label_names", data=names, dtype=text)
    g = f.create_group("failed")
    g.create_dataset("paths", data=[p for p, _ in failures], dtype=text, maxshape=(None,))
    g.create_dataset("errors", data=[e for _, e in failures], dtype=text, maxshape=(None,))
