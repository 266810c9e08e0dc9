"""Tombstones: the index ids of rows removed from the store since a level was built, kept so a
removal costs what was removed instead of a rebuild.

FAISS ids are the store's row numbers at the time each vector was added; after store.removal
takes rows out, the rows after them move down. Rather than rebuild (71.9 s for HNSW on 100,000
rows, benchmarks/bench_removal.py), a level keeps its files and records the removed ids, sorted,
in `level{K}-{build}.tombs.npy` beside them (named in its sidecar entry, digested with its
files). A stored row is then `id - (tombstones below id)`; a tombstoned id is never returned.
Rows added later continue the ids: id = row + tombstones (every tombstone lies below the old end).

Bound: a level is rebuilt once its tombstones exceed TOMBSTONE_MAX_SHARE of its ids or
TOMBSTONE_MAX_ROWS. A search whose over-fetched candidates hold too few live ones asks again for
k + every tombstone, so that second search grows with the tombstones (as an exact delta part's
scan grows with its rows: the same limits as index.growth's DELTA_MAX_SHARE / DELTA_MAX_ROWS),
and dead vectors still take memory and HNSW hops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..io import atomic_write

TOMBSTONE_MAX_SHARE = 0.10
TOMBSTONE_MAX_ROWS = 25_000
NO_TOMBSTONES = np.zeros(0, np.int64)


def ids_to_rows(ids: np.ndarray, tombstones: np.ndarray) -> np.ndarray:
    """Store rows of index ids (any shape): id - (tombstones below id); -1 for a tombstoned id and
    for FAISS's -1 padding. Pure; tombstones sorted, unique."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(tombstones):
        return ids
    below = np.searchsorted(tombstones, ids, side="left")
    dead = tombstones[np.minimum(below, len(tombstones) - 1)] == ids
    return np.where((ids < 0) | dead, -1, ids - below)


def rows_to_ids(rows: np.ndarray, tombstones: np.ndarray) -> np.ndarray:
    """Index ids of live store rows (ids_to_rows undone). tombstones[j] - j is how many live ids lie
    below the j-th tombstone (non-decreasing), so a row's id is the row plus the tombstones whose
    count of live ids below them is at most the row. Pure."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(tombstones):
        return rows
    return rows + np.searchsorted(tombstones - np.arange(len(tombstones)), rows, side="right")


def add_tombstones(tombstones: np.ndarray, removed_rows: np.ndarray) -> np.ndarray:
    """The tombstones after the store rows `removed_rows` (in the numbering before that removal)
    were removed too. Pure."""
    return np.union1d(tombstones, rows_to_ids(removed_rows, tombstones)).astype(np.int64)


def rows_after(rows: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The numbers of live rows after the sorted rows `removed` were taken out before them. Pure."""
    return np.asarray(rows, dtype=np.int64) - np.searchsorted(removed, rows, side="left")


def id_mask(mask: np.ndarray, tombstones: np.ndarray, ntotal: int) -> np.ndarray:
    """A mask over store rows as one over the index's ids (tombstones never allowed)."""
    if not len(tombstones):
        return mask
    out = np.ones(ntotal, dtype=bool)
    out[tombstones] = False
    out[out] = mask
    return out


def over_bound(count: int, ntotal: int) -> str | None:
    """Why `count` tombstones among `ntotal` ids are too many to keep (a rebuild is cheaper to
    search), or None."""
    limit = min(TOMBSTONE_MAX_SHARE * ntotal, TOMBSTONE_MAX_ROWS)
    if count > limit:
        return (f"{count:,} removed rows would be tombstoned, over the limit of {int(limit):,} "
                f"({TOMBSTONE_MAX_SHARE:.0%} of the index's {ntotal:,} ids, at most {TOMBSTONE_MAX_ROWS:,})")
    return None


