"""Label-free evaluation: the pure measures on hand-computed cases, and `sjea eval STORE` on a folder
store of real colour photos (skimage.data crops as JPEG and PNG files), with and without labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sjea_tools import metrics
from sjea_tools.cli import app
from sjea_tools.evaluation import augmented_copies, knn_k_for

runner = CliRunner()
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")


# --- pure measures ---------------------------------------------------------------------------------

def test_alignment_is_zero_for_identical_pairs_and_four_for_opposite_ones():
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    assert metrics.alignment(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.alignment(x, 3 * x) == pytest.approx(0.0, abs=1e-6)  # on unit vectors: scale does not count
    assert metrics.alignment(x, -x) == pytest.approx(4.0, abs=1e-6)
    # orthogonal pairs: |u - v|^2 = 2
    assert metrics.alignment(np.eye(4)[:2], np.eye(4)[2:]) == pytest.approx(2.0, abs=1e-9)


def test_uniformity_of_known_configurations():
    assert metrics.uniformity(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-6)  # one point: log 1 (float32 rows)
    # two antipodal points: one pair at squared distance 4 -> log exp(-8) = -8
    assert metrics.uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0, abs=1e-6)
    # the 3 axes: three pairs, each at squared distance 2 -> -4
    assert metrics.uniformity(np.eye(3)) == pytest.approx(-4.0, abs=1e-6)
    # axes and their opposites in 2-D: of 6 pairs, 4 at distance^2 2 and 2 at 4
    square = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=float)
    expected = math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6)
    assert metrics.uniformity(square) == pytest.approx(expected, abs=1e-6)
    assert metrics.uniformity(square, t=1.0) == pytest.approx(math.log((4 * math.exp(-2) + 2 * math.exp(-4)) / 6), abs=1e-6)


def test_copy_retrieval_on_constructed_vectors():
    bank = np.eye(4, dtype=np.float32)
    # copy 0 and 1 closest to their own original; copy 2 nearest to original 3 (rank 2); copy 3 to
    # original 0, its own third (rank 3)
    copies = np.array([[1, 0.1, 0, 0], [0, 1, 0, 0.2], [0, 0, 0.5, 1], [1, 0, 0.2, 0.1]], dtype=np.float32)
    assert metrics.copy_ranks(bank, copies).tolist() == [1, 1, 2, 3]
    out = metrics.copy_retrieval(bank, copies, ks=(1, 2))
    assert out == {"recall_at_1": 50.0, "recall_at_2": 75.0, "mean_rank": 1.75}
    # chunked the same
    assert metrics.copy_ranks(bank, copies, chunk=3).tolist() == [1, 1, 2, 3]
    # a collapsed embedding ranks every original last (ties count against it), not first
    assert metrics.copy_ranks(np.ones((5, 3)), np.ones((5, 3))).tolist() == [5] * 5


def test_paired_bootstrap_interval_excludes_zero_only_for_a_real_difference():
    a = np.r_[np.ones(80), np.zeros(20)]
    same = metrics.paired_bootstrap(a, a, seed=1)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    better = metrics.paired_bootstrap(a, np.r_[np.zeros(50), np.ones(30), np.zeros(20)], seed=1)
    assert better["mean"] == pytest.approx(0.5) and better["low"] > 0.3
    noise = metrics.paired_bootstrap(np.r_[1, 0, 1, 0, 1, 0], np.r_[0, 1, 1, 0, 0, 1], seed=1)
    assert noise["low"] < 0 < noise["high"]
    assert metrics.paired_bootstrap(a, a[::-1], seed=3) == metrics.paired_bootstrap(a, a[::-1], seed=3)


def test_knn_k_follows_the_smallest_class():
    assert knn_k_for(np.r_[np.zeros(48), np.ones(300)].astype(int)) == 48
    assert knn_k_for(np.r_[np.zeros(1000), np.ones(900)].astype(int)) == 200
    assert knn_k_for(np.array([2, 2, 5, 5, 5])) == 2  # absent class numbers do not count as size 0


def test_augmented_copies_are_seeded_mild_and_keep_the_shape():
    px = photo_pixels(8, 32)
    a, b = augmented_copies(px, seed=0), augmented_copies(px, seed=0)
    assert a.shape == px.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, augmented_copies(px, seed=1)) and not np.array_equal(a, px)
    # mild: no copy is turned grey, and each keeps its photo's overall colour
    from sjea_tools.baselines import is_grey

    assert not any(is_grey(c[None]) for c in a)
    colour = lambda p: p.reshape(len(p), -1, 3).mean(axis=1)  # noqa: E731
    d = np.linalg.norm(colour(a)[:, None] - colour(px)[None], axis=2)
    assert np.abs(colour(a) - colour(px)).max() < 60 and (np.diag(d) < 40).mean() >= 0.75


# --- real photos ------------------------------------------------------------------------------------

def photo_pixels(n: int, size: int) -> np.ndarray:
    """n square crops of real colour photos at size x size (uint8), one photo after another."""
    from PIL import Image

    out = []
    for i in range(n):
        img = Image.fromarray(load_photo(PHOTOS[i % len(PHOTOS)]))
        w, h = img.size
        s = min(w, h) // 2
        left, top = (i * 37) % (w - s), (i * 23) % (h - s)
        out.append(np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def load_photo(name: str) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return getattr(data, name)()[..., :3]


def write_photo_folder(root: Path, per_photo: int, labelled: bool) -> Path:
    """per_photo seeded crops (35-80% of the short side, resized to 48-96 px) of each photo, JPEG
    and PNG alternately; in one sub-folder per photo when `labelled`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = Image.fromarray(load_photo(name))
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        w, h = img.size
        for j in range(per_photo):
            s = int(min(w, h) * rng.uniform(0.35, 0.8))
            left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            side = int(rng.integers(48, 97))
            crop = img.crop((left, top, left + s, top + s)).resize((side, side), Image.BILINEAR)
            crop.save(folder / f"{name}-{j}.{'jpg' if j % 2 else 'png'}")
    return root


