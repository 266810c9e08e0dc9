"""Robust image decoding: every file becomes an RGB PIL image, or a one-line reason it cannot."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The Pillow formats of IMAGE_EXTENSIONS (JPEG opens a camera MPO too), the only ones
# opened: any other plugin (EPS runs Ghostscript; PSD, ICNS, ...) never sees a file's bytes,
# whatever its name says.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# The most pixels (width x height, read from the header before any pixel is decoded) an image may
# have: Pillow's default MAX_IMAGE_PIXELS (about 89.5 MP, 9459x9459; a 61 MP camera photo passes).
# Pillow itself only warns up to twice that and fails beyond, so a 1 MB PNG of 18000x18000 would
# be decoded in full (3.4 GB); this cap is checked here instead, and Pillow's global is left alone.
MAX_PIXELS = 89_478_485
# Decoded bytes in flight per process: each decode reserves its estimate (below) before any pixel
# is decoded and waits while others hold the budget, so N concurrent decodes (the server's
# threads) stay under this much, whatever N; a file estimated over it decodes alone.
DECODE_BUDGET_BYTES = 512 << 20
# Estimated peak bytes per decoded pixel: Pillow keeps RGB and L in 4/1 bytes, plus an EXIF
# transpose or RGB copy; other modes (RGBA, P, 16-bit) go through up to four full-size copies.
_BYTES_PER_PIXEL_RGB, _BYTES_PER_PIXEL_OTHER = 8, 20


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


class _DecodeBudget:
    """A byte budget shared by the threads of a process (see DECODE_BUDGET_BYTES)."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self.cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        nbytes = min(nbytes, self.total)  # an image over the budget waits until it decodes alone
        with self.cond:
            self.cond.wait_for(lambda: self.used + nbytes <= self.total)
            self.used += nbytes
        try:
            yield
        finally:
            with self.cond:
                self.used -= nbytes
                self.cond.notify_all()


_budget = _DecodeBudget(DECODE_BUDGET_BYTES)


def decode_estimate(img: Image.Image) -> int:
    """Estimated peak bytes of decoding img (opened, not loaded) and converting it to RGB."""
    w, h = img.size
    return w * h * (_BYTES_PER_PIXEL_RGB if img.mode in ("RGB", "L", "1") else _BYTES_PER_PIXEL_OTHER)


def decode_image(path: str | Path, target_size: int | None = None, display_name: str | None = None) -> Image.Image:
    """decoded()'s RGB image, kept by the caller (outside the decode budget)."""
    with decoded(path, target_size, display_name) as img:
        return img


@contextmanager
def decoded(path: str | Path, target_size: int | None = None,
            display_name: str | None = None) -> Iterator[Image.Image]:
    """The file as an RGB image, held under its share of DECODE_BUDGET_BYTES until the block ends
    (reduce it to what you keep inside the block). Opens the IMAGE_FORMATS only, refuses images
    over MAX_PIXELS, honours EXIF orientation, reduces large JPEGs while decoding (to a short side
    >= target_size).

    Callers embedding for a model pass its size (data.preprocess.file_pixels does): the draft
    reduction changes pixels slightly, so a store, a query and the Python API decode alike.
    Raises OSError/ValueError with a readable message for unreadable files, naming the file as
    display_name when given (an upload's temporary path is the server's business, not the user's).
    """
    name = display_name if display_name is not None else str(path)
    with _reading(path, name):
        img = Image.open(path, formats=IMAGE_FORMATS)
    with img:
        with _reading(path, name):
            check_pixel_count(img.size)
            if target_size is not None and img.format in ("JPEG", "MPO"):
                # JPEG decodes at 1/2, 1/4 or 1/8 scale for free; keep the short side >= target.
                img.draft("RGB", (target_size, target_size))
        with _budget.reserve(decode_estimate(img)):
            with _reading(path, name):
                img.seek(0)  # first frame of a GIF/TIFF
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
            yield rgb


@contextmanager
def _reading(path: str | Path, name: str) -> Iterator[None]:
    """Pillow's errors as OSError/ValueError that name the file as `name`; its bomb warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        except Image.DecompressionBombError as e:  # not an OSError: callers catching bad files would crash
            # Pillow's own stop (at twice its default) fires in Image.open, before check_pixel_count.
            raise ValueError(f"image too large to decode safely: over the {MAX_PIXELS / 1e6:.1f} MP cap ({e})") from None
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"cannot identify {name} as an image in a supported format "
                                         f"({', '.join(IMAGE_FORMATS)})") from None
        except OSError as e:
            if str(path) not in str(e):
                raise
            raise OSError(str(e).replace(str(path), name)) from None


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
