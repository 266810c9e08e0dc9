"""Write a dataset out as image files in class sub-folders: real images for `sjea embed`."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import SjeaError
from ..io import atomic_path
from .datasets import load_dataset, row_pixels

FORMATS = ("png", "jpg", "jpeg", "webp", "bmp")


def class_folder_name(class_name: str | None) -> str:
    """A class name as one safe folder name ('T-shirt/top' -> 'T-shirt-top'); 'images' for none."""
    return class_name.replace("/", "-").replace(" ", "_") if class_name else "images"


def write_image_folder(dataset: str, out: str | Path, split: str = "test", limit: int | None = None,
                       fmt: str = "png", data_dir: str | None = None) -> dict:
    """The first `limit` images of a dataset as OUT/<class>/<index>.<fmt>; returns a summary.

    Each file is written atomically, so a killed run leaves no half image; a rerun only adds what
    is missing."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise SjeaError(f"--format must be png, jpg, webp or bmp, not '{fmt}'.")
    if limit is not None and limit < 1:
        raise SjeaError(f"--limit must be 1 or more (got {limit}).")
    data = load_dataset(dataset, data_dir, split)
    if data.pixels is None:
        raise SjeaError(f"'{dataset}' is already a folder of images; nothing to write.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SjeaError(f"{out} exists and is not a folder; choose another output folder.")
    n = len(data) if limit is None else min(limit, len(data))
    names = data.class_names or []
    pillow_format = "JPEG" if fmt in ("jpg", "jpeg") else fmt.upper()
    written = 0
    for i in range(n):
        label = int(data.labels[i]) if data.labels is not None and names else None
        path = out / class_folder_name(None if label is None else names[label]) / f"{i:06d}.{fmt}"
        if not path.exists():
            with atomic_path(path) as tmp:
                Image.fromarray(row_pixels(data, i)).save(tmp, format=pillow_format)
            written += 1
    return {"folder": str(out), "images": n, "written": written, "dataset": dataset, "split": split}
