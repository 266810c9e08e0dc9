"""Embed image folders: scan -> decode in worker processes -> backend (PyTorch or ONNX Runtime) -> store.

    from sjea_tools.embed import embed_folder, embed_store, EmbedRequest, Embedder
    summary = embed_folder("photos/", "photos.h5", run="runs/tiny")      # resumable, streaming
    summary = embed_store(EmbedRequest("photos/", "photos.h5", run="runs/tiny"))   # the same, typed
    emb = Embedder.from_source(run="runs/tiny")
    y0, y1 = emb.embed_images([pil_a, pil_b])                             # one array per level

Modules: `request` (EmbedRequest: the options, checked once), `reader` (which images, decoded in
order), `backends` (Embedder), `plan` (resume, update or start), `runner` (embed_folder / embed_store:
plan -> reader -> Embedder -> journal -> store). Search indexes and the cluster tree are separate
steps: sjea_tools.pipeline runs them after embedding.
"""

from __future__ import annotations

from .backends import BACKENDS, Embedder, choose_backend
from .plan import Plan, plan_run
from .reader import collect_images, decoded_batches, default_workers, load_pixels
from .request import COMMIT_EVERY_S, DTYPES, EmbedRequest, RayOptions
from .runner import embed_folder, embed_held, embed_store

__all__ = ["BACKENDS", "COMMIT_EVERY_S", "DTYPES", "EmbedRequest", "Embedder", "Plan", "RayOptions", "choose_backend",
           "collect_images", "decoded_batches", "default_workers", "embed_folder", "embed_held", "embed_store",
           "load_pixels", "plan_run"]
