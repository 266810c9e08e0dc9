"""Data: Fashion-MNIST from the Debian files, missing data, image-folder scans, robust decoding."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sjea_tools import SjeaError
from sjea_tools.data import (PixelDataset, coarse_from_class_names, decode_image, file_pixels, load_dataset,
                             model_pixels, normalize_pixels, preprocess_image, row_pixels, scan_images)
from sjea_tools.data.datasets import train_split
from sjea_tools.spec import PreprocessSpec

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# CLASSES in the order of the lower-cased folder names used in the coarse-grouping test
CLASSES_SORTED = ["Bag", "Ankle boot", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker", "T-shirt/top",
                  "Trouser"]
# method.md's grouping, by class name, written independently of the library's table
GROUPS = {"tops": {"T-shirt/top", "Pullover", "Coat", "Shirt"}, "bottoms": {"Trouser"}, "dresses": {"Dress"},
          "footwear": {"Sandal", "Sneaker", "Ankle boot"}, "bags": {"Bag"}}


def read_idx_gz(path: Path) -> np.ndarray:
    """Independent IDX reader: big-endian header, then unsigned bytes."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


# --- Fashion-MNIST --------------------------------------------------------------------------------

def check_fmnist(data, n: int, split: str) -> None:
    prefix = "train" if split == "train" else "t10k"
    assert len(data) == n
    assert data.pixels.shape == (n, 28, 28, 3) and data.pixels.dtype == np.uint8
    assert data.labels.shape == (n,)
    assert data.labels.min() == 0 and data.labels.max() == 9
    assert np.bincount(data.labels, minlength=10).tolist() == [n // 10] * 10  # balanced classes
    assert data.class_names == CLASSES
    raw_images = read_idx_gz(DEBIAN / f"{prefix}-images-idx3-ubyte.gz")
    raw_labels = read_idx_gz(DEBIAN / f"{prefix}-labels-idx1-ubyte.gz")
    assert np.array_equal(data.labels, raw_labels)
    for c in range(3):  # grayscale repeated into RGB
        assert np.array_equal(data.pixels[..., c], raw_images)
    # coarse labels agree with the grouping of the fine class names
    assert sorted(data.coarse_names) == sorted(GROUPS)
    assert data.coarse_labels.shape == (n,)
    for fine in range(10):
        coarse = set(data.coarse_labels[data.labels == fine].tolist())
        assert len(coarse) == 1
        assert CLASSES[fine] in GROUPS[data.coarse_names[coarse.pop()]]


def test_fashion_mnist_test_split(fmnist_test):
    check_fmnist(fmnist_test, 10000, "test")


def test_fashion_mnist_train_split():
    check_fmnist(load_dataset("fashion-mnist", split="train"), 60000, "train")


def test_fashion_mnist_from_a_data_dir_gz_or_plain(tmp_path):
    gz_dir, plain_dir = tmp_path / "gz", tmp_path / "plain" / "FashionMNIST" / "raw"
    gz_dir.mkdir()
    plain_dir.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(DEBIAN / f"{stem}.gz", gz_dir)
        (plain_dir / stem).write_bytes(gzip.decompress((DEBIAN / f"{stem}.gz").read_bytes()))
    a = load_dataset("fashion-mnist", data_dir=str(gz_dir), split="test")
    b = load_dataset("fashion-mnist", data_dir=str(tmp_path / "plain"), split="test")  # torchvision's layout
    assert len(a) == len(b) == 10000
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.labels, b.labels)


def test_empty_data_dir_says_how_to_get_the_data(tmp_path):
    with pytest.raises(SjeaError) as e:
        load_dataset("fashion-mnist", data_dir=str(tmp_path), split="train")
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "\n" not in msg


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    shutil.copy(DEBIAN / "t10k-labels-idx1-ubyte.gz", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))
    with pytest.raises(SjeaError, match="not a readable IDX file.*re-install"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), split="test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(SjeaError, match="not a readable IDX file"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), split="test")


