"""Growth: an index on the store's first rows takes the rows added since, as an exact delta part
beside the base while the parts stay small, else folded with every part into the base.

Delta parts: a growth adds its rows as a new exact (Flat) part beside the base index instead of
rewriting the base, whose file is O(stored rows) (0.46 GB per level at 200,000 x 512 HNSW: 1.3-2.9
s to write, 0.7-0.9 s to read back). Every search scans each part exactly, so the parts together
hold at most DELTA_MAX_SHARE of the base's rows (a Flat base searches ~10% slower, HNSW and IVF
keep their recall and gain exact answers) and at most DELTA_MAX_ROWS (half of FLAT_MAX_ROWS: an
exact scan of 25,000 x 512 costs ~3 ms a query on 2 cores, whatever the store's size). Each part
is one more file to open and one more search call and merge per query batch: DELTA_MAX_PARTS
bounds that. The growth past a limit folds every part into the base, written once: that O(n)
write is paid once per 8 small updates or per 10% growth, whichever comes first.
The caller (build_indexes' caller) holds the store's writer lock; nothing here takes it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..io import atomic_path, atomic_write
from ..progress import ProgressFn
from ..vectors import exact_top_k, merge_top_k
from .choose import KIND_NAMES, OPTION_NAMES, SEARCH_PARAM, choose_index
from .level_file import add_vectors, save_level
from .load import prepare, read_faiss, set_search_params
from .recall import MIN_GAIN, TARGET_RECALL, probe_recall, tune_and_measure
from .sidecar import PROBE_SUFFIX, level_files, read_probe

DELTA_MAX_PARTS = 8
DELTA_MAX_SHARE = 0.10
DELTA_MAX_ROWS = 25_000
# How far recall may drop below the recall the index was built with, where that was already under
# the target (IVF-PQ's ceiling): growth keeps such an index unless it got measurably worse.
RECALL_SLACK = 0.02


def plan_level(n: int, dim: int, level: int, old: dict | None, problem: str | None, request: dict) -> tuple[str, str]:
    """(action, reason): "built", "rebuilt", "up to date" or "grow" (which may still rebuild)."""
    if old is None:
        return "built", "no index yet"
    if request["rebuild"]:
        return "rebuilt", "--rebuild asked"
    if problem:
        return "rebuilt", problem
    entry = old["levels"].get(str(level))
    if entry is None or "probe" not in entry:
        return "rebuilt", f"the index has no growth record for level {level}"
    differs = settings_differ(n, dim, entry, old, request)
    if differs:
        return "rebuilt", differs
    return ("up to date", "") if n == old["n"] else ("grow", "")


def rows_removed(store, old: dict) -> str | None:
    """Why an index cannot follow rows removed from the store since it was built (store.removal)
    where the store's removal log does not lead from its version to now (index.tombstones follows
    it where it does): FAISS ids are row numbers, the rows after each removed one moved down, so
    every level is rebuilt. None otherwise."""
    removed_from = store.attrs.get("rows_removed_from")
    if removed_from is None or old.get("store_fingerprint") not in set(np.atleast_1d(removed_from).tolist()):
        return None
    return "rows were removed from the store since it was indexed (the rows after them moved)"


def settings_differ(n: int, dim: int, entry: dict, old: dict, request: dict) -> str | None:
    """How the settings asked differ from those the existing index was built with, or None."""
    if request["metric"] != old.get("metric"):
        return f"--metric {request['metric']} asked, the index uses {old.get('metric')}"
    if request["sample"] != old.get("sample"):
        return f"a recall sample of {request['sample']} asked, the index was measured on {old.get('sample')}"
    kind, have = request["kind"], entry["kind"]
    if kind == "auto":
        chosen = choose_index(n, dim, request["budget"])["kind"]
        if chosen != have:
            return f"the index kind chosen for {n:,} rows is {KIND_NAMES[chosen]}, the existing one is {KIND_NAMES[have]}"
        return None  # auto builds ignore explicit parameters, so they cannot differ
    if kind != have:
        return f"--kind {kind} asked, the existing index is {have}"
    current = {**entry["params"], "nprobe": entry["search_params"].get("nprobe"),
               "ef_search": entry["search_params"].get("efSearch")}
    for key, value in request["params"].items():
        if current.get(key) is not None and int(current[key]) != int(value):
            return f"{OPTION_NAMES.get(key, key)} {value} asked, the existing index has {current[key]}"
    return None


def grow_level(store, level: int, old: dict, request: dict, path: Path, progress: ProgressFn | None,
               covered: int | None = None, shift: int | None = None) -> tuple[dict | None, str]:
    """Add the store's rows after the `covered` ones (default old["n"]) to a level's index and
    measure recall again, reading only the added rows: as a new delta part beside the base while
    the parts stay within the limits (grow_by_part), else folded with every part into the base,
    written once (fold_level). `shift`: the level's tombstones (default its entry's), by which the
    added rows' ids exceed their row numbers (index.tombstones). (the new entry, "") or (None, why
    it must be rebuilt instead)."""
    entry = old["levels"][str(level)]
    covered = int(old["n"]) if covered is None else covered
    shift = int((entry.get("tombstones") or {}).get("count", 0)) if shift is None else shift
    if fits_in_part(entry, covered + shift, store.n + shift):
        grown = grow_by_part(store, level, old, request, path, progress, covered, shift)
        if grown is not None:
            return grown, ""
    if shift:  # a fold appends the parts' rows from the store, where the tombstoned ones are gone
        return None, (f"the delta parts are full and {shift:,} removed rows are tombstoned (a fold would renumber "
                      "the rows after them)")
    return fold_level(store, level, old, request, path, progress)


def fits_in_part(entry: dict, n_old: int, n: int) -> bool:
    """Whether the rows after the base (earlier parts' and the n - n_old added) stay within the
    delta limits with one more part. Pure."""
    base = int(entry.get("base_rows", n_old))
    return (len(entry.get("parts", [])) < DELTA_MAX_PARTS
            and n - base <= min(DELTA_MAX_SHARE * base, DELTA_MAX_ROWS))


def grow_by_part(store, level: int, old: dict, request: dict, path: Path, progress: ProgressFn | None,
                 covered: int, shift: int) -> dict | None:
    """Write the rows after old["n"] as a new exact part (IndexFlatIP: the vectors are prepared
    for inner product as the base's are) beside a level's base, which is neither read nor written,
    and measure the combined recall: the probe's truth and the base's stored answers both merge
    the queries' exact top among the added rows, so the cost follows the rows added (queries x
    added), not the rows stored. The new entry, or None where a fold must decide (files missing,
    a probe too small, recall below the floor). With `shift` tombstones the probe and the part
    count index ids (store rows from `covered` on are ids covered + shift on); a compressed level
    (rerank > 1) re-scores by store row, which a tombstoned id has none of: None."""
    import faiss

    folder, entry = path.parent, old["levels"][str(level)]
    n_old, n = covered + shift, store.n + shift  # in index ids
    t0 = time.perf_counter()
    if not all((folder / f).is_file() for f in level_files(entry)) or (shift and entry.get("rerank", 1) > 1):
        return None
    try:
        probe = with_base_answers(read_probe(folder / entry["probe"]), folder / entry["file"], entry)
    except SjeaError:
        return None
    if probe["ids"].shape[1] < min(10, n):
        return None
    new = prepare(store.read_embeddings(level, np.arange(covered, store.n)), request["metric"])
    part = faiss.IndexFlatIP(new.shape[1])
    add_vectors(part, new, progress, f"level {level} delta part +{n - n_old:,}")
    rerank = entry.get("rerank", 1)
    probe = extend_probe(probe, new, n_old, min(n, probe["ids"].shape[1] * rerank))
    recall = probe_recall(probe, rerank, lambda ids: prepare(store.read_embeddings(level, ids), request["metric"]))
    if recall < min(TARGET_RECALL, entry["recall_at_10"] - RECALL_SLACK):
        return None
    parts = entry.get("parts", [])
    record, probe_file = save_part(part, probe, path.with_name(f"{path.stem}.delta{len(parts) + 1}.faiss"), n_old)
    name = SEARCH_PARAM.get(entry["kind"])
    return {**entry, "probe": probe_file, "parts": [*parts, record], "base_rows": int(entry.get("base_rows", old["n"])),
            "recall_at_10": round(recall, 4), "recall_sample": len(probe["queries"]),
            "recall_tuning": [{name: entry["search_params"][name], "recall": round(recall, 4)}] if name else [],
            "build_seconds": round(time.perf_counter() - t0, 3), "bytes": entry["bytes"] + record["bytes"],
            "action": "grown", "added": n - n_old,
            "status": f"grown (+{n - n_old:,} rows, delta part {len(parts) + 1} of {DELTA_MAX_PARTS})"}


def with_base_answers(probe: dict, base_path: Path, entry: dict) -> dict:
    """The probe with the base index's answers to its queries. A probe written before they were
    stored (an older sjea; its level has no parts yet) gets them by one search of the base,
    memory-mapped when large: once, the next growths find them in the probe."""
    if "found_ids" in probe:
        return probe
    index = read_faiss(base_path)
    set_search_params(index, entry["search_params"])
    scores, ids = index.search(probe["queries"], min(index.ntotal, probe["ids"].shape[1] * entry.get("rerank", 1)))
    return {**probe, "found_ids": ids.astype(np.int64), "found_scores": scores.astype(np.float32)}


def extend_probe(probe: dict, new: np.ndarray, n_old: int, width: int) -> dict:
    """The probe after `new` rows were added at n_old as an exact part: its queries' exact top
    among them merged into the truth (k wide) and into the index's answers (`width` wide, what a
    PartedIndex search returns). No query is drawn from the part (that needs every row's vectors:
    the fold draws them)."""
    k = probe["ids"].shape[1]
    scores, ids = exact_top_k(probe["queries"], new, min(width, len(new)))
    ids = ids.astype(np.int64) + n_old
    truth_scores, truth_ids = merge_top_k(probe["scores"], probe["ids"], scores[:, :k], ids[:, :k], k)
    found_scores, found_ids = merge_top_k(probe["found_scores"], probe["found_ids"], scores, ids, width)
    return {**probe, "ids": truth_ids, "scores": truth_scores.astype(np.float32), "found_ids": found_ids,
            "found_scores": found_scores.astype(np.float32)}


def save_part(part, probe: dict, path: Path, first_row: int) -> tuple[dict, str]:
    """Write a delta part and the level's new recall probe, each atomically under a new name
    (readers keep the old set until the sidecar is replaced): (the part's record, the probe's name)."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(part, str(tmp))
    probe_path = path.with_suffix(PROBE_SUFFIX)
    atomic_write(probe_path, lambda f: np.savez(f, **probe))
    return ({"file": path.name, "first_row": int(first_row), "rows": int(part.ntotal),
             "bytes": path.stat().st_size}, probe_path.name)


