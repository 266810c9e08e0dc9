"""Search a store: per level, or hierarchically (candidates from one level, re-ranked by the next).

Pure, on arrays (the evaluation uses these):
    cosine_top_k(queries, base, k)                           exact top-k by cosine
    hierarchical_search(queries, bases, k, factor, order)    the funnel over in-memory features
On a store (`sjea search` calls this):
    search_store(store_path, queries=[image files or folders], ids=[rows], k, mode, level, ...)

Scores are always exact cosines computed from the stored vectors: an approximate index only
proposes candidates (PQ proposes 4x more), so a reported score is never an approximation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SjeaError
from .index import exact_rerank, load_indexes, normalized, read_sidecar

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
    q, b = normalized(queries), normalized(base)
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


def check_order(order, n_levels: int) -> list[int]:
    """The levels a hierarchical search visits. Default: top level first, re-ranked down to level 0.

    Measured on Fashion-MNIST (docs/reproduction.md): the stacked level is the relatively coarser
    one (its fine-class precision@10 falls about three times as much as its coarse one), and
    candidates from level 1 re-ranked by level 0 beat the reverse order on coarse and fine labels.
    """
    order = list(range(n_levels - 1, -1, -1)) if order is None else [int(v) for v in order]
    if len(order) < 2 or len(set(order)) != len(order) or any(not 0 <= v < n_levels for v in order):
        raise SjeaError(f"--order {','.join(map(str, order))} must name 2 or more distinct levels of 0..{n_levels - 1}, "
                        "e.g. 1,0 (coarse level first).")
    return order


def funnel(queries: list[np.ndarray], first: np.ndarray, get_rows, k: int, factor: float, order: list[int],
           n: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids `first` (q, m) by each level of order[1:], then score the k kept at every level.

    queries[level] are unit query vectors; get_rows(level, sorted ids) -> unit stored vectors.
    """
    sizes = stage_sizes(k, factor, len(order), n)
    ids = first
    for level, keep in zip(order[1:], sizes[1:]):
        ids, _ = exact_rerank(queries[level], ids, lambda rows, lv=level: get_rows(lv, rows), keep)
    scores = np.stack([score_rows(queries[lv], ids, lambda rows, lv=lv: get_rows(lv, rows))
                       for lv in range(len(queries))], axis=2)
    return ids, scores


def score_rows(queries: np.ndarray, ids: np.ndarray, get_rows) -> np.ndarray:
    """Cosine of each query with each of its ids (q, m); -1 ids score nan."""
    valid = np.unique(ids[ids >= 0])
    table = get_rows(valid)
    pos = np.searchsorted(valid, np.where(ids >= 0, ids, valid[0] if len(valid) else 0))
    s = np.einsum("qd,qmd->qm", queries, table[pos]) if len(valid) else np.full(ids.shape, np.nan, np.float32)
    return np.where(ids >= 0, s, np.nan).astype(np.float32)


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
    unit_q = [normalized(q) for q in queries]
    unit_b = [normalized(b) for b in bases]
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


def check_options(k: int, mode: str | None, level: int | None, levels: list[int], factor: float) -> str:
    if k <= 0:
        raise SjeaError(f"--k must be at least 1, not {k}.")
    if factor < 1:
        raise SjeaError(f"--factor must be at least 1, not {factor}.")
    if level is not None and level not in levels:
        raise SjeaError(f"--level {level} is out of range: the store has levels {levels}.")
    if mode is None:
        mode = "per-level" if level is not None or len(levels) < 2 else "hierarchical"
    if mode not in MODES:
        raise SjeaError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'.")
    if mode != "per-level" and len(levels) < 2:
        raise SjeaError(f"--mode {mode} needs a store with 2 or more levels; this one has {levels}: use --mode per-level.")
    if mode != "per-level" and level is not None:
        raise SjeaError("--level picks one level for --mode per-level; leave it out for hierarchical search.")
    return mode


