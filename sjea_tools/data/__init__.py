"""Data: datasets as uint8 pixels, robust decoding, the eval preprocess, two-view augmentation.

Names are imported on first use: decoding an image file (images, preprocess) must not pay for
torch, which datasets and augment need.
"""

from __future__ import annotations

from sjea_tools import lazy_attributes

_LAZY = {
    "ImageData": "datasets", "PixelDataset": "datasets", "coarse_from_class_names": "datasets",
    "load_dataset": "datasets", "row_pixels": "datasets", "scan_images": "datasets",
    "IMAGE_EXTENSIONS": "images", "decode_image": "images",
    "file_pixels": "preprocess", "model_pixels": "preprocess", "normalize_array": "preprocess",
    "normalize_pixels": "preprocess", "preprocess_image": "preprocess",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
