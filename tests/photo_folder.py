"""A messy folder of real colour photos, as a user has one: crops and resizes of scikit-image's
bundled photographs (no download), JPEG and PNG, one class per sub-folder, a nested folder, and
broken files (a truncated JPEG, a zero-byte file, a text file named .png).

Seeded, so a test gets the same files every time. `make_photo_folder(root)` with the defaults is
small and quick (tests); `per_class=66, sizes=(200, 1600)` is the 396-photo folder of issue 20.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# One bundled colour photograph per class: each class is crops of one scene, so folder labels mean
# something. Names are skimage.data functions (all ship inside the package).
SOURCES = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket",
           "cells": "immunohistochemistry", "retina": "retina"}
# The broken files, relative to the root: what a training run must skip and name.
BROKEN = ("cat/truncated.jpg", "coffee/empty.jpg", "rocket/notes.png")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    px = getattr(skimage.data, name)()
    return px[..., :3] if px.ndim == 3 else np.repeat(px[..., None], 3, axis=2)


def make_photo_folder(root: str | Path, per_class: int = 6, sizes: tuple[int, int] = (40, 120), seed: int = 0,
                      broken: bool = True) -> dict:
    """Write `per_class` photos into each of 6 class folders (every third one of the 'rocket' class
    in the nested 'rocket/launch/'), alternating JPEG and PNG, each a random crop of its class's
    photo resized to a long side drawn from `sizes`; then the BROKEN files when `broken`.
    Returns {"root", "images": readable paths relative to root, "broken": BROKEN or ()}."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    images = []
    for cls, source in SOURCES.items():
        px = _photo(source)
        h, w = px.shape[:2]
        for i in range(per_class):
            ch, cw = (int(rng.uniform(0.5, 1.0) * d) for d in (h, w))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img = Image.fromarray(px[top:top + ch, left:left + cw])
            side = int(rng.integers(sizes[0], sizes[1] + 1))
            scale = side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
            folder = f"{cls}/launch" if cls == "rocket" and i % 3 == 0 else cls
            rel = f"{folder}/{cls}_{i:03d}." + ("jpg" if i % 2 == 0 else "png")
            (root / folder).mkdir(parents=True, exist_ok=True)
            img.save(root / rel, quality=90) if rel.endswith(".jpg") else img.save(root / rel)
            images.append(rel)
    if broken:
        _write_broken(root)
    return {"root": root, "images": sorted(images), "broken": BROKEN if broken else ()}


def _write_broken(root: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_photo("chelsea")).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    (root / BROKEN[0]).write_bytes(data[:len(data) // 3])  # header intact, scan data cut short
    (root / BROKEN[1]).write_bytes(b"")
    (root / BROKEN[2]).write_text("shopping list: milk, eggs\n")
