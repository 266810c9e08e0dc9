"""What the server keeps per store: loaded once, shared by every request, reloaded when the files change.

`StoreHolder.current()` returns the `LoadedStore` for the store as it is on disk now: the FAISS
indexes, the row paths, the cluster tree and the query model are loaded once per *fingerprint*
(size, mtime and inode of the store file and of its index.json) and shared read-only by all
request threads, so concurrent clients never hold a second copy of the indexes. When `sjea embed
--update` or `sjea index` replaces the files, the next request loads the new ones; while the new
store has no matching index yet, requests get a one-line "stale" error instead of wrong rows.

The HDF5 file is opened per request (about 0.1 ms), not held open: a held handle would keep the
file locked against `sjea index` / `sjea clusters` writing the cluster tree into it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..index import SIDECAR, index_dir, open_indexes
from ..filters import RowFilter
from ..search import (DEFAULT_MODE, DEFAULT_WITHIN, hierarchy_tree, query_vectors, resolve_request,
                      search_open_store)
from ..store import open_store


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

    def __init__(self, path: Path, fp: tuple, embedder_source: dict | None = None, previous_embedder=None):
        from ..clusters import read_tree

        self.path, self.fingerprint = path, fp
        with open_store(path) as store:
            self.attrs = dict(store.attrs)
            self.n, self.levels, self.dims, self.model_id = store.n, store.levels, store.dims, store.model_id
            self.root = Path(store.root)
            self.paths = store.paths
            self.labels, self.label_names = store.labels, store.label_names
            self.store_fingerprint = getattr(store, "fingerprint", None)
            # the one trip into the index package per store version; requests call indexes.search
            self.indexes = open_indexes(path).load(store.model_id, store.n, store.levels,
                                                   fingerprint=self.store_fingerprint)
            self.tree, self.tree_note = read_tree(store)
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
               exclude_same_folder: bool = False) -> dict:
        """What `search_store` returns (the fields of `sjea search --json`), through the same
        search.search_open_store on the loaded indexes and tree; each result also carries the
        query's cluster path when the store has a tree."""
        mode, used, wanted = resolve_request(k, mode, level, order, self.levels, probes, within, min_score,
                                             self.cosine)
        row_filter = RowFilter.parse(where, exclude_same_folder)
        if files and self.embedder is None:
            raise SjeaError(f"searching by image needs the store's model, which did not load: {self.embedder_error}")
        with open_store(self.path) as store:
            tree = self._hierarchy_tree(store, wanted) if mode != "per-level" else None
            labels, qv = self._query_vectors(store, ids, files)
            res = search_open_store(store, self.path, labels, qv, indexes=self.indexes, tree=tree, paths=self.paths,
                                    k=k, mode=mode, used=used, probes=probes, within=within, min_score=min_score,
                                    notes=[], row_filter=row_filter)
        self._add_cluster_paths(res["results"], [self.indexes.prepare(v) for v in qv])
        res["root"] = str(self.root)
        return res

    def _query_vectors(self, store, ids, files) -> tuple[list[dict], list[np.ndarray]]:
        """search.query_vectors, except that stored rows take their path from the loaded list: the
        library reads (and checksums) every path of the store per call, about 1 s at 100,000 rows."""
        rows = [self.check_id(i) for i in ids]
        labels = [{"query": f"id:{i}", "query_id": i, "query_file": str(self.root / self.paths[i])} for i in rows]
        per_level = [[store.read_embeddings(lv, rows)] if rows else [] for lv in self.levels]
        if files:
            file_labels, vecs = query_vectors(store, self.path, [], files, self.embedder)
            labels += file_labels
            for j, v in enumerate(vecs):
                per_level[j].append(v)
        return labels, [np.concatenate(v).astype(np.float32) for v in per_level]

    def _hierarchy_tree(self, store, wanted: list[int] | None) -> dict:
        """The loaded tree when it is the one asked for; otherwise search's own check gives the message."""
        if self.tree is not None and wanted in (None, self.tree_levels):
            return self.tree
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

    def __init__(self, path, run=None, onnx=None):
        self.path = Path(path)
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
                self._loaded = LoadedStore(self.path, fp, self.source, previous_embedder=self._embedder)
                self._embedder = self._loaded.embedder or self._embedder
                self.loads += 1
                self._failed = None
            except SjeaError as e:
                self._loaded = None
                msg = str(e) if loaded is None else f"{self.path} changed on disk and cannot be served yet: {e}"
                self._failed = (fp, msg)
                raise StaleStore(msg) from None
            return self._loaded
