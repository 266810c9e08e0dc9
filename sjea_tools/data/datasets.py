"""Datasets as uint8 RGB pixels: Fashion-MNIST, CIFAR-10/100, STL-10 and image folders.

Every loader looks for local files first (`data_dir`, then the usual places), then tries a
download; when both fail it raises one line saying how to get the data. The result is an
`ImageData`: in-memory pixels for the small benchmark sets, or file paths for a folder.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from .images import is_image_path
from .preprocess import file_pixels, model_pixels

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
# The natural coarse grouping (method.md): tops, bottoms, dresses, footwear, bags. The one table of
# it: `coarse_from_class_names` recognises the same classes by name in image folders.
FASHION_MNIST_COARSE = {"tops": [0, 2, 4, 6], "bottoms": [1], "dresses": [3], "footwear": [5, 7, 9], "bags": [8]}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    return Path(os.environ.get("SJEA_DATA", Path.home() / ".cache" / "sjea" / "datasets"))


@dataclass
class ImageData:
    """Pixels (N, H, W, 3) uint8 in memory, or image paths decoded on demand."""

    name: str
    pixels: np.ndarray | None = None
    paths: list[str] | None = None
    root: str | None = None
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    coarse_labels: np.ndarray | None = None
    coarse_names: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.paths or [])

    def subset(self, index: np.ndarray) -> "ImageData":
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return ImageData(
            self.name, pick(self.pixels), None if self.paths is None else [self.paths[i] for i in index],
            self.root, pick(self.labels), self.class_names, pick(self.coarse_labels), self.coarse_names, self.meta)


def resize_pixels(pixels: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Square uint8 (N, H, W, 3) images resized to (N, size, size, 3) once, in bounded chunks, so
    training batches need no per-image work (antialiased when shrinking)."""
    if pixels.shape[1] == size and pixels.shape[2] == size:
        return pixels
    import torch

    out = np.empty((len(pixels), size, size, 3), dtype=np.uint8)
    for i in range(0, len(pixels), chunk):
        x = torch.from_numpy(pixels[i:i + chunk]).permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def row_pixels(data: ImageData, i: int, image_size: int | None = None) -> np.ndarray:
    """Row `i` of a dataset as uint8 (S, S, 3) pixels at `image_size` (None: as stored): in-memory
    pixels resized only when their size differs, folder images decoded. The one row -> pixels."""
    if data.pixels is not None:
        px = data.pixels[i]
        if image_size is None or px.shape[:2] == (image_size, image_size):
            return px
        from PIL import Image

        return model_pixels(Image.fromarray(px), image_size)
    if image_size is None:
        raise SjeaError(f"{data.name} is a folder of images: give the size to decode its images at.")
    return file_pixels(data.paths[i], image_size)


class PixelDataset:
    """(uint8 HWC pixels at `image_size`, label) pairs; decodes folder images in workers. A map-style
    dataset for torch's DataLoader (which needs only __len__ and __getitem__), defined without
    torch so that scanning and decoding images (the query path) do not import it."""

    def __init__(self, data: ImageData, image_size: int):
        self.data, self.image_size = data, image_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        import torch

        label = int(self.data.labels[i]) if self.data.labels is not None else -1
        return torch.from_numpy(np.ascontiguousarray(row_pixels(self.data, i, self.image_size))), label


# --- Fashion-MNIST: the four raw IDX files, gzipped or not --------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise SjeaError(f"{path} is not a readable IDX file ({e}); re-install the dataset files.") from None


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
            for p in (d / name, d / "FashionMNIST" / "raw" / name):
                if p.is_file():
                    return p
    return None


