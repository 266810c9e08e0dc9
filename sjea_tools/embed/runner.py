"""Embed image folders: scan -> decode in worker processes -> backend (PyTorch or ONNX Runtime) -> store.

    from sjea_tools.embed import embed_folder, Embedder
    summary = embed_folder("photos/", "photos.h5", run="runs/tiny")      # resumable, streaming
    emb = Embedder.from_source(run="runs/tiny")
    y0, y1 = emb.embed_images([pil_a, pil_b])                             # one array per level

Decoding and preprocessing are `sjea_tools.data`'s (`decode_image`, `model_pixels`,
`normalize_pixels`): workers send uint8 pixels at the model's size and the batch is normalised
once, the same way export verification and search prepare their inputs. Rows are appended in scan
order to the store's journal (store.py), so a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import SjeaError
from .vectors import l2_normalize

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("float32", "float16")
# Seconds between durable commits of the journal: at most this much work is redone after a kill.
COMMIT_EVERY_S = 2.0
ONNX_CACHE_DIR = "onnx-cache"


# --- pure helpers ---------------------------------------------------------------------------------

def choose_backend(device: str, onnx_available: bool) -> str:
    """The faster backend for a device: ONNX Runtime on CPU (measured 1.3-1.6x over eager PyTorch on
    ResNet-18, benchmarks/bench_onnx.py), PyTorch on GPUs, where eager CUDA kernels already run fast."""
    if device.startswith("cuda") or not onnx_available:
        return "torch"
    return "onnx"


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SjeaError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu.")
    elif device != "cpu":
        raise SjeaError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'.")
    return device


def parse_levels(levels, num_levels: int) -> list[int]:
    """None/'all' -> every level; '0,1' or [0, 1] -> those, checked against the model."""
    if levels is None or levels == "all" or levels == []:
        return list(range(num_levels))
    if isinstance(levels, str):
        try:
            levels = [int(v) for v in levels.split(",") if v.strip()]
        except ValueError:
            raise SjeaError(f"--levels must be 'all' or level numbers like 0,1, not '{levels}'.") from None
    levels = sorted({int(k) for k in levels})
    bad = [k for k in levels if not 0 <= k < num_levels]
    if bad or not levels:
        raise SjeaError(f"--levels {bad or levels}: this model has levels 0..{num_levels - 1}.")
    return levels


def release_freed_buffers_promptly() -> None:
    """Keep RSS flat over long runs (measured: +350 MB over 8,000 images without this).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); afterwards
    the per-batch buffers (pixels, normalised inputs, outputs) come from the heap, and freed heap
    memory is rarely returned to the OS. A fixed 1 MiB threshold keeps such buffers mmapped, so
    freeing them returns the memory at once. Process-wide and harmless elsewhere; no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# --- inputs ---------------------------------------------------------------------------------------

def collect_images(images: str | Path) -> tuple[Path, list[str]]:
    """(root folder, image paths relative to it): a folder scanned recursively in sorted order, a
    text file listing one path per line (relative to the file's folder; order kept), or one image."""
    from .data.datasets import scan_images
    from .data.images import is_image_path

    src = Path(images)
    if src.is_dir():
        root = src.resolve()
        paths = scan_images(root)
        if not paths:
            raise SjeaError(f"no images (jpg, jpeg, png, bmp, gif, tif, tiff, webp) found under {src}; "
                            "check the folder or pass a text file listing image paths.")
        return root, paths
    if not src.exists():
        raise SjeaError(f"{src} does not exist; pass a folder of images or a text file listing image paths.")
    if is_image_path(src):
        return src.resolve().parent, [src.name]
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SjeaError(f"cannot read the image list {src} ({type(e).__name__}); pass a folder or a UTF-8 text "
                        "file with one image path per line.") from None
    root = src.resolve().parent
    seen, paths = set(), []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        full = Path(line) if Path(line).is_absolute() else root / line
        rel = os.path.relpath(full, root)
        if rel not in seen:
            seen.add(rel)
            paths.append(rel)
    if not paths:
        raise SjeaError(f"the image list {src} names no images (one path per line; # starts a comment).")
    return root, paths


def load_pixels(path: str | Path, image_size: int) -> np.ndarray:
    """uint8 (S, S, 3) pixels of one file, or an exception saying why it cannot be read."""
    from .data.images import decode_image
    from .data.preprocess import model_pixels

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")  # a FIFO or device would block or never end
    if st.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    return model_pixels(decode_image(path, target_size=image_size), image_size)


class DecodeDataset:
    """Item i -> (i, pixels, None) or (i, None, reason): decoding never raises into the loader."""

    def __init__(self, root: Path, paths: Sequence[str], image_size: int):
        self.root, self.paths, self.image_size = Path(root), paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data.images import describe_error

        try:
            return i, load_pixels(self.root / self.paths[i], self.image_size), None
        except Exception as e:  # every decoder raises its own types; the reason is recorded
            return i, None, describe_error(e)


