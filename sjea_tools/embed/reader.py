"""Which images, and their pixels in order: scanning, and decoding in worker processes.

Decoding and preprocessing are `sjea_tools.data`'s (`file_pixels`): workers send
uint8 pixels at the model's size and the batch is normalised once by the Embedder, the same way
export verification, search and `sjea_tools.embed_files` prepare their inputs. No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SjeaError


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def collect_images(images: str | Path) -> tuple[Path, list[str]]:
    """(root folder, image paths relative to it): a folder scanned recursively in sorted order, a
    text file listing one path per line (relative to the file's folder; order kept), or one image."""
    from ..data.datasets import scan_images
    from ..data.images import is_image_path

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
    return src.resolve().parent, _listed_images(src)


def _listed_images(src: Path) -> list[str]:
    """The paths a list file names, relative to its folder, each once, in the file's order."""
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
    return paths


def load_pixels(path: str | Path, image_size: int) -> np.ndarray:
    """uint8 (S, S, 3) pixels of one file, or an exception saying why it cannot be read
    (data.preprocess.file_pixels: the one way from a file to model pixels)."""
    from ..data.preprocess import file_pixels

    return file_pixels(path, image_size)


def decode_batch(root: Path, paths: Sequence[str], start: int, image_size: int):
    """One batch: (indices decoded, uint8 (b, S, S, 3) array or None, [(index, reason)]), indices
    counted from `start`; decoding never raises, the reason of each failure is kept."""
    from ..data.images import describe_error

    ok, pixels, errors = [], [], []
    for i, rel in enumerate(paths, start):
        try:
            pixels.append(load_pixels(Path(root) / rel, image_size))
            ok.append(i)
        except Exception as e:  # every decoder raises its own types; the reason is recorded
            errors.append((i, describe_error(e)))
    return ok, (np.stack(pixels) if pixels else None), errors


def decoded_batches(root: Path, paths: Sequence[str], image_size: int, batch_size: int, workers: int,
                    pin_memory: bool = False):
    """Batches in order (decode_batch's), decoded by `workers` processes ahead of the consumer
    (0 = in this process); pin_memory gives page-locked torch tensors for a CUDA model.

    A process pool rather than torch's DataLoader: embedding with ONNX Runtime then never imports
    torch (about 2 s of every run's start-up). A worker that dies raises BrokenProcessPool
    instead of hanging; at most 2 batches per worker wait decoded, so memory stays bounded.
    Workers end when this process dies (sjea_tools.workers), even by SIGKILL."""
    tasks = ((paths[s:s + batch_size], s) for s in range(0, len(paths), max(1, batch_size)))
    if workers == 0:
        for chunk, s in tasks:
            yield _pinned(decode_batch(root, chunk, s, image_size), pin_memory)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    from ..workers import end_with_this_process

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                             initializer=end_with_this_process()) as pool:
        pending: deque = deque()
        try:
            for chunk, s in tasks:
                pending.append(pool.submit(decode_batch, root, chunk, s, image_size))
                if len(pending) >= 2 * workers:
                    yield _pinned(pending.popleft().result(), pin_memory)
            while pending:
                yield _pinned(pending.popleft().result(), pin_memory)
        finally:
            for future in pending:
                future.cancel()  # a consumer that stopped early does not wait for the rest


def _pinned(batch, pin_memory: bool):
    if not pin_memory or batch[1] is None:
        return batch
    import torch

    return batch[0], torch.from_numpy(batch[1]).pin_memory(), batch[2]
