"""Images in and out of the server: uploads checked before they are decoded, stored files found by id.

No path from a client ever reaches the file system: an upload is written to a private temporary
file, and a stored image is `root / paths[id]` of the store, served only when it resolves inside
the store's image root (a symlink pointing out of it is refused).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import SjeaError

MAX_UPLOAD_BYTES = 20 << 20      # a 20 MiB photo is large; stops a client filling memory or disk
MAX_PIXELS = 50_000_000          # 50 MP: any camera photo, not a crafted 18000 x 18000 bomb
THUMB_SIZES = (16, 512)
READ_CHUNK = 1 << 16


class TooLarge(SjeaError):
    """An upload over the byte limit (HTTP 413)."""


class BadImage(SjeaError):
    """An upload or stored file that is not a readable image, or has too many pixels (HTTP 400)."""


class Forbidden(SjeaError):
    """A stored row whose file lies outside the store's image root (HTTP 403)."""


class Missing(SjeaError):
    """A stored row whose file is gone (HTTP 404)."""


def read_limited(stream: BinaryIO, max_bytes: int) -> bytes:
    """The whole upload, or TooLarge as soon as it passes max_bytes (never more is kept)."""
    out = bytearray()
    while chunk := stream.read(READ_CHUNK):
        out += chunk
        if len(out) > max_bytes:
            raise TooLarge(f"the upload is larger than the limit of {max_bytes / 2**20:g} MiB; send a smaller image.")
    if not out:
        raise BadImage("the upload is empty; send an image file (jpg, png, ...).")
    return bytes(out)


def image_size(source, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header only; BadImage when it is not an image or has too many pixels."""
    from PIL import Image

    from ..data.images import IMAGE_FORMATS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's bomb *warning*; the limit below is ours
        try:
            with Image.open(source, formats=IMAGE_FORMATS) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            raise BadImage(f"the image has more than {max_pixels:,} pixels (a decompression bomb?); "
                           "send a smaller image.") from None
        except Exception:  # noqa: BLE001 - any failure to read a header means "not an image"
            raise BadImage("the upload is not an image Pillow can read; send a jpg, png, gif, bmp, tiff or webp file.") from None
    if w * h > max_pixels:
        raise BadImage(f"the image is {w} x {h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
                       "send a smaller image.")
    return w, h


@contextmanager
def upload_file(data: bytes, max_pixels: int) -> Iterator[Path]:
    """The upload as a private temporary file (checked first), removed afterwards: queries then go
    through exactly the decoder that `sjea search` uses for files."""
    image_size(io.BytesIO(data), max_pixels)
    fd, name = tempfile.mkstemp(prefix="sjea-serve-", suffix=".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def item_file(root: Path, rel: str, item_id: int) -> Path:
    """The stored file of row item_id, only when it resolves inside root (symlinks out refused)."""
    base = root.resolve()
    try:
        target = (base / rel).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise Missing(f"the image file of item {item_id} is no longer in the store's image root.") from None
    except (OSError, RuntimeError):  # symlink loops
        raise Forbidden(f"the image file of item {item_id} cannot be resolved inside the store's image root.") from None
    if not target.is_relative_to(base) or not target.is_file():
        raise Forbidden(f"the image file of item {item_id} lies outside the store's image root; it is not served.")
    return target


def thumbnail_png(path: Path, size: int, max_pixels: int) -> bytes:
    """A PNG at most size x size of a stored file, cached by (file, mtime, size)."""
    st = path.stat()
    return _thumbnail(str(path), st.st_mtime_ns, st.st_size, size, max_pixels)


@lru_cache(maxsize=8192)
def _thumbnail(path: str, mtime_ns: int, nbytes: int, size: int, max_pixels: int) -> bytes:
    from ..data.images import decode_image

    image_size(path, max_pixels)
    try:
        img = decode_image(path, target_size=size, display_name=Path(path).name)
    except (OSError, ValueError) as e:
        raise BadImage(f"the stored file is not a readable image ({str(e).splitlines()[0][:120]}).") from None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
