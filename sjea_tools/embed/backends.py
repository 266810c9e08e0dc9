"""The model behind one interface: `Embedder` runs a run's PyTorch model or an ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..devices import resolve_device
from ..errors import SjeaError
from ..levels import parse_levels
from ..spec import PreprocessSpec
from ..vectors import l2_normalize

BACKENDS = ("auto", "torch", "onnx")
ONNX_CACHE_DIR = "onnx-cache"


def choose_backend(device: str, onnx_available: bool) -> str:
    """The faster backend for a device: ONNX Runtime on CPU (measured 1.3-1.6x over eager PyTorch on
    ResNet-18, benchmarks/bench_onnx.py), PyTorch on GPUs, where eager CUDA kernels already run fast."""
    if device.startswith("cuda") or not onnx_available:
        return "torch"
    return "onnx"


class Embedder:
    """A model (PyTorch or ONNX Runtime) that turns uint8 pixels or PIL images into rows per level."""

    def __init__(self, *, backend: str, levels: list[int], dims: list[int], preprocess: PreprocessSpec,
                 model_id: str, source: str, device: str, normalize: bool, model=None, onnx_model=None):
        self.backend, self.levels, self.dims, self.preprocess = backend, levels, dims, preprocess
        self.model_id, self.source, self.device, self.normalize = model_id, source, device, normalize
        self.model, self.onnx_model = model, onnx_model

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @classmethod
    def from_source(cls, run=None, onnx=None, backend: str = "auto", device: str = "cpu", levels=None,
                    normalize: bool = True) -> "Embedder":
        """The latest run by default, a run folder (`run`), or an exported ONNX file (`onnx`)."""
        if backend not in BACKENDS:
            raise SjeaError(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'.")
        device = resolve_device(device)
        if onnx is not None:
            if run is not None:
                raise SjeaError("pass either --run or --onnx, not both.")
            if backend == "torch":
                raise SjeaError("--backend torch needs a run folder (--run); an --onnx file runs on ONNX Runtime.")
            return cls._from_onnx(Path(onnx), device, levels, normalize, source=str(Path(onnx).resolve()))
        from .. import runs

        model = runs.load_model(run)
        model_sha = runs.model_id(model)
        levels = parse_levels(levels, model.num_levels)
        if backend == "auto":
            backend = choose_backend(device, _onnx_runtime_available())
        source = str(Path(model.run_dir).resolve())
        if backend == "onnx":
            return cls._from_onnx(_exported_onnx(model, model_sha), device, levels, normalize, source=source,
                                  model_id=model_sha)
        model = model.to(device)
        return cls(backend="torch", levels=levels, dims=[model.level_dims[k] for k in levels],
                   preprocess=model.preprocess_spec, model_id=model_sha,
                   source=source, device=device, normalize=normalize, model=model)

    @classmethod
    def _from_onnx(cls, path: Path, device: str, levels, normalize: bool, source: str,
                   model_id: str | None = None) -> "Embedder":
        if not path.is_file():
            raise SjeaError(f"ONNX file {path} does not exist; export one with 'sjea export'.")
        from exports.runtime import OnnxModel

        om = OnnxModel(str(path), provider="cuda" if device.startswith("cuda") else "cpu")
        available = [int(k) for k in om.levels]
        levels = parse_levels(levels, available)
        dims = [int(om.dims[available.index(k)]) for k in levels]
        if model_id is None:
            from ..io import sha256_file

            model_id = om.model_id or sha256_file(path)
        return cls(backend="onnx", levels=levels, dims=dims, preprocess=om.preprocess,
                   model_id=model_id, source=source, device=device, normalize=normalize, onnx_model=om)

    @classmethod
    def for_store(cls, store, backend: str = "auto", device: str = "cpu") -> "Embedder":
        """The model that wrote a store, with its levels and normalisation: for embedding queries."""
        src = Path(store.attrs.get("model_source", ""))
        where = {"onnx": src} if src.suffix == ".onnx" else {"run": src}
        emb = cls.from_source(**where, backend=backend, device=device, levels=store.levels,
                              normalize=store.normalized)
        if emb.model_id != store.model_id:
            raise SjeaError(f"the model at {src} has changed since {store.path} was written (model id "
                            f"{emb.model_id[:12]} != {store.model_id[:12]}); re-embed with 'sjea embed --overwrite'.")
        return emb

    # --- embedding ----------------------------------------------------------------------------
    def embed_pixels(self, pixels) -> list[np.ndarray]:
        """uint8 (B, S, S, 3) pixels -> one float32 (B, dim) array per level."""
        import torch

        from ..data.preprocess import normalize_pixels

        pixels = torch.as_tensor(pixels)
        if self.backend == "torch":
            with torch.inference_mode():
                x = normalize_pixels(pixels.to(self.device, non_blocking=True), self.preprocess)
                outs = [y.float().cpu().numpy() for y in self.model.forward_levels(x, self.levels)]
        else:
            om = self.onnx_model
            # A graph exported with its preprocessing takes the uint8 pixels as they are.
            x = pixels.numpy() if om.takes_pixels else normalize_pixels(pixels, self.preprocess).numpy()
            by_level = dict(zip([int(k) for k in om.levels], om.run(x)))
            outs = [np.asarray(by_level[k], dtype=np.float32) for k in self.levels]
        return [l2_normalize(o) for o in outs] if self.normalize else outs

    def embed_images(self, images) -> list[np.ndarray]:
        """PIL images -> one float32 (n, dim) array per level (L2-normalised when `normalize`)."""
        from ..data.preprocess import model_pixels

        if not images:
            return [np.zeros((0, d), np.float32) for d in self.dims]
        return self.embed_pixels(np.stack([model_pixels(im, self.preprocess) for im in images]))

    def store_attrs(self) -> dict:
        """What a store records about the model: identity, levels, and its PreprocessSpec as the
        flat attributes image_size, mean, std, colour_mode (readable with plain h5py)."""
        from .. import __version__

        return {"sjea_version": __version__, "model_id": self.model_id, "model_source": self.source,
                "backend": self.backend, "levels": self.levels, "dims": self.dims, **self.preprocess.to_dict(),
                "normalized": bool(self.normalize)}


def _onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401

        import exports.onnx  # noqa: F401
        import exports.runtime  # noqa: F401
    except ImportError:
        return False
    return True


def _exported_onnx(model, model_sha: str) -> Path:
    """The run's ONNX graph of every level, exported once per checkpoint and cached in the run folder.

    export_levels writes atomically (sjea_tools.io): concurrent ranks may all export, and the last
    rename wins with a whole file."""
    path = Path(model.run_dir) / ONNX_CACHE_DIR / f"levels-{model_sha[:16]}.onnx"
    if path.is_file():
        return path
    from exports.onnx import export_levels

    return export_levels(model, path, list(range(model.num_levels)), output="representation")
