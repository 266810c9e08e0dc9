"""A store that follows its folder: rows of vanished or changed files removed, labels restored, and
the size and modification time of each row's file recorded so the next `--update` sees changes.

Removal rewrites no row. The store becomes (or stays) a store of segments, and each segment's entry
in the top-level file gains `live`: the [start, stop) ranges of its own rows the store still shows
(and `failed_live` for its failures); the top-level virtual datasets map only those ranges, so every
reader sees a store of live rows only, unchanged. The cost is the top-level file (paths and ranges,
O(rows) strings, no vector read or written); the dead rows stay in their segment files until a
compaction rewrites them. Row numbers after a removed row shift down: the history is restarted,
and the removal is logged (REMOVAL_LOG: the version's history, the removed rows in its numbering,
the version published) so an index built before follows it with tombstones (index.tombstones)
instead of a rebuild. The caller holds the writer lock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from .reader import h5py_module, open_store
from .segments import OWN_ATTRS, claim_folder, link_segment, publish, remove_orphans, write_labels_file
from .writer import new_fingerprint, write_text_dataset

STATS_GROUP = "file_stats"  # /file_stats/size, /file_stats/mtime_ns: per row, of the file embedded
UNKNOWN = (-1, -1)
# Store attribute, JSON: the last REMOVAL_LOG_MAX removals, oldest first, each {"from": the
# history [[fingerprint, rows], ...] of the version rows were removed from, "rows": those rows as
# [start, stop) runs in its numbering, "to": the fingerprint of the version published}. An index
# more removals behind than that is rebuilt (its version is then only in rows_removed_from).
REMOVAL_LOG = "removal_log"
REMOVAL_LOG_MAX = 16
# What an --update's append carries from the removal before it (embed.runner).
REMOVAL_ATTRS = ("rows_removed_from", REMOVAL_LOG)


def rewrite_rows(out: str | Path, drop: set[str], drop_failed: set[str], label_names: list[str] | None,
                 extra_attrs: dict | None = None) -> int:
    """Publish `out` without the rows whose paths are in `drop` and the failures in `drop_failed`;
    with `label_names` (sorted class names every live row's class is in) a store without /labels
    gets them. Returns the rows left."""
    out = Path(out)
    remove_orphans(out)
    with open_store(out) as s:
        store_id = s.store_id or new_fingerprint()
        claim_folder(out, store_id)
        segs = [dict(g) for g in s.segments] if s.segments else [link_segment(out, out, 0, s)]
        paths, failed, names = s.paths, s.failed, s.label_names
        # OWN_ATTRS holds `normalized` (publish writes it itself): carried here, or a removal loses it.
        attrs = {**{k: v for k, v in s.attrs.items() if k not in OWN_ATTRS}, "normalized": s.normalized}
        # Every earlier version's row numbers are void now: an index of one follows the log or is rebuilt.
        attrs["rows_removed_from"] = [p for p, _ in s.history]
        log, before = _raw_log(s), s.history
    keep = np.asarray([p not in drop for p in paths], dtype=bool)
    keep_failed = np.asarray([p not in drop_failed for p, _ in failed], dtype=bool)
    if paths and not keep.any():
        raise SjeaError(f"none of the {len(paths):,} images of {out} is in the folder any more, so it was left as "
                        "it is; check the folder, or pass --keep-missing to keep their rows.")
    _narrow(segs, keep, "rows", "live")
    _narrow(segs, keep_failed, "failed", "failed_live")
    live = [p for p, k in zip(paths, keep) if k]
    if names is None and label_names is not None:
        _label_every_segment(out, segs, label_names)
        names = label_names
    attrs.update(extra_attrs or {})
    fingerprint = new_fingerprint()
    event = {"from": [[p, int(r)] for p, r in before], "rows": _ranges(np.flatnonzero(~keep)), "to": fingerprint}
    attrs[REMOVAL_LOG] = json.dumps((log + [event])[-REMOVAL_LOG_MAX:])
    publish(out, attrs, segs, live, [f for f, k in zip(failed, keep_failed) if k], names, [], store_id,
            fingerprint=fingerprint, keep_labels=True)
    remove_orphans(out)
    return len(live)


def removal_log(store) -> list[dict]:
    """The store's logged removals (REMOVAL_LOG), oldest first: {"from": [(fingerprint, rows)],
    "rows": sorted int64 removed rows, "to": fingerprint}; [] when none (or unreadable: a rebuild)."""
    return [{"from": [(str(p), int(r)) for p, r in e["from"]], "to": str(e["to"]),
             "rows": _expand(e["rows"], 0)} for e in _raw_log(store)]


def _raw_log(store) -> list[dict]:
    try:
        log = json.loads(store.attrs.get(REMOVAL_LOG) or "[]")
    except (TypeError, ValueError):
        return []
    return log if isinstance(log, list) else []


def _narrow(segs: list[dict], keep: np.ndarray, count: str, key: str) -> None:
    """Restrict each segment's `key` ranges to the rows `keep` marks (over the store's live rows)."""
    at = 0
    for g in segs:
        n = int(g[count])
        own = _expand(g.get(key), n)
        mine = keep[at:at + len(own)]
        at += len(own)
        if mine.all():
            continue
        g[key] = _ranges(own[mine])


def _expand(live: list | None, n: int) -> np.ndarray:
    if live is None:
        return np.arange(n, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in live] or [np.zeros(0, np.int64)])


def _ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted row numbers as [start, stop) runs."""
    if not len(rows):
        return []
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return [[int(r[0]), int(r[-1]) + 1] for r in runs]


