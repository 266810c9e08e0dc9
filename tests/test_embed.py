"""embed_folder on real images: formats, failures, exact embeddings, update, lists, float16."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_run, write_fmnist_folder
from sjea_tools.data import decode_image, model_pixels, normalize_pixels
from sjea_tools.embed import Embedder, collect_images, embed_folder
from sjea_tools.errors import SjeaError
from sjea_tools.store import open_store
from sjea_tools.vectors import l2_normalize


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="module")
def model(run_dir):
    import sjea_tools

    return sjea_tools.load_model(run_dir)


def _photo(data, i, size=(56, 40)) -> Image.Image:
    """A real Fashion-MNIST image, upscaled to a non-square size so rotations change it."""
    return Image.fromarray(data.pixels[i]).resize(size, Image.BICUBIC)


def make_mixed_folder(root: Path, data) -> tuple[list[str], dict[str, str]]:
    """Nested folders of real images in every supported mode and format, plus broken files.

    Returns (readable relative paths, {broken relative path: expected words in the reason}).
    """
    good: list[str] = []

    def save(rel, img, **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, **kw)
        good.append(rel)
        return p

    rgb = [_photo(data, i) for i in range(12)]
    save("shirts/plain.png", rgb[0])
    save("shirts/UPPER.JPG", rgb[1], quality=90)
    save("shirts/deep/nested/a.jpeg", rgb[2])
    save("shirts/b.bmp", rgb[3].convert("L"))
    save("shoes/c.webp", rgb[4], lossless=True)
    save("shoes/d.tif", rgb[5])
    save("shoes/e.tiff", rgb[6].convert("CMYK"))
    save("shoes/cmyk.jpg", rgb[7].convert("CMYK"), quality=95)
    save("shoes/palette.png", rgb[8].convert("P", palette=Image.ADAPTIVE, colors=32))
    frames = [rgb[9].convert("P"), rgb[10].convert("P")]
    save("shoes/anim.gif", frames[0], save_all=True, append_images=frames[1:])
    rgba = rgb[11].convert("RGBA")
    rgba.putalpha(128)
    save("bags/rgba.png", rgba)
    sixteen = (np.asarray(rgb[0].convert("L"), dtype=np.uint16) * 257)
    img16 = Image.fromarray(sixteen)
    assert img16.mode.startswith("I;16")
    save("bags/sixteen.png", img16)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    save("bags/rotated_exif.png", rgb[2], exif=exif.tobytes())
    save("bags/rotated_by_hand.png", rgb[2].transpose(Image.Transpose.ROTATE_270))
    (root / "bags" / "notes.txt").write_text("not an image, ignored by extension")

    bad: dict[str, str] = {}
    jpeg = (root / "shirts" / "UPPER.JPG").read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    bad["broken/truncated.jpg"] = "truncated"
    png = (root / "shirts" / "plain.png").read_bytes()
    corrupt = bytearray(png)
    corrupt[60:200] = np.random.default_rng(0).bytes(140)  # recorded seed: the same damage every run
    (root / "broken" / "corrupt.png").write_bytes(bytes(corrupt))
    bad["broken/corrupt.png"] = "Error"
    (root / "broken" / "zero.png").write_bytes(b"")
    bad["broken/zero.png"] = "0 bytes"
    (root / "broken" / "text.jpg").write_text("hello, I am not a JPEG")
    bad["broken/text.jpg"] = "cannot identify"
    os.mkfifo(root / "broken" / "fifo.png")  # would block a naive open() forever
    bad["broken/fifo.png"] = "not a regular file"
    os.symlink(root / "nowhere.png", root / "broken" / "dangling.png")
    bad["broken/dangling.png"] = "FileNotFoundError"
    return sorted(good), bad


def _expected(model, root: Path, paths: list[str], normalize: bool) -> list[np.ndarray]:
    """What the model says for these files, batch of all at once, through the one preprocess."""
    px = np.stack([model_pixels(decode_image(root / p, target_size=model.image_size), model.image_size)
                   for p in paths])
    with torch.no_grad():
        ys = [y.numpy() for y in model.forward_levels(normalize_pixels(px, model.mean, model.std))]
    return [l2_normalize(y) for y in ys] if normalize else ys


def test_mixed_folder_rows_are_the_readable_images_and_failures_have_reasons(tmp_path, fmnist_test, run_dir, model):
    good, bad = make_mixed_folder(tmp_path / "imgs", fmnist_test)
    summary = embed_folder(tmp_path / "imgs", tmp_path / "out.h5", run=run_dir, backend="torch", batch_size=5,
                           workers=2, normalize=False)
    assert summary["rows"] == len(good) and summary["failed"] == len(bad)
    with open_store(tmp_path / "out.h5") as s:
        assert s.paths == good  # sorted, recursive, case-insensitive extensions
        failed = dict(s.failed)
        assert set(failed) == set(bad)
        for rel, words in bad.items():
            assert words.lower() in failed[rel].lower(), (rel, failed[rel])
        # Every embedded image sits in a class folder; broken/ holds only failures, so it is no class.
        assert s.label_names == ["bags", "shirts", "shoes"]
        assert [s.label_names[c] for c in s.labels] == [p.split("/")[0] for p in good]
        rows = [s.read_embeddings(k) for k in s.levels]
    # Criterion 2: the store holds exactly model.forward_levels of the same images.
    for got, want in zip(rows, _expected(model, tmp_path / "imgs", good, normalize=False)):
        assert np.abs(got - want).max() <= 1e-5
    # EXIF orientation is honoured: the EXIF-rotated file embeds like the hand-rotated one, and the
    # rotation matters for this image (so the check could fail).
    i, j, k = good.index("bags/rotated_exif.png"), good.index("bags/rotated_by_hand.png"), good.index(
        "shirts/deep/nested/a.jpeg")
    assert np.abs(rows[0][i] - rows[0][j]).max() <= 1e-5
    assert np.abs(rows[0][i] - rows[0][k]).max() > 1e-3


def test_normalized_float16_and_labels_from_class_folders(tmp_path, fmnist_test, run_dir, model):
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 40)
    embed_folder(folder, tmp_path / "n.h5", run=run_dir, backend="torch", workers=0, batch_size=16,
                 dtype="float16", levels="1")
    paths = collect_images(folder)[1]
    with open_store(tmp_path / "n.h5") as s:
        assert s.levels == [1] and s.normalized and s.attrs["dtype"] == "float16"
        got = s.read_embeddings(1)
        assert s.label_names == sorted({p.split("/")[0] for p in paths})
        assert [s.label_names[c] for c in s.labels] == [p.split("/")[0] for p in s.paths]
    import h5py

    with h5py.File(tmp_path / "n.h5", "r") as f:  # stored as half precision, as the format says
        assert f["level_1/embeddings"].dtype == np.float16
    want = _expected(model, folder, paths, normalize=True)[1]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=2e-3)
    assert np.abs(got - want).max() <= 2e-3  # float16 rounding of unit vectors


def test_update_adds_only_new_images_and_a_list_file_works(tmp_path, fmnist_test, run_dir):
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 30)
    out = tmp_path / "s.h5"
    embed_folder(folder, out, run=run_dir, backend="torch", workers=1, batch_size=8)
    with open_store(out) as s:
        first_paths, first_rows = s.paths, s.read_embeddings(0)
    write_fmnist_folder(folder, fmnist_test, 10, start=30)
    with pytest.raises(SjeaError, match="already exists"):
        embed_folder(folder, out, run=run_dir, backend="torch")
    summary = embed_folder(folder, out, run=run_dir, backend="torch", workers=1, batch_size=8, update=True)
    assert summary["added"] == 10 and summary["rows"] == 40
    with open_store(out) as s:
        assert s.paths[:30] == first_paths and len(set(s.paths)) == 40
        np.testing.assert_array_equal(s.read_embeddings(0)[:30], first_rows)
        new_rows = s.read_embeddings(0)[30:]
        new_paths = s.paths[30:]
    assert embed_folder(folder, out, run=run_dir, backend="torch", update=True)["status"] == "up to date"
    # The same images through a list file (relative to its folder) give the same rows.
    (folder / "list.txt").write_text("# new ones\n" + "\n".join(new_paths) + "\n\n")
    embed_folder(folder / "list.txt", tmp_path / "l.h5", run=run_dir, backend="torch", workers=0)
    with open_store(tmp_path / "l.h5") as s:
        assert s.paths == new_paths
        assert np.abs(s.read_embeddings(0) - new_rows).max() <= 1e-5


def test_embedder_embed_images_matches_the_store(tmp_path, fmnist_test, run_dir):
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 12)
    embed_folder(folder, tmp_path / "s.h5", run=run_dir, backend="torch", workers=0)
    with open_store(tmp_path / "s.h5") as s:
        emb = Embedder.for_store(s, backend="torch")
        rows = [s.read_embeddings(k) for k in s.levels]
        imgs = [decode_image(folder / p) for p in s.paths]
    got = emb.embed_images(imgs)
    assert emb.levels == [0, 1] and emb.normalize
    for g, r in zip(got, rows):
        assert np.abs(g - r).max() <= 1e-5


def test_bad_library_arguments(tmp_path, run_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SjeaError, match="no images"):
        embed_folder(tmp_path / "empty", tmp_path / "o.h5", run=run_dir)
    with pytest.raises(SjeaError, match="levels"):
        Embedder.from_source(run=run_dir, backend="torch", levels="0,5")
    with pytest.raises(SjeaError, match="--dtype"):
        embed_folder(tmp_path / "empty", tmp_path / "o.h5", run=run_dir, dtype="int8")
    with pytest.raises(SjeaError, match="--backend"):
        Embedder.from_source(run=run_dir, backend="tensorflow")


def test_l2_normalize_is_exact_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


def test_onnx_backend_matches_torch_within_the_export_tolerance(tmp_path, fmnist_test, run_dir):
    from sjea_tools.exports.verify import FP32

    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 24)
    (folder / "Bag" / "bad.png").write_bytes(b"garbage")
    embed_folder(folder, tmp_path / "t.h5", run=run_dir, backend="torch", normalize=False, workers=0)
    # auto on CPU exports the run on the fly (cached in the run folder by checkpoint sha) and uses ONNX.
    summary = embed_folder(folder, tmp_path / "o.h5", run=run_dir, backend="auto", device="cpu", normalize=False,
                           workers=0)
    assert summary["backend"] == "onnx"
    cached = list((run_dir / "onnx-cache").glob("levels-*.onnx"))
    assert len(cached) == 1
    # An exported file alone (no checkpoint) gives the same store, with the checkpoint's model id.
    embed_folder(folder, tmp_path / "f.h5", onnx=cached[0], normalize=False, workers=0)
    with open_store(tmp_path / "t.h5") as t, open_store(tmp_path / "o.h5") as o, open_store(tmp_path / "f.h5") as f:
        assert t.paths == o.paths == f.paths and t.failed == o.failed
        assert t.model_id == o.model_id == f.model_id
        assert o.attrs["backend"] == "onnx"
        for k in t.levels:
            a, b, c = t.read_embeddings(k), o.read_embeddings(k), f.read_embeddings(k)
            assert np.abs(a - b).max() <= FP32.max_abs_diff
            np.testing.assert_array_equal(b, c)


def test_a_fresh_store_follows_the_umask(tmp_path, fmnist_test, run_dir):
    """Under umask 022 a store is 0644 like any other output (it was 0600, mkstemp's mode)."""
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 8)
    old = os.umask(0o022)
    try:
        embed_folder(folder, tmp_path / "s.h5", run=run_dir, backend="torch", workers=0)
    finally:
        os.umask(old)
    assert (tmp_path / "s.h5").stat().st_mode & 0o777 == 0o644


def test_levels_use_the_shared_parser(run_dir):
    assert Embedder.from_source(run=run_dir, backend="torch", levels=["1", "0"]).levels == [0, 1]
    assert Embedder.from_source(run=run_dir, backend="torch", levels="all").levels == [0, 1]
    with pytest.raises(SjeaError, match="repeats a level"):
        Embedder.from_source(run=run_dir, backend="torch", levels="1,1")
