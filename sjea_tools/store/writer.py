"""Writing a complete store from blocks of rows, in one atomic step (sjea_tools.io.atomic_path).

Integrity: every numeric dataset carries HDF5's Fletcher32 checksum per chunk (a flipped byte in
the embeddings is a read error, never a garbage score); HDF5 cannot filter variable-length strings,
so each string dataset carries the sha256 of its contents in its `sha256` attribute instead; the
file is written in the HDF5 1.8 format (libver v108), whose object headers and superblock carry
checksums of their own, so a flipped header byte fails to open instead of reading wrong.
Every write records a fresh `fingerprint` (a random token): an index built from the store records
it too, and is refused once the store has been rewritten (sjea_tools.index).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import SjeaError
from ..io import atomic_path, require_free_space
from ..progress import ProgressFn, report
from .reader import COPY_ROWS, FORMAT, h5py_module, strings_sha256, to_stored_text

# Rows per HDF5 chunk aim at about 1 MiB, the size HDF5's chunk cache handles well.
CHUNK_BYTES = 1 << 20
# The oldest HDF5 format with checksummed metadata; PyTables and every HDF5 since 1.8 read it.
LIBVER = ("v108", "v108")

RowBlocks = Iterable[tuple[list[str], dict]]


def write_store(out: str | Path, attrs: dict, row_sources: Iterable[RowBlocks], failures: list[tuple[str, str]],
                progress: ProgressFn | None = None, task: str = "writing", total: int | None = None, *,
                fingerprint: str | None = None, label_names: list[str] | None = None,
                keep_groups: list | None = None, store_id: str | None = None) -> Path:
    """Write a complete store from blocks of rows (stores, journals) to a temporary file beside
    `out`, then rename it over `out`: a store on disk is always complete, and gets the mode the
    user's umask asks for. progress(task, rows written, total) after every block.
    fingerprint: keep this one (a rewrite of the same rows, `sjea compact`) instead of a new one;
    label_names: index labels into these class names (a segment of a larger store) instead of the
    sorted classes of these rows alone; keep_groups: open h5py groups (a cluster tree) copied in;
    store_id: the id of the store these rows belong to (default: the one in attrs, else that of the
    store this write replaces at `out`, else a new one: docs/store-format.md, "Store id")."""
    h5py = h5py_module()
    out = Path(out)
    store_id = store_id or attrs.get("store_id") or existing_store_id(out) or new_fingerprint()
    if total is not None:
        check_free_space(out, attrs, total)
    with atomic_path(out) as tmp, h5py.File(tmp, "w", libver=LIBVER) as f:
        paths_ds, level_ds = _create_rows(f, attrs, total)
        all_paths = _append_rows(paths_ds, level_ds, row_sources, np.dtype(attrs["dtype"]), progress, task, total)
        if len(set(all_paths)) != len(all_paths):
            raise SjeaError(f"the rows for {out} name some images twice; the inputs overlap (merge each "
                            "shard once).")
        paths_ds.attrs["sha256"] = strings_sha256(all_paths)
        _write_labels_and_failures(f, all_paths, failures, label_names)
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
        # A small integer, not numpy's bool: h5py writes bools as an HDF5 enum PyTables cannot read.
        f.attrs["normalized"] = np.uint8(bool(attrs.get("normalized")))
        f.attrs["fingerprint"] = fingerprint or new_fingerprint()
        f.attrs["store_id"] = store_id
        f.attrs["format"] = FORMAT
        for group in keep_groups or []:
            group.file.copy(group, f, name=group.name.lstrip("/"))
    return out


def new_fingerprint() -> str:
    return uuid.uuid4().hex


def existing_store_id(out: Path) -> str | None:
    """The store id of the store at `out` (which a rewrite at the same name keeps), or None when
    there is none, it is no store, or it was written before store ids were recorded."""
    if not out.is_file():
        return None
    try:
        with h5py_module().File(out, "r") as f:
            value = f.attrs.get("store_id")
    except (OSError, KeyError, ValueError):
        return None
    return value.decode() if isinstance(value, bytes) else (str(value) if value is not None else None)


def chunk_rows(dim: int, dtype: np.dtype) -> int:
    return max(1, min(65536, CHUNK_BYTES // (dim * dtype.itemsize)))


def estimated_bytes(attrs: dict, rows: int) -> int:
    """An upper estimate of a store's size: whole chunks per level (HDF5 allocates them whole),
    paths and failures at 256 bytes a row, and HDF5's own overhead."""
    dtype = np.dtype(attrs["dtype"])
    total = 256 * 1024 + 256 * rows
    for d in (int(d) for d in attrs["dims"]):
        per_chunk = chunk_rows(d, dtype)
        total += -(-max(rows, 1) // per_chunk) * per_chunk * d * dtype.itemsize
    return int(total * 1.1)


def check_free_space(out: Path, attrs: dict, rows: int) -> None:
    """Refuse before writing when the folder cannot hold the store (io.require_free_space)."""
    require_free_space(out, estimated_bytes(attrs, rows))


def _create_rows(f, attrs: dict, total: int | None = None):
    """Empty resizable /paths and /level_K/embeddings datasets. HDF5 stores whole chunks: a store
    of few rows (a small update's segment) gets chunks of its size, not 1 MiB ones."""
    text = h5py_module().string_dtype("utf-8")
    dtype = np.dtype(attrs["dtype"])
    paths_ds = f.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=text, chunks=(COPY_ROWS,))
    level_ds = {}
    for k, d in zip((int(k) for k in attrs["levels"]), (int(d) for d in attrs["dims"])):
        level_ds[k] = f.create_group(f"level_{k}").create_dataset(
            "embeddings", shape=(0, d), maxshape=(None, d), dtype=dtype,
            chunks=(min(chunk_rows(d, dtype), max(1, total or chunk_rows(d, dtype))), d),
            fletcher32=True)
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
            paths_ds[n:n + m] = to_stored_text(paths)
            for k, ds in level_ds.items():
                ds.resize((n + m, ds.shape[1]))
                ds[n:n + m] = np.asarray(block[k]).astype(dtype, copy=False)
            all_paths.extend(paths)
            n += m
            report(progress, task, n, total)
    return all_paths


