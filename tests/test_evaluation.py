"""Evaluation metrics: hand-checked toy cases, and `evaluate_run` against an independent numpy k-NN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sjea_tools import evaluation as ev
from sjea_tools.errors import SjeaError



def test_weighted_vote_uses_the_temperature():
    # One neighbour of class 0 at similarity 1.0, two of class 1 at 0.8: with T=0.1 the close one
    # outweighs the pair (e^10 > 2 e^8); with T=1 the pair wins (2 e^0.8 > e^1).
    labels = np.array([[0, 1, 1]])
    sims = np.array([[1.0, 0.8, 0.8]])
    assert ev.weighted_vote(labels, sims, num_classes=2, temperature=0.1)[0] == 0
    assert ev.weighted_vote(labels, sims, num_classes=2, temperature=1.0)[0] == 1


def test_knn_accuracy_on_points_with_known_neighbours():
    bank = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32) * 5  # scale must not matter
    bank_labels = np.array([0, 0, 1, 1])
    queries = np.array([[1, 0.05], [0.05, 1], [1, 0.2]], dtype=np.float32)
    assert ev.knn_accuracy(bank, bank_labels, queries, np.array([0, 1, 0]), k=2) == pytest.approx(100.0)
    assert ev.knn_accuracy(bank, bank_labels, queries, np.array([0, 1, 1]), k=2) == pytest.approx(100 * 2 / 3)


def test_precision_at_k_counts_matching_neighbours():
    ids = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    bank_labels = np.array([5, 5, 7, 7])
    assert ev.precision_at_k(ids, bank_labels, np.array([5, 5]), k=2) == pytest.approx(50.0)
    assert ev.precision_at_k(ids, bank_labels, np.array([5, 7]), k=4) == pytest.approx(50.0)
    assert ev.precision_at_k(ids, bank_labels, np.array([5, 7]), k=1) == pytest.approx(100.0)


def test_linear_probe_separates_blobs_and_not_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32)) * 4
    y = rng.integers(0, 6, size=1200)
    x = (centres[y] + rng.normal(size=(1200, 32))).astype(np.float32)
    good = ev.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=5)
    assert good["top1"] > 97 and good["top5"] >= good["top1"]
    noise = ev.linear_probe(x[:1000], rng.integers(0, 6, 1000), x[1000:], rng.integers(0, 6, 200), epochs=5)
    assert noise["top1"] < 35  # chance is 16.7


def test_collapse_stats_tell_collapsed_from_spread_features():
    rng = np.random.default_rng(0)
    spread = ev.collapse_stats(rng.normal(size=(500, 64)))
    collapsed = ev.collapse_stats(np.ones((500, 64)) + 1e-6 * rng.normal(size=(500, 64)))
    assert spread["effective_rank"] > 50 and collapsed["effective_rank"] < 5
    assert spread["mean_std"] > 0.1 and collapsed["mean_std"] < 1e-4


def numpy_knn_accuracy(bank, bank_labels, queries, query_labels, k=200, t=0.1):
    """The weighted k-NN written plainly, one query at a time."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    correct = 0
    for q, label in zip(queries, query_labels):
        sims = bank @ (q / np.linalg.norm(q))
        nearest = np.argsort(-sims)[:k]
        votes = {}
        for i in nearest:
            votes[bank_labels[i]] = votes.get(bank_labels[i], 0.0) + np.exp(sims[i] / t)
        correct += max(votes, key=votes.get) == label
    return 100.0 * correct / len(queries)


