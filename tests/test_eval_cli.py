"""`sjea eval` through the CLI: the table, JSON, stores, and one-line errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sjea_tools.cli import app

from test_evaluation import numpy_knn_accuracy

runner = CliRunner()



def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_eval_prints_a_row_per_level_and_writes_eval_json(tmp_path, make_run):
    run = make_run(tmp_path / "run")
    result = runner.invoke(app, ["eval", "--run", str(run), "--max-train", "300", "--max-test", "100",
                                 "--probe-epochs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "eval.json").read_text())
    assert f"wrote {run / 'eval.json'}" in " ".join(result.stderr.split())
    assert [row["level"] for row in saved["levels"]] == [0, 1]
    table_rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    for row in saved["levels"]:
        cells = [c.strip() for c in next(r for r in table_rows if r.split("│")[1].strip() == str(row["level"])).split("│")]
        assert cells[3] == f"{row['linear_top1']:.2f}" and cells[5] == f"{row['knn_top1']:.2f}"
        measures = row["hierarchy"]["measures"]  # H-AP and mistake severity close the row
        assert cells[-3:-1] == [f"{measures['h_ap']:.2f}", f"{measures['mistake_severity']:.3f}"]
    assert "hierarchical search" in result.stdout
    # every floor carries the same measures, under the same protocol, in the JSON and the floors' table
    for floor in saved["baselines"]["pixels"]:
        m = floor["hierarchy"]
        assert set(m) == {"top1_error", "mistakes", "mistake_severity", "avg_distance_at_k", "h_ap", "h_ap_depth"}
        assert set(m["avg_distance_at_k"]) == {"1", "5", "10", "20"}
        # the distance at k = 1 is the mistakes' severity times the error rate
        assert m["avg_distance_at_k"]["1"] == pytest.approx(m["mistake_severity"] * m["top1_error"] / 100, abs=1e-3)
        line = next(r for r in table_rows if r.split("│")[1].strip() == floor["features"])
        assert [c.strip() for c in line.split("│")][-3:-1] == [f"{m['h_ap']:.2f}", f"{m['mistake_severity']:.3f}"]
    assert {"tree", "h_ap_relevance", "h_ap_depth", "distance_k"} <= set(saved["hierarchy_measures"])
    assert saved["n_train"] == 300 and saved["n_test"] == 100 and saved["dataset"] == "fashion-mnist"


def test_eval_json_and_random_init_baseline(tmp_path, make_run):
    run = make_run(tmp_path / "run", levels=1)
    result = runner.invoke(app, ["eval", "--run", str(run), "--max-train", "200", "--max-test", "80",
                                 "--probe-epochs", "2", "--random-init", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["weights"] == "random-init" and len(printed["levels"]) == 1
    assert printed == json.loads((run / "eval-random-init.json").read_text())
    assert not (run / "eval.json").exists()
    assert "hierarchical_search" not in printed  # one level: nothing to re-rank


def test_eval_store_matches_numpy_knn_on_the_stored_embeddings(tmp_path, make_run, write_fmnist_folder, fmnist_test):
    import h5py

    from sjea_tools.embed import embed_folder

    run = make_run(tmp_path / "run")
    images = write_fmnist_folder(tmp_path / "images", fmnist_test, 150)
    store = tmp_path / "fm.h5"
    embed_folder(images, store, run=run, workers=0, backend="torch")
    result = runner.invoke(app, ["eval", str(store), "--probe-epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["output"] == str(store.with_name("fm.h5.eval.json")) and out["n_train"] + out["n_test"] == 150
    # k from class sizes (never 200 on 150 rows): the smallest class of the bank
    with h5py.File(store, "r") as f:
        bank_counts = np.bincount(np.delete(f["labels"][:], out["test_rows"]))
    assert out["settings"]["knn_k"] == min(200, bank_counts[bank_counts > 0].min())
    with h5py.File(store, "r") as f:  # read the store with plain h5py, not through sjea
        labels = f["labels"][:]
        test = np.zeros(len(labels), bool)
        test[out["test_rows"]] = True
        for row in out["levels"]:
            emb = f[f"level_{row['level']}/embeddings"][:].astype(np.float64)
            expected = numpy_knn_accuracy(emb[~test], labels[~test], emb[test], labels[test], k=out["settings"]["knn_k"])
            assert abs(row["knn_top1"] - expected) <= 0.1
            # the folder's class names are Fashion-MNIST's, so the coarse grouping applies
            assert "coarse" in row["hierarchy"]
            m = row["hierarchy"]["measures"]  # the bank is smaller than 100 rows per query list: H-AP at its size
            assert m["h_ap_depth"] == min(100, out["n_train"]) and 0 <= m["h_ap"] <= 100
            assert m["avg_distance_at_k"]["1"] == pytest.approx(m["mistake_severity"] * m["top1_error"] / 100, abs=1e-3)


def test_eval_of_unlabelled_images_needs_a_store(tmp_path, make_run, fmnist_test):
    """A run on a folder without class sub-folders is refused; the folder's store gets label-free
    measures instead (tests/test_eval_labelfree.py), or a one-line refusal with --no-images."""
    from PIL import Image

    from sjea_tools.embed import embed_folder

    run = make_run(tmp_path / "run")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(12):
        Image.fromarray(fmnist_test.pixels[i]).save(flat / f"{i}.png")
    embed_folder(flat, tmp_path / "flat.h5", run=run, workers=0, backend="torch")
    assert_one_line_error(runner.invoke(app, ["eval", str(tmp_path / "flat.h5"), "--no-images"]), "no labels")
    assert_one_line_error(runner.invoke(app, ["eval", "--run", str(run), "--dataset", str(flat)]), "no labels")
    assert not (tmp_path / "flat.h5.eval.json").exists() and not (run / "eval.json").exists()


def test_eval_bad_options_are_one_line(tmp_path, make_run):
    run = make_run(tmp_path / "run")
    assert_one_line_error(runner.invoke(app, ["eval", "--run", str(run), "--level", "5"]), "level")
    assert_one_line_error(runner.invoke(app, ["eval", "--run", str(run), "--dataset", "imagenet"]), "unknown dataset")
    assert_one_line_error(runner.invoke(app, ["eval", "--run", str(tmp_path / "nowhere")]), "does not exist")
    for flag in ("--limit", "--sample"):  # STORE-only options
        assert_one_line_error(runner.invoke(app, ["eval", "--run", str(run), flag, "5"]), flag, "STORE")


def test_paths_are_printed_literally_on_one_line(tmp_path, make_run):
    """A folder named with rich markup, a newline and a byte that is not UTF-8 is printed as written
    (markup shown, the newline and the byte escaped), never interpreted or crashing the print."""
    run = make_run(tmp_path / "run", levels=1)
    odd = tmp_path / "[bold]a\nb\udce9[/bold]"
    result = runner.invoke(app, ["eval", "--run", str(run), "--out", str(odd / "e.json"), "--max-train", "200",
                                 "--max-test", "50", "--probe-epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((odd / "e.json").read_text())["output"] == str(odd / "e.json")
    shown = f"wrote {tmp_path}/[bold]a\\nb\\xe9[/bold]/e.json"
    assert [line for line in result.stderr.splitlines() if line.strip()] == [shown], result.stderr