def _label_every_segment(out: Path, segs: list[dict], names: list[str]) -> None:
    """Give each segment of a store that has no /labels a labels file indexing `names` (rows whose
    class is not among them, removed ones, get -1)."""
    from ..data.datasets import path_class  # here: sjea_tools.data imports torch, a reader never needs it

    index = {c: i for i, c in enumerate(names)}
    for g in segs:
        if not int(g["rows"]):
            continue
        with h5py_module().File(out.parent / g["file"], "r") as f:
            own = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in f["paths"][:]]
        g["labels"] = write_labels_file(out, g, np.asarray([index.get(path_class(p), -1) for p in own],
                                                             dtype=np.int64))
        with h5py_module().File(out.parent / g["labels"], "r+") as f:  # new, not yet named by the store
            write_text_dataset(f, "label_names", names)  # what a later renumbering reads


# --- what the store knows of its files ----------------------------------------------------------

def stat_files(root: Path, paths: list[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of each file, UNKNOWN where it cannot be read."""
    out = {}
    for p in paths:
        try:
            st = os.stat(root / p)
            out[p] = (int(st.st_size), int(st.st_mtime_ns))
        except OSError:
            out[p] = UNKNOWN
    return out


def read_file_stats(store) -> dict[str, tuple[int, int]] | None:
    """path -> (size, mtime_ns) recorded for each row and failure; None for a store written before
    they were recorded (or whose record no longer matches its rows)."""
    got = store.read_group(STATS_GROUP)
    if got is None or len(got[0].get("size", ())) != store.n:
        return None
    a = got[0]
    stats = {p: (int(x), int(y)) for p, x, y in zip(store.paths, a["size"], a["mtime_ns"])}
    failed = [p for p, _ in store.failed]
    if len(a.get("failed_size", ())) == len(failed):
        stats.update({p: (int(x), int(y)) for p, x, y in zip(failed, a["failed_size"], a["failed_mtime_ns"])})
    return stats


def record_file_stats(out: str | Path, stats: dict[str, tuple[int, int]]) -> None:
    """Write /file_stats for the store's rows and failures in place, as the cluster tree is (derived
    data, replaced whole; a compaction keeps it, an update writes it again). The caller holds the lock."""
    with open_store(out, mode="a") as s:
        rows = np.asarray([stats.get(p, UNKNOWN) for p in s.paths], dtype=np.int64).reshape(-1, 2)
        failed = np.asarray([stats.get(p, UNKNOWN) for p, _ in s.failed], dtype=np.int64).reshape(-1, 2)
        s.write_group(STATS_GROUP, {"size": rows[:, 0], "mtime_ns": rows[:, 1], "failed_size": failed[:, 0],
                                    "failed_mtime_ns": failed[:, 1]})