class Tombstoned:
    """A level's index (FAISS or PartedIndex) whose ids include tombstones, searched as the store
    is now: `search` returns store rows, never a removed one; `ntotal` counts live rows. Each query
    asks for k plus up to k more (or every tombstone, if fewer), and a query still left with under
    k live ids asks again for k + every tombstone, which always holds k live ones. Candidates keep
    the index's order (ties as FAISS gives them; the row numbering keeps the ids' order)."""

    def __init__(self, inner, tombstones: np.ndarray):
        self.inner, self.tombstones = inner, tombstones
        self.ntotal = int(inner.ntotal) - len(tombstones)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        t, total = self.tombstones, int(self.inner.ntotal)
        scores, rows = self._live(x, min(total, k + min(len(t), k)), k)
        short = np.flatnonzero((rows >= 0).sum(1) < min(k, self.ntotal))
        if len(short) and min(total, k + min(len(t), k)) < min(total, k + len(t)):
            scores[short], rows[short] = self._live(x[short], min(total, k + len(t)), k)
        return scores, rows

    def _live(self, x: np.ndarray, width: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.inner.search(x, width)
        rows = ids_to_rows(ids, self.tombstones)
        order = np.argsort(rows < 0, axis=1, kind="stable")[:, :k]  # live first, in the index's order
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            scores = np.concatenate([scores, np.full((len(x), pad), -np.inf, np.float32)], 1)
            rows = np.concatenate([rows, np.full((len(x), pad), -1, np.int64)], 1)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows

    def __getattr__(self, name: str):
        if name in ("inner", "tombstones"):  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)


def write_tombstones(path: Path, tombstones: np.ndarray) -> dict:
    """Write the sorted ids atomically under a new name (readers keep the old set until the sidecar
    is replaced); the level entry's record of them."""
    atomic_write(path, lambda f: np.save(f, np.asarray(tombstones, dtype=np.int64)))
    return {"file": path.name, "count": int(len(tombstones))}


def read_tombstones(folder: Path, entry: dict, store_path) -> np.ndarray:
    """A level's tombstones (sorted unique int64), NO_TOMBSTONES where it has none; refused when the
    file is unreadable or not the count recorded."""
    record = entry.get("tombstones")
    if not record:
        return NO_TOMBSTONES
    path = folder / record["file"]
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SjeaError(f"{path} is unreadable ({str(e)[:80]}); rebuild the index with: sjea index "
                        f"{store_path} --rebuild") from None
    if ids.dtype != np.int64 or ids.ndim != 1 or len(ids) != int(record["count"]) or np.any(np.diff(ids) <= 0):
        raise SjeaError(f"{path} does not hold the {record['count']} sorted removed ids its sidecar records; "
                        f"rebuild the index with: sjea index {store_path} --rebuild")
    return ids


@dataclass
class Removals:
    """The removals between the version an index was built on and the store now: `steps` (each
    removal's rows below the index's coverage, in the numbering before it), `covered` (the first
    store rows the index holds now), or `problem` (why it cannot follow them: rebuild)."""
    steps: list
    covered: int
    problem: str | None = None


def removals_since(store, old: dict) -> Removals | None:
    """Follow the store's removal log (store.removal_log) from the version `old` (an index sidecar)
    was built on; None when no removal happened since. Each removal names the versions its rows
    began with (history) and the version it published, so the chain is checked link by link;
    appends in between keep the history, which the end of the chain must still be in."""
    from ..store.removal import removal_log

    fp, covered, steps = old.get("store_fingerprint"), int(old.get("n", 0)), []
    for event in removal_log(store):
        history = dict(event["from"])
        if fp not in history:
            continue
        if history[fp] < covered or (not steps and history[fp] != covered):
            return Removals([], 0, f"the store's history gives the indexed version {history[fp]:,} rows, "
                                   f"the index {covered:,}")
        rows = event["rows"]
        steps.append(rows[rows < covered])
        covered, fp = covered - len(steps[-1]), event["to"]
    if not steps:
        return None
    have = store.rows_unchanged_since(fp)
    if have is None or have < covered:
        return Removals([], 0, "the store was rewritten since rows were removed from it (the removals cannot be followed)")
    return Removals(steps, covered)
