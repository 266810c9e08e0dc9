"""build_indexes: one index per level of a store, built, grown or kept, and the sidecar that
switches readers to the new files in one rename."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..io import atomic_write_text
from ..progress import ProgressFn
from ..store import disk_faults, open_store
from .choose import check_build_options, parse_memory, wanted_spec
from .growth import grow_level, plan_level, rows_removed
from .level_file import build_level_file
from .load import prepare
from .recall import RECALL_SAMPLE
from .sidecar import (INDEX_FORMAT, SIDECAR, StoredPaths, digests, foreign_file, index_dir, read_sidecar_or_none,
                      remove_unused_files, rows_record, settings_changed, stale_rows, vectors_changed)
from .tombstones import (Removals, add_tombstones, over_bound, read_tombstones, removals_since, rows_after,
                         write_tombstones)


def build_indexes(store_path: str | Path, kind: str = "auto", memory_budget=None, params: dict | None = None,
                  metric: str = "cosine", sample: int = RECALL_SAMPLE, tune: bool = True,
                  progress: ProgressFn | None = None, rebuild: bool = False) -> dict:
    """One FAISS index per level of a store, saved beside it; returns the sidecar dict.

    kind "auto" asks choose_index; an explicit kind uses `params` (nlist, nprobe, m, nbits,
    ef_construction, ef_search) with defaults for the rest. An index already beside the store that
    was built on its first rows with the same settings *grows*: only the added rows are read, written
    as a new exact delta part while the parts stay small (the base file untouched), else added to
    the base with the parts (the IVF quantizer and the HNSW graph kept), and recall is measured
    again. A level is rebuilt when the kind chosen for the new size differs, recall after growth
    falls below target, the indexed rows changed, the settings asked differ, or `rebuild`. Each
    level entry says what happened in "action" (built, grown, rebuilt, up to date) and "status"
    (that word and why). Indexes only: the cluster tree is pipeline.index_store's next step.
    Silent unless given `progress`. The caller holds the store's writer lock (so two builds never
    delete each other's files); this function does not take it.
    """
    check_build_options(kind, metric, params, sample)
    request = {"kind": kind, "budget": parse_memory(memory_budget), "metric": metric, "sample": sample,
               "tune": tune, "rebuild": rebuild, "params": {k: v for k, v in (params or {}).items() if v is not None}}
    store_path = Path(store_path)
    folder = index_dir(store_path)
    with disk_faults(f"the index folder {folder}"):
        old = read_sidecar_or_none(store_path)
        remove_unused_files(folder, old)  # what a killed build or growth left
        sidecar, changed = _index_all_levels(store_path, old, request, progress)
        if changed:  # the one step that switches readers to the new files
            atomic_write_text(folder / SIDECAR, json.dumps(sidecar, indent=2) + "\n")
            remove_unused_files(folder, sidecar)
    sidecar["path"] = str(folder)
    return sidecar


def _index_all_levels(store_path: Path, old: dict | None, request: dict,
                      progress: ProgressFn | None) -> tuple[dict, bool]:
    """(the new sidecar, whether it differs from `old` and must be written)."""
    import faiss

    build_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    with open_store(store_path) as store:
        if store.n == 0:
            raise SjeaError(f"{store_path} holds no embeddings yet; run sjea embed first.")
        paths = StoredPaths(store)  # read only where the store's history cannot answer, or for a build
        removal = None if old is None else removals_since(store, old)
        if old is None:
            problem = "no index yet"
        elif removal is None:
            problem = rows_removed(store, old) or stale_rows(store, old, paths) or foreign_parts(store, old)
        else:
            problem = removal.problem or removed_stale(store, old, removal) or foreign_parts(store, old)
        entries = {str(level): _index_level(store, level, dim, old, problem, request, build_id, progress, removal)
                   for level, dim in zip(store.levels, store.dims)}
        for entry in entries.values():  # what binds each file to this sidecar (load.py checks it)
            if entry["action"] != "up to date" or not entry.get("digests"):
                entry["digests"] = digests(index_dir(store_path), entry)
        built = any(e["action"] in ("built", "rebuilt") for e in entries.values())
        sidecar = {"format": INDEX_FORMAT, "store": store_path.name, "model_id": store.model_id, "n": store.n,
                   "store_fingerprint": store.fingerprint, "store_id": store.store_id, "metric": request["metric"], "levels": entries,
                   "memory_budget": request["budget"], "sample": request["sample"],
                   "rows": rows_record(store, paths() if built or paths.read else None),
                   "faiss_version": faiss.__version__,
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if old is not None and all(e["action"] == "up to date" for e in entries.values()):
        # Nothing to add; only a rewrite of the same rows (a new fingerprint) needs a new sidecar.
        if old.get("store_fingerprint") == sidecar["store_fingerprint"] and old.get("store_id") == store.store_id \
                and all(e.get("digests") == old["levels"][lv].get("digests") for lv, e in entries.items()):
            return {**old, "levels": entries}, False
    return sidecar, True


def finite_rows(store, level: int, rows):
    """The rows, or one line naming the first NaN/infinite one (an index would rank it at random)."""
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise SjeaError(f"{store.path} level {level} row {bad[0]} holds NaN or infinity ({len(bad)} such rows); "
                        f"run 'sjea verify {store.path}', then embed the images again into a new file.")
    return rows


def foreign_parts(store, old: dict) -> str | None:
    """Why the existing index files are not this store's (another store's sidecar, a file replaced
    or swapped since it was built), or None."""
    if old.get("store_id") not in (None, store.store_id):
        return "the index in the folder was built for another store (its store id differs)"
    folder = index_dir(store.path)
    for level in store.levels:
        name = str(level) in old.get("levels", {}) and foreign_file(folder, old, level)
        if name:
            return f"{name} is not the file this index was built with (replaced or swapped)"
    return None


def removed_stale(store, old: dict, removal: Removals) -> str | None:
    """stale_rows for an index whose rows were partly removed since (the store's history, which
    removals_since followed, vouches for the order): its settings, and its check rows' vectors
    where they are now, when none of them was removed."""
    changed = settings_changed(store, old)
    if changed:
        return changed
    rows = np.asarray(old["rows"]["check_rows"], dtype=np.int64)
    for step in removal.steps:
        if np.isin(rows, step).any():
            return None  # a check row is gone: its digest cannot be recomputed; the history vouches
        rows = rows_after(rows, step)
    return vectors_changed(store, old["rows"], rows)


def _index_level(store, level: int, dim: int, old: dict | None, problem: str | None, request: dict, build_id: str,
                 progress: ProgressFn | None, removal: Removals | None = None) -> dict:
    """One level's sidecar entry: kept, tombstoned, grown, or built from all its vectors."""
    action, reason = plan_level(store.n, dim, level, old, problem, request)
    path = index_dir(store.path) / f"level{level}-{build_id}.faiss"
    if removal is not None and action in ("up to date", "grow"):
        entry, reason = tombstone_level(store, level, old, removal, request, path, progress)
        if entry is not None:
            return entry
        action = "rebuilt"
    if action == "up to date":
        return {**old["levels"][str(level)], "action": action, "status": "up to date", "added": 0}
    if action == "grow":
        entry, reason = grow_level(store, level, old, request, path, progress)
        if entry is not None:
            return entry
        action = "rebuilt"
    spec = wanted_spec(store.n, dim, request)
    vectors = prepare(finite_rows(store, level, store.read_embeddings(level)), request["metric"])
    forced = any(request["params"].get(p) is not None for p in ("nprobe", "ef_search"))
    entry = build_level_file(vectors, spec, path, sample=request["sample"], tune=request["tune"] and not forced,
                             progress=progress, task=f"level {level} {spec['kind']}")
    return {**entry, "action": action, "status": f"{action}: {reason}", "added": 0, "rows_at_build": store.n,
            "search_forced": forced}



