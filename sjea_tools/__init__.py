"""sjea-tools: Stacked Joint Embedding Architectures: train, export, embed and search.

    import sjea_tools
    model = sjea_tools.load_model("runs/tiny")          # eval mode
    ys = model.forward_levels(batch)                      # Y[0..N-1] in one pass
    rows = sjea_tools.embed_files(["a.jpg"], store="photos.h5")   # {level: rows}, as stored

`embed_files` is the one way from image files to vectors (store, run or ONNX file): the same
decoder and preprocess as `sjea embed`, so it returns a file's stored row. `model.preprocess` on
an image you opened yourself skips that decoder (no JPEG draft decoding, EXIF, alpha, 16-bit
scaling) and can differ from the stored row.

Names are imported on first use, so that `sjea --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "config", "RunConfig": "config", "resolve_config": "config",
    "SjeaError": "errors",
    "stacked_vicreg_loss": "losses", "vicreg_loss": "losses",
    "StackedModel": "models", "build_model": "models",
    "find_run": "runs", "load_model": "runs", "model_id": "runs",
    "embed_files": "query",
}

__all__ = ["__version__", *_LAZY]


def lazy_attributes(package: str, names: dict[str, str], namespace: dict):
    """(__getattr__, __dir__) for a package whose public `names` ({name: submodule}) are imported
    on first use (PEP 562): the cheap paths (--help, decoding, the ONNX query path) stay torch-free."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
