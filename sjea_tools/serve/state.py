"""What the server keeps per store: loaded once, shared by every request, reloaded when the files change.

`StoreHolder.current()` returns the `LoadedStore` for the store as it is on disk now: the FAISS
indexes, the row paths, the cluster tree and the query model are loaded once per *fingerprint*
(size, mtime and inode of the store file and of its index.json) and shared read-only by all
request threads, so concurrent clients never hold a second copy of the indexes. When `sjea embed
--update` or `sjea index` replaces the files, the next request loads the new ones; while the new
store has no matching index yet, requests get a one-line "stale" error instead of wrong rows.

Requests do not open the HDF5 file: it is opened once per store version, at load, and not held
(a held handle would keep the file locked against `sjea index` / `sjea clusters` writing the
cluster tree into it). What exact re-scoring and queries by id need of it, each level's stored
vectors (prepared as the index holds them), is read then into one array per level (`LevelVectors`);
a store whose vectors exceed `VECTORS_IN_MEMORY_MAX` (the switch) gets them memory-mapped instead,
from a `.npy` copy written once beside its index and named by its fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..index import SIDECAR, index_dir, open_indexes
from ..filters import RowFilter
from ..io import atomic_path
from ..search import (DEFAULT_MODE, DEFAULT_WITHIN, check_finite_row, expand_queries, hierarchy_tree,
                      resolve_request, search_open_store)
from ..store import open_store

# Stored vectors up to this many bytes (all levels) are held in memory; a larger store's are
# memory-mapped from a cache file beside its index (the OS pages in what searches touch).
VECTORS_IN_MEMORY_MAX = 1 << 30
CACHE_PREFIX = "vectors-"


class StaleStore(SjeaError):
    """The store changed on disk and cannot be served until its index matches it (HTTP 409)."""


def fingerprint(store_path: Path) -> tuple:
    """What changes when the store or its index is replaced (every writer renames a new file in)."""
    out = []
    for p in (store_path, index_dir(store_path) / SIDECAR):
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


class LoadedStore:
    """One version of a store with its indexes, paths, cluster tree and query model, read-only."""

    def __init__(self, path: Path, fp: tuple, embedder_source: dict | None = None, previous_embedder=None,
                 in_memory_max: int = VECTORS_IN_MEMORY_MAX):
        from ..clusters import read_tree

        self.path, self.fingerprint = path, fp
        with open_store(path) as store:
            self.attrs = dict(store.attrs)
            self.n, self.levels, self.dims, self.model_id = store.n, store.levels, store.dims, store.model_id
            self.normalized, self.centres = store.normalized, store.centres  # what its scores are
            self.whitening_digests = store.whitening_digests
            self.root = Path(store.root)
            self.paths = store.paths
            self.labels, self.label_names = store.labels, store.label_names
            self.store_fingerprint = getattr(store, "fingerprint", None)
            # the one trip into the index package per store version; requests call indexes.search
            self.indexes = open_indexes(path).load(store.model_id, store.n, store.levels,
                                                   fingerprint=self.store_fingerprint)
            self.tree, self.tree_note = read_tree(store)
            self.vectors = LevelVectors.read(store, self.indexes, fp, in_memory_max)
            if previous_embedder is not None and previous_embedder.model_id == store.model_id \
                    and previous_embedder.levels == store.levels:
                # the same model: an update added rows, the model (seconds to load) stays
                self.embedder, self.embedder_error = previous_embedder, None
            else:
                self.embedder, self.embedder_error = _load_embedder(store, embedder_source)
        self.cosine = self.indexes.cosine

    # --- search -----------------------------------------------------------------------------------
    def search(self, ids=(), files=(), k: int = 10, mode: str | None = None, level=None, order=None,
               probes: int = 1, within: str = DEFAULT_WITHIN, min_score: float | None = None, where=(),
               exclude_same_folder: bool = False, margin: float = 0.0) -> dict:
        """What `search_store` returns (the fields of `sjea search --json`), through the same
        search.search_open_store on the loaded indexes and tree; each result also carries the
        query's cluster path when the store has a tree."""
        mode, used, wanted = resolve_request(k, mode, level, order, self.levels, probes, within, min_score,
                                             self.cosine, margin)
        row_filter = RowFilter.parse(where, exclude_same_folder)
        if files and self.embedder is None:
            raise SjeaError(f"searching by image needs the store's model, which did not load: {self.embedder_error}")
        tree = self._hierarchy_tree(wanted) if mode != "per-level" else None
        labels, qv = self._query_vectors(ids, files)
        res = search_open_store(self, self.path, labels, qv, indexes=self.indexes, tree=tree, paths=self.paths,
                                k=k, mode=mode, used=used, probes=probes, within=within, min_score=min_score,
                                notes=[], row_filter=row_filter, get_rows=self.vectors.rows, prepared=True,
                                margin=margin)
        self._add_cluster_paths(res["results"], qv)
        res["root"] = str(self.root)
        return res

    def _query_vectors(self, ids, files) -> tuple[list[dict], list[np.ndarray]]:
        """What search.query_vectors gives, prepared, from memory: stored rows are the held vectors
        (the library reads them and every path of the store per call), files are embedded in one batch."""
        rows = [self.check_id(i) for i in ids]
        labels = [{"query": f"id:{i}", "query_id": i, "query_file": str(self.root / self.paths[i])} for i in rows]
        per_level = [[self.vectors.query_rows(j, rows, self.path)] for j in range(len(self.levels))]
        if files:
            found = expand_queries(files)
            vecs = self.embedder.embed_files(found)
            labels += [{"query": str(p), "query_id": None, "query_file": str(p.resolve())} for p in found]
            for j, lv in enumerate(self.levels):
                per_level[j].append(self.indexes.prepare(vecs[self.embedder.levels.index(lv)]))
        return labels, [np.concatenate(v).astype(np.float32, copy=False) for v in per_level]

    def _hierarchy_tree(self, wanted: list[int] | None) -> dict:
        """The loaded tree when it is the one asked for; otherwise search's own check gives the message."""
        if self.tree is not None and wanted in (None, self.tree_levels):
            return self.tree
        with open_store(self.path) as store:
            return hierarchy_tree(store, self.path, wanted)

    @property
    def tree_levels(self) -> list[int] | None:
        return None if self.tree is None else [int(v) for v in np.atleast_1d(self.tree["attrs"]["levels"])]

    def _add_cluster_paths(self, results: list[dict], qv: list[np.ndarray]) -> None:
        """Per-level results get the query's path down the tree too (the page shows it for every mode)."""
        from ..clusters import query_paths

        todo = [r for r in results if "cluster_path" not in r]
        if not todo:
            return
        if self.tree is None:
            for r in todo:
                r["cluster_path"] = None
            return
        rows = [i for i, r in enumerate(results) if "cluster_path" not in r]
        paths = query_paths(self.tree, [qv[self.levels.index(lv)][rows] for lv in self.tree_levels])
        for r, p in zip(todo, paths):
            r["cluster_path"] = [int(c) for c in p]

    # --- items ------------------------------------------------------------------------------------
    def check_id(self, item_id) -> int:
        """A row number from the client, or a 404-style SjeaError; never a path."""
        text = str(item_id)
        if not text.isdigit() or len(text) > 12:
            raise UnknownItem(f"item ids are row numbers 0..{self.n - 1}, not '{text[:80]}'.")
        i = int(text)
        if i >= self.n:
            raise UnknownItem(f"no item {i}: the store has rows 0..{self.n - 1}.")
        return i

    def item(self, i: int) -> dict:
        label = None
        if self.labels is not None:
            code = int(self.labels[i])
            label = self.label_names[code] if self.label_names and 0 <= code < len(self.label_names) else code
        cluster = None if self.tree is None else [int(c) for c in self.tree["assign"][i]]
        return {"id": i, "path": self.paths[i], "label": label, "cluster_path": cluster,
                "thumbnail": f"/api/items/{i}/thumbnail"}

    def cluster_roots(self) -> dict:
        from .tree import cluster_roots

        return cluster_roots(self.tree, self.tree_note)

    def cluster_node(self, depth: int, node: int, offset: int = 0, limit: int = 60) -> dict:
        from .tree import cluster_node

        return cluster_node(self.tree, self.tree_note, depth, node, offset, limit)

    def info(self) -> dict:
        kinds = self.indexes.kinds
        return {"store": str(self.path), "root": str(self.root), "n": self.n, "levels": self.levels, "dims": self.dims,
                "model_id": self.model_id, "fingerprint": self.store_fingerprint,
                "model_source": self.attrs.get("model_source"),
                "backend": self.attrs.get("backend"), "metric": "cosine" if self.cosine else "inner-product",
                "index_kinds": kinds, "cluster_tree": self.tree is not None, "cluster_note": self.tree_note,
                "image_search": self.embedder is not None, "image_search_error": self.embedder_error,
                "tree_levels": self.tree_levels, "label_names": self.label_names,
                "default_mode": DEFAULT_MODE if len(self.levels) > 1 else "per-level"}


