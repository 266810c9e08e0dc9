"""Embed -> search indexes -> cluster tree, each step explicit, and the torchrun shard/merge flow.

    from sjea_tools.pipeline import embed_and_index, merge_shards, shard_path
    embed_and_index("photos/", "photos.h5", run="runs/tiny")           # store, indexes, cluster tree
    for i in range(2):                                                 # two machines, one shard each
        embed_and_index("photos/", shard_path("photos.h5", (i, 2)), shard=(i, 2), index=False)
    merge_shards("photos.h5", 2)                                       # == one run, then indexed

`sjea embed` and `sjea merge` are thin layers over these functions. Under torchrun (WORLD_SIZE > 1)
`run_embed` gives each rank its own shard and GPU, waits for all of them, and rank 0 merges and
indexes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .clusters import build_cluster_tree, read_tree
from .embed import embed_folder
from .index import build_indexes, index_dir, index_is_current, read_sidecar
from .io import disk_faults, require_free_space
from .progress import ProgressFn
from .store import merge_stores, open_store, parse_shard, writer_lock


def index_store(store: str | Path, progress: ProgressFn | None = None, *, clusters: bool = True,
                if_stale: bool = False, **index_options) -> dict:
    """What search needs beside a store: one FAISS index per level (index.build_indexes, its
    options passed through: kind, memory_budget, params, metric, ...), then the cluster tree unless
    clusters=False. With if_stale, an index that still describes the store is kept as it is.
    Returns the index sidecar with the tree's sizes under "clusters"."""
    with writer_lock(store):  # one writer from the first index file to the tree
        if if_stale and index_is_current(store):
            sidecar = {**read_sidecar(store), "path": str(index_dir(store)), "status": "up to date"}
        else:
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


def embed_and_index(images, out, *, index: bool = True, progress: ProgressFn | None = None,
                    **embed_options) -> dict:
    """embed_folder (its options pass through), then index_store unless index=False. A rerun of a
    finished command (killed while indexing, say) builds what is missing instead of refusing."""
    with writer_lock(out):
        summary = embed_folder(images, out, progress=progress, **embed_options)
        if index:
            summary["index"] = index_store(out, progress, if_stale=summary["status"] != "written")
    return summary


def merge_and_index(inputs: list, out, *, index: bool = True, progress: ProgressFn | None = None,
                    overwrite: bool = False) -> dict:
    """merge_stores (an existing OUT replaced only with overwrite), then index_store unless index=False."""
    with writer_lock(out):
        summary = merge_stores(inputs, out, progress=progress, overwrite=overwrite)
        if index:
            summary["index"] = index_store(out, progress, if_stale=summary["status"] != "written")
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


def torchrun_shard() -> tuple[int, int] | None:
    """Under torchrun (WORLD_SIZE > 1) each rank embeds one shard: (RANK, WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def rank_device(device: str) -> str:
    """One GPU per rank (LOCAL_RANK) when the device is auto or cuda and GPUs are visible."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def run_embed(images, out, *, shard=None, index: bool = True, progress: ProgressFn | None = None,
              **embed_options) -> dict:
    """`sjea embed`: embed_and_index, or under torchrun with no shard given, embed_on_ranks."""
    if shard is None and torchrun_shard() is not None:
        return embed_on_ranks(images, out, index=index, progress=progress, **embed_options)
    return embed_and_index(images, out, shard=shard, index=index, progress=progress, **embed_options)


def embed_on_ranks(images, out, *, index: bool = True, progress: ProgressFn | None = None,
                   device: str = "auto", **embed_options) -> dict:
    """One torchrun rank: embed its shard into shard_path(out), wait for every rank, then rank 0
    merges the shards into OUT (and indexes it). The summary is the rank's own; rank 0's has the
    merge summary under "merged"."""
    import datetime

    import torch.distributed as dist

    shard = torchrun_shard()
    summary = embed_folder(images, shard_path(out, shard), shard=shard, device=rank_device(device),
                           progress=progress, **embed_options)
    if not dist.is_initialized():
        # The first barrier waits for the slowest rank's whole shard: hours on a large folder.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()
    # OUT is this same merge's earlier result on a rerun (replaced without asking), else --overwrite decides.
    summary["merged"] = (merge_shards(out, shard[1], index=index, progress=progress,
                                      overwrite=embed_options.get("overwrite", False)) if shard[0] == 0 else None)
    dist.barrier()  # no rank exits (tearing down the group) while rank 0 still merges
    dist.destroy_process_group()
    return summary
