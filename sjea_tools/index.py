"""FAISS indexes, one per level, saved beside the store.

    choose_index(n, dim, budget)       which kind of index (pure; the numbers below were measured)
    build_index(vectors, spec)         a FAISS index over L2-normalised vectors (inner product = cosine)
    tune_and_measure(index, vectors)   recall@10 against exact search, raising nprobe/efSearch to 0.95
    build_indexes(store_path)          all of the above for every level of a store, plus the sidecar;
                                       an index on the store's first rows *grows* by the rows added
                                       since (grow_level) unless plan_level says why it must not
                                       (indexes only: pipeline.index_store adds the cluster tree)
    load_indexes(store_path)           the indexes, refused when stale; large files memory-mapped

Layout beside `emb.h5`: `emb.h5.index/index.json` (the sidecar: the store's model id, row
count and fingerprint (a token every store write renews: a rewritten store's old index is refused;
the store's history of fingerprints says in O(1) whether its first rows are still the indexed
ones, Store.rows_unchanged_since), what the indexed rows were (rows_record), kind, parameters,
measured recall, build time, size, and per level what the last run did and why),
`emb.h5.index/level{K}-{build}.faiss` and beside it `level{K}-{build}.probe.npz` (the recall
queries, their exact top-k and the index's own answers, which a growth extends with the added rows
instead of searching every stored row again). A small growth leaves the base file alone and writes
the added rows as an exact *delta part*, `level{K}-{build}.delta{J}.faiss`, listed in the level's
"parts"; search merges the base's and the parts' top-k (PartedIndex); a growth past the limits
(DELTA_MAX_PARTS, DELTA_MAX_SHARE, DELTA_MAX_ROWS) folds every part into the base once.
Every file is written through sjea_tools.io (temporary file, fsync, the user's umask, rename); a
build or a growth writes new files first and then replaces the sidecar in one rename, so a reader
never sees a half-built set and a kill leaves the previous set usable.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import SjeaError
from .io import atomic_path, atomic_write, atomic_write_text, sha256_bytes, stale_temp_files
from .progress import Counter, ProgressFn
from .vectors import best_k, exact_rerank, l2_normalize

KINDS = ("flat", "hnsw", "ivf-flat", "ivf-pq")
METRICS = ("cosine", "inner-product")
INDEX_FORMAT = "sjea-index/1"
SIDECAR = "index.json"
# Beside each level file: the recall queries and their exact top-k, which growth extends.
PROBE_SUFFIX = ".probe.npz"
GiB = 1 << 30
DEFAULT_MEMORY_BUDGET = 8 * GiB
# Exact search over 50,000 x 512 floats takes ~6 ms per query on 2 cores: fast enough, and exact.
FLAT_MAX_ROWS = 50_000
# HNSW (M=32) over 100,000 x 512 built in 27 s on 2 cores (0.995 recall@10 at efSearch 64); its
# build grows slightly faster than linearly, so 1,000,000 would take 5+ minutes: past 300,000
# rows IVF (trained on a sample) builds much faster for the same recall.
HNSW_MAX_ROWS = 300_000
HNSW_M = 32
TARGET_RECALL = 0.95
RECALL_SAMPLE = 1000
# A doubling of nprobe/efSearch that gains less recall than this is undone: tuning stops there.
MIN_GAIN = 0.002
# PQ codes only approximate the scores: search fetches this many times k and re-scores exactly.
PQ_RERANK = 4
# Files larger than this are memory-mapped on load rather than read into memory.
MMAP_MIN_BYTES = 256 << 20
# What a recall probe holds: the queries (stored rows) and their exact top-k ...
PROBE_KEYS = ("rows", "queries", "ids", "scores")
# ... and the index's own answers to them (k x rerank wide), which a delta part's growth extends.
ANSWER_KEYS = ("found_ids", "found_scores")
# Delta parts: a growth adds its rows as a new exact (Flat) part beside the base index instead of
# rewriting the base, whose file is O(stored rows) (0.46 GB per level at 200,000 x 512 HNSW: 1.3-2.9
# s to write, 0.7-0.9 s to read back). Every search scans each part exactly, so the parts together
# hold at most DELTA_MAX_SHARE of the base's rows (a Flat base searches ~10% slower, HNSW and IVF
# keep their recall and gain exact answers) and at most DELTA_MAX_ROWS (half of FLAT_MAX_ROWS: an
# exact scan of 25,000 x 512 costs ~3 ms a query on 2 cores, whatever the store's size). Each part
# is one more file to open and one more search call and merge per query batch: DELTA_MAX_PARTS
# bounds that. The growth past a limit folds every part into the base, written once: that O(n)
# write is paid once per 8 small updates or per 10% growth, whichever comes first.
DELTA_MAX_PARTS = 8
DELTA_MAX_SHARE = 0.10
DELTA_MAX_ROWS = 25_000


def choose_index(n: int, dim: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """The index kind and parameters for n vectors of dimension dim within a memory budget.

    Returns {"kind", "params", "search_params", "estimated_bytes", "reason"}. Pure.
    """
    if n <= 0 or dim <= 0:
        raise SjeaError(f"cannot index {n} vectors of dimension {dim}; embed some images first.")
    raw = n * dim * 4
    if n <= FLAT_MAX_ROWS and raw <= memory_budget_bytes:
        return {"kind": "flat", "params": {}, "search_params": {}, "estimated_bytes": raw,
                "reason": f"{n} rows <= {FLAT_MAX_ROWS}: exact search is fast enough"}
    hnsw_bytes = raw + n * HNSW_M * 2 * 4 * 1.1  # base layer: 2M neighbour ids per vector
    if n <= HNSW_MAX_ROWS and hnsw_bytes <= memory_budget_bytes:
        return {"kind": "hnsw", "params": {"m": HNSW_M, "ef_construction": 40},
                "search_params": {"efSearch": 64}, "estimated_bytes": int(hnsw_bytes),
                "reason": f"{n} rows <= {HNSW_MAX_ROWS}: HNSW builds in about a minute on 2 cores"}
    nlist = ivf_lists(n)
    search = {"nprobe": max(1, nlist // 64)}
    ivf_bytes = raw + n * 8 + nlist * dim * 4  # vectors, their ids, the centroids
    if ivf_bytes <= memory_budget_bytes:
        why = "rows > HNSW limit" if n > HNSW_MAX_ROWS else "HNSW graph exceeds the memory budget"
        return {"kind": "ivf-flat", "params": {"nlist": nlist}, "search_params": search,
                "estimated_bytes": ivf_bytes, "reason": f"{why}; the full vectors fit the budget"}
    for m in pq_subquantizers(dim):
        pq_bytes = n * (m + 8) + nlist * dim * 4 + 256 * dim * 4
        if pq_bytes <= memory_budget_bytes:
            return {"kind": "ivf-pq", "params": {"nlist": nlist, "m": m, "nbits": 8 if n >= 256 * 39 else 4},
                    "search_params": search, "estimated_bytes": pq_bytes, "rerank": PQ_RERANK,
                    "reason": f"full vectors ({raw / GiB:.1f} GiB) exceed the memory budget "
                              f"({memory_budget_bytes / GiB:.1f} GiB): compressed to {m} bytes each"}
    raise SjeaError(f"{n} vectors of dimension {dim} do not fit a memory budget of "
                    f"{memory_budget_bytes / GiB:.2f} GiB even compressed; raise --memory-budget.")


def ivf_lists(n: int) -> int:
    """Number of IVF lists: the power of two nearest sqrt(n), with >= 39 training points each."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(nlist, n // 39)))


