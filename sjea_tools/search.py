"""Search a store: per level, or hierarchically (inside the query's coarse cluster, ranked by the fine level).

Pure, on arrays (the evaluation uses it; exact top-k by cosine is vectors.cosine_top_k):
    hierarchical_search(queries, bases, k, order)            cluster-gated search (sjea_tools.hierarchy)
On a store (`sjea search` calls this):
    search_store(store_path, queries=[image files or folders], ids=[rows], k, mode, level, ...)
Every search returns (scores, ids), FAISS's order. The indexes are reached through one handle,
index.open_indexes: opened once per store version, then `handle.search` per level and query batch.

Scores are always exact, computed from the stored vectors (cosines for a cosine index, raw inner
products for an inner-product one): an approximate index only proposes candidates (PQ proposes 4x
more), so a reported score is never an approximation.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import SjeaError
from .filters import RowFilter, parent_folder
from .index import open_indexes
from .levels import parse_levels
from .hierarchy import WITHIN, check_margin
from .vectors import exact_scores, l2_normalize

MODES = ("per-level", "hierarchical", "both")
# Chosen by benchmarks/bench_hierarchical.py and bench_hierarchical_scale.py (docs/search.md): the mode
# that measured best. On the trained default model's whitened rows no hierarchical variant (hard or soft
# gate, boundary rows, mixed re-rank, spread order) beat the fine level alone on fine P@10 by more than
# the draw of queries (the closest, mixed re-rank: +0.04, paired bootstrap interval -0.15 to +0.23), and
# at 1M rows the hierarchical gates ran slower than IVF-Flat at the same recall, so the default is per-level.
DEFAULT_MODE = "per-level"
DEFAULT_WITHIN = "score"
STORE_SUFFIXES = (".h5", ".hdf5")


def check_order(order, levels: int | list[int]) -> list[int] | None:
    """The levels a hierarchical search uses, coarse first (2 or more, each once); None = measured."""
    if order is None:
        return None
    have = list(range(levels)) if isinstance(levels, int) else list(levels)
    return parse_levels(order, have, option="--order", ordered=True, min_count=2)


def hierarchical_search(queries: list[np.ndarray], bases: list[np.ndarray], k: int, order: list[int] | None = None,
                        probes: int = 1, within: str = DEFAULT_WITHIN, seed: int = 0,
                        sizes: list[int] | None = None, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster-gated search (sjea_tools.hierarchy) on in-memory features of every level.

    queries[l] (q, d_l) and bases[l] (n, d_l). Builds the cluster tree over the levels of `order`
    (coarse first; default: measured by `clusters.coarse_order`), then searches inside each
    query's coarse cluster. Returns each hit's cosine at every level, scores (q, k, levels) (-inf
    for padding), and ids (q, k) (-1 padded).
    """
    from .clusters import build_tree, coarse_order, default_sizes

    if k <= 0:
        raise SjeaError(f"k must be at least 1, not {k}.")
    unit_b = [l2_normalize(b) for b in bases]
    unit_q = [l2_normalize(q) for q in queries]
    n = len(unit_b[0])
    sizes = sizes or default_sizes(n, len(bases))
    order = check_order(order, len(bases)) or coarse_order(unit_b, sizes[0], seed=seed)[0]
    tree = build_tree([unit_b[i] for i in order], sizes[:len(order)], seed=seed)
    got, scores = gated_hits(unit_q, lambda j, rows: unit_b[j][rows], tree, order, min(k, n), probes, within,
                             margin)
    return scores, got["ids"]


def gated_hits(qv: list[np.ndarray], get_rows, tree: dict, pos: list[int], k: int, probes: int,
               within: str, margin: float = 0.0) -> tuple[dict, np.ndarray]:
    """hierarchy.gated_search down the tree over the levels at positions `pos` of qv (coarse first),
    ranked by the last, and each hit's exact score at every level: (what gated_search returns,
    scores (q, k, len(qv)), -inf for padding). get_rows(j, sorted rows) -> level j's vectors."""
    from .hierarchy import gated_search

    got = gated_search([qv[j] for j in pos], lambda rows: get_rows(pos[-1], rows), tree, k, probes, within, margin)
    scores = np.stack([exact_scores(qv[j], got["ids"], lambda rows, j=j: get_rows(j, rows)) for j in range(len(qv))],
                      axis=2)
    return got, scores


