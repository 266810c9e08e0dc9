"""Search a store: per level, or hierarchically (candidates from one level, re-ranked by the next).

Pure, on arrays (the evaluation uses these):
    cosine_top_k(queries, base, k)                           exact top-k by cosine
    hierarchical_search(queries, bases, k, factor, order)    the funnel over in-memory features
On a store (`sjea search` calls this):
    search_store(store_path, queries=[image files or folders], ids=[rows], k, mode, level, ...)

Scores are always exact, computed from the stored vectors (cosines for a cosine index, raw inner
products for an inner-product one): an approximate index only proposes candidates (PQ proposes 4x
more), so a reported score is never an approximation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SjeaError
from .index import load_indexes, read_sidecar
from .levels import parse_levels
from .vectors import exact_rerank, exact_scores, l2_normalize

MODES = ("per-level", "hierarchical", "both")
DEFAULT_FACTOR = 10
STORE_SUFFIXES = (".h5", ".hdf5")


SIMILARITY_BLOCK = 1 << 25  # floats of work arrays per chunk of queries (128 MiB of float32)


def query_chunks(n_queries: int, floats_per_query: int) -> list[slice]:
    """Slices of queries small enough that one chunk's work arrays stay under SIMILARITY_BLOCK."""
    size = max(1, SIMILARITY_BLOCK // max(1, floats_per_query))
    return [slice(start, start + size) for start in range(0, n_queries, size)]


def _in_chunks(fn, n_queries: int, floats_per_query: int):
    """Run fn(slice) over query chunks and concatenate its (ids, scores): memory stays bounded
    whatever the number of queries."""
    parts = [fn(c) for c in query_chunks(n_queries, floats_per_query)]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cosine_top_k(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids and cosine scores (q, k) of each query against base (n, d)."""
    q, b = l2_normalize(queries), l2_normalize(base)
    return _in_chunks(lambda c: _cosine_top_k(q[c], b, k), len(q), len(b))


def _cosine_top_k(q: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(b))
    sims = q @ b.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(b) else np.tile(np.arange(len(b)), (len(q), 1))
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
    ids = np.take_along_axis(top, order, 1)
    return ids, np.take_along_axis(sims, ids, 1)


def stage_sizes(k: int, factor: float, stages: int, n: int) -> list[int]:
    """Candidates kept after each stage: factor*k first, shrinking geometrically to k at the last."""
    if stages == 1:
        return [min(n, k)]
    sizes = [int(round(k * factor ** ((stages - 1 - i) / (stages - 1)))) for i in range(stages)]
    return [max(k, min(n, s)) if i < stages - 1 else min(n, k) for i, s in enumerate(sizes)]


def check_order(order, levels: int | list[int]) -> list[int]:
    """The levels a hierarchical search visits, in that order (2 or more, each once). Default: top
    level first, re-ranked down to level 0.

    Measured on Fashion-MNIST (docs/reproduction.md): the stacked level is the relatively coarser
    one (its fine-class precision@10 falls about three times as much as its coarse one), and
    candidates from level 1 re-ranked by level 0 beat the reverse order on coarse and fine labels.
    """
    have = list(range(levels)) if isinstance(levels, int) else list(levels)
    if order is None:
        order = have[::-1]
    return parse_levels(order, have, option="--order", ordered=True, min_count=2)


def funnel(queries: list[np.ndarray], first: np.ndarray, get_rows, k: int, factor: float, order: list[int],
           n: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids `first` (q, m) by each level of order[1:], then score the k kept at every level.

    queries[level] are unit query vectors; get_rows(level, sorted ids) -> unit stored vectors.
    """
    sizes = stage_sizes(k, factor, len(order), n)
    ids = first
    for level, keep in zip(order[1:], sizes[1:]):
        ids, _ = exact_rerank(queries[level], ids, lambda rows, lv=level: get_rows(lv, rows), keep)
    scores = np.stack([exact_scores(queries[lv], ids, lambda rows, lv=lv: get_rows(lv, rows))
                       for lv in range(len(queries))], axis=2)
    return ids, scores


def hierarchical_search(queries: list[np.ndarray], bases: list[np.ndarray], k: int, factor: float = DEFAULT_FACTOR,
                        order: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coarse-to-fine search on in-memory features of every level (default order: top level first).

    queries[l] (q, d_l) and bases[l] (n, d_l) for each level l. Takes the exact top factor*k by
    cosine at level order[0], re-ranks them by order[1], ... (keeping geometrically fewer, k at the
    last). Returns ids (q, k) and the cosine of each hit at every level, scores (q, k, levels).
    """
    if k <= 0:
        raise SjeaError(f"k must be at least 1, not {k}.")
    if factor < 1:
        raise SjeaError(f"--factor must be at least 1, not {factor}.")
    order = check_order(order, len(bases))
    n = len(bases[0])
    unit_q = [l2_normalize(q) for q in queries]
    unit_b = [l2_normalize(b) for b in bases]
    m = stage_sizes(k, factor, len(order), n)[0]

    def search(c: slice):
        chunk = [q[c] for q in unit_q]
        first, _ = _cosine_top_k(chunk[order[0]], unit_b[order[0]], m)
        return funnel(chunk, first, lambda lv, rows: unit_b[lv][rows], k, factor, order, n)

    # Per query: its similarities to every row, then its m candidates' vectors when re-ranking.
    return _in_chunks(search, len(unit_q[0]), max(n, m * max(b.shape[1] for b in unit_b)))


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


def decode_queries(paths: list[Path]) -> list:
    from .data.images import decode_image, describe_error

    images = []
    for p in paths:
        try:
            images.append(decode_image(p))
        except Exception as e:  # noqa: BLE001 - any decoder failure is the same user error
            raise SjeaError(f"query {p} is not a readable image ({describe_error(e)}); pass an image file "
                            "(jpg, png, ...), a folder of images, or --id N.") from None
    return images


def check_options(k: int, mode: str | None, level, levels: list[int], factor: float) -> tuple[str, list[int]]:
    """(mode, levels a per-level search visits); `level` is a levels spec (sjea_tools.levels)."""
    if k <= 0:
        raise SjeaError(f"--k must be at least 1, not {k}.")
    if factor < 1:
        raise SjeaError(f"--factor must be at least 1, not {factor}.")
    chosen = None if level is None else parse_levels(level, levels)
    if mode is None:
        mode = "per-level" if chosen is not None or len(levels) < 2 else "hierarchical"
    if mode not in MODES:
        raise SjeaError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'.")
    if mode != "per-level" and len(levels) < 2:
        raise SjeaError(f"--mode {mode} needs a store with 2 or more levels; this one has {levels}: use --mode per-level.")
    if mode != "per-level" and chosen is not None:
        raise SjeaError("--level picks the levels of --mode per-level; leave it out for hierarchical search "
                        "(choose its levels with --order).")
    return mode, levels if chosen is None else chosen


def search_store(store_path=None, queries=(), ids=(), k: int = 10, mode: str | None = None, level=None,
                 factor: float = DEFAULT_FACTOR, order=None, embedder=None, mmap: bool | None = None) -> dict:
    """Search a store with image files/folders (`queries`) and/or stored rows (`ids`).

    mode: "per-level" (each level's own top k; `level` picks levels: 1, "0,1", [0, 1], "all"),
    "hierarchical" (default with 2+ levels; `order` e.g. "1,0" or [1, 0]), or "both". Returns
    {"store", "notes", "k", "mode", "levels", "order", "factor", "root",
    "results": [{"query", "per_level": {level: hits}, "hierarchical": hits, "cluster_path"}]}
    where a hit is {"rank", "id", "path", "score"} (+ "scores" by level in hierarchical).
    """
    from .store import open_store

    path, note = find_store(store_path)
    notes = [note] if note else []
    if not queries and not ids:
        raise SjeaError("nothing to search for: pass image files, a folder of images, or --id N.")
    with open_store(path) as store:
        levels, n = store.levels, store.n
        mode, used = check_options(k, mode, level, levels, factor)
        if k > n:
            notes.append(f"k={k} is larger than the store ({n} rows): showing all {n}")
            k = n
        order_levels = check_order(order, levels) if mode != "per-level" else None
        sidecar = read_sidecar(path)
        indexes = load_indexes(path, store.model_id, n, used if mode == "per-level" else levels, mmap=mmap)
        cosine = (sidecar or {}).get("metric", "cosine") == "cosine"
        labels, qv = query_vectors(store, path, ids, queries, embedder)
        qv = [l2_normalize(v) if cosine else v for v in qv]

        def get_rows(j: int, rows: np.ndarray) -> np.ndarray:
            x = store.read_embeddings(levels[j], rows)
            return l2_normalize(x) if cosine else x

        searcher = _Searcher(indexes, sidecar, qv, levels, get_rows, n, store.paths)
        results = [dict(lab) for lab in labels]
        if mode in ("per-level", "both"):
            for r, hits in zip(results, searcher.per_level(used, k)):
                r["per_level"] = hits
        if mode in ("hierarchical", "both"):
            hits = searcher.hierarchical([levels.index(lv) for lv in order_levels], k, factor)
            cluster_paths = cluster_paths_of(store, qv, levels, notes)
            for qi, (r, h) in enumerate(zip(results, hits)):
                r["hierarchical"] = h
                r["cluster_path"] = None if cluster_paths is None else [int(c) for c in cluster_paths[qi]]
        return {"store": str(path), "root": store.root, "n": n, "model_id": store.model_id, "k": k, "mode": mode,
                "levels": used if mode == "per-level" else levels, "order": order_levels,
                "factor": factor if mode != "per-level" else None, "notes": notes, "results": results}


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
            per_level[j].append(store.read_embeddings(lv, [int(i)]))
        labels.append({"query": f"id:{int(i)}", "query_id": int(i),
                       "query_file": str(Path(store.root) / store.paths[int(i)])})
    files = expand_queries(queries)
    if files:
        emb = query_embedder(store, path, embedder)
        vecs = emb.embed_images(decode_queries(files))
        for j, lv in enumerate(levels):
            per_level[j].append(vecs[emb.levels.index(lv)])
        labels.extend({"query": str(p), "query_id": None, "query_file": str(p.resolve())} for p in files)
    return labels, [np.concatenate(v).astype(np.float32) for v in per_level]


def query_embedder(store, path: Path, embedder=None):
    """The embedder for query images: the one given, else the store's own model; another model is refused."""
    from .embed import Embedder

    emb = embedder or Embedder.for_store(store)
    if emb.model_id != store.model_id:
        raise SjeaError(f"the query model ({emb.model_id[:12]}) is not the model that wrote {path} "
                        f"({store.model_id[:12]}); search with the store's own model, or re-embed the "
                        f"images with this one: sjea embed IMAGES {path} --overwrite")
    missing = [lv for lv in store.levels if lv not in emb.levels]
    if missing:
        raise SjeaError(f"the query model lacks level(s) {missing} of {path}; use the model that wrote it.")
    return emb


class _Searcher:
    """The FAISS indexes and stored vectors of one open store, searched with unit query vectors
    qv[j] (one array per store level j); hits are dicts ready for the result."""

    def __init__(self, indexes: dict, sidecar: dict, qv: list[np.ndarray], levels: list[int], get_rows, n: int,
                 paths: list[str]):
        self.indexes, self.sidecar, self.qv, self.levels = indexes, sidecar, qv, levels
        self.get_rows, self.n, self.paths = get_rows, n, paths

    def top(self, j: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        lv = self.levels[j]
        return index_top(self.indexes[lv], self.qv[j], k, self.sidecar["levels"][str(lv)].get("rerank", 1),
                         lambda rows: self.get_rows(j, rows), self.n)

    def per_level(self, used: list[int], k: int) -> list[dict]:
        """Per query: {level: hits} for each level of `used`."""
        out: list[dict] = [{} for _ in self.qv[0]]
        for lv in used:
            hit_ids, hit_scores = self.top(self.levels.index(lv), k)
            for r, hid, hsc in zip(out, hit_ids, hit_scores):
                r[str(lv)] = [{"rank": i + 1, "id": int(h), "path": self.paths[h], "score": float(s)}
                              for i, (h, s) in enumerate(zip(hid, hsc)) if h >= 0]
        return out

    def hierarchical(self, order_pos: list[int], k: int, factor: float) -> list[list[dict]]:
        """Per query: the hits of the funnel over store positions `order_pos`, scored at every level."""
        first, _ = self.top(order_pos[0], stage_sizes(k, factor, len(order_pos), self.n)[0])
        ids, scores = funnel(self.qv, first, self.get_rows, k, factor, order_pos, self.n)
        last = order_pos[-1]
        return [[{"rank": i + 1, "id": int(h), "path": self.paths[h], "score": float(scores[qi, i, last]),
                  "scores": {str(lv): float(scores[qi, i, j]) for j, lv in enumerate(self.levels)}}
                 for i, h in enumerate(ids[qi]) if h >= 0] for qi in range(len(ids))]


def cluster_paths_of(store, qv: list[np.ndarray], levels: list[int], notes: list[str]) -> np.ndarray | None:
    """Each query's path down the store's cluster tree, or None (with a note why) when it has none."""
    from .clusters import query_paths, read_tree

    tree, why = read_tree(store)
    if why:
        notes.append(why)
    if tree is None:
        return None
    return query_paths(tree, [qv[levels.index(lv)] for lv in np.atleast_1d(tree["attrs"]["levels"])])


def index_top(index, queries: np.ndarray, k: int, rerank: int, get_rows, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k from a FAISS index, re-scored exactly from the stored vectors (rerank x k candidates)."""
    _, cand = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(n, k * max(1, rerank)))
    return exact_rerank(queries, cand, get_rows, k)
