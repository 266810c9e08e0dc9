"""Image files to vectors from Python: the rows `sjea embed` stores for them, nothing else.

    import sjea_tools
    rows = sjea_tools.embed_files(["a.jpg", "b.png"], store="photos.h5")   # {level: (2, dim)}
    rows = sjea_tools.embed_files(["a.jpg"], run="runs/tiny")              # or onnx="model.onnx"

Every file goes through the one decoder and preprocess (data.preprocess.file_pixels: EXIF
orientation, alpha over white, 16-bit scaling, JPEG draft decoding at the model's size) and the
store's own model, so a file's vector equals its stored row (within float rounding). On the CPU,
with a run's cached ONNX graph, neither this nor `sjea search` imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .embed.backends import Embedder
from .errors import SjeaError
from .levels import parse_levels


def embed_files(paths: Iterable[str | Path], run=None, onnx=None, store=None, levels=None, backend: str = "auto",
                device: str = "cpu", batch_size: int = 256) -> dict[int, np.ndarray]:
    """{level: float32 (len(paths), dim)} for image files, in the order given.

    The model is the store's own (`store`: its model, levels and normalisation), a run folder
    (`run`, default the latest) or an exported ONNX file (`onnx`); rows are L2-normalised as
    `sjea embed` stores them by default. `levels` picks levels (0, "0,1", [0, 1], "all").
    A file that cannot be read is an SjeaError naming it.
    """
    if store is not None:
        if run is not None or onnx is not None:
            raise SjeaError("pass one of run, onnx or store, not several.")
        from .store import open_store

        with open_store(store) as s:
            emb = Embedder.for_store(s, backend=backend, device=device)
    else:
        emb = Embedder.from_source(run=run, onnx=onnx, backend=backend, device=device)
    wanted = parse_levels(levels, emb.levels)
    vectors = dict(zip(emb.levels, emb.embed_files(list(paths), batch_size=batch_size)))
    return {lv: vectors[lv] for lv in wanted}