def collate_decoded(items):
    """A batch: (indices of decoded items, uint8 tensor (b, S, S, 3) or None, [(index, reason)])."""
    import torch

    ok = [(i, px) for i, px, err in items if err is None]
    pixels = torch.from_numpy(np.stack([px for _, px in ok])) if ok else None
    return [i for i, _ in ok], pixels, [(i, err) for i, _, err in items if err is not None]


def decoded_batches(root: Path, paths: Sequence[str], image_size: int, batch_size: int, workers: int,
                    pin_memory: bool = False):
    """Batches in order, decoded by `workers` processes ahead of the consumer (0 = in this process)."""
    import torch

    loader = torch.utils.data.DataLoader(
        DecodeDataset(root, paths, image_size), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_decoded, pin_memory=pin_memory, prefetch_factor=4 if workers else None)
    return iter(loader)


# --- the model behind one interface -----------------------------------------------------------------

class Embedder:
    """A model (PyTorch or ONNX Runtime) that turns uint8 pixels or PIL images into rows per level."""

    def __init__(self, *, backend: str, levels: list[int], dims: list[int], image_size: int, mean, std,
                 model_id: str, source: str, device: str, normalize: bool, model=None, onnx_model=None):
        self.backend, self.levels, self.dims = backend, levels, dims
        self.image_size, self.mean, self.std = int(image_size), tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.model_id, self.source, self.device, self.normalize = model_id, source, device, normalize
        self.model, self.onnx_model = model, onnx_model

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
        from . import runs

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
                   image_size=model.image_size, mean=model.mean, std=model.std, model_id=model_sha, source=source,
                   device=device, normalize=normalize, model=model)

    @classmethod
    def _from_onnx(cls, path: Path, device: str, levels, normalize: bool, source: str,
                   model_id: str | None = None) -> "Embedder":
        if not path.is_file():
            raise SjeaError(f"ONNX file {path} does not exist; export one with 'sjea export'.")
        from exports.runtime import OnnxModel

        om = OnnxModel(str(path), provider="cuda" if device.startswith("cuda") else "cpu")
        available = [int(k) for k in om.levels]
        levels = parse_levels(levels, max(available) + 1)
        missing = [k for k in levels if k not in available]
        if missing:
            raise SjeaError(f"{path} has levels {available}, not {missing}; export those levels or pick --levels.")
        dims = [int(om.dims[available.index(k)]) for k in levels]
        if model_id is None:
            from .io import sha256_file

            model_id = om.model_id or sha256_file(path)
        return cls(backend="onnx", levels=levels, dims=dims, image_size=om.image_size, mean=om.mean, std=om.std,
                   model_id=model_id, source=source, device=device, normalize=normalize, onnx_model=om)

    @classmethod
    def for_store(cls, store, backend: str = "auto", device: str = "cpu") -> "Embedder":
        """The model that wrote a store, with its levels and normalisation: for embedding queries."""
        src = Path(store.attrs.get("model_source", ""))
        if src.suffix == ".onnx":
            emb = cls.from_source(onnx=src, backend=backend, device=device, levels=store.levels,
                                  normalize=store.normalized)
        else:
            emb = cls.from_source(run=src, backend=backend, device=device, levels=store.levels,
                                  normalize=store.normalized)
        if emb.model_id != store.model_id:
            raise SjeaError(f"the model at {src} has changed since {store.path} was written (model id "
                            f"{emb.model_id[:12]} != {store.model_id[:12]}); re-embed with 'sjea embed --overwrite'.")
        return emb

    # --- embedding ----------------------------------------------------------------------------
    def embed_pixels(self, pixels) -> list[np.ndarray]:
        """uint8 (B, S, S, 3) pixels -> one float32 (B, dim) array per level."""
        import torch

        from .data.preprocess import normalize_pixels

        pixels = torch.as_tensor(pixels)
        if self.backend == "torch":
            with torch.inference_mode():
                x = normalize_pixels(pixels.to(self.device, non_blocking=True), self.mean, self.std)
                outs = [y.float().cpu().numpy() for y in self.model.forward_levels(x, self.levels)]
        else:
            om = self.onnx_model
            # A graph exported with its preprocessing takes the uint8 pixels as they are.
            x = pixels.numpy() if om.takes_pixels else normalize_pixels(pixels, self.mean, self.std).numpy()
            by_level = dict(zip([int(k) for k in self.onnx_model.levels], self.onnx_model.run(x)))
            outs = [np.asarray(by_level[k], dtype=np.float32) for k in self.levels]
        return [l2_normalize(o) for o in outs] if self.normalize else outs

    def embed_images(self, images) -> list[np.ndarray]:
        """PIL images -> one float32 (n, dim) array per level (L2-normalised when `normalize`)."""
        from .data.preprocess import model_pixels

        if not images:
            return [np.zeros((0, d), np.float32) for d in self.dims]
        return self.embed_pixels(np.stack([model_pixels(im, self.image_size) for im in images]))

    def store_attrs(self) -> dict:
        from . import __version__

        return {"sjea_version": __version__, "model_id": self.model_id, "model_source": self.source,
                "backend": self.backend, "levels": self.levels, "dims": self.dims, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "normalized": bool(self.normalize)}