# --------------------------------------------------------------------------------------------
# On a store


def find_store(store: str | Path | None, folder: Path = Path(".")) -> tuple[Path, str | None]:
    """The store given, else the newest .h5/.hdf5 file in the folder (with a note saying which)."""
    if store is not None:
        return Path(store), None
    found = sorted((p for p in Path(folder).iterdir() if p.suffix.lower() in STORE_SUFFIXES and p.is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise SjeaError(f"no store (.h5) in {Path(folder).resolve()}; pass --store STORE.h5 or create one with "
                        "'sjea embed IMAGES OUT.h5'.")
    return found[0], f"using store {found[0]} (the newest in this folder; pass --store to choose)"


def expand_queries(queries) -> list[Path]:
    """Image files as given; folders become the images inside them (sorted)."""
    from .data.datasets import scan_images

    out: list[Path] = []
    for q in queries:
        p = Path(q)
        if p.is_dir():
            found = scan_images(p)
            if not found:
                raise SjeaError(f"query folder {p} holds no images; pass image files, a folder of images, or --id N.")
            out.extend(p / f for f in found)
        elif p.is_file():
            out.append(p)
        else:
            raise SjeaError(f"query {p} does not exist; pass image files, a folder of images, or --id N.")
    return out


def check_options(k: int, mode: str | None, level, levels: list[int], probes: int = 1, within: str = "score",
                  min_score: float | None = None, cosine: bool = True, margin: float = 0.0) -> tuple[str, list[int]]:
    """(mode, levels a per-level search visits); `level` is a levels spec (sjea_tools.levels)."""
    if k <= 0:
        raise SjeaError(f"--k must be at least 1, not {k}.")
    if probes <= 0:
        raise SjeaError(f"--probes must be at least 1 (coarse clusters the answer may come from), not {probes}.")
    check_margin(margin)
    if within not in WITHIN:
        raise SjeaError(f"--within must be one of {', '.join(WITHIN)}, not '{within}'.")
    check_min_score(min_score, cosine)
    chosen = None if level is None else parse_levels(level, levels)
    if mode is None:
        mode = "per-level" if chosen is not None or len(levels) < 2 else DEFAULT_MODE
    if mode not in MODES:
        raise SjeaError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'.")
    if mode != "per-level" and len(levels) < 2:
        raise SjeaError(f"--mode {mode} needs a store with 2 or more levels; this one has {levels}: use --mode per-level.")
    if mode != "per-level" and chosen is not None:
        raise SjeaError("--level picks the levels of --mode per-level; leave it out for hierarchical search "
                        "(its levels are the cluster tree's: sjea clusters STORE --order ...).")
    return mode, levels if chosen is None else chosen


def check_min_score(min_score: float | None, cosine: bool) -> None:
    if min_score is None:
        return
    if not np.isfinite(min_score) or (cosine and not -1 <= min_score <= 1):
        raise SjeaError(f"--min-score must be a cosine from -1 to 1, not {min_score}; see docs/search.md for "
                        "what scores mean.")


def search_store(store_path=None, queries=(), ids=(), k: int = 10, mode: str | None = None, level=None,
                 order=None, probes: int = 1, within: str = DEFAULT_WITHIN, min_score: float | None = None,
                 embedder=None, mmap: bool | None = None, row_filter: RowFilter | None = None,
                 margin: float = 0.0) -> dict:
    """Search a store with image files/folders (`queries`) and/or stored rows (`ids`).

    mode: "per-level" (each level's own top k; `level` picks levels: 1, "0,1", [0, 1], "all"),
    "hierarchical" (inside the query's coarse cluster(s) of the store's cluster tree, see
    sjea_tools.hierarchy; `order` e.g. "1,0" must match the tree's), or "both"; default DEFAULT_MODE
    with 2+ levels. Hits scoring below `min_score` are left out. Returns {"store", "notes", "k",
    "mode", "levels", "order", "root", "results": [{"query", "per_level": {level: hits},
    "hierarchical": hits, "cluster_path", "gate"}]} where a hit is {"rank", "id", "path", "score"}
    (+ "scores" by level and "group", its cluster per tree level, in hierarchical). `row_filter`
    (filters.RowFilter): hits only from the rows it allows, still the true top k among them.
    """
    from .store import open_store

    path, note = find_store(store_path)
    if not queries and not ids:
        raise SjeaError("nothing to search for: pass image files, a folder of images, or --id N.")
    with open_store(path) as store:
        indexes = open_indexes(path)
        mode, used, wanted = resolve_request(k, mode, level, order, store.levels, probes, within, min_score,
                                             indexes.cosine, margin)
        tree = hierarchy_tree(store, path, wanted) if mode != "per-level" else None
        with ThreadPoolExecutor(1) as pool:  # FAISS reads its files while the queries are embedded
            loading = pool.submit(indexes.load, store.model_id, store.n, used, mmap=mmap) \
                if mode != "hierarchical" else None
            labels, qv = query_vectors(store, path, ids, queries, embedder)
            if loading is not None:
                loading.result()
        return search_open_store(store, path, labels, qv, indexes=indexes, tree=tree,
                                 paths=store.paths, k=k, mode=mode, used=used, probes=probes, within=within,
                                 min_score=min_score, notes=[note] if note else [], row_filter=row_filter,
                                 margin=margin)


def resolve_request(k: int, mode: str | None, level, order, levels: list[int], probes: int, within: str,
                    min_score: float | None, cosine: bool,
                    margin: float = 0.0) -> tuple[str, list[int], list[int] | None]:
    """Every option check of a search: (mode, levels a per-level search visits, the hierarchical
    order asked for or None for the tree's measured one)."""
    if order is not None and mode is None and level is None:
        mode = "hierarchical"  # --order implies it, as --level implies per-level
    mode, used = check_options(k, mode, level, levels, probes, within, min_score, cosine, margin)
    if order is not None and mode == "per-level":
        raise SjeaError("--order sets the levels of hierarchical search; use it with --mode hierarchical or both.")
    return mode, used, (check_order(order, levels) if mode != "per-level" else None)


# A store written before centring (or by a model without means) keeps working, with raw cosines.
UNCENTRED_NOTE = ("scores are uncentred cosines (the store was written before centring): a random pair scores "
                  "well above 0; for centred scores embed again with a centred model (docs/search.md, Scores)")


def search_open_store(store, path: Path, labels: list[dict], qv: list[np.ndarray], *, indexes, tree: dict | None,
                      paths: list[str], k: int, mode: str, used: list[int], probes: int, within: str,
                      min_score: float | None, notes: list[str], row_filter: RowFilter | None = None,
                      get_rows=None, prepared: bool = False, margin: float = 0.0) -> dict:
    """The search itself, on an open store with its index handle (index.open_indexes, the levels
    searched loaded) and tree at hand: `search_store` opens them per call, `sjea serve` once per
    store version; both answer through this function. get_rows(j, sorted rows) -> level j's
    prepared vectors (default: read from `store`, StoredRows); prepared: qv is prepared already."""
    levels, n = store.levels, store.n
    centred = store.centres is not None
    if store.normalized and not centred and UNCENTRED_NOTE not in notes:
        notes.append(UNCENTRED_NOTE)
    if k > n:
        notes.append(f"k={k} is larger than the store ({n} rows): showing all {n}")
        k = n
    if not prepared:
        qv = [indexes.prepare(v) for v in qv]
    get_rows = get_rows or StoredRows(store, indexes)
    searcher = Searcher(indexes, qv, levels, get_rows, paths)
    results = [dict(lab) for lab in labels]
    masks = filter_masks(row_filter, store, paths, results)
    if masks is not None:
        allowed = sorted({int(m.sum()) for m in masks})
        notes.append(f"filter {' and '.join(row_filter.describe())} allows {allowed[0]:,}"
                     f"{f' to {allowed[-1]:,}' if len(allowed) > 1 else ''} of {n:,} rows")
    if mode in ("per-level", "both"):
        for r, hits in zip(results, searcher.per_level(used, k, masks)):
            r["per_level"] = {lv: keep_above(h, min_score) for lv, h in hits.items()}
    tree_levels = None
    if tree is not None:
        tree_levels = [int(v) for v in np.atleast_1d(tree["attrs"]["levels"])]
        for r, (hits, cp, gate) in zip(results, searcher.hierarchical(tree, tree_levels, k, probes, within, masks,
                                                                         margin)):
            r.update(hierarchical=keep_above(hits, min_score), cluster_path=cp, gate=gate)
    return {"store": str(path), "root": store.root, "n": n, "model_id": store.model_id, "k": k, "mode": mode,
            "levels": used if mode == "per-level" else levels, "order": tree_levels, "within": within
            if tree is not None else None, "probes": probes if tree is not None else None,
            "margin": margin if tree is not None else None,
            "min_score": min_score, "where": row_filter.describe() if row_filter else [], "notes": notes,
            "metric": score_metric(store), "results": results}


def score_metric(store) -> str:
    """What a store's scores are: whitened or centred cosines, plain cosines (written before
    centring) or inner products (--no-normalize)."""
    if not store.normalized:
        return "inner product"
    if store.centres is None:
        return "cosine"
    return "whitened cosine" if store.whitening_digests is not None else "centred cosine"


class StoredRows:
    """get_rows(j, sorted rows) of search_open_store read from an open store: a few rows are read
    as asked (h5py fancy reads, ~ms each), but once one read asks for FULL_READ_SHARE of a
    level (a batch of many queries) the whole level is read once (one contiguous read) and kept
    for the call; only the rows asked for are prepared (normalising all of 100,000 x 768 took 0.8 s)."""

    FULL_READ_SHARE = 1 / 16

    def __init__(self, store, indexes):
        self.store, self.indexes, self.whole = store, indexes, {}

    def __call__(self, j: int, rows: np.ndarray) -> np.ndarray:
        if j not in self.whole:
            level = self.store.levels[j]
            if len(rows) < self.FULL_READ_SHARE * self.store.n:
                return self.indexes.prepare(self.store.read_embeddings(level, rows))
            self.whole[j] = self.store.read_embeddings(level)
        return self.indexes.prepare(self.whole[j][rows])


def keep_above(hits: list[dict], min_score: float | None) -> list[dict]:
    return hits if min_score is None else [h for h in hits if h["score"] >= min_score]


def hierarchy_tree(store, path: Path, wanted: list[int] | None) -> dict:
    """The store's cluster tree, required by hierarchical search, in the level order asked for."""
    from .clusters import read_tree

    tree, why = read_tree(store)
    if tree is None:
        raise SjeaError(f"hierarchical search needs the store's cluster tree: {why.split('; ', 1)[0]}; build it "
                        f"with: sjea clusters {path} --rebuild (or search with --mode per-level).")
    have = [int(v) for v in np.atleast_1d(tree["attrs"]["levels"])]
    if len(have) < 2:
        raise SjeaError(f"the cluster tree of {path} covers one level ({have}); rebuild it over two or more: "
                        f"sjea clusters {path} --rebuild")
    if wanted is not None and wanted != have:
        raise SjeaError(f"the cluster tree of {path} goes {' > '.join(map(str, have))} (coarse first, measured); "
                        f"to search {' > '.join(map(str, wanted))} rebuild it: sjea clusters {path} --order "
                        f"{','.join(map(str, wanted))}")
    return tree


def query_vectors(store, path: Path, ids, queries, embedder=None) -> tuple[list[dict], list[np.ndarray]]:
    """(a label per query, a (q, d) float32 array per store level): stored rows `ids` first, then
    the images of `queries` embedded with the store's own model."""
    n, levels = store.n, store.levels
    labels: list[dict] = []
    per_level: list[list[np.ndarray]] = [[] for _ in levels]
    for i in ids:
        if not 0 <= int(i) < n:
            raise SjeaError(f"--id {i} is out of range: the store has rows 0..{n - 1}.")
        for j, lv in enumerate(levels):
            per_level[j].append(check_finite_row(store.read_embeddings(lv, [int(i)]), int(i), lv, path))
        labels.append({"query": f"id:{int(i)}", "query_id": int(i),
                       "query_file": str(Path(store.root) / store.paths[int(i)])})
    files = expand_queries(queries)
    if files:
        emb = query_embedder(store, path, embedder)
        vecs = emb.embed_files(files)  # the decode + preprocess the store used (JPEG draft too)
        for j, lv in enumerate(levels):
            per_level[j].append(vecs[emb.levels.index(lv)])
        labels.extend({"query": str(p), "query_id": None, "query_file": str(p.resolve())} for p in files)
    return labels, [np.concatenate(v).astype(np.float32) for v in per_level]


def check_finite_row(row: np.ndarray, i: int, level: int, path) -> np.ndarray:
    """A stored row used as a query, or the one-line error of a damaged store."""
    if not np.isfinite(row).all():
        raise SjeaError(f"row {i} of {path} holds non-finite values at level {level}: the store is "
                        f"damaged; 'sjea verify {path}' lists such rows; re-embed its images.")
    return row


def query_embedder(store, path: Path, embedder=None):
    """The embedder for query images: the one given, else the store's own model; another model is refused."""
    from .embed import Embedder

    emb = embedder or Embedder.for_store(store)
    if emb.model_id != store.model_id:
        raise SjeaError(f"the query model ({emb.model_id[:12]}) is not the model that wrote {path} "
                        f"({store.model_id[:12]}); search with the store's own model, or re-embed the "
                        "images with this one into a new file: sjea embed IMAGES NEW.h5 --run RUN")
    missing = [lv for lv in store.levels if lv not in emb.levels]
    if missing:
        raise SjeaError(f"the query model lacks level(s) {missing} of {path}; use the model that wrote it.")
    return emb.in_space_of(store)  # the store's normalisation and centring means, whoever loaded the model


class Searcher:
    """The index handle and stored vectors of one open store, searched with prepared query vectors
    qv[j] (one array per store level j); hits are dicts ready for the result."""

    def __init__(self, indexes, qv: list[np.ndarray], levels: list[int], get_rows, paths: list[str]):
        self.indexes, self.qv, self.levels, self.get_rows, self.paths = indexes, qv, levels, get_rows, paths

    def per_level(self, used: list[int], k: int, masks: list[np.ndarray] | None = None) -> list[dict]:
        """Per query: {level: hits} for each level of `used`; masks: the rows each query may return."""
        out: list[dict] = [{} for _ in self.qv[0]]
        for lv in used:
            hit_scores, hit_ids = self.level_top_k(lv, k, masks)
            for r, hid, hsc in zip(out, hit_ids, hit_scores):
                # a non-finite stored row (a damaged store: sjea verify says which) is never a hit
                keep = [(h, s) for h, s in zip(hid, hsc) if h >= 0 and np.isfinite(s)]
                r[str(lv)] = [{"rank": i + 1, "id": int(h), "path": self.paths[h], "score": float(s)}
                              for i, (h, s) in enumerate(keep)]
        return out

    def level_top_k(self, lv: int, k: int, masks: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        j = self.levels.index(lv)

        def rows_of(rows):
            return self.get_rows(j, rows)

        if masks is None:
            return self.indexes.search(lv, self.qv[j], k, rows_of)
        scores = np.full((len(self.qv[j]), k), -np.inf, np.float32)
        ids = np.full((len(self.qv[j]), k), -1, np.int64)
        for mask, qs in mask_groups(masks):
            scores[qs], ids[qs] = self.indexes.search(lv, self.qv[j][qs], k, rows_of, mask=mask)
        return scores, ids

    def hierarchical(self, tree: dict, tree_levels: list[int], k: int, probes: int, within: str,
                     masks: list[np.ndarray] | None = None,
                     margin: float = 0.0) -> list[tuple[list[dict], list[int], dict]]:
        """Per query: (hits of the gated search, scored at every level; its cluster path; its gate);
        with masks, each query's gate and hits hold only the rows it may return."""
        if masks is None:
            return self.gated(tree, tree_levels, k, probes, within, margin)
        out: list = [None] * len(self.qv[0])
        for mask, qs in mask_groups(masks):
            sub = Searcher(self.indexes, [v[qs] for v in self.qv], self.levels, self.get_rows, self.paths)
            for qi, got in zip(qs, sub.gated(filtered_tree(tree, mask), tree_levels, k, probes, within, margin)):
                out[qi] = got
        return out

    def gated(self, tree: dict, tree_levels: list[int], k: int, probes: int,
              within: str, margin: float = 0.0) -> list[tuple[list[dict], list[int], dict]]:
        pos = [self.levels.index(lv) for lv in tree_levels]
        got, scores = gated_hits(self.qv, self.get_rows, tree, pos, k, probes, within, margin)
        ids = got["ids"]
        out = []
        for qi in range(len(ids)):
            hits = [{"rank": i + 1, "id": int(h), "path": self.paths[h], "score": float(scores[qi, i, pos[-1]]),
                     "scores": {str(lv): float(scores[qi, i, j]) for j, lv in enumerate(self.levels)},
                     "group": [int(c) for c in got["nodes"][qi, i]]}
                    for i, h in enumerate(ids[qi]) if h >= 0]
            gate = {"clusters": list(got["gate"][qi]), "rows": int(got["gate_rows"][qi])}
            out.append((hits, [int(c) for c in got["path"][qi]], gate))
        return out


# --------------------------------------------------------------------------------------------
# Filtered search (sjea_tools.filters.RowFilter)


def filter_masks(row_filter: RowFilter | None, store, paths: list[str], results: list[dict]) -> list | None:
    """Per query, the (n,) bool mask of rows it may return; None without a filter. The store's
    labels are read only for a label clause."""
    if not row_filter:
        return None
    needs_labels = any(key == "label" for key, _ in row_filter.clauses)
    labels, names = (store.labels, store.label_names) if needs_labels else (None, None)
    base = row_filter.base_mask(paths, labels, names)
    if not row_filter.exclude_same_folder:
        return [base] * len(results)
    folders = [parent_folder(p) for p in paths]
    return row_filter.query_masks(base, folders, [query_folder(r, paths, store.root) for r in results])


def query_folder(result: dict, paths: list[str], root) -> str | None:
    """The store-relative folder a query comes from: its row's, or its file's when under the root."""
    if result.get("query_id") is not None:
        return parent_folder(paths[result["query_id"]])
    try:
        rel = Path(result["query_file"]).resolve().relative_to(Path(root).resolve())
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return parent_folder(rel.as_posix())


def mask_groups(masks: list[np.ndarray]) -> list[tuple[np.ndarray, list[int]]]:
    """(mask, the queries that share it): queries of one folder share one array, searched together."""
    groups: dict[int, tuple[np.ndarray, list[int]]] = {}
    for qi, m in enumerate(masks):
        groups.setdefault(id(m), (m, []))[1].append(qi)
    return list(groups.values())


def filtered_tree(tree: dict, mask: np.ndarray) -> dict:
    """The cluster tree as hierarchy.gated_search sees it when only `mask`'s rows exist: coarse
    cluster members and sizes count allowed rows, so the gate widens until it holds k of them."""
    assign0 = tree["assign"][:, 0]
    rows = np.flatnonzero(mask)
    rows = rows[np.argsort(assign0[rows], kind="stable")]
    starts = np.searchsorted(assign0[rows], np.arange(len(tree["size_0"]) + 1))
    return {**tree, "members_0": (rows, starts), "size_0": np.diff(starts)}
