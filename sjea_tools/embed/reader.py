"""Which images, and their pixels in order: scanning, and decoding in worker processes.

Decoding and preprocessing are `sjea_tools.data`'s (`file_pixels`): workers send
uint8 pixels at the model's size and the batch is normalised once by the Embedder, the same way
export verification and search prepare their inputs.
"""

from __future__ import annotations

import os
import stat
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
    """uint8 (S, S, 3) pixels of one file, or an exception saying why it cannot be read."""
    from ..data.preprocess import file_pixels

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")  # a FIFO or device would block or never end
    if st.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    return file_pixels(path, image_size)


class DecodeDataset:
    """Item i -> (i, pixels, None) or (i, None, reason): decoding never raises into the loader."""

    def __init__(self, root: Path, paths: Sequence[str], image_size: int):
        self.root, self.paths, self.image_size = Path(root), paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.images import describe_error

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