def _onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401

        import exports.onnx  # noqa: F401
        import exports.runtime  # noqa: F401
    except ImportError:
        return False
    return True


def _exported_onnx(model, model_sha: str) -> Path:
    """The run's ONNX graph of every level, exported once per checkpoint and cached in the run folder."""
    path = Path(model.run_dir) / ONNX_CACHE_DIR / f"levels-{model_sha[:16]}.onnx"
    if path.is_file():
        return path
    from exports.onnx import export_levels

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        export_levels(model, tmp, list(range(model.num_levels)), output="representation")
        os.replace(tmp, path)  # concurrent ranks may export too: the rename makes one of them win whole
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- the whole job ----------------------------------------------------------------------------------

def _check_output(out: Path) -> None:
    if out.is_dir():
        raise SjeaError(f"output {out} is a folder; give a file name such as {out / 'embeddings.h5'}.")
    if out.exists() and not out.is_file():
        raise SjeaError(f"output {out} exists and is not a regular file; choose another name.")


def embed_folder(images, out, run=None, onnx=None, levels=None, batch_size: int = 256, workers: int | None = None,
                 device: str = "cpu", backend: str = "auto", dtype: str = "float32", normalize: bool = True,
                 shard=None, update: bool = False, overwrite: bool = False, index: bool = True,
                 progress: Callable[[int, int, int], None] | None = None, embedder: Embedder | None = None,
                 commit_every_s: float = COMMIT_EVERY_S) -> dict:
    """Embed every image under `images` (a folder, a text file of paths, or one image) into the HDF5
    store `out`, resuming an interrupted run of the same command. Returns a summary dict.

    progress(done, total, failed) is called after every batch. commit_every_s: seconds between
    durable commits of the journal (the most work a kill can cost).
    """
    from . import store as st

    t0 = time.perf_counter()
    out = Path(out)
    _check_output(out)
    if dtype not in DTYPES:
        raise SjeaError(f"--dtype must be float32 or float16, not '{dtype}'.")
    if batch_size < 1:
        raise SjeaError(f"--batch-size must be at least 1 (got {batch_size}).")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise SjeaError(f"--workers must be 0 (decode in this process) or more (got {workers}).")
    if update and overwrite:
        raise SjeaError("pass --update (add new images) or --overwrite (replace the store), not both.")
    shard_t = st.parse_shard(shard)
    root, scanned = collect_images(images)
    todo_all = scanned[st.shard_slice(len(scanned), shard_t)]

    emb = embedder or Embedder.from_source(run=run, onnx=onnx, backend=backend, device=device, levels=levels,
                                           normalize=normalize)
    attrs = {**emb.store_attrs(), "dtype": dtype, "root": str(root), "input": str(Path(images).resolve()),
             "scan_count": len(scanned), "shard": None if shard_t is None else f"{shard_t[0]}/{shard_t[1]}"}

    # 1. What is already done: an unfinished run's journal, and/or an existing store (--update).
    journal_dir = st.partial_path(out)
    journal = st.Journal.open(journal_dir) if (journal_dir / "meta.json").is_file() else None
    if journal is None and journal_dir.exists():
        import shutil

        shutil.rmtree(journal_dir)  # a journal folder whose creation was cut short holds nothing
    # A journal whose store was renamed into place before the kill is finished work.
    base = None
    existing = _readable_store(out, overwrite)
    if existing is not None:
        with existing as s:
            done_token = s.attrs.get("run_token")
            if journal is not None and journal.meta["token"] == done_token:
                journal.remove()
                journal = None
                if not (update or overwrite):
                    return _summary(out, s.n, 0, 0, len(s.failed), 0, t0, emb, status="complete")
            if not overwrite:
                st.check_same_identity(attrs, s.attrs, str(out),
                                       "pass --overwrite to replace it, or write to another file.")
                if (s.attrs.get("shard") or None) != attrs["shard"]:
                    raise SjeaError(f"{out} holds shard {s.attrs.get('shard') or 'all'}, this run is shard "
                                    f"{attrs['shard'] or 'all'}; write to another file or pass --overwrite.")
                if not update and journal is None:
                    raise SjeaError(f"{out} already exists; pass --update to add new images, --overwrite to "
                                    "replace it, or write to another file.")
                base = out
    mode = "overwrite" if overwrite else ("update" if base is not None else "new")
    base_rows = 0
    done: set[str] = set()
    if base is not None:
        with st.open_store(base) as s:
            base_rows = s.n
            done.update(s.paths)
            done.update(p for p, _ in s.failed)

    if journal is not None:
        same = journal.meta.get("mode") == mode and journal.meta.get("base_rows") == base_rows
        try:
            st.check_same_identity(attrs, journal.meta["attrs"], f"the unfinished run in {journal_dir}",
                                   "run the same command again to resume it, or pass --overwrite to start over.")
            if (journal.meta["attrs"].get("shard") or None) != attrs["shard"]:
                raise SjeaError(f"the unfinished run in {journal_dir} is shard {journal.meta['attrs'].get('shard')}; "
                                "run the same command again, or pass --overwrite to start over.")
            if not same:
                raise SjeaError(f"the unfinished run in {journal_dir} was started as '{journal.meta.get('mode')}' "
                                f"on a store of {journal.meta.get('base_rows')} rows; run that command again, or "
                                "pass --overwrite to start over.")
        except SjeaError:
            if not overwrite:
                raise
            journal.remove()
            journal = None
    # 2. Resume the journal if it belongs to this same command, else start a new one.
    resumed = 0
    if journal is None:
        journal = st.Journal.create(journal_dir, attrs, base_rows=base_rows, mode=mode)
    else:
        resumed = journal.rows + journal.failed
        done.update(journal.paths())
        done.update(p for p, _ in journal.failures())

    todo = [p for p in todo_all if p not in done]
    total = len(todo) + resumed
    if progress:
        progress(resumed, total, journal.failed)
    if not todo and base is not None and journal.rows + journal.failed == 0:
        journal.remove()  # --update with nothing new: the store is already up to date
        with st.open_store(out) as s:
            return _summary(out, s.n, 0, 0, len(s.failed), resumed, t0, emb, status="up to date")

    # 3. Stream: decode workers -> backend -> journal, in scan order, committed every few seconds.
    release_freed_buffers_promptly()
    n_done = resumed
    pin = emb.backend == "torch" and emb.device.startswith("cuda")
    try:
        for idx, pixels, errors in decoded_batches(root, todo, emb.image_size, batch_size, workers, pin):
            rows = dict(zip(emb.levels, emb.embed_pixels(pixels))) if idx else {}
            journal.append([todo[i] for i in idx], rows, [(todo[i], e) for i, e in errors])
            journal.commit(every_s=commit_every_s)
            n_done += len(idx) + len(errors)
            if progress:
                progress(n_done, total, journal.failed)
        journal.commit()
    except BaseException:
        journal.close()  # the last commit stands; the next run resumes from it
        raise

    # 4. Finish: the complete store goes to a temporary file, then replaces OUT in one rename.
    final_attrs = {**attrs, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_token": journal.meta["token"]}
    sources, failures = [journal.iter_rows()], journal.failures()
    base_store = None
    try:
        if base is not None:
            base_store = st.open_store(base)
            final_attrs["created"] = base_store.attrs.get("created", final_attrs["created"])
            final_attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            sources.insert(0, base_store.iter_rows())
            failures = base_store.failed + failures
        st.write_store(out, final_attrs, sources, failures)
    finally:
        if base_store is not None:
            base_store.close()
    added, failed_now = journal.rows, journal.failed
    journal.remove()
    with st.open_store(out) as s:
        summary = _summary(out, s.n, added, failed_now, len(s.failed), resumed, t0, emb, status="written")
    if index:
        summary["index"] = build_index(out, progress=progress is not None)
    return summary


def _readable_store(out: Path, overwrite: bool):
    """The store at `out` opened, None if there is none; a file that is no store is replaced only
    with --overwrite."""
    from . import store as st

    if not out.is_file():
        return None
    try:
        return st.open_store(out)
    except SjeaError as e:
        if overwrite:
            return None
        raise SjeaError(f"{e} Pass --overwrite to replace {out}, or write to another file.") from None


def build_index(out: Path, progress: bool = False):
    """The FAISS indexes beside a store (sjea_tools.index.build_indexes)."""
    from .index import build_indexes

    return build_indexes(out, progress=progress)


def _summary(out: Path, rows: int, added: int, failed_now: int, failed_total: int, resumed: int, t0: float,
             emb: Embedder, status: str) -> dict:
    seconds = time.perf_counter() - t0
    processed = added + failed_now - resumed
    return {"out": str(out), "status": status, "rows": rows, "added": added, "failed": failed_now,
            "failed_total": failed_total, "resumed_from": resumed, "seconds": round(seconds, 3),
            "images_per_s": round(max(processed, 0) / seconds, 1) if seconds > 0 else None,
            "backend": emb.backend, "device": emb.device, "levels": emb.levels, "model_id": emb.model_id}
