"""Where `sjea embed` runs: one entry, `run_embed(request)`, choosing the engine.

    from sjea_tools.embed import EmbedRequest, RayOptions
    from sjea_tools.engines import run_embed
    run_embed(EmbedRequest("photos/", "photos.h5", run="runs/tiny"))                      # this process
    run_embed(EmbedRequest("/shared/photos", "/shared/photos.h5", engine="ray",
                           ray=RayOptions(partitions=64, address="head:6379")))         # Ray tasks

Engines: local (pipeline.embed_locally: embed, then index, in this process), torchrun (`torchrun`
module: under WORLD_SIZE > 1 each rank embeds its own shard on its own GPU, rank 0 merges and
indexes) and Ray (`ray` module: one Ray task per partition, merged by the driver). Each is imported
only when chosen: `pip install 'sjea-tools[ray]'` adds Ray.
"""

from __future__ import annotations

from ..embed import EmbedRequest, Embedder
from ..progress import ProgressFn


def run_embed(request: EmbedRequest, progress: ProgressFn | None = None, embedder: Embedder | None = None) -> dict:
    """`sjea embed`: request.engine "ray" runs on Ray; "local" runs the torchrun shard flow under
    torchrun when no --shard is given, else in this process. `embedder`: a model already loaded
    (local and torchrun only; a Ray task loads its own)."""
    if request.engine == "ray":
        from .ray import embed_with_ray

        return embed_with_ray(request, progress)
    from .torchrun import embed_on_ranks, torchrun_shard

    if request.shard is None and torchrun_shard() is not None:
        return embed_on_ranks(request, progress, embedder)
    from ..pipeline import embed_locally

    return embed_locally(request, progress, embedder)