class LevelVectors:
    """Each level's stored vectors as the index holds them (prepared), one (n, dim) float32 array
    per level: in memory, or memory-mapped from `CACHE_PREFIX<level>-<key>.npy` in the index folder
    when all levels together exceed `in_memory_max` bytes. Read once per store version."""

    def __init__(self, arrays: list[np.ndarray], levels: list[int]):
        self.arrays, self.levels = arrays, levels

    @classmethod
    def read(cls, store, indexes, fp: tuple, in_memory_max: int) -> "LevelVectors":
        if 4 * store.n * sum(store.dims) > in_memory_max:
            try:
                return cls(cached_arrays(store, indexes, cache_key(store, fp)), store.levels)
            except OSError:
                pass  # no room or no write access beside the index: held in memory after all
        arrays = [np.empty((store.n, d), np.float32) for d in store.dims]
        fill(store, indexes, arrays)
        return cls(arrays, store.levels)

    @property
    def mapped(self) -> bool:
        return any(isinstance(a, np.memmap) for a in self.arrays)

    def rows(self, j: int, rows: np.ndarray) -> np.ndarray:
        """search_open_store's get_rows: level j's vectors of `rows`."""
        return self.arrays[j][rows]

    def query_rows(self, j: int, rows: list[int], path: Path) -> np.ndarray:
        """Stored rows as queries; a non-finite one (a damaged store) is the library's one-line error."""
        out = np.asarray(self.arrays[j][rows], dtype=np.float32)
        for i, row in zip(rows, out):
            check_finite_row(row, i, self.levels[j], path)
        return out