def fold_level(store, level: int, old: dict, request: dict, path: Path,
               progress: ProgressFn | None) -> tuple[dict | None, str]:
    """Add every row after the base (its delta parts' and the added ones) to a level's base index
    in memory, measure and tune recall, and write it once; the parts are dropped. (the new entry,
    "") or (None, why it must be rebuilt instead)."""
    folder = path.parent
    entry = old["levels"][str(level)]
    n_old, n = int(old["n"]), store.n
    n_base, parts = int(entry.get("base_rows", n_old)), entry.get("parts", [])
    t0 = time.perf_counter()
    try:
        index = read_faiss(folder / entry["file"], mmap=False)
        probe = read_probe(folder / entry["probe"])
    except SjeaError:  # deleted or damaged since: a rebuild repairs it
        return None, f"{entry['file']} or its recall probe is missing or unreadable"
    if index.ntotal != n_base:
        return None, f"{entry['file']} holds {index.ntotal:,} vectors, not the {n_base:,} recorded"
    if probe["ids"].shape[1] < min(10, n):
        return None, "the index held too few rows to measure recall@10 on"
    spec = {"kind": entry["kind"], "params": dict(entry["params"]), "search_params": dict(entry["search_params"]),
            "rerank": entry.get("rerank", 1), "reason": entry["reason"]}
    set_search_params(index, spec["search_params"])
    new = prepare(store.read_embeddings(level, np.arange(n_base, n)), request["metric"])
    add_vectors(index, new, progress, f"level {level} {spec['kind']} +{n - n_base:,}")
    probe = grow_probe(index, spec["kind"], probe, new, n_old, request["sample"], n_base=n_base)
    had = entry["recall_at_10"]  # below target: its setting was tuned to that ceiling already
    measured = tune_and_measure(index, None, spec, probe=probe, tune=request["tune"] and not entry.get("search_forced"),
                                get_rows=lambda ids: prepare(store.read_embeddings(level, ids), request["metric"]),
                                settled=had - MIN_GAIN if had < TARGET_RECALL else None)
    floor = min(TARGET_RECALL, entry["recall_at_10"] - RECALL_SLACK)
    if measured["recall_at_k"] < floor:
        against = (f"the target {floor:.2f}" if floor == TARGET_RECALL else
                   f"{floor:.2f} (the {entry['recall_at_10']:.2f} it had, less {RECALL_SLACK})")
        return None, f"recall@10 {measured['recall_at_k']:.2f} after growth is below {against}"
    saved = save_level(index, spec, measured, path, time.perf_counter() - t0)
    status = (f"grown and folded (+{n - n_base:,} rows into the base, {len(parts)} delta part"
              f"{'s' if len(parts) > 1 else ''} dropped)" if parts else f"grown (+{n - n_old:,} rows)")
    return {**saved, "action": "grown", "status": status, "added": n - n_old,
            "rows_at_build": entry.get("rows_at_build", n_old), "search_forced": entry.get("search_forced", False)}, ""