def embed(tmp_path, make_run, labelled: bool, per_photo: int = 6):
    from sjea_tools.embed import embed_folder

    run = make_run(tmp_path / "run", levels=2)
    images = write_photo_folder(tmp_path / "photos", per_photo, labelled)
    store = tmp_path / "photos.h5"
    embed_folder(images, store, run=run, workers=0, backend="torch")
    return store


def test_eval_store_without_labels_prints_label_free_measures_beside_random_init_and_pixels(tmp_path, make_run):
    store = embed(tmp_path, make_run, labelled=False)
    result = runner.invoke(app, ["eval", str(store), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    free = out["label_free"]
    assert free["sample"] == 36 and free["skipped"] == [] and "levels" not in out
    kinds = [(r["features"], r["level"]) for r in free["rows"]]
    assert kinds == [("trained", 0), ("trained", 1), ("random init", 0), ("random init", 1), ("pixels", None)]
    for row in free["rows"]:
        assert 0 <= row["copy_recall_at_1"] <= row["copy_recall_at_10"] <= 100
        assert 1 <= row["copy_mean_rank"] <= 36 and 0 <= row["alignment"] <= 4 and -4 <= row["uniformity"] <= 0
        assert 1 <= row["effective_rank"] <= row["dim"]
    # pixels of mild copies of photos are found again far above chance (1 in 36)
    from sjea_tools.store import open_store

    with open_store(store) as s:
        size = s.preprocess.image_size
    pixels = free["rows"][-1]
    assert pixels["dim"] == 3 * size * size and pixels["copy_recall_at_10"] > 50
    assert json.loads((tmp_path / "photos.h5.eval.json").read_text())["label_free"] == free
    # the table: every row printed, no labelled section
    shown = runner.invoke(app, ["eval", str(store), "--sample", "20"])
    assert shown.exit_code == 0, shown.output
    assert "label-free" in shown.stdout and "random init" in shown.stdout and "pixels" in shown.stdout
    assert "20 images" in " ".join(shown.stdout.split()) and "probe top-1" not in shown.stdout


def test_eval_store_with_folder_labels_adds_floors_and_a_verdict(tmp_path, make_run):
    store = embed(tmp_path, make_run, labelled=True, per_photo=8)
    result = runner.invoke(app, ["eval", str(store), "--probe-epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # 48 labelled rows, 8 per class: the bank's smallest class bounds k (was 200)
    assert out["settings"]["knn_k"] <= 8 and "smallest class" in out["settings"]["knn_k_rule"]
    lab = out["label_free"]["labelled"]
    assert lab["splits"] == 3 and all(1 <= k <= 8 for k in lab["k"])
    assert {(r["features"], r["level"]) for r in lab["rows"]} == {
        ("trained", 0), ("trained", 1), ("random init", 0), ("random init", 1), ("pixels", None)}
    verdicts = {(v["level"], v["versus"]): v for v in lab["verdicts"]}
    assert set(verdicts) == {(0, "random init"), (1, "random init"), (0, "pixels"), (1, "pixels")}
    for v in verdicts.values():
        d = v["difference"]
        assert d["low"] <= d["mean"] <= d["high"]
        assert v["state"] == ("better" if d["low"] > 0 else "worse" if d["high"] < 0 else "within noise")
    # the store's model here is itself a random init: it must not be reported as beating one
    assert verdicts[(0, "random init")]["state"] != "better" or verdicts[(1, "random init")]["state"] != "better"
    shown = runner.invoke(app, ["eval", str(store), "--probe-epochs", "1"])
    assert shown.exit_code == 0, shown.output
    lines = [ln for ln in shown.stdout.splitlines() if ln.startswith("level ")]
    assert len(lines) == 4 and all("random init" in ln or "pixels" in ln for ln in lines)


def test_eval_store_errors_are_one_line(tmp_path, make_run):
    import shutil

    from test_eval_cli import assert_one_line_error

    store = embed(tmp_path, make_run, labelled=False, per_photo=2)
    assert_one_line_error(runner.invoke(app, ["eval", str(store), "--no-images"]), "no labels", "--no-images")
    assert_one_line_error(runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--sample", "5"]), "--sample")
    shutil.rmtree(tmp_path / "photos")
    assert_one_line_error(runner.invoke(app, ["eval", str(store)]), "photos", "not there")
    assert not (tmp_path / "photos.h5.eval.json").exists()