def fill(store, indexes, arrays: list[np.ndarray]) -> None:
    """Copy the store's rows, prepared, into `arrays` block by block (bounded extra memory)."""
    first = 0
    for _, block in store.iter_rows():
        rows = len(next(iter(block.values())))
        for j, lv in enumerate(store.levels):
            arrays[j][first:first + rows] = indexes.prepare(block[lv].astype(np.float32, copy=False))
        first += rows


def cache_key(store, fp: tuple) -> str:
    """Names one version of the store: its recorded fingerprint and the file's size, mtime and inode."""
    return hashlib.sha256(repr((store.fingerprint, fp[0])).encode()).hexdigest()[:16]


def cached_arrays(store, indexes, key: str) -> list[np.ndarray]:
    """The levels' prepared vectors memory-mapped from cache files, written (atomically) the first
    time this version of the store is served; the files of other versions are removed then."""
    from contextlib import ExitStack

    folder = index_dir(store.path)
    names = [folder / f"{CACHE_PREFIX}{lv}-{key}.npy" for lv in store.levels]
    if not all(p.is_file() for p in names):
        for old in folder.glob(f"{CACHE_PREFIX}*.npy"):
            old.unlink(missing_ok=True)
        with ExitStack() as stack:
            tmps = [stack.enter_context(atomic_path(p)) for p in names]
            arrays = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=(store.n, d))
                      for t, d in zip(tmps, store.dims)]
            fill(store, indexes, arrays)
            for a in arrays:
                a.flush()
            del arrays  # closed before the files are renamed into place
    return [np.load(p, mmap_mode="r") for p in names]


class UnknownItem(SjeaError):
    """An id that is not a row of the store (HTTP 404)."""


def _load_embedder(store, source: dict | None):
    """(the query model, None) or (None, why not): a store whose model is gone still serves id search."""
    from ..embed import Embedder
    from ..search import query_embedder

    try:
        if source:
            emb = Embedder.from_source(**source, levels=store.levels, normalize=store.normalized)
        else:
            emb = Embedder.for_store(store)
        return query_embedder(store, store.path, emb), None
    except SjeaError as e:
        return None, str(e)


class StoreHolder:
    """The current LoadedStore of one store path, reloaded (once, under a lock) when its files change."""

    def __init__(self, path, run=None, onnx=None, in_memory_max: int = VECTORS_IN_MEMORY_MAX):
        self.path, self.in_memory_max = Path(path), in_memory_max
        self.source = {"run": run} if run else {"onnx": onnx} if onnx else None
        self._lock = threading.Lock()
        self._loaded: LoadedStore | None = None
        self._embedder = None  # the last query model loaded; reused while the store's model id stays
        self._failed: tuple[tuple, str] | None = None  # (fingerprint, message) of the last failed load
        self.loads = 0

    def current(self) -> LoadedStore:
        fp = fingerprint(self.path)
        loaded = self._loaded
        if loaded is not None and loaded.fingerprint == fp:
            return loaded
        with self._lock:
            if self._loaded is not None and self._loaded.fingerprint == fp:
                return self._loaded
            if self._failed is not None and self._failed[0] == fp:
                raise StaleStore(self._failed[1])
            try:
                self._loaded = LoadedStore(self.path, fp, self.source, previous_embedder=self._embedder,
                                           in_memory_max=self.in_memory_max)
                self._embedder = self._loaded.embedder or self._embedder
                self.loads += 1
                self._failed = None
            except SjeaError as e:
                self._loaded = None
                msg = str(e) if loaded is None else f"{self.path} changed on disk and cannot be served yet: {e}"
                self._failed = (fp, msg)
                raise StaleStore(msg) from None
            return self._loaded
