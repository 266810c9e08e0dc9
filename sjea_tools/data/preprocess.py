"""The single evaluation preprocess: RGB, resize the short side, centre crop, normalise.

Split in two so that image decoding workers can send compact uint8 pixels and the batch is
normalised once on the inference device: `model_pixels` (PIL -> uint8 HWC) and
`normalize_pixels` (uint8 batch -> float NCHW; `normalize_array` is the same arithmetic in numpy,
for the torch-free query path). `preprocess_image` is both in a row; `file_pixels` is the one way
from an image file to model pixels (store, queries and the Python API all use it). Each takes the
numbers one by one or as the model's `PreprocessSpec` (sjea_tools.spec), the one record of size,
mean and std. torch is imported only by the functions that return tensors.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from ..spec import PreprocessSpec
from .images import decoded, to_rgb

if TYPE_CHECKING:
    import torch


def _size(size_or_spec: int | PreprocessSpec) -> int:
    return size_or_spec.image_size if isinstance(size_or_spec, PreprocessSpec) else int(size_or_spec)


def _mean_std(mean_or_spec, std) -> tuple[Sequence[float], Sequence[float]]:
    if isinstance(mean_or_spec, PreprocessSpec):
        return mean_or_spec.mean, mean_or_spec.std
    if std is None:
        raise TypeError("normalize_pixels needs a PreprocessSpec, or both mean and std")
    return mean_or_spec, std


# Up to this aspect ratio the whole image is resized, then cropped (the pixels of every store so
# far); beyond it only the region the centre crop keeps is resized (resize's box=), so a 1 x 300,000
# strip costs a model-sized image, not a 64 x 19,200,000 one.
MAX_WHOLE_RESIZE_ASPECT = 8


def model_pixels(img: Image.Image, image_size: int | PreprocessSpec) -> np.ndarray:
    """uint8 (H, W, 3) pixels at the model's size: short side resized, centre cropped."""
    image_size = _size(image_size)
    img = to_rgb(img)
    w, h = img.size
    if (w, h) == (image_size, image_size):
        return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    if max(w, h) > MAX_WHOLE_RESIZE_ASPECT * min(w, h):
        sx, sy = w / nw, h / nh  # the crop's box in the file's pixels
        box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
        img = img.resize((image_size, image_size), Image.BILINEAR, box=box, reducing_gap=3.0)
    else:
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        img = img.crop((left, top, left + image_size, top + image_size))
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def file_pixels(path: str | Path, image_size: int | PreprocessSpec, display_name: str | None = None) -> np.ndarray:
    """uint8 (S, S, 3) pixels of one image file; OSError/ValueError saying why it cannot be read
    (naming the file as display_name when given).

    JPEGs are draft-decoded at the model's size (data.images.decoded), so every caller that
    wants the stored vector of a file must come through here. The full-size image is reduced to
    the model's size inside the decode budget, so no more than DECODE_BUDGET_BYTES of decoded
    images are held at once per process."""
    image_size = _size(image_size)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")  # a FIFO or device would block or never end
    if st.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with decoded(path, target_size=image_size, display_name=display_name) as img:
        return model_pixels(img, image_size)


def normalize_array(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) pixels to normalised float32 (N, 3, H, W) in numpy: the float32 operations
    of normalize_pixels in the same order, so both give the same bits."""
    x = np.asarray(pixels).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    m = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def normalize_pixels(pixels: "torch.Tensor | np.ndarray", mean: Sequence[float] | PreprocessSpec,
                     std: Sequence[float] | None = None) -> "torch.Tensor":
    """uint8 (N, H, W, 3) or (H, W, 3) pixels to normalised float32 (N, 3, H, W) or (3, H, W)."""
    import torch

    mean, std = _mean_std(mean, std)
    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
        pixels = np.array(pixels)  # torch cannot share a read-only buffer without warning
    x = torch.as_tensor(pixels)
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x[0].contiguous() if single else x.contiguous()


def preprocess_image(img: Image.Image, image_size: int | PreprocessSpec, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> "torch.Tensor":
    """model_pixels then normalize_pixels: preprocess_image(img, spec) or (img, size, mean, std)."""
    if isinstance(image_size, PreprocessSpec):
        return normalize_pixels(model_pixels(img, image_size), image_size)
    return normalize_pixels(model_pixels(img, image_size), mean, std)
