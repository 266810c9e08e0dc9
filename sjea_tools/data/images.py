"""Robust image decoding: every file becomes an RGB PIL image, or a one-line reason it cannot."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The most pixels (width x height, read from the header before any pixel is decoded) an image may
# have: Pillow's default MAX_IMAGE_PIXELS (about 89.5 MP, 9459x9459; a 61 MP camera photo passes).
# Pillow itself only warns up to twice that and fails beyond, so a 1 MB PNG of 18000x18000 would
# be decoded in full (3.4 GB); this cap is checked here instead, and Pillow's global is left alone.
MAX_PIXELS = 89_478_485


def is_image_path(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits instead of clipping.
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype("uint8"), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def check_pixel_count(size: tuple[int, int]) -> None:
    """ValueError when width x height is over MAX_PIXELS (called before decoding)."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise ValueError(f"image too large to decode safely: {w}x{h} = {w * h / 1e6:.1f} MP, over the "
                         f"{MAX_PIXELS / 1e6:.1f} MP cap; shrink it first")


def decode_image(path: str | Path, target_size: int | None = None) -> Image.Image:
    """Open, refuse images over MAX_PIXELS, honour EXIF orientation, reduce large JPEGs while
    decoding (to a short side >= target_size), convert to RGB.

    Callers embedding for a model pass its size (data.preprocess.file_pixels does): the draft
    reduction changes pixels slightly, so a store, a query and the Python API decode alike.
    Raises OSError/ValueError with a readable message for unreadable files.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as img:
                check_pixel_count(img.size)
                if target_size is not None and img.format == "JPEG":
                    # JPEG decodes at 1/2, 1/4 or 1/8 scale for free; keep the short side >= target.
                    img.draft("RGB", (target_size, target_size))
                img.seek(0)  # first frame of a GIF/TIFF
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
        except Image.DecompressionBombError as e:  # not an OSError: callers catching bad files would crash
            # Pillow's own stop (at twice its default) fires in Image.open, before check_pixel_count.
            raise ValueError(f"image too large to decode safely: over the {MAX_PIXELS / 1e6:.1f} MP cap ({e})") from None


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