def tombstone_level(store, level: int, old: dict, removal: Removals, request: dict, path: Path,
                    progress: ProgressFn | None) -> tuple[dict | None, str]:
    """A level after rows were removed from the store: its files kept, the removed rows' ids added
    to its tombstones (index.tombstones), then the rows added since grown as a delta part. (the
    entry, "") or (None, why it is rebuilt instead: too many tombstones, a growth that cannot)."""
    entry = old["levels"][str(level)]
    try:
        tombs = read_tombstones(path.parent, entry, store.path)
    except SjeaError as e:
        return None, str(e).split(";")[0]
    had = len(tombs)
    for rows in removal.steps:
        tombs = add_tombstones(tombs, rows)
    too_many = over_bound(len(tombs), store.n + len(tombs))
    if too_many:
        return None, too_many
    kept = {k: v for k, v in entry.items() if k != "tombstones"}
    if len(tombs):
        kept["tombstones"] = write_tombstones(path.with_name(f"{path.stem}.tombs.npy"), tombs)
    # The recall kept was measured with these ids still live (a growth below measures again, the
    # removed ids still counted): the entry says how many removed ids its recall counts.
    kept["recall_with_removed"] = len(tombs)
    note = f"tombstoned ({len(tombs) - had:,} rows removed, {len(tombs):,} in all"
    if store.n == removal.covered:
        return {**kept, "action": "tombstoned", "status": f"{note}; recall@10 measured before the removals)",
                "added": 0}, ""
    grown, why = grow_level(store, level, {**old, "levels": {**old["levels"], str(level): kept}}, request, path,
                            progress, covered=removal.covered, shift=len(tombs))
    if grown is None:
        return None, why
    return {**grown, "action": "tombstoned",
            "status": f"{note}; recall@10 measured with the removed ids counted), then {grown['status']}"}, ""
