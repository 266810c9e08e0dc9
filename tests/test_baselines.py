"""Pixel floors beside the model in `sjea eval`, under the very same protocol."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from sjea_tools.baselines import centre, pixel_features
from sjea_tools.cli import app
from sjea_tools.data import load_dataset
from sjea_tools.evaluation import random_subset

from test_evaluation import numpy_knn_accuracy


def test_pixel_features_count_grayscale_once_and_centre_uses_the_train_mean(fmnist_test):
    sub = fmnist_test.subset(np.arange(50))
    f = pixel_features(sub)
    assert f.shape == (50, 784) and f.dtype == np.float32 and 0 <= f.min() and f.max() <= 1
    tr, te = centre(f[:30], f[30:])
    assert np.allclose(tr.mean(0), 0, atol=1e-6)
    assert np.allclose(te, f[30:] - f[:30].mean(0), atol=1e-6)


def test_eval_prints_pixel_rows_under_the_same_protocol(tmp_path, make_run):
    run = make_run(tmp_path / "run", levels=1)
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--max-train", "400", "--max-test", "60",
                                      "--probe-epochs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "eval.json").read_text())
    rows = {r["features"]: r for r in saved["baselines"]["pixels"]}
    assert set(rows) == {"raw pixels", "centred pixels"}
    # The same images as the model's bank and queries, scored by an independent plain k-NN.
    train = load_dataset("fashion-mnist", split="train")
    train = train.subset(random_subset(len(train), 400, 0))
    test = load_dataset("fashion-mnist", split="test")
    test = test.subset(random_subset(len(test), 60, 1))
    tr, te = pixel_features(train), pixel_features(test)
    assert np.isclose(rows["raw pixels"]["knn_top1"], numpy_knn_accuracy(tr, train.labels, te, test.labels))
    ctr, cte = centre(tr, te)
    assert np.isclose(rows["centred pixels"]["knn_top1"], numpy_knn_accuracy(ctr, train.labels, cte, test.labels))
    assert rows["raw pixels"]["knn_top1_centred"] == rows["centred pixels"]["knn_top1"]
    # The model's own level has a centred k-NN too.
    assert 0 <= saved["baselines"]["model"][0]["knn_top1_centred"] <= 100
    out = " ".join(result.stdout.split())
    assert "beside the floors" in out and "cheap protocol" in out
    for name, row in rows.items():
        assert f"{name} │ 784 │ {row['knn_top1']:.2f} │ {row['knn_top1_centred']:.2f} │ {row['linear_top1']:.2f}" in out


def test_no_baselines_option_leaves_them_out(tmp_path, make_run):
    run = make_run(tmp_path / "run", levels=1)
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--max-train", "200", "--max-test", "40",
                                      "--probe-epochs", "1", "--no-baselines", "--json"])
    assert result.exit_code == 0, result.output
    assert "baselines" not in json.loads(result.stdout)
