"""Embed -> search indexes -> cluster tree, each step explicit, and the shard/merge flow.

    from sjea_tools.pipeline import embed_and_index, merge_shards, shard_path
    embed_and_index("photos/", "photos.h5", run="runs/tiny")           # store, indexes, cluster tree
    for i in range(2):                                                 # two machines, one shard each
        embed_and_index("photos/", shard_path("photos.h5", (i, 2)), shard=(i, 2), index=False)
    merge_shards("photos.h5", 2)                                       # == one run, then indexed

`sjea embed` runs sjea_tools.engines.run_embed (this process, torchrun ranks or Ray tasks, all
built on these steps); `sjea merge` and `sjea index` are thin layers over merge_and_index and
index_store. Each of those takes the store's writer lock once, at its top, for all its steps; the
steps below them (`*_held`) expect it held.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .clusters import build_cluster_tree, read_tree
from .embed import EmbedRequest, Embedder, embed_held
from .index import build_indexes, index_dir, index_is_current, read_sidecar
from .io import disk_faults, require_free_space
from .progress import ProgressFn
from .store import merge_stores, open_store, parse_shard, writer_lock
from .store.guard import require_held


def index_store(store: str | Path, progress: ProgressFn | None = None, *, clusters: bool = True,
                if_stale: bool = False, **index_options) -> dict:
    """What search needs beside a store: one FAISS index per level (index.build_indexes, its
    options passed through: kind, memory_budget, params, metric, ...), then the cluster tree unless
    clusters=False. With if_stale, an index that still describes the store is kept as it is.
    Returns the index sidecar with the tree's sizes under "clusters"."""
    with writer_lock(store):  # one writer from the first index file to the tree
        return index_held(store, progress, clusters=clusters, if_stale=if_stale, **index_options)


def index_held(store: str | Path, progress: ProgressFn | None = None, *, clusters: bool = True,
               if_stale: bool = False, **index_options) -> dict:
    """index_store's work; the caller holds writer_lock(store)."""
    require_held(store)
    if if_stale and index_is_current(store):
        sidecar = {**read_sidecar(store), "path": str(index_dir(store)), "status": "up to date"}
    else:
        # build_indexes still takes the lock itself (re-entrant: a nested take keeps this one)
        sidecar = build_indexes(store, progress=progress, **index_options)
    if clusters and if_stale and _tree_sizes(store) is not None:
        sidecar["clusters"] = _tree_sizes(store)
    elif clusters:
        _check_room_for_tree(store)
        sidecar["clusters"] = build_cluster_tree(store)["sizes"]
    return sidecar


def _check_room_for_tree(store) -> None:
    """The tree is written into the store in place: ask for room first (assignments per row and
    depth, centroids, examples), as every HDF5 writer does."""
    with open_store(store) as s:
        need = s.n * 8 * 2 * len(s.levels) + sum(s.dims) * 4 * 1024 + (1 << 20)
    with disk_faults(f"the cluster tree into {store} (the store and its indexes are intact)"):
        require_free_space(store, need)


def _tree_sizes(store) -> list[int] | None:
    """The sizes of the store's cluster tree when it is current, else None."""
    with open_store(store) as s:
        tree, _ = read_tree(s)
    return None if tree is None else [int(v) for v in np.atleast_1d(tree["attrs"]["sizes"])]


def embed_and_index(images, out, *, progress: ProgressFn | None = None, embedder: Embedder | None = None,
                    **options) -> dict:
    """The keyword form of embed_locally: `options` are EmbedRequest's fields (index=True by default)."""
    return embed_locally(EmbedRequest(images, out, **options), progress, embedder)


def embed_locally(request: EmbedRequest, progress: ProgressFn | None = None,
                  embedder: Embedder | None = None) -> dict:
    """Embed (embed.embed_held), then index_held unless request.index is False, in this process
    and under one writer lock. A rerun of a finished command (killed while indexing, say) builds
    what is missing instead of refusing. `embedder`: a model already loaded (tests, benchmarks)."""
    with writer_lock(request.out):
        summary = embed_held(request, progress, embedder)
        if request.index:
            summary["index"] = index_held(request.out, progress, if_stale=summary["status"] != "written")
    return summary


def merge_and_index(inputs: list, out, *, index: bool = True, progress: ProgressFn | None = None,
                    overwrite: bool = False) -> dict:
    """merge_stores (an existing OUT replaced only with overwrite), then index_store unless index=False."""
    with writer_lock(out):
        # merge_stores still takes the lock itself (re-entrant: a nested take keeps this one)
        summary = merge_stores(inputs, out, progress=progress, overwrite=overwrite)
        if index:
            summary["index"] = index_held(out, progress, if_stale=summary["status"] != "written")
    return summary


def shard_path(out, shard) -> Path:
    """Where shard I of N of OUT goes: OUT-shardIIIofNNN.h5 beside it."""
    out = Path(out)
    i, n = parse_shard(shard)
    return out.with_name(f"{out.stem}-shard{i:03d}of{n:03d}{out.suffix or '.h5'}")


def merge_shards(out, count: int, *, index: bool = True, progress: ProgressFn | None = None,
                 overwrite: bool = False) -> dict:
    """Merge the `count` files shard_path(out, (I, count)) into OUT (and index it)."""
    return merge_and_index([shard_path(out, (i, count)) for i in range(count)], out, index=index,
                           progress=progress, overwrite=overwrite)
