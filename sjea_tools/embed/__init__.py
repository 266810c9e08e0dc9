"""Embed image folders: scan -> decode in worker processes -> backend (PyTorch or ONNX Runtime) -> store.

    from sjea_tools.embed import embed_folder, Embedder
    summary = embed_folder("photos/", "photos.h5", run="runs/tiny")      # resumable, streaming
    emb = Embedder.from_source(run="runs/tiny")
    y0, y1 = emb.embed_images([pil_a, pil_b])                             # one array per level

Modules: `reader` (which images, decoded in order), `backends` (Embedder), `plan` (resume,
update or start), `runner` (embed_folder: plan -> reader -> Embedder -> journal -> store). Search
indexes and the cluster tree are separate steps: sjea_tools.pipeline runs them after embedding.
"""

from __future__ import annotations

from .backends import BACKENDS, Embedder, choose_backend
from .plan import Plan, plan_run
from .reader import collect_images, decoded_batches, default_workers, load_pixels
from .runner import COMMIT_EVERY_S, DTYPES, embed_folder

__all__ = ["BACKENDS", "COMMIT_EVERY_S", "DTYPES", "Embedder", "Plan", "choose_backend", "collect_images",
           "decoded_batches", "default_workers", "embed_folder", "load_pixels", "plan_run"]
