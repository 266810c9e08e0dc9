"""The model behind one interface: `Embedder` runs a run's PyTorch model or an ONNX graph.

Rows are what a store holds: each level's raw output minus the model's centring mean for that
level (when it has one: trainers.centring), times its whitening matrix (when the level has one),
L2-normalised (vectors.centre_and_normalize). Both backends apply the same float32 means and
matrices to their float32 outputs, so they differ only by what the graphs themselves differ (ONNX
verification: 1e-4 absolute)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sjea_tools.exports.runtime import ModelIdentityError

from ..devices import resolve_device
from ..errors import SjeaError
from ..levels import parse_levels
from ..spec import PreprocessSpec
from ..vectors import centre_and_normalize, matrix_digest

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
                 model_id: str, source: str, device: str, normalize: bool, model=None, onnx_model=None,
                 centres: list[np.ndarray] | None = None, whitenings: list[np.ndarray | None] | None = None):
        self.backend, self.levels, self.dims, self.preprocess = backend, levels, dims, preprocess
        self.model_id, self.source, self.device, self.normalize = model_id, source, device, normalize
        self.model, self.onnx_model = model, onnx_model
        # One float32 (dim,) mean per level of `levels`, or None (a model from before centring).
        self.centres = None if centres is None else [np.asarray(c, np.float32).reshape(-1) for c in centres]
        # One float32 (dim, dim) whitening per level of `levels` (None: that level is centred only),
        # or None: no level is whitened.
        self.whitenings = None if centres is None or whitenings is None or all(w is None for w in whitenings) \
            else [None if w is None else np.asarray(w, np.float32) for w in whitenings]

    @property
    def centred(self) -> bool:
        """Whether rows are centred: the model has means and rows are normalised (cosine). Raw
        inner-product rows (normalize=False) are the graph's outputs as they are."""
        return self.normalize and self.centres is not None

    def in_space_of(self, store) -> "Embedder":
        """This embedder giving rows in `store`'s space: the store's levels, its normalisation and
        its recorded centring means (none for a store written before centring: rows not centred)."""
        import copy

        emb = copy.copy(self)
        emb.levels = [k for k in self.levels if k in store.levels]
        emb.dims = [d for k, d in zip(self.levels, self.dims) if k in store.levels]
        emb.normalize = store.normalized
        centres = store.centres
        emb.centres = None if centres is None else [centres[store.levels.index(k)] for k in emb.levels]
        emb.whitenings = self._whitenings_for(store, emb.levels) if emb.centred else None
        return emb

    def without_whitening(self) -> "Embedder":
        """This embedder giving centred rows only (`sjea embed --no-whiten`): the store records no
        whitening, so its queries are centred only too."""
        import copy

        emb = copy.copy(self)
        emb.whitenings = None
        return emb

    def _whitenings_for(self, store, levels: list[int]) -> list[np.ndarray | None] | None:
        """This model's whitening of `levels`, checked against the sha256 the store recorded for
        each (a store written before whitening records none: its rows are centred only)."""
        recorded = store.whitening_digests
        if recorded is None:
            return None
        mine = dict(zip(self.levels, self.whitenings or [None] * len(self.levels)))
        found = []
        for k in levels:
            want, w = recorded[store.levels.index(k)], mine.get(k)
            if (want is None) != (w is None) or (w is not None and matrix_digest(w) != want):
                raise SjeaError(f"{store.path}'s level-{k} rows were whitened with another matrix than {self.source}'s "
                                "(or it has none: an ONNX file exported before whitening); search it with the run "
                                "that wrote it, or embed the images again with this model.")
            found.append(w)
        return found if any(w is not None for w in found) else None

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @classmethod
    def from_source(cls, run=None, onnx=None, backend: str = "auto", device: str = "cpu", levels=None,
                    normalize: bool = True) -> "Embedder":
        """The latest run by default, a run folder (`run`), or an exported ONNX file (`onnx`).

        A run on ONNX Runtime uses its cached graph (exported once per checkpoint) without
        loading the checkpoint, so torch is not imported when the cache is there."""
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

        run_dir = runs.find_run(run)
        model_sha = runs.model_id(runs.model_file(run_dir))
        source = str(Path(run_dir).resolve())
        if backend == "auto":
            backend = choose_backend(device, _onnx_runtime_available())
        if backend == "onnx":
            cached = Path(run_dir) / ONNX_CACHE_DIR / cache_name(model_sha)
            if cached.is_file():
                try:
                    return cls._from_onnx(cached, device, levels, normalize, source=source, model_id=model_sha)
                except ModelIdentityError:
                    pass  # changed after export, or another model's: exported again below
            _export_run_onnx(run_dir, cached)
            return cls._from_onnx(cached, device, levels, normalize, source=source, model_id=model_sha)
        model = runs.load_model(run_dir).to(device)
        levels = parse_levels(levels, model.num_levels)
        centres = None if model.centres is None else [model.centres[k].cpu().numpy() for k in levels]
        whitenings = None if model.whitenings is None else [
            None if model.whitenings[k] is None else model.whitenings[k].cpu().numpy() for k in levels]
        return cls(backend="torch", levels=levels, dims=[model.level_dims[k] for k in levels],
                   preprocess=model.preprocess_spec, model_id=model_sha, source=source, device=device,
                   normalize=normalize, model=model, centres=centres, whitenings=whitenings)

    @classmethod
    def _from_onnx(cls, path: Path, device: str, levels, normalize: bool, source: str,
                   model_id: str | None = None) -> "Embedder":
        """An ONNX file on ONNX Runtime; its model id is the one OnnxModel verified from its content
        (a changed file is refused), and must equal `model_id` when one is expected."""
        if not path.is_file():
            raise SjeaError(f"ONNX file {path} does not exist; export one with 'sjea export'.")
        from sjea_tools.exports.runtime import OnnxModel

        om = OnnxModel(str(path), provider="cuda" if device.startswith("cuda") else "cpu")
        if model_id is not None and om.model_id != model_id:
            raise ModelIdentityError(f"{path} is not the ONNX graph of model {model_id[:12]} (it is {om.model_id[:12]}); "
                            "delete it and run the command again to re-export it.")
        available = [int(k) for k in om.levels]
        levels = parse_levels(levels, available)
        dims = [int(om.dims[available.index(k)]) for k in levels]
        centres = None if om.centres is None else [om.centres[available.index(k)] for k in levels]
        whitenings = None if om.whitenings is None else [om.whitenings[available.index(k)] for k in levels]
        return cls(backend="onnx", levels=levels, dims=dims, preprocess=om.preprocess, model_id=om.model_id,
                   source=source, device=device, normalize=normalize, onnx_model=om, centres=centres,
                   whitenings=whitenings)

    @classmethod
    def for_store(cls, store, backend: str = "auto", device: str = "cpu") -> "Embedder":
        """The model that wrote a store, with its levels, normalisation and centring (the store's
        recorded means: none for a store written before centring): for embedding queries.

        On the CPU, a run's cached ONNX graph of the store's model id serves without torch (no
        checkpoint is loaded or hashed); otherwise the run or ONNX file the store names."""
        src = Path(store.attrs.get("model_source", ""))
        cached = src / ONNX_CACHE_DIR / cache_name(store.model_id)
        if src.suffix != ".onnx" and backend != "torch" and resolve_device(device) == "cpu" and cached.is_file():
            try:
                return cls._from_onnx(cached, "cpu", store.levels, store.normalized, source=str(src),
                                      model_id=store.model_id).in_space_of(store)
            except ModelIdentityError:
                pass  # a changed or foreign cache file: the run itself decides below
        where = {"onnx": src} if src.suffix == ".onnx" else {"run": src}
        emb = cls.from_source(**where, backend=backend, device=device, levels=store.levels,
                              normalize=store.normalized)
        if emb.model_id != store.model_id:
            raise SjeaError(f"the model at {src} has changed since {store.path} was written (model id "
                            f"{emb.model_id[:12]} != {store.model_id[:12]}); embed the images into a new file "
                            "with the model you mean (--run or --onnx).")
        return emb.in_space_of(store)

    # --- embedding ----------------------------------------------------------------------------
    def embed_pixels(self, pixels) -> list[np.ndarray]:
        """uint8 (B, S, S, 3) pixels (numpy or a torch tensor) -> one float32 (B, dim) array per level."""
        if self.backend == "torch":
            import torch

            from ..data.preprocess import normalize_pixels

            with torch.inference_mode():
                x = normalize_pixels(torch.as_tensor(pixels).to(self.device, non_blocking=True), self.preprocess)
                outs = [y.float().cpu().numpy() for y in self.model.forward_levels(x, self.levels)]
        else:
            from ..data.preprocess import normalize_array

            om = self.onnx_model
            pixels = np.asarray(pixels)
            # A graph exported with its preprocessing takes the uint8 pixels as they are.
            x = pixels if om.takes_pixels else normalize_array(pixels, self.preprocess)
            by_level = dict(zip([int(k) for k in om.levels], om.run(x)))
            outs = [np.asarray(by_level[k], dtype=np.float32) for k in self.levels]
        if not self.normalize:
            return outs
        centres = self.centres or [None] * len(outs)
        whitenings = self.whitenings or [None] * len(outs)
        return [centre_and_normalize(o, c, w) for o, c, w in zip(outs, centres, whitenings)]

    def embed_images(self, images) -> list[np.ndarray]:
        """PIL images -> one float32 (n, dim) array per level (L2-normalised when `normalize`).

        For image files use embed_files: it decodes exactly as a store does (JPEG draft decoding
        at the model's size), which an image opened here by the caller cannot."""
        from ..data.preprocess import model_pixels

        if not images:
            return [np.zeros((0, d), np.float32) for d in self.dims]
        return self.embed_pixels(np.stack([model_pixels(im, self.preprocess) for im in images]))

    def embed_files(self, paths, batch_size: int = 256, display_names=None) -> list[np.ndarray]:
        """Image files -> one float32 (n, dim) array per level: the rows `sjea embed` stores for
        them (same decoder, preprocess and model). A file that cannot be read is a one-line error,
        naming it by its entry in `display_names` when given (a server's upload, not its temp path)."""
        from ..data.images import describe_error
        from ..data.preprocess import file_pixels

        paths = [Path(p) for p in paths]
        names = list(display_names) if display_names is not None else [str(p) for p in paths]
        parts: list[list[np.ndarray]] = [[] for _ in self.levels]
        for start in range(0, len(paths), max(1, batch_size)):
            pixels = []
            for p, name in zip(paths[start:start + batch_size], names[start:start + batch_size]):
                try:
                    pixels.append(file_pixels(p, self.preprocess, display_name=name))
                except Exception as e:  # noqa: BLE001 - every decoder raises its own types
                    raise SjeaError(f"{name} is not a readable image ({describe_error(e)}); pass image files "
                                    "(jpg, png, ...) or a folder of images.") from None
            for part, y in zip(parts, self.embed_pixels(np.stack(pixels))):
                part.append(y)
        return [np.concatenate(p) if p else np.zeros((0, d), np.float32) for p, d in zip(parts, self.dims)]

    def store_attrs(self) -> dict:
        """What a store records about the model: identity, levels, its PreprocessSpec as the
        flat attributes image_size, mean, std, colour_mode, and the centring means its rows had
        subtracted, one `centre_K` per level (plain float lists: a journal keeps them as JSON), and
        for each whitened level the sha256 of its matrix (`whitening_K_sha256`; the model carries the
        matrix), all readable with plain h5py."""
        from .. import __version__

        centres = {}
        if self.centred:
            centres = {f"centre_{k}": [float(v) for v in c] for k, c in zip(self.levels, self.centres)}
            for k, w in zip(self.levels, self.whitenings or []):
                if w is not None:
                    centres[f"whitening_{k}_sha256"] = matrix_digest(w)
        return {"sjea_version": __version__, "model_id": self.model_id, "model_source": self.source,
                "backend": self.backend, "levels": self.levels, "dims": self.dims, **self.preprocess.to_dict(),
                "normalized": bool(self.normalize), **centres}


def _onnx_runtime_available() -> bool:
    """ONNX Runtime and the onnx package are installed (found, not imported: importing the
    exporter would import torch)."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def cache_name(model_sha: str) -> str:
    return f"levels-{model_sha[:16]}.onnx"


def _export_run_onnx(run_dir: Path, path: Path) -> Path:
    """Export every level of the run's model to `path`, its ONNX cache (once per checkpoint).

    Written atomically (sjea_tools.io): concurrent ranks may all export; the last rename wins whole."""
    from sjea_tools.exports.onnx import export_levels

    from .. import runs

    model = runs.load_model(run_dir)
    return export_levels(model, path, list(range(model.num_levels)), output="representation")