def test_unknown_dataset_and_split_are_clear_errors(tmp_path):
    with pytest.raises(SjeaError, match="unknown dataset 'imagenet21k'.*fashion-mnist"):
        load_dataset("imagenet21k")
    with pytest.raises(SjeaError, match="split must be train or test"):
        load_dataset("fashion-mnist", split="val")
    with pytest.raises(SjeaError, match="does not exist"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(SjeaError, match="no images .* found under"):
        load_dataset(str(tmp_path))


def test_train_split_holds_out_with_a_fixed_seed(fmnist_test):
    a = train_split(fmnist_test, holdout=1000, seed=22343, limit=None)
    b = train_split(fmnist_test, holdout=1000, seed=22343, limit=None)
    c = train_split(fmnist_test, holdout=1000, seed=1, limit=None)
    assert len(a) == 9000 and np.array_equal(a.labels, b.labels) and np.array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.labels, c.labels)
    assert len(train_split(fmnist_test, holdout=0, seed=0, limit=100)) == 100
    assert train_split(fmnist_test, holdout=0, seed=0, limit=None) is fmnist_test


def test_model_pixels_are_writable_for_torch_from_numpy():
    """Read-only arrays make torch.from_numpy warn (and in-place ops undefined) in every worker."""
    for size in ((8, 8), (20, 12)):
        px = model_pixels(Image.new("RGB", size, (1, 2, 3)), 8)
        assert px.shape == (8, 8, 3) and px.dtype == np.uint8
        assert px.flags.writeable


def test_pixel_dataset_resizes_to_the_model_size(fmnist_test):
    ds = PixelDataset(fmnist_test.subset(np.arange(4)), image_size=32)
    px, label = ds[1]
    assert px.shape == (32, 32, 3) and px.dtype == torch.uint8 and label == int(fmnist_test.labels[1])
    same, _ = PixelDataset(fmnist_test.subset(np.arange(4)), image_size=28)[1]
    assert np.array_equal(same.numpy(), fmnist_test.pixels[1])


def test_row_pixels_is_the_same_for_memory_and_folder_rows(tmp_path, fmnist_test):
    """The one row -> pixels: a folder of the same images gives the same pixels as memory."""
    data = fmnist_test.subset(np.arange(3))
    for i in range(3):
        Image.fromarray(data.pixels[i]).save(tmp_path / f"{i}.png")
    folder = load_dataset(str(tmp_path))
    for i in range(3):
        assert np.shares_memory(row_pixels(data, i), data.pixels[i])  # as stored: no copy, no resize
        assert np.array_equal(row_pixels(folder, i, 28), data.pixels[i])
        assert np.array_equal(row_pixels(folder, i, 40), row_pixels(data, i, 40))
        assert row_pixels(data, i, 40).shape == (40, 40, 3)
    assert np.array_equal(file_pixels(tmp_path / "1.png", 28), data.pixels[1])
    with pytest.raises(SjeaError, match="size to decode"):
        row_pixels(folder, 0)