def pq_subquantizers(dim: int) -> list[int]:
    """PQ code sizes in bytes, largest first: dim/4 (best recall) down to dim/32, dividing dim."""
    return [m for m in (dim // 4, dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0]


def explicit_spec(kind: str, n: int, dim: int, **params) -> dict:
    """A spec for a forced kind; unset parameters get the same defaults choose_index uses."""
    if kind not in KINDS:
        raise SjeaError(f"unknown index kind {kind!r}; choose one of auto, {', '.join(KINDS)}.")
    params = {k: v for k, v in params.items() if v is not None}
    search: dict = {}
    if kind == "hnsw":
        ef_search = params.pop("ef_search", 64)
        params = {"m": params.get("m", HNSW_M), "ef_construction": params.get("ef_construction", 40)}
        search = {"efSearch": ef_search}
    elif kind in ("ivf-flat", "ivf-pq"):
        nlist = int(params.get("nlist", ivf_lists(n)))
        if nlist < 1 or nlist > n:
            raise SjeaError(f"--nlist {nlist} must be between 1 and the number of rows ({n}).")
        search = {"nprobe": int(params.get("nprobe", max(1, nlist // 64)))}
        out = {"nlist": nlist}
        if kind == "ivf-pq":
            m = int(params.get("m", pq_subquantizers(dim)[0]))
            if dim % m:
                raise SjeaError(f"--pq-m {m} must divide the dimension {dim}.")
            out.update(m=m, nbits=int(params.get("nbits", 8 if n >= 256 * 39 else 4)))
        params = out
    else:
        params = {}
    return {"kind": kind, "params": params, "search_params": search, "estimated_bytes": None,
            "reason": "forced with --kind", "rerank": PQ_RERANK if kind == "ivf-pq" else 1}


def factory_string(spec: dict) -> str:
    p = spec["params"]
    return {"flat": lambda: "Flat",
            "hnsw": lambda: f"HNSW{p['m']}",
            "ivf-flat": lambda: f"IVF{p['nlist']},Flat",
            "ivf-pq": lambda: f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}"}[spec["kind"]]()


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


def set_search_params(index, params: dict) -> None:
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top-k by inner product (brute force, blocked by FAISS)."""
    import faiss

    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                     np.ascontiguousarray(vectors, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (both (q, k) id arrays)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def recall_probe(vectors: np.ndarray, k: int = 10, sample: int = RECALL_SAMPLE, seed: int = 0) -> dict:
    """The queries recall is measured with (up to `sample` stored rows) and their exact top-k:
    {"rows", "queries", "ids", "scores"}. Saved beside the index, so a growth extends the truth
    with the added rows only instead of searching every stored row again."""
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    scores, ids = exact_top_k(queries, vectors, min(k, n))
    return {"rows": rows.astype(np.int64), "queries": queries, "ids": ids.astype(np.int64),
            "scores": scores.astype(np.float32)}


def tune_and_measure(index, vectors: np.ndarray, spec: dict, k: int = 10, sample: int = RECALL_SAMPLE,
                     target: float = TARGET_RECALL, seed: int = 0, tune: bool = True, probe: dict | None = None,
                     get_rows=None, settled: float | None = None) -> dict:
    """recall@k of index against exact search on up to `sample` stored vectors.

    For IVF (nprobe) and HNSW (efSearch) the search parameter is doubled until the recall reaches
    `target` (what autofaiss does), unless the parameter was forced; spec["search_params"] is updated.
    A doubling that gains less than MIN_GAIN is undone (PQ's ceiling, or ties among equal vectors:
    a larger setting only slows every search). `settled`: the recall below target at which the
    current setting was already tuned (a growth): no doubling is tried while the recall stays there.
    A growth passes its `probe` (recall_probe, extended) and `get_rows` (sorted ids -> vectors, for
    the exact re-scoring of compressed indexes) instead of `vectors`. The probe is returned too,
    with the index's answers at the setting kept ("found_ids", "found_scores": k x rerank wide,
    before re-scoring): a delta part's growth merges its own exact answers into them (grow_by_part)
    instead of searching the base again.
    """
    probe = probe if probe is not None else recall_probe(vectors, k, sample, seed)
    get_rows = get_rows or (lambda ids: vectors[ids])
    queries, truth, n = probe["queries"], probe["ids"], int(index.ntotal)
    k = truth.shape[1]
    name = {"hnsw": "efSearch", "ivf-flat": "nprobe", "ivf-pq": "nprobe"}.get(spec["kind"])
    limit = {"efSearch": 2048, "nprobe": spec["params"].get("nlist", 1)}.get(name, 0)
    tried: list[dict] = []
    rerank = spec.get("rerank", 1)
    previous = None  # (setting, recall, answers) before the last doubling
    while True:
        answers = index.search(queries, min(n, k * rerank))
        found = answers[1]
        if rerank > 1:  # what search does for compressed indexes: exact re-scoring of more candidates
            found, _ = exact_rerank(queries, found, get_rows, k)
        recall = recall_at_k(found, truth)
        value = spec["search_params"].get(name) if name else None
        if name:
            tried.append({name: value, "recall": round(recall, 4)})
        if previous is not None and recall - previous[1] < MIN_GAIN:  # more probing stopped helping
            value, recall, answers = previous
            spec["search_params"][name] = value
            set_search_params(index, spec["search_params"])
            break
        # Stop at the target, at the limit, or where this setting was already tuned (a growth).
        if (not tune or name is None or recall >= target or value >= limit
                or (settled is not None and recall >= settled)):
            break
        previous = (value, recall, answers)
        spec["search_params"][name] = min(limit, value * 2)
        set_search_params(index, spec["search_params"])
    probe = {**probe, "found_ids": answers[1].astype(np.int64), "found_scores": answers[0].astype(np.float32)}
    return {"recall_at_k": recall, "k": k, "sample": len(queries), "target": target, "tried": tried,
            "probe": probe}


# --------------------------------------------------------------------------------------------
# Files beside the store


def index_dir(store_path: str | Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".index")


def read_sidecar(store_path: str | Path) -> dict | None:
    path = index_dir(store_path) / SIDECAR
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise SjeaError(f"{path} is unreadable; rebuild it with: sjea index {store_path}") from None


def parse_memory(text: str | int | None) -> int:
    """'8G', '512M', '2.5GiB' or a byte count -> bytes."""
    if text is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(text, int):
        if text <= 0:
            raise SjeaError(f"memory budget {text} must be positive.")
        return text
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:] if s else "", 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise SjeaError(f"memory budget {text!r} is not a size; write e.g. 8G or 512M.") from None
    if not math.isfinite(value):
        raise SjeaError(f"memory budget {text!r} is not a finite size; write e.g. 8G or 512M.")
    if value <= 0:
        raise SjeaError(f"memory budget {text!r} must be positive.")
    return int(value)


def build_indexes(store_path: str | Path, kind: str = "auto", memory_budget=None, params: dict | None = None,
                  metric: str = "cosine", sample: int = RECALL_SAMPLE, tune: bool = True,
                  progress: ProgressFn | None = None, clusters: bool = False, rebuild: bool = False) -> dict:
    """One FAISS index per level of a store, saved beside it; returns the sidecar dict.

    kind "auto" asks choose_index; an explicit kind uses `params` (nlist, nprobe, m, nbits,
    ef_construction, ef_search) with defaults for the rest. An index already beside the store that
    was built on its first rows with the same settings *grows*: only the added rows are read, written
    as a new exact delta part while the parts stay small (the base file untouched), else added to
    the base with the parts (the IVF quantizer and the HNSW graph kept), and recall is measured
    again. A level is
    rebuilt when the kind chosen for the new size differs, recall after growth falls below target,
    the indexed rows changed, the settings asked differ, or `rebuild`. Each level entry says what
    happened in "action" (built, grown, rebuilt, up to date) and "status" (that word and why).
    Indexes only: the cluster tree is pipeline.index_store's next step (`clusters` is accepted
    only as False, for old callers). Silent unless given `progress`. Holds the store's writer
    lock, so two builds never delete each other's files.
    """
    from .store import disk_faults, writer_lock

    if clusters:
        raise SjeaError("build_indexes builds indexes only; use sjea_tools.pipeline.index_store for the "
                        "indexes and the cluster tree.")
    check_build_options(kind, metric, params, sample)
    request = {"kind": kind, "budget": parse_memory(memory_budget), "metric": metric, "sample": sample,
               "tune": tune, "rebuild": rebuild, "params": {k: v for k, v in (params or {}).items() if v is not None}}
    store_path = Path(store_path)
    folder = index_dir(store_path)
    with writer_lock(store_path), disk_faults(f"the index folder {folder}"):
        old = read_sidecar_or_none(store_path)
        remove_unused_files(folder, old)  # what a killed build or growth left
        sidecar, changed = _index_all_levels(store_path, old, request, progress)
        if changed:  # the one step that switches readers to the new files
            atomic_write_text(folder / SIDECAR, json.dumps(sidecar, indent=2) + "\n")
            remove_unused_files(folder, sidecar)
    sidecar["path"] = str(folder)
    return sidecar


def check_build_options(kind: str, metric: str, params: dict | None, sample: int) -> None:
    """Refuse unknown kinds and metrics, and index parameters that are not whole numbers >= 1."""
    if metric not in METRICS:
        raise SjeaError(f"unknown metric {metric!r}; choose cosine or inner-product.")
    if kind != "auto" and kind not in KINDS:
        raise SjeaError(f"unknown index kind {kind!r}; choose one of auto, {', '.join(KINDS)}.")
    names = {"nlist": "--nlist", "nprobe": "--nprobe", "m": "--pq-m/--hnsw-m", "nbits": "nbits",
             "ef_construction": "ef_construction", "ef_search": "--ef-search"}
    for key, value in {**(params or {}), "sample": sample}.items():
        if value is None:
            continue
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
        if not ok:
            raise SjeaError(f"{names.get(key, key)} must be a whole number >= 1, not {value!r}.")


def _index_all_levels(store_path: Path, old: dict | None, request: dict,
                      progress: ProgressFn | None) -> tuple[dict, bool]:
    """(the new sidecar, whether it differs from `old` and must be written)."""
    import faiss

    from .store import open_store

    build_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    with open_store(store_path) as store:
        if store.n == 0:
            raise SjeaError(f"{store_path} holds no embeddings yet; run sjea embed first.")
        paths = StoredPaths(store)  # read only where the store's history cannot answer, or for a build
        problem = "no index yet" if old is None else stale_rows(store, old, paths)
        entries = {str(level): _index_level(store, level, dim, old, problem, request, build_id, progress)
                   for level, dim in zip(store.levels, store.dims)}
        built = any(e["action"] in ("built", "rebuilt") for e in entries.values())
        sidecar = {"format": INDEX_FORMAT, "store": store_path.name, "model_id": store.model_id, "n": store.n,
                   "store_fingerprint": store.fingerprint, "metric": request["metric"], "levels": entries,
                   "memory_budget": request["budget"], "sample": request["sample"],
                   "rows": rows_record(store, paths() if built or paths.read else None),
                   "faiss_version": faiss.__version__,
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if old is not None and all(e["action"] == "up to date" for e in entries.values()):
        # Nothing to add; only a rewrite of the same rows (a new fingerprint) needs a new sidecar.
        if old.get("store_fingerprint") == sidecar["store_fingerprint"]:
            return {**old, "levels": entries}, False
    return sidecar, True


def _index_level(store, level: int, dim: int, old: dict | None, problem: str | None, request: dict, build_id: str,
                 progress: ProgressFn | None) -> dict:
    """One level's sidecar entry: kept, grown, or built from all its vectors."""
    action, reason = plan_level(store.n, dim, level, old, problem, request)
    if action == "up to date":
        return {**old["levels"][str(level)], "action": action, "status": "up to date", "added": 0}
    path = index_dir(store.path) / f"level{level}-{build_id}.faiss"
    if action == "grow":
        entry, reason = grow_level(store, level, old, request, path, progress)
        if entry is not None:
            return entry
        action = "rebuilt"
    spec = wanted_spec(store.n, dim, request)
    vectors = prepare(store.read_embeddings(level), request["metric"])
    forced = any(request["params"].get(p) is not None for p in ("nprobe", "ef_search"))
    entry = build_level_file(vectors, spec, path, sample=request["sample"], tune=request["tune"] and not forced,
                             progress=progress, task=f"level {level} {spec['kind']}")
    return {**entry, "action": action, "status": f"{action}: {reason}", "added": 0, "rows_at_build": store.n,
            "search_forced": forced}


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index holds them: L2-normalised for cosine, as stored for inner product."""
    return l2_normalize(vectors) if metric == "cosine" else vectors


def wanted_spec(n: int, dim: int, request: dict) -> dict:
    if request["kind"] == "auto":
        return choose_index(n, dim, request["budget"])
    return explicit_spec(request["kind"], n, dim, **request["params"])


def read_sidecar_or_none(store_path: str | Path) -> dict | None:
    """The sidecar, or None when it is absent or unreadable (a rebuild replaces it anyway)."""
    try:
        return read_sidecar(store_path)
    except SjeaError:
        return None


def index_is_current(store_path: str | Path) -> bool:
    """Whether the index beside a store describes the store as it is now (what load_indexes checks)."""
    from .store import open_store

    sidecar = read_sidecar_or_none(store_path)
    if sidecar is None:
        return False
    with open_store(store_path) as s:
        try:
            check_sidecar(store_path, sidecar, s.model_id, s.n, s.levels, s.fingerprint)
        except SjeaError:
            return False
    folder = index_dir(store_path)
    return all((folder / f).is_file() for e in sidecar["levels"].values() for f in level_files(e))


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


def remove_unused_files(folder: Path, sidecar: dict | None) -> None:
    """Delete the index and probe files the sidecar does not point at (a previous build's, or a
    killed build's) and the temporary files a killed build left (sjea_tools.io names them
    .level*.*.tmp and .index.json.*.tmp). Called under the store's writer lock."""
    levels = sidecar["levels"].values() if sidecar else []
    keep = {f for e in levels for f in level_files(e)} | {e.get("probe") for e in levels}
    if not folder.is_dir():
        return
    for path in [*folder.glob("level*.faiss"), *folder.glob(f"level*{PROBE_SUFFIX}"), *folder.glob(".level*.tmp"),
                 *stale_temp_files(folder / SIDECAR)]:
        if path.name not in keep:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Growth: what decides it, and the adding


# How far recall may drop below the recall the index was built with, where that was already under
# the target (IVF-PQ's ceiling): growth keeps such an index unless it got measurably worse.
RECALL_SLACK = 0.02
# Stored rows whose vectors the sidecar fingerprints (spread over the indexed rows): a spot check.
CHECK_ROWS = 8
# Store attributes that define what the rows are (sjea_tools.store.IDENTITY_ATTRS, with the
# PreprocessSpec spelled as the attributes that hold it).
IDENTITY_KEYS = ("model_id", "levels", "dims", "image_size", "mean", "std", "colour_mode", "normalized", "dtype",
                 "root")
KIND_NAMES = {"flat": "Flat", "hnsw": "HNSW", "ivf-flat": "IVF", "ivf-pq": "IVF-PQ"}
OPTION_NAMES = {"nlist": "--nlist", "nprobe": "--nprobe", "m": "--pq-m/--hnsw-m", "nbits": "nbits",
                "ef_construction": "ef_construction", "ef_search": "--ef-search"}


class StoredPaths:
    """The store's /paths, read on the first call only (reading 200,000 paths costs ~0.2 s: a
    growth that the store's history vouches for never reads them)."""

    def __init__(self, store):
        self.store, self.read, self._paths = store, False, None

    def __call__(self) -> list[str]:
        if not self.read:
            self._paths, self.read = self.store.paths, True
        return self._paths


def rows_record(store, paths: list[str] | None) -> dict:
    """What an index was built on, checkable later without reading the stored vectors (stale_rows).

    First check: the sidecar's `store_fingerprint` and the store's history of versions
    (Store.rows_unchanged_since: --update and compaction keep the earlier versions' rows as the
    first rows, --overwrite and merge start a new history), which costs nothing whatever the rows.
    The rest serves stores without that history (single files written before it, or rewritten
    since): the store's identity attributes (model, levels, preprocessing, root folder), its
    `created` time (kept by --update, renewed by --overwrite and merge), the sha256 of the indexed
    rows' paths in order (any other image set or order changes it; None when this run did not
    read them: a growth the history vouched for) and the sha256 of CHECK_ROWS stored vectors per
    level (a re-embedding of the same names with other pixels or weights changes them).
    """
    rows = check_rows(store.n)
    return {"paths_sha256": None if paths is None else paths_digest(paths, len(paths))[1],
            "created": store.attrs.get("created"), "identity": identity_digest(store.attrs),
            "check_rows": rows.tolist(),
            "check_sha256": {str(lv): vectors_digest(store, lv, rows) for lv in store.levels}}


def paths_digest(paths: list[str], n_first: int) -> tuple[str, str]:
    """(sha256 of the first n_first paths, of all): one pass over the bytes store.strings_sha256
    hashes (each path + NUL), so the full digest equals the /paths checksum of a store written now."""
    from .store import strings_hash

    h = strings_hash(paths[:n_first])
    first = h.hexdigest()
    return first, strings_hash(paths[n_first:], h).hexdigest()


def check_rows(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, CHECK_ROWS).round().astype(np.int64))


def identity_digest(attrs: dict) -> str:
    values = {k: attrs.get(k) for k in IDENTITY_KEYS}
    return sha256_bytes(json.dumps(values, sort_keys=True, default=str).encode())


def vectors_digest(store, level: int, rows: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(store.read_embeddings(level, rows)).tobytes())


def stale_rows(store, old: dict, paths) -> str | None:
    """Why the store's first old["n"] rows are not the rows the index holds, or None if they are.
    The store's history answers in O(1) where it knows the indexed version; otherwise `paths` (a
    callable returning the stored paths, StoredPaths) is read and compared with the record."""
    record, n_old = old.get("rows"), int(old.get("n", 0))
    if record is None:
        return "the index was built by an older sjea that did not record its rows"
    if old.get("model_id") != store.model_id:
        return "the store was written by another model"
    if record["identity"] != identity_digest(store.attrs):
        return "the store's settings changed (levels, dimensions, preprocessing or image folder)"
    if store.n < n_old:
        return f"the store has {store.n:,} rows, fewer than the {n_old:,} indexed"
    unchanged = store.rows_unchanged_since(old.get("store_fingerprint"))
    if unchanged is not None and unchanged != n_old:
        return f"the store's history gives the indexed version {unchanged:,} rows, the index {n_old:,}"
    if unchanged is None:  # no history of the indexed version: compare what the index recorded
        if record["created"] != store.attrs.get("created"):
            return "the store was written anew (--overwrite or merge) since the index was built"
        if record.get("paths_sha256") is None:
            return "the store keeps no history of the version indexed, and the index no digest of its images"
        if paths_digest(paths(), n_old)[0] != record["paths_sha256"]:
            return f"the store's first {n_old:,} rows are not the indexed images in the same order"
    rows = np.asarray(record["check_rows"], dtype=np.int64)
    if any(vectors_digest(store, lv, rows) != record["check_sha256"].get(str(lv)) for lv in store.levels):
        return "the stored vectors of the indexed rows changed"
    return None


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


def grow_level(store, level: int, old: dict, request: dict, path: Path,
               progress: ProgressFn | None) -> tuple[dict | None, str]:
    """Add the store's rows after old["n"] to a level's index and measure recall again, reading
    only the added rows: as a new delta part beside the base while the parts stay within the
    limits (grow_by_part), else folded with every part into the base, written once (fold_level).
    (the new entry, "") or (None, why it must be rebuilt instead)."""
    entry = old["levels"][str(level)]
    if fits_in_part(entry, int(old["n"]), store.n):
        grown = grow_by_part(store, level, old, request, path, progress)
        if grown is not None:
            return grown, ""
    return fold_level(store, level, old, request, path, progress)


def fits_in_part(entry: dict, n_old: int, n: int) -> bool:
    """Whether the rows after the base (earlier parts' and the n - n_old added) stay within the
    delta limits with one more part. Pure."""
    base = int(entry.get("base_rows", n_old))
    return (len(entry.get("parts", [])) < DELTA_MAX_PARTS
            and n - base <= min(DELTA_MAX_SHARE * base, DELTA_MAX_ROWS))


def level_files(entry: dict) -> list[str]:
    """The index files of a level's sidecar entry: its base, then its delta parts in row order."""
    return [entry["file"], *(part["file"] for part in entry.get("parts", []))]


def grow_by_part(store, level: int, old: dict, request: dict, path: Path,
                 progress: ProgressFn | None) -> dict | None:
    """Write the rows after old["n"] as a new exact part (IndexFlatIP: the vectors are prepared
    for inner product as the base's are) beside a level's base, which is neither read nor written,
    and measure the combined recall: the probe's truth and the base's stored answers both merge
    the queries' exact top among the added rows, so the cost follows the rows added (queries x
    added), not the rows stored. The new entry, or None where a fold must decide (files missing,
    a probe too small, recall below the floor)."""
    import faiss

    folder, entry = path.parent, old["levels"][str(level)]
    n_old, n = int(old["n"]), store.n
    t0 = time.perf_counter()
    if not all((folder / f).is_file() for f in level_files(entry)):
        return None
    try:
        probe = with_base_answers(read_probe(folder / entry["probe"]), folder / entry["file"], entry)
    except SjeaError:
        return None
    if probe["ids"].shape[1] < min(10, n):
        return None
    new = prepare(store.read_embeddings(level, np.arange(n_old, n)), request["metric"])
    part = faiss.IndexFlatIP(new.shape[1])
    add_vectors(part, new, progress, f"level {level} delta part +{n - n_old:,}")
    rerank = entry.get("rerank", 1)
    probe = extend_probe(probe, new, n_old, min(n, probe["ids"].shape[1] * rerank))
    recall = probe_recall(probe, rerank, lambda ids: prepare(store.read_embeddings(level, ids), request["metric"]))
    if recall < min(TARGET_RECALL, entry["recall_at_10"] - RECALL_SLACK):
        return None
    parts = entry.get("parts", [])
    record, probe_file = save_part(part, probe, path.with_name(f"{path.stem}.delta{len(parts) + 1}.faiss"), n_old)
    name = {"hnsw": "efSearch", "ivf-flat": "nprobe", "ivf-pq": "nprobe"}.get(entry["kind"])
    return {**entry, "probe": probe_file, "parts": [*parts, record], "base_rows": int(entry.get("base_rows", n_old)),
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
    truth = merge_top_k(probe["ids"], probe["scores"], ids[:, :k], scores[:, :k], k)
    found = merge_top_k(probe["found_ids"], probe["found_scores"], ids, scores, width)
    return {**probe, "ids": truth[0], "scores": truth[1].astype(np.float32), "found_ids": found[0],
            "found_scores": found[1].astype(np.float32)}


def probe_recall(probe: dict, rerank: int, get_rows) -> float:
    """recall@k of the index's stored answers against the probe's truth, re-scored exactly from
    the stored vectors where the index is compressed (what search does)."""
    k = probe["ids"].shape[1]
    found = probe["found_ids"]
    if rerank > 1:
        found, _ = exact_rerank(probe["queries"], found, get_rows, k)
    return recall_at_k(found, probe["ids"])


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


def add_vectors(index, vectors: np.ndarray, progress: ProgressFn | None, task: str, chunk: int = 50_000) -> None:
    added = Counter(progress, task, len(vectors))
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))
        added.advance(min(chunk, len(vectors) - start))


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
    ids, scores = merge_top_k(probe["ids"], probe["scores"], ids + n_old, scores, k)
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


def merge_top_k(ids_a, scores_a, ids_b, scores_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (q, *) candidate lists by score; ties keep the first list's (lower) ids."""
    return best_k(np.concatenate([ids_a, ids_b], 1), np.concatenate([scores_a, scores_b], 1), k)


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


def read_probe(path: Path) -> dict:
    try:
        with np.load(path) as f:
            return {name: f[name] for name in (*PROBE_KEYS, *ANSWER_KEYS) if name in PROBE_KEYS or name in f.files}
    except (OSError, ValueError, KeyError) as e:
        raise SjeaError(f"{path} is unreadable ({str(e)[:80]}); rebuild the index with: sjea index "
                        f"{str(path.parent)[:-len('.index')]} --rebuild") from None


def check_sidecar(store_path: str | Path, sidecar: dict | None, model_id: str, n: int, levels,
                  fingerprint: str | None = None) -> dict:
    """Refuse an index that does not describe the store as it is now; the message gives the fix.
    Every store write records a new fingerprint and the sidecar the one it was built from, so a
    store rewritten with the same model and row count is still caught."""
    fix = f"rebuild it with: sjea index {store_path}"
    if sidecar is None:
        raise SjeaError(f"{store_path} has no FAISS index yet; build it with: sjea index {store_path}")
    if sidecar.get("format") != INDEX_FORMAT:
        raise SjeaError(f"the index of {store_path} has an unknown format; {fix}")
    if sidecar["model_id"] != model_id:
        raise SjeaError(f"the index of {store_path} was built for another model "
                        f"({sidecar['model_id'][:12]}, store has {model_id[:12]}); {fix}")
    if fingerprint is not None and sidecar.get("store_fingerprint") != fingerprint:
        raise SjeaError(f"the index of {store_path} is stale: it was built from an earlier version of the store "
                        f"(rewritten since); {fix}")
    if sidecar["n"] != n:
        raise SjeaError(f"the index of {store_path} is stale: built for {sidecar['n']} rows, the store now "
                        f"has {n}; {fix}")
    missing = [lv for lv in levels if str(lv) not in sidecar["levels"]]
    if missing:
        raise SjeaError(f"the index of {store_path} lacks level(s) {missing}; {fix}")
    return sidecar


def read_faiss(path: Path, mmap: bool | None = None):
    """faiss.read_index, memory-mapped (read-only, zero-copy) for files over MMAP_MIN_BYTES."""
    import faiss

    if mmap is None:
        mmap = path.stat().st_size >= MMAP_MIN_BYTES
    flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise SjeaError(f"{path} is not a readable FAISS index ({str(e).splitlines()[0][:80]}); "
                        f"rebuild it with: sjea index {str(path.parent)[:-len('.index')]}") from None


def load_indexes(store_path: str | Path, model_id: str, n: int, levels, mmap: bool | None = None,
                 fingerprint: str | None = None) -> dict:
    """{level: faiss index} for a store whose model id and row count are given; stale -> SjeaError.
    A level with delta parts gets a PartedIndex (base and parts searched as one); the base is
    memory-mapped when large, the parts (small) are read. The store's fingerprint is read from the
    store unless given."""
    if fingerprint is None:
        from .store import open_store

        with open_store(store_path) as s:
            fingerprint = s.fingerprint
    sidecar = check_sidecar(store_path, read_sidecar(store_path), model_id, n, levels, fingerprint)
    folder = index_dir(store_path)
    out = {}
    for level in levels:
        entry = sidecar["levels"][str(level)]
        index = read_faiss(existing(folder / entry["file"], store_path), mmap)
        set_search_params(index, entry["search_params"])
        if entry.get("parts"):
            index = PartedIndex(index, [read_faiss(existing(folder / part["file"], store_path), mmap=False)
                                        for part in entry["parts"]])
            check_parts(index, entry, folder, store_path)
        if index.ntotal != n:
            raise SjeaError(f"{folder / entry['file']} holds {index.ntotal} vectors, the store {n}; rebuild with: "
                            f"sjea index {store_path}")
        out[level] = index
    return out


def existing(path: Path, store_path) -> Path:
    if not path.is_file():
        raise SjeaError(f"{path} is missing; rebuild the index with: sjea index {store_path}")
    return path


def check_parts(index: "PartedIndex", entry: dict, folder: Path, store_path) -> None:
    """Refuse parts whose rows are not the ones the sidecar records (the ids would be off)."""
    for (part, first), record in zip(index.parts, entry["parts"]):
        if first != record["first_row"] or part.ntotal != record["rows"]:
            raise SjeaError(f"{folder / record['file']} holds rows {first:,}+{part.ntotal:,}, the sidecar records "
                            f"{record['first_row']:,}+{record['rows']:,}; rebuild with: sjea index {store_path}")


class PartedIndex:
    """A level's base index and its delta parts searched as one: each is searched for its own
    top k (the parts exactly), ids offset by the rows before it, and the lists merged by score
    (merge_top_k: ties keep the lower id, as a single index holding every row would). Anything
    else (d, efSearch, the HNSW graph, ...) is the base's."""

    def __init__(self, base, parts: list):
        self.base, self.parts = base, []
        first = int(base.ntotal)
        for part in parts:
            self.parts.append((part, first))
            first += int(part.ntotal)
        self.ntotal = first

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (q, k) as faiss returns them."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        scores, ids = self.base.search(x, min(k, self.base.ntotal))
        for part, first in self.parts:
            s, i = part.search(x, min(k, part.ntotal))
            ids, scores = merge_top_k(ids, scores, np.where(i >= 0, i + first, -1), s, k)
        return scores, ids

    def __getattr__(self, name: str):
        if name in ("base", "parts"):  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.base, name)