def write_text_dataset(group, name: str, values: list[str]) -> None:
    """A string dataset that keeps any file name (see reader.to_stored_text) with its sha256."""
    ds = group.create_dataset(name, data=to_stored_text(values), dtype=h5py_module().string_dtype("utf-8"),
                              maxshape=(None,))
    ds.attrs["sha256"] = strings_sha256(values)


def labels_of(paths: list[str], label_names: list[str] | None = None):
    """(labels, class names) of rows (data.datasets.folder_labels; files at the top level: ROOT_LABEL),
    or indexed into `label_names` (which must hold every class of these rows)."""
    # Imported here: sjea_tools.data imports torch, which readers of a store never need.
    from ..data.datasets import ROOT_LABEL, folder_labels

    labels, names = folder_labels(paths, root_label=True)
    if label_names is None:
        return labels, names
    if labels is None:  # only loose files: ROOT_LABEL, where the store's classes have it
        if ROOT_LABEL not in label_names:
            return None, None
        labels, names = np.zeros(len(paths), dtype=np.int64), [ROOT_LABEL]
    index = {c: i for i, c in enumerate(label_names)}
    return np.asarray([index[names[i]] for i in labels], dtype=np.int64), list(label_names)


def _write_labels_and_failures(f, paths: list[str], failures: list[tuple[str, str]],
                               label_names: list[str] | None = None) -> None:
    labels, names = labels_of(paths, label_names)
    if labels is not None:
        f.create_dataset("labels", data=labels, chunks=(max(1, min(len(labels), 65536)),), fletcher32=True)
        write_text_dataset(f, "label_names", names)
    g = f.create_group("failed")
    write_text_dataset(g, "paths", [p for p, _ in failures])
    write_text_dataset(g, "errors", [e for _, e in failures])
