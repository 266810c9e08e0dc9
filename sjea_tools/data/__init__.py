"""Data: datasets as uint8 pixels, robust decoding, the eval preprocess, two-view augmentation."""

from .datasets import (ImageData, PixelDataset, coarse_from_class_names, load_dataset, row_pixels,
                       scan_images)
from .images import IMAGE_EXTENSIONS, decode_image
from .preprocess import file_pixels, model_pixels, normalize_pixels, preprocess_image

__all__ = ["IMAGE_EXTENSIONS", "ImageData", "PixelDataset", "coarse_from_class_names", "decode_image",
           "file_pixels", "load_dataset", "model_pixels", "normalize_pixels", "preprocess_image", "row_pixels",
           "scan_images"]
