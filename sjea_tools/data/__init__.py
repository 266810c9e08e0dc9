"""Data: datasets as uint8 pixels, robust decoding, the eval preprocess, two-view augmentation."""

from .datasets import ImageData, PixelDataset, load_dataset, scan_images
from .images import IMAGE_EXTENSIONS, decode_image
from .preprocess import model_pixels, normalize_pixels, preprocess_image

__all__ = ["IMAGE_EXTENSIONS", "ImageData", "PixelDataset", "decode_image", "load_dataset", "model_pixels",
           "normalize_pixels", "preprocess_image", "scan_images"]