def test_evaluate_run_matches_an_independent_numpy_knn(tmp_path, make_run):
    run = make_run(tmp_path / "run")
    from sjea_tools.data.datasets import FASHION_MNIST_COARSE

    coarse_of = np.zeros(10, np.int64)
    for group, members in enumerate(FASHION_MNIST_COARSE.values()):
        coarse_of[members] = group
    result = ev.evaluate_run(run, max_train=400, max_test=120, probe_epochs=3, save_features=True)
    assert json.loads((run / "eval.json").read_text())["levels"] == result["levels"]
    feats = np.load(result["features_file"])
    assert len(feats["train_labels"]) == 400 and len(feats["test_labels"]) == 120
    for row in result["levels"]:
        k = row["level"]
        expected = numpy_knn_accuracy(feats[f"train_level{k}"], feats["train_labels"], feats[f"test_level{k}"],
                                      feats["test_labels"])
        assert abs(row["knn_top1"] - expected) <= 0.1
        assert 0 <= row["linear_top1"] <= row["linear_top5"] <= 100
        assert set(row["hierarchy"]) == {"coarse", "fine", "measures"}  # Fashion-MNIST has the coarse grouping
        # the hierarchy measures from a plain numpy ranking (cosine, best first) of the saved features
        ids = numpy_ranking(feats[f"train_level{k}"], feats[f"test_level{k}"], ev.H_AP_DEPTH)
        expected_measures = ev.hierarchy_measures(ids, feats["train_labels"], feats["test_labels"], coarse_of)
        # tolerance: float32 FAISS and float64 numpy may swap two near-equal neighbours
        got = row["hierarchy"]["measures"]
        assert got["avg_distance_at_k"] == pytest.approx(expected_measures.pop("avg_distance_at_k"), abs=0.01)
        assert {key: got[key] for key in expected_measures} == pytest.approx(expected_measures, abs=0.1)
        # the coarse k-NN against the plain numpy one on Fashion-MNIST's grouping (data/datasets.py)
        coarse_expected = numpy_knn_accuracy(feats[f"train_level{k}"], coarse_of[feats["train_labels"]],
                                             feats[f"test_level{k}"], coarse_of[feats["test_labels"]])
        assert abs(row["hierarchy"]["coarse"]["knn_top1"] - coarse_expected) <= 0.1
    orders = [r["order"] for r in result["hierarchical_search"]]
    assert orders == [[0, 1], [1, 0]]
    for r in result["hierarchical_search"]:
        assert set(r["measures"]["avg_distance_at_k"]) == {"1", "5", "10", "20"}
        assert 0 <= r["measures"]["h_ap"] <= 100 and r["measures"]["h_ap_depth"] == ev.H_AP_DEPTH
    assert result["hierarchy_measures"]["h_ap_depth"] == ev.H_AP_DEPTH


def numpy_ranking(bank, queries, depth):
    """Each query's `depth` nearest bank rows by cosine, best first, in plain numpy."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(queries @ bank.T), axis=1, kind="stable")[:, :depth]


@pytest.mark.parametrize("levels,needle", [([], "needs at least 1 level"), ([0, 0], "repeats a level"),
                                           ([3], "level 3 does not exist; levels here: 0, 1")])
def test_evaluate_run_refuses_bad_levels_before_any_work(tmp_path, make_run, levels, needle):
    run = make_run(tmp_path / "run")
    with pytest.raises(SjeaError, match=needle):
        ev.evaluate_run(run, levels=levels)
    assert not (run / "eval.json").exists()


def test_evaluate_run_reports_progress_only_to_a_callable(tmp_path, make_run, capfd):
    run = make_run(tmp_path / "run")
    calls = []
    ev.evaluate_run(run, max_train=60, max_test=30, probe_epochs=1, levels="1",
                    progress=lambda task, done, total: calls.append((task, done, total)))
    assert capfd.readouterr() == ("", "")
    assert calls[0] == ("train features", 0, 60) and calls[-1] == ("test features", 30, 30)
    assert [c[1] for c in calls if c[0] == "train features"] == sorted(c[1] for c in calls if c[0] == "train features")


def test_evaluate_run_refuses_a_folder_without_class_subfolders(tmp_path, make_run, fmnist_test):
    from PIL import Image

    run = make_run(tmp_path / "run")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        Image.fromarray(fmnist_test.pixels[i]).save(flat / f"{i}.png")
    with pytest.raises(SjeaError, match="no labels"):
        ev.evaluate_run(run, dataset=str(flat))
    assert not (run / "eval.json").exists()


def test_precision_uses_ten_neighbours_even_when_k_is_smaller():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 100)
    feats = rng.normal(size=(200, 8)).astype(np.float32)
    out = ev.evaluate_features([feats[:150]], labels[:150], [feats[150:]], labels[150:], [0],
                               (np.array([0, 0]), ["one"]), probe_epochs=1, k=3)
    coarse = out["levels"][0]["hierarchy"]["coarse"]
    assert coarse["precision_at_10"] == 100.0 and coarse["knn_top1"] == 100.0  # one coarse group
    from sjea_tools.vectors import cosine_top_k

    _, ids = cosine_top_k(feats[150:], feats[:150], 10)
    assert out["levels"][0]["hierarchy"]["fine"]["precision_at_10"] == pytest.approx(
        ev.precision_at_k(ids, labels[:150], labels[150:], 10))
