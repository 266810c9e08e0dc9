"""`verify_store`: read every byte of a store and check every checksum and invariant.

Ordinary reads already check what they touch (Fletcher32 per chunk, the sha256 of string
datasets, HDF5's metadata checksums; through a top-level file, those of its segments); this reads
everything once, so damage is found before a search or an index build trips over it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..progress import ProgressFn, report
from .reader import StoreDamagedError, copy_rows, damaged_message, open_store

# Rows of unit vectors whose norm strays further than this from 1 mean changed bytes (float16
# rounding stays well inside it).
NORM_TOLERANCE = 1e-2


def verify_store(path: str | Path, progress: ProgressFn | None = None) -> dict:
    """Check a whole store; StoreDamagedError (one line) on the first problem, else a summary.
    progress("verifying", rows checked, total rows) per block and level."""
    path = Path(path)
    with open_store(path) as s:
        _check_segments(s)  # first: the clearest message when a segment file was replaced
        n = s.n
        paths = s.paths
        failed = s.failed
        if len(set(paths)) != len(paths):
            raise StoreDamagedError(damaged_message(path, "/paths names some images twice"))
        labels, names = s.labels, s.label_names
        if labels is not None and (len(labels) != n or names is None or labels.min(initial=0) < 0
                                   or labels.max(initial=-1) >= len(names)):
            raise StoreDamagedError(damaged_message(path, "/labels do not match /paths and /label_names"))
        total = n * len(s.levels)
        done = 0
        for level, dim in zip(s.levels, s.dims):
            done = _check_level(s, level, dim, n, done, total, progress)
    return {"path": str(path), "ok": True, "rows": n, "levels": s.levels, "failed": len(failed),
            "normalized": s.normalized, "centred": s.centres is not None,
            "whitened": s.whitening_digests is not None, "fingerprint": s.fingerprint}


def _check_level(s, level: int, dim: int, n: int, done: int, total: int, progress: ProgressFn | None) -> int:
    with s.reading(f"/level_{level}/embeddings"):
        ds = s._f[f"level_{level}/embeddings"]
        # A virtual dataset (a store of segments) has no chunks of its own: bounded blocks.
        shape, chunk = ds.shape, (ds.chunks or (copy_rows(s.dims, s.dtype.itemsize),))[0]
    if shape != (n, dim):
        raise StoreDamagedError(damaged_message(s.path, f"level {level} holds {shape}, expected {(n, dim)}"))
    for start in range(0, n, max(1, chunk)):
        rows = s.read_embeddings(level, np.arange(start, min(n, start + chunk)))
        if not np.isfinite(rows).all():
            raise StoreDamagedError(damaged_message(s.path, f"level {level} rows {start}+ hold NaN or infinity"))
        if s.normalized and len(rows):
            norms = np.linalg.norm(rows, axis=1)
            if np.abs(norms - 1).max() > NORM_TOLERANCE:
                raise StoreDamagedError(damaged_message(s.path, f"level {level} rows {start}+ are not unit "
                                                                 "vectors although the store says normalized"))
        done += len(rows)
        report(progress, "verifying", done, total)
    return done


def _check_segments(s) -> None:
    """Each segment file is the one the store recorded (fingerprint, rows, failures) and whole;
    the reads through the top-level file below then check every byte of it."""
    for seg in s.segments or []:
        where = s.path.parent / seg["file"]
        with open_store(where) as part:
            found = (part.fingerprint, part.n, len(part.failed))
        if found != (seg["fingerprint"], int(seg["rows"]), int(seg["failed"])):
            raise StoreDamagedError(damaged_message(s.path, f"segment {where} is not the one the store recorded "
                                                            f"(fingerprint, rows, failures {found})"))