def load_fashion_mnist(data_dir: str | None, split: str) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    dirs = [Path(data_dir)] if data_dir else [DEBIAN_FASHION_MNIST, cache_dir() / "fashion-mnist"]
    img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if (img_path is None or lbl_path is None) and not data_dir:
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(str(cache_dir() / "fashion-mnist"), train=split == "train", download=True)
            img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
            lbl_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
        except Exception:
            pass
    if img_path is None or lbl_path is None:
        where = data_dir or f"{DEBIAN_FASHION_MNIST} or {cache_dir() / 'fashion-mnist'}"
        raise SjeaError(f"Fashion-MNIST {split} files not found in {where} and could not be downloaded; "
                        "install them with 'apt-get install dataset-fashion-mnist' or pass --data-dir with "
                        "the four IDX .gz files.")
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise SjeaError(f"{img_path} and {lbl_path} do not match; re-install the dataset files.")
    pixels = np.repeat(images[..., None], 3, axis=3)  # models always take RGB
    fine_to_coarse, coarse_names = coarse_from_class_names(FASHION_MNIST_CLASSES)
    return ImageData("fashion-mnist", pixels=pixels, labels=labels, class_names=list(FASHION_MNIST_CLASSES),
                     coarse_labels=fine_to_coarse[labels], coarse_names=coarse_names)


def _canonical(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def coarse_from_class_names(class_names) -> tuple[np.ndarray, list[str]] | None:
    """(fine -> coarse index map, coarse names) when the class names are Fashion-MNIST's, in any
    order and spelling ('T-shirt/top', 't_shirt_top'), else None: image folders of the same
    classes get the same coarse labels as the dataset."""
    if not class_names:
        return None
    group_of = {_canonical(FASHION_MNIST_CLASSES[fine]): g
                for g, members in enumerate(FASHION_MNIST_COARSE.values()) for fine in members}
    canon = [_canonical(c) for c in class_names]
    if sorted(canon) != sorted(group_of):
        return None
    return np.asarray([group_of[c] for c in canon], dtype=np.int64), list(FASHION_MNIST_COARSE)


# --- torchvision datasets -----------------------------------------------------------------------

def _torchvision(name: str, data_dir: str | None, split: str) -> ImageData:
    import torchvision

    root = Path(data_dir) if data_dir else cache_dir() / name
    errors = []
    for download in (False, True):
        try:
            if name == "stl10":
                tv_split = {"train": "unlabeled", "test": "test", "labeled": "train"}[split]
                ds = torchvision.datasets.STL10(str(root), split=tv_split, download=download)
                pixels = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))
                labels = np.asarray(ds.labels, dtype=np.int64)
                labels = None if (labels < 0).all() else labels
                return ImageData(name, pixels=pixels, labels=labels, class_names=list(ds.classes))
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            # torchvision verifies the md5 of the official batch files before reading them.
            ds = cls(str(root), train=split == "train", download=download)
            data = ImageData(name, pixels=np.asarray(ds.data), labels=np.asarray(ds.targets, dtype=np.int64),
                             class_names=list(ds.classes))
            if name == "cifar100":
                _add_cifar100_coarse(data, root, split)
            return data
        except Exception as e:  # not found locally / no network
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            if data_dir:
                break
    raise SjeaError(f"{name} not found in {root} and could not be downloaded ({errors[-1]}); "
                    f"put the official archive's extracted folder there or pass --data-dir.")


