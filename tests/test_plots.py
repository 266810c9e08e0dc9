"""`sjea plot`: the three PNGs from a run, the pure pieces behind them, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sjea_tools import plots
from sjea_tools.cli import app
from sjea_tools.errors import SjeaError

from test_eval_cli import assert_one_line_error

runner = CliRunner()



def write_metrics(run, steps=12, levels=2):
    """metrics.jsonl rows as the trainer writes them: covariance falling over training."""
    rows = []
    for s in range(1, steps + 1):
        rows.append({"kind": "step", "step": s * 10, "epoch": s / 4, "lr": 1e-3, "images_per_s": 50.0, "loss": 40.0,
                     "levels": [{"loss": 20.0, "invariance": 0.1, "variance": 0.5, "covariance": (k + 1) * 4.0 / s}
                                for k in range(levels)]})
        if s % 4 == 0:
            rows.append({"kind": "epoch", "epoch": s // 4, "step": s * 10, "collapse_warning": False,
                         "levels": [{"std": 0.04, "effective_rank": 100.0} for _ in range(levels)]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_plot_writes_the_three_pngs(tmp_path, make_run):
    run = make_run(tmp_path / "run")
    write_metrics(run)
    result = runner.invoke(app, ["plot", "--run", str(run), "--class", "trouser", "--max-points", "150", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["written"]
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["covariance.png", "subclusters_Trouser.png", "tsne.png"]
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
            # not a blank canvas: a drawn figure has many distinct colours
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_only_covariance_needs_no_dataset_or_model_pass(tmp_path, make_run):
    run = make_run(tmp_path / "run", levels=3)
    write_metrics(run, levels=3)
    paths = plots.plot_run(run, kinds=["covariance"], out_dir=tmp_path / "pics")
    assert paths == [tmp_path / "pics" / "covariance.png"] and paths[0].stat().st_size > 1000


def test_covariance_series_reads_step_rows_per_level():
    rows = [{"kind": "epoch", "epoch": 1, "levels": [{"std": 1}]},
            {"kind": "step", "step": 10, "levels": [{"covariance": 3.0}, {"covariance": 5.0}]},
            {"kind": "step", "step": 20, "levels": [{"covariance": 1.0}, {"covariance": 2.0}]}]
    steps, series = plots.covariance_series(rows)
    assert steps.tolist() == [10, 20]
    assert [s.tolist() for s in series] == [[3.0, 1.0], [5.0, 2.0]]
    with pytest.raises(SjeaError, match="no training steps"):
        plots.covariance_series([rows[0]])


def test_tsne_is_min_max_scaled_and_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 16)) + 8 * np.eye(16)[0], rng.normal(size=(60, 16)) - 8 * np.eye(16)[0]])
    xy = plots.tsne_2d(x)
    assert xy.shape == (120, 2)
    assert np.allclose(xy.min(axis=0), 0) and np.allclose(xy.max(axis=0), 1)
    a, b = xy[:60].mean(axis=0), xy[60:].mean(axis=0)
    spread = max(xy[:60].std(axis=0).max(), xy[60:].std(axis=0).max())
    assert np.linalg.norm(a - b) > 2 * spread


def test_sub_clusters_recover_three_groups_with_typical_members_first():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:3] * 10
    truth = np.repeat(np.arange(3), 40)
    x = centres[truth] + rng.normal(size=(120, 8))
    clusters, typical = plots.sub_clusters(x, 3)
    assert len(typical) == 3
    for c in range(3):  # every found cluster is exactly one true group
        assert len(set(truth[clusters == c])) == 1
        assert len(typical[c]) == plots.THUMBS_PER_CLUSTER and (clusters[typical[c]] == c).all()
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        centre = unit[clusters == c].mean(axis=0)
        sims = unit[typical[c]] @ centre
        assert (np.diff(sims) <= 1e-6).all() and sims[-1] >= np.sort(unit[clusters == c] @ centre)[-10] - 1e-6


def test_plot_sub_clusters_agree_with_the_cluster_tree():
    from sjea_tools.clusters import build_tree

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16)) + np.repeat(np.eye(16)[:4] * 3, 75, axis=0)
    clusters, _ = plots.sub_clusters(x, 4, seed=5)
    tree = build_tree([x], [4], seed=5)
    assert np.array_equal(clusters, tree["assign"][:, 0])


def test_resolve_class_by_name_or_index():
    names = ["T-shirt/top", "Trouser", "Bag"]
    assert plots.resolve_class("bag", names) == 2
    assert plots.resolve_class("1", names) == 1
    assert plots.resolve_class(None, names) == 0


def test_plot_errors_are_one_line(tmp_path, make_run, monkeypatch):
    run = make_run(tmp_path / "run")
    # a run without metrics
    assert_one_line_error(runner.invoke(app, ["plot", "--run", str(run)]), "metrics.jsonl")
    write_metrics(run)
    # an unknown class: nothing is written
    assert_one_line_error(runner.invoke(app, ["plot", "--run", str(run), "--class", "Spaceship"]),
                          "unknown class 'Spaceship'", "Ankle boot")
    assert not (run / "plots").exists()
    assert_one_line_error(runner.invoke(app, ["plot", "--run", str(run), "--only", "histogram"]), "unknown plot")
    # matplotlib missing: say how to install the extra
    real = plots.importlib.util.find_spec
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert_one_line_error(runner.invoke(app, ["plot", "--run", str(run)]), "pip install matplotlib scikit-learn")


def test_plot_prints_an_odd_folder_name_literally(tmp_path, make_run):
    run = make_run(tmp_path / "run")
    write_metrics(run)
    odd = tmp_path / "[/bold]x\n[red]y"  # a closing tag alone used to raise MarkupError
    result = runner.invoke(app, ["plot", "--run", str(run), "--only", "covariance", "--out-dir", str(odd)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"wrote {tmp_path}/[/bold]x\\n[red]y/covariance.png"]
    assert (odd / "covariance.png").stat().st_size > 1000