def grow_probe(index, kind: str, probe: dict, new: np.ndarray, n_old: int, sample: int,
               n_base: int | None = None) -> dict:
    """The recall probe after rows were added at n_old: `new` holds the rows from n_base on
    (default n_old; a fold passes its delta parts' rows too, whose top-k the probe's truth already
    holds). The old queries' exact top-k is merged with their exact top-k among the rows after
    n_old (queries x added rows: cost follows what was added), and queries are drawn from `new`
    in proportion, so the sample stays uniform over all rows; their exact top-k comes from the
    grown index's own full vectors (IVF-PQ keeps only codes, so it keeps its old queries)."""
    n_base = n_old if n_base is None else n_base
    k, n = probe["ids"].shape[1], n_base + len(new)
    added = new[n_old - n_base:]
    scores, ids = exact_top_k(probe["queries"], added, min(k, len(added)))
    scores, ids = merge_top_k(probe["scores"], probe["ids"], scores, ids + n_old, k)
    exact = exact_searcher(index, kind)
    want = min(sample, n)
    take = min(len(new), round(want * len(new) / n)) if exact is not None else 0
    rng = np.random.default_rng(n)
    keep = np.sort(rng.choice(len(ids), min(want - take, len(ids)), replace=False))
    picked = np.sort(rng.choice(len(new), take, replace=False))
    queries = np.ascontiguousarray(new[picked], dtype=np.float32)
    new_scores, new_ids = exact(queries, k) if take else (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    return {"rows": np.concatenate([probe["rows"][keep], picked + n_base]).astype(np.int64),
            "queries": np.concatenate([probe["queries"][keep], queries]),
            "ids": np.concatenate([ids[keep], new_ids]).astype(np.int64),
            "scores": np.concatenate([scores[keep], new_scores]).astype(np.float32)}


def exact_searcher(index, kind: str):
    """search(queries, k) -> exact (scores, ids) over every vector the index holds, or None where it
    keeps only compressed codes (IVF-PQ)."""
    import faiss

    if kind == "flat":
        return index.search
    if kind == "hnsw":
        return faiss.downcast_index(index.storage).search
    if kind == "ivf-flat":
        every_list = faiss.SearchParametersIVF(nprobe=faiss.extract_index_ivf(index).nlist)
        return lambda queries, k: index.search(queries, k, params=every_list)
    return None