def _add_cifar100_coarse(data: ImageData, root: Path, split: str) -> None:
    import pickle  # noqa: S403  the md5-verified official CIFAR-100 file, as torchvision reads it

    base = root / "cifar-100-python"
    with open(base / ("train" if split == "train" else "test"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    with open(base / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    data.coarse_labels = np.asarray(entry["coarse_labels"], dtype=np.int64)
    data.coarse_names = list(meta["coarse_label_names"])


# --- image folders ------------------------------------------------------------------------------

def scan_images(root: str | Path, follow_symlinks: bool = True) -> list[str]:
    """Image files under root, recursive, in sorted order, as paths relative to root (without
    follow_symlinks, those a symbolic link reaches outside root are left out)."""
    return scan_folder(root, follow_symlinks)[0]


OUTSIDE_LINK = "symbolic link to {what} outside the image root; pass --follow-symlinks to embed it"


def scan_folder(root: str | Path, follow_symlinks: bool = True) -> tuple[list[str], dict[str, str]]:
    """(image paths relative to root, sorted; {path: reason} of the links to outside root left out
    when not follow_symlinks). Any name the file system allows is kept: names that are not UTF-8
    come back surrogate-escaped, as os.walk gives them."""
    root = Path(root)
    real_root = os.path.realpath(root)
    found, outside = [], {}
    seen: set[tuple[int, int]] = set()  # (device, inode) of every folder scanned
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            # A symlink back to a folder already scanned (a cycle, or two links to one place):
            # following it would list the same files again, endlessly for a cycle.
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        join = (lambda name: str(rel / name)) if str(rel) != "." else (lambda name: name)  # noqa: E731
        if not follow_symlinks:
            for d in [d for d in dirnames if not _inside(os.path.join(dirpath, d), real_root)]:
                dirnames.remove(d)
                outside[join(d)] = OUTSIDE_LINK.format(what="a folder")
        for f in sorted(filenames):
            if not is_image_path(f):
                continue
            if follow_symlinks or _inside(os.path.join(dirpath, f), real_root):
                found.append(join(f))
            else:
                outside[join(f)] = OUTSIDE_LINK.format(what="a file")
    return sorted(found), outside


def _inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def list_images(src: str | Path, allow_outside: bool = False) -> tuple[Path, list[str]]:
    """(root, paths relative to it) named by a list file, one per line (# starts a comment), each
    once, in the file's order. Relative lines are relative to the file's folder, which is the
    root; a line leading outside it (../x, /elsewhere) is refused unless allow_outside, when the
    root becomes the folder all listed paths share."""
    src = Path(src)
    try:
        lines = src.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as e:
        raise SjeaError(f"cannot read the image list {src} ({type(e).__name__}); pass a folder or a text file "
                        "with one image path per line.") from None
    base = str(src.resolve().parent)
    full = []
    for line in (ln.strip() for ln in lines):
        if line and not line.startswith("#"):
            full.append(os.path.normpath(os.path.join(base, line)))
    if not full:
        raise SjeaError(f"the image list {src} names no images (one path per line; # starts a comment).")
    root = base
    outside = [f for f in full if not (f + os.sep).startswith(base.rstrip(os.sep) + os.sep)]
    if outside and not allow_outside:
        raise SjeaError(f"the image list {src} names {outside[0]}, outside its folder {base}; put the list in a "
                        "folder above every image, or pass --allow-outside to use the folder they all share.")
    if outside:
        root = os.path.commonpath([os.path.dirname(f) for f in full])
    paths = list(dict.fromkeys(os.path.relpath(f, root) for f in full))
    return Path(root), paths


def find_images(images: str | Path, follow_symlinks: bool = False,
                allow_outside: bool = False) -> tuple[Path, list[str], dict[str, str]]:
    """(root folder, image paths relative to it, {path: reason} refused) for `sjea embed`: a folder
    scanned recursively in sorted order, a list file (`list_images`), or one image. Paths a symbolic
    link takes outside the root are refused unless follow_symlinks."""
    src = Path(images)
    if src.is_dir():
        root = src.resolve()
        paths, refused = scan_folder(root, follow_symlinks)
        if not paths and not refused:
            raise SjeaError(f"no images (jpg, jpeg, png, bmp, gif, tif, tiff, webp) found under {src}; "
                            "check the folder or pass a text file listing image paths.")
        return root, sorted(paths + list(refused)), refused
    if not src.exists():
        raise SjeaError(f"{src} does not exist; pass a folder of images or a text file listing image paths.")
    if is_image_path(src):
        return src.resolve().parent, [src.name], {}
    root, paths = list_images(src, allow_outside)
    refused = {} if follow_symlinks or allow_outside else \
        {p: OUTSIDE_LINK.format(what="a file") for p in paths if not _inside(os.path.join(root, p), os.path.realpath(root))}
    return root, paths, refused


def load_image_folder(root: str | Path) -> ImageData:
    root = Path(root)
    if not root.is_dir():
        raise SjeaError(f"image folder {root} does not exist; pass a folder of images or a dataset name "
                        "(fashion-mnist, cifar10, cifar100, stl10).")
    paths = scan_images(root)
    if not paths:
        raise SjeaError(f"no images (jpg, jpeg, png, bmp, gif, tif, tiff, webp) found under {root}.")
    labels, class_names = folder_labels(paths)
    return ImageData(str(root), paths=[str(root / p) for p in paths], root=str(root), labels=labels,
                     class_names=class_names)


# The class of a file at the folder's top level (in no class folder): a few loose files must not
# take the labels of every other row away. Parentheses: no folder name sorts or reads as it by chance.
ROOT_LABEL = "(root)"


def path_class(rel_path: str) -> str:
    """The class of a file: its first folder below the root, ROOT_LABEL at the top level."""
    parts = Path(rel_path).parts
    return parts[0] if len(parts) >= 2 else ROOT_LABEL


def folder_labels(rel_paths: list[str], root_label: bool = False) -> tuple[np.ndarray | None, list[str] | None]:
    """Class = first sub-folder, when every image sits in one; else no labels. With root_label
    (a store's labels), files at the top level get ROOT_LABEL where some file sits in a sub-folder."""
    nested = [len(Path(p).parts) >= 2 for p in rel_paths]
    if not any(nested) or not (root_label or all(nested)):
        return None, None
    first = [path_class(p) for p in rel_paths]
    class_names = sorted(set(first))
    index = {c: i for i, c in enumerate(class_names)}
    return np.asarray([index[c] for c in first], dtype=np.int64), class_names


def load_dataset(name: str, data_dir: str | None = None, split: str = "train") -> ImageData:
    """A dataset by name (fashion-mnist, cifar10, cifar100, stl10) or an image folder path."""
    if split not in ("train", "test", "labeled"):
        raise SjeaError(f"split must be train or test (labeled: STL-10's labelled training split), not '{split}'.")
    if split == "labeled" and name != "stl10":
        split = "train"  # only STL-10 has an unlabelled training split to tell apart
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, split)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(name, data_dir, split)
    if Path(name).is_dir() or "/" in name or name.startswith("."):
        return load_image_folder(name)
    raise SjeaError(f"unknown dataset '{name}' (known: fashion-mnist, cifar10, cifar100, stl10, or a path "
                    "to an image folder).")


def train_split(data: ImageData, holdout: int, seed: int, limit: int | None) -> ImageData:
    """Hold out `holdout` images with a fixed seed (CIFAR recipe), then keep the first `limit`."""
    index = np.arange(len(data))
    if holdout:
        index = np.random.default_rng(seed).permutation(len(data))[holdout:]
        index.sort()
    if limit:
        index = index[:limit]
    return data if len(index) == len(data) else data.subset(index)


# --- decoding a folder once, before training ------------------------------------------------------

# Decoded pixels are kept in memory when they fit this budget (about 175,000 images at 64 px): every
# epoch then reads memory instead of decoding each file again. Larger folders keep their paths.
IN_MEMORY_BYTES = 2 * 1024**3


class _DecodeRows:
    """(row, uint8 pixels or None, reason) per image: what a DataLoader worker hands back."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .images import describe_error

        try:
            return i, file_pixels(self.paths[i], self.image_size), None
        except (OSError, ValueError) as e:  # what file_pixels raises for a file it cannot read
            return i, None, describe_error(e)


def _as_list(items):
    return items


def decode_folder(data: ImageData, image_size: int, workers: int = 0, progress=None,
                  max_bytes: int = IN_MEMORY_BYTES) -> tuple[ImageData, dict[str, str]]:
    """Decode every image of a folder dataset once at `image_size`: (the readable images, with their
    pixels in memory when they fit `max_bytes`, else their paths; {path relative to the root: reason}
    of those skipped). A truncated, empty or non-image file is skipped, never raised."""
    import torch

    from ..progress import Counter

    keep = len(data) * image_size * image_size * 3 <= max_bytes
    loader = torch.utils.data.DataLoader(_DecodeRows(data.paths, image_size), batch_size=32, num_workers=workers,
                                         collate_fn=_as_list)
    good, pixels, skipped = [], [], {}
    counter = Counter(progress, "decoding", len(data))
    for batch in loader:
        for i, px, reason in batch:
            if px is None:
                skipped[os.path.relpath(data.paths[i], data.root) if data.root else data.paths[i]] = reason
                continue
            good.append(i)
            if keep:
                pixels.append(px)
        counter.advance(len(batch))
    readable = data.subset(np.asarray(good, dtype=np.int64))
    if keep and pixels:
        readable.pixels = np.stack(pixels)
    return readable, skipped
