"""`sjea embed` under torchrun: each rank embeds one shard on its own GPU, rank 0 merges and indexes.

    torchrun --nproc_per_node 4 --no-python sjea embed photos/ photos.h5 -r runs/tiny

Rank R of W embeds shard R/W (pipeline.shard_path beside OUT) as a plain `--shard R/W` run, under
that shard store's own writer lock; after a barrier rank 0 merges the shards into OUT
(pipeline.merge_shards, under OUT's lock) and indexes it.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..embed import EmbedRequest, Embedder, embed_store
from ..pipeline import merge_shards, shard_path
from ..progress import ProgressFn


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


def embed_on_ranks(request: EmbedRequest, progress: ProgressFn | None = None,
                   embedder: Embedder | None = None) -> dict:
    """One torchrun rank: embed its shard into shard_path(OUT), wait for every rank, then rank 0
    merges the shards into OUT (and indexes it unless request.index is False). The summary is the
    rank's own; rank 0's has the merge summary under "merged"."""
    import datetime

    import torch.distributed as dist

    shard = torchrun_shard()
    mine = replace(request, out=shard_path(request.out, shard), shard=shard, device=rank_device(request.device))
    summary = embed_store(mine, progress, embedder)
    if not dist.is_initialized():
        # The first barrier waits for the slowest rank's whole shard: hours on a large folder.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()
    # OUT is this same merge's earlier result on a rerun (replaced without asking), else --overwrite decides.
    summary["merged"] = (merge_shards(request.out, shard[1], index=request.index, progress=progress,
                                      overwrite=request.overwrite) if shard[0] == 0 else None)
    dist.barrier()  # no rank exits (tearing down the group) while rank 0 still merges
    dist.destroy_process_group()
    return summary