def search_store(store_path=None, queries=(), ids=(), k: int = 10, mode: str | None = None, level: int | None = None,
                 factor: float = DEFAULT_FACTOR, order: list[int] | None = None, embedder=None,
                 mmap: bool | None = None) -> dict:
    """Search a store with image files/folders (`queries`) and/or stored rows (`ids`).

    mode: "per-level" (each level's own top k), "hierarchical" (default with 2+ levels), or
    "both". Returns {"store", "notes", "k", "mode", "levels", "order", "factor", "root",
    "results": [{"query", "per_level": {level: hits}, "hierarchical": hits, "cluster_path"}]}
    where a hit is {"rank", "id", "path", "score"} (+ "scores" by level in hierarchical).
    """
    from .clusters import query_paths, read_tree
    from .store import open_store

    path, note = find_store(store_path)
    notes = [note] if note else []
    if not queries and not ids:
        raise SjeaError("nothing to search for: pass image files, a folder of images, or --id N.")
    with open_store(path) as store:
        levels, n = store.levels, store.n
        mode = check_options(k, mode, level, levels, factor)
        if k > n:
            notes.append(f"k={k} is larger than the store ({n} rows): showing all {n}")
            k = n
        order_pos = check_order(None if order is None else [levels.index(v) if v in levels else -1 for v in order],
                                len(levels)) if mode != "per-level" else None
        sidecar = read_sidecar(path)
        used = levels if level is None else [level]
        indexes = load_indexes(path, store.model_id, n, used if mode == "per-level" else levels, mmap=mmap)
        cosine = (sidecar or {}).get("metric", "cosine") == "cosine"

        # Query vectors, one (q, d) array per store level, unit length.
        labels: list[dict] = []
        per_level_q: list[list[np.ndarray]] = [[] for _ in levels]
        for i in ids:
            if not 0 <= int(i) < n:
                raise SjeaError(f"--id {i} is out of range: the store has rows 0..{n - 1}.")
            for j, lv in enumerate(levels):
                per_level_q[j].append(store.read_embeddings(lv, [int(i)]))
            labels.append({"query": f"id:{int(i)}", "query_id": int(i), "query_file": str(Path(store.root) / store.paths[int(i)])})
        files = expand_queries(queries)
        if files:
            from .embed import Embedder

            emb = embedder or Embedder.for_store(store)
            if emb.model_id != store.model_id:
                raise SjeaError(f"the query model ({emb.model_id[:12]}) is not the model that wrote {path} "
                                f"({store.model_id[:12]}); search with the store's own model, or re-embed the "
                                f"images with this one: sjea embed IMAGES {path} --overwrite")
            missing = [lv for lv in levels if lv not in emb.levels]
            if missing:
                raise SjeaError(f"the query model lacks level(s) {missing} of {path}; use the model that wrote it.")
            vecs = emb.embed_images(decode_queries(files))
            for j, lv in enumerate(levels):
                per_level_q[j].append(vecs[emb.levels.index(lv)])
            labels.extend({"query": str(p), "query_id": None, "query_file": str(p.resolve())} for p in files)
        qv = [np.concatenate(v).astype(np.float32) for v in per_level_q]
        qv = [normalized(v) if cosine else v for v in qv]

        def get_rows(j: int, rows: np.ndarray) -> np.ndarray:
            x = store.read_embeddings(levels[j], rows)
            return normalized(x) if cosine else x

        paths = store.paths
        results = [dict(lab) for lab in labels]
        if mode in ("per-level", "both"):
            for r in results:
                r["per_level"] = {}
            for lv in used:
                j = levels.index(lv)
                hits_ids, hits_scores = index_top(indexes[lv], qv[j], k, sidecar["levels"][str(lv)].get("rerank", 1),
                                                  lambda rows, j=j: get_rows(j, rows), n)
                for r, hid, hsc in zip(results, hits_ids, hits_scores):
                    r["per_level"][str(lv)] = [{"rank": i + 1, "id": int(h), "path": paths[h], "score": float(s)}
                                               for i, (h, s) in enumerate(zip(hid, hsc)) if h >= 0]
        if mode in ("hierarchical", "both"):
            first_level = order_pos[0]
            m0 = stage_sizes(k, factor, len(order_pos), n)[0]
            first, _ = index_top(indexes[levels[first_level]], qv[first_level], m0,
                                 sidecar["levels"][str(levels[first_level])].get("rerank", 1),
                                 lambda rows: get_rows(first_level, rows), n)
            hids, hscores = funnel(qv, first, get_rows, k, factor, order_pos, n)
            tree, why = read_tree(store)
            cpaths = query_paths(tree, [qv[levels.index(lv)] for lv in np.atleast_1d(tree["attrs"]["levels"])]) \
                if tree is not None else None
            if why:
                notes.append(why)
            last = order_pos[-1]
            for qi, r in enumerate(results):
                r["hierarchical"] = [
                    {"rank": i + 1, "id": int(h), "path": paths[h], "score": float(hscores[qi, i, last]),
                     "scores": {str(lv): float(hscores[qi, i, j]) for j, lv in enumerate(levels)}}
                    for i, h in enumerate(hids[qi]) if h >= 0]
                r["cluster_path"] = None if cpaths is None else [int(c) for c in cpaths[qi]]
        return {"store": str(path), "root": store.root, "n": n, "model_id": store.model_id, "k": k, "mode": mode,
                "levels": used if mode == "per-level" else levels,
                "order": None if order_pos is None else [levels[j] for j in order_pos],
                "factor": factor if mode != "per-level" else None, "notes": notes, "results": results}


def index_top(index, queries: np.ndarray, k: int, rerank: int, get_rows, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k from a FAISS index, re-scored exactly from the stored vectors (rerank x k candidates)."""
    _, cand = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(n, k * max(1, rerank)))
    return exact_rerank(queries, cand, get_rows, k)
