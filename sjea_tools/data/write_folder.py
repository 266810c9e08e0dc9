"""Write a dataset out as image files in class sub-folders: real images for `sjea embed`."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import SjeaError
from .datasets import load_dataset


def write_image_folder(dataset: str, out: str | Path, split: str = "test", limit: int | None = None,
                       fmt: str = "png", data_dir: str | None = None) -> dict:
    """The first `limit` images of a dataset as OUT/<class>/<index>.<fmt>; returns a summary."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg", "webp", "bmp"):
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
    written = 0
    for i in range(n):
        label = int(data.labels[i]) if data.labels is not None else None
        folder = out / (names[label].replace("/", "-").replace(" ", "_") if label is not None and names else "images")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.{fmt}"
        if not path.exists():  # a rerun only adds what is missing
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(data.pixels[i]).save(tmp, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper())
            tmp.replace(path)
            written += 1
    return {"folder": str(out), "images": n, "written": written, "dataset": dataset, "split": split}