def test_preprocess_takes_a_spec_or_the_numbers(fmnist_test):
    spec = PreprocessSpec(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    img = Image.fromarray(fmnist_test.pixels[0])
    by_numbers = preprocess_image(img, 32, spec.mean, spec.std)
    assert by_numbers.shape == (3, 32, 32)
    assert torch.equal(preprocess_image(img, spec), by_numbers)
    assert np.array_equal(model_pixels(img, spec), model_pixels(img, 32))
    px = fmnist_test.pixels[:2]
    want = (torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255 - 0.4) / 0.25
    assert torch.allclose(normalize_pixels(px, spec)[:, 1], want[:, 1], atol=1e-6)


def test_coarse_groups_by_class_name_in_any_spelling_and_order():
    names = ["bag", "ankle_boot", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "t-shirt top",
             "TROUSER"]
    fine_to_coarse, coarse_names = coarse_from_class_names(names)
    assert sorted(coarse_names) == sorted(GROUPS)
    by_group = {g: set() for g in coarse_names}
    for name, c in zip(CLASSES_SORTED, fine_to_coarse):
        by_group[coarse_names[c]].add(name)
    assert by_group == GROUPS
    assert coarse_from_class_names(names[:-1]) is None  # not all ten classes: no grouping
    assert coarse_from_class_names(["cat", "dog"]) is None and coarse_from_class_names(None) is None


# --- image folders --------------------------------------------------------------------------------

def make_tree(root: Path, files: list[str]) -> None:
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.lower().endswith((".txt", ".bak", ".json")) or "." not in Path(rel).name:
            p.write_text("not an image")
        else:
            Image.new("RGB", (4, 4), (1, 2, 3)).save(p, format="PNG")  # content does not matter to a scan


def test_scan_is_recursive_sorted_and_case_insensitive(tmp_path):
    images = ["b.png", "A.JPG", "zeta/Deep/x.JpEg", "zeta/c.webp", "alpha/one.TIFF", "alpha/two.tif",
              "alpha/three.Bmp", "alpha/four.gif", "m/n/o/p.PNG"]
    others = ["notes.txt", "b.png.bak", "meta.json", "README", "alpha/png"]
    make_tree(tmp_path, images + others)
    found = scan_images(tmp_path)
    assert found == sorted(images)
    assert scan_images(str(tmp_path)) == found  # a str root works too
    assert scan_images(tmp_path / "zeta") == ["Deep/x.JpEg", "c.webp"]


def test_scan_lists_each_image_once_through_a_symlink_cycle(tmp_path):
    make_tree(tmp_path, ["a.png", "sub/b.png"])
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    assert scan_images(tmp_path) == ["a.png", "sub/b.png"]


def test_scan_follows_a_symlinked_folder(tmp_path):
    outside = tmp_path / "outside"
    make_tree(outside, ["o.png"])
    root = tmp_path / "root"
    make_tree(root, ["r.png"])
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert scan_images(root) == ["linked/o.png", "r.png"]


def test_image_folder_labels_come_from_first_subfolder(tmp_path):
    make_tree(tmp_path, ["cat/1.png", "cat/sub/2.png", "dog/3.png"])
    data = load_dataset(str(tmp_path))
    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.paths == [str(tmp_path / p) for p in ("cat/1.png", "cat/sub/2.png", "dog/3.png")]
    flat = tmp_path / "flat"
    make_tree(flat, ["1.png", "x/2.png"])
    assert load_dataset(str(flat)).labels is None  # an image at the top: no classes


# --- decode_image ---------------------------------------------------------------------------------

def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_decode_grayscale(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    img = decode_image(save(Image.fromarray(gray), tmp_path / "g.png"))
    assert img.mode == "RGB" and img.size == (8, 8)
    a = np.asarray(img)
    for c in range(3):
        assert np.array_equal(a[..., c], gray)


def test_decode_bilevel(tmp_path):
    img = decode_image(save(Image.new("1", (5, 4), 1), tmp_path / "b.png"))
    assert img.mode == "RGB" and np.asarray(img).min() == 255


def test_decode_palette_with_transparency(tmp_path):
    pal = Image.new("P", (6, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (3, 0, 6, 2))  # right half red, left half palette index 0 (transparent)
    path = save(pal, tmp_path / "p.png", transparency=0)
    a = np.asarray(decode_image(path))
    assert decode_image(path).mode == "RGB"
    assert (a[:, :3] == 255).all()  # transparent -> white, not black
    assert (a[:, 3:] == [255, 0, 0]).all()
    # a palette image without transparency keeps its colours
    b = np.asarray(decode_image(save(pal, tmp_path / "p.gif")))
    assert (b[:, :3] == 0).all() and (b[:, 3:] == [255, 0, 0]).all()


def test_decode_rgba_composites_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[:, 0] = [0, 0, 255, 0]      # fully transparent blue -> white
    rgba[:, 1] = [0, 0, 255, 255]    # opaque blue
    rgba[:, 2] = [0, 0, 0, 128]      # half-transparent black -> mid gray
    a = np.asarray(decode_image(save(Image.fromarray(rgba), tmp_path / "a.png")))
    assert (a[:, 0] == 255).all()
    assert (a[:, 1] == [0, 0, 255]).all()
    assert np.abs(a[:, 2].astype(int) - 127).max() <= 1
    la = Image.new("LA", (2, 2), (0, 0))  # transparent black -> white
    la.putpixel((1, 1), (0, 255))  # opaque black stays black
    b = np.asarray(decode_image(save(la, tmp_path / "la.png")))
    assert (b[0, 0] == 255).all() and (b[1, 1] == 0).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_decode_cmyk(tmp_path, fmt):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    path = save(cmyk, tmp_path / f"c.{fmt.lower()}", format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert Image.open(path).mode == "CMYK"
    img = decode_image(path, target_size=8 if fmt == "JPEG" else None)
    assert img.mode == "RGB"
    a = np.asarray(img).astype(int)
    assert np.abs(a - [255, 0, 0]).max() <= 8


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_decode_16_bit_grayscale_scales_the_full_range(tmp_path, fmt):
    values = np.array([[0, 257 * 10, 257 * 100, 65535], [32768, 1000, 255, 65280]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / f"d.{fmt}")
    assert Image.open(path).mode.startswith("I")
    a = np.asarray(decode_image(path))
    assert a.shape == (2, 4, 3) and a.dtype == np.uint8
    expected = values.astype(np.float64) * 255.0 / 65535.0
    assert np.abs(a[..., 0].astype(int) - expected).max() <= 1
    assert np.array_equal(a[..., 0], a[..., 2])


def test_decode_dark_16_bit_image_stays_dark(tmp_path):
    """A 16-bit image whose values are all below 256 is nearly black, not a bright 8-bit image."""
    values = np.array([[0, 100, 200, 255]], dtype=np.uint16)
    a = np.asarray(decode_image(save(Image.fromarray(values), tmp_path / "dark.png")))
    assert a.max() <= 1


@pytest.mark.parametrize("orientation,top_left,size", [
    (1, "red", (40, 20)),   # as stored: red left, blue right
    (3, "blue", (40, 20)),  # rotated 180: blue on the left
    (6, "red", (20, 40)),   # display needs 90 deg clockwise: the left half goes to the top
    (8, "blue", (20, 40)),  # 90 deg counter-clockwise: the left half goes to the bottom
])
def test_decode_honours_exif_orientation(tmp_path, orientation, top_left, size):
    px = np.zeros((20, 40, 3), dtype=np.uint8)
    px[:, :20] = [255, 0, 0]
    px[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(px), tmp_path / "r.jpg", exif=exif, quality=95)
    img = decode_image(path)
    assert img.size == size
    a = np.asarray(img).astype(int)
    corner = a[2, 2]
    want = [255, 0, 0] if top_left == "red" else [0, 0, 255]
    assert np.abs(corner - want).max() <= 30


def test_decode_large_jpeg_is_reduced_while_decoding_but_not_below_target(tmp_path):
    rng = np.random.default_rng(0)
    path = save(Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)), tmp_path / "big.jpg")
    full = decode_image(path)
    small = decode_image(path, target_size=32)
    assert full.size == (400, 300)
    assert min(small.size) >= 32 and small.size[0] < 400
    assert small.mode == "RGB"


def test_decode_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    a = np.asarray(decode_image(path)).astype(int)
    assert np.abs(a - [255, 0, 0]).max() <= 5


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decompression bomb in a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name,content", [
    ("text.jpg", b"hello, not an image"),
    ("empty.png", b""),
    ("bomb.png", png_header_only(40000, 40000)),
], ids=["text", "empty", "bomb"])
def test_unreadable_files_raise_oserror_or_valueerror(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises((OSError, ValueError)):
        decode_image(path)


def test_truncated_file_raises(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises((OSError, ValueError)):
        decode_image(path)


# --- through the CLI ------------------------------------------------------------------------------

def test_train_with_an_empty_data_dir_is_one_clear_line_and_can_be_retried(tmp_path):
    from typer.testing import CliRunner

    from sjea_tools.cli import app

    empty, out = tmp_path / "empty", tmp_path / "runs" / "r1"
    empty.mkdir()
    args = ["train", "--data-dir", str(empty), "--out", str(out), "--quiet"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 2, first.output
    assert "apt-get install dataset-fashion-mnist" in first.output and "--data-dir" in first.output
    assert "Traceback" not in first.output
    # Nothing half-made stays behind: running again (e.g. after installing the data) meets the
    # same data error, not "run folder already exists".
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in second.output, second.output
