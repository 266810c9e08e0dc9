"""`sjea embed --engine ray` (sjea_tools.engines.ray) in Ray's local mode: 2 workers on this machine.

One local Ray serves the whole module (its start-up is most of the cost); embed_with_ray uses a Ray
already initialised in the process, as it documents.
"""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_run, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.embed import EmbedRequest, RayOptions, embed_folder
from sjea_tools.engines import ray as engine
from sjea_tools.errors import SjeaError
from sjea_tools.index import read_sidecar
from sjea_tools.pipeline import shard_path
from sjea_tools.store import open_store, partial_path

N_IMAGES = 64


@pytest.fixture(scope="module")
def ray_local():
    with engine.ray_session(num_cpus=2, num_gpus=0):  # 2 workers, no GPU: the same on every machine
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fmnist_test, ray_local):
    """A folder (one broken file), the plain run's store, and embed_with_ray's store of the same
    folder, whose shard 0 resumes the journal a killed earlier attempt left (what a retried task does)."""
    base = tmp_path_factory.mktemp("ray")
    run = make_run(base / "run")
    folder = write_fmnist_folder(base / "imgs", fmnist_test, N_IMAGES)
    (folder / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    options = dict(run=run, backend="torch", workers=0, batch_size=8)
    plain = base / "plain.h5"
    embed_folder(folder, plain, **options)
    out = base / "ray.h5"
    _killed_after_one_batch(folder, out, options)
    calls = []
    summary = _embed_with_ray(folder, out, partitions=2, index=False, **options,
                                    progress=lambda task, done, total: calls.append((task, done, total)))
    return base, run, folder, plain, out, summary, calls


def _embed_with_ray(folder, out, *, partitions=None, address=None, progress=None, **options):
    request = EmbedRequest(folder, out, engine="ray", ray=RayOptions(partitions, address), **options)
    return engine.embed_with_ray(request, progress)


def _killed_after_one_batch(folder, out, options) -> None:
    """Shard 0's journal as a task killed after its first committed batch leaves it."""
    def stop(task, done, total):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_folder(folder, shard_path(out, (0, 2)), shard=(0, 2), commit_every_s=0, progress=stop, **options)
    assert partial_path(shard_path(out, (0, 2))).exists()


def _same_store(a, b) -> None:
    with open_store(a) as x, open_store(b) as y:
        assert x.paths == y.paths and x.failed == y.failed and x.label_names == y.label_names
        assert np.array_equal(x.labels, y.labels) and x.levels == y.levels
        for k in x.levels:
            np.testing.assert_allclose(x.read_embeddings(k), y.read_embeddings(k), rtol=0, atol=1e-6)


def test_ray_partitions_merge_into_the_store_a_plain_run_writes(setup):
    base, _, _, plain, out, summary, calls = setup
    _same_store(out, plain)
    assert summary["engine"] == "ray" and summary["partitions"] == 2 and summary["status"] == "written"
    assert summary["rows"] == N_IMAGES and summary["failed_total"] == 1
    assert summary["shards"] == [str(shard_path(out, (i, 2))) for i in range(2)]
    assert [p["images"] for p in summary["parts"]] == [32, 33]  # store.shard_slice of the one scan
    assert summary["parts"][0]["resumed_from"] == 8  # the killed attempt's committed batch, not redone
    assert sum(p["added"] + p["failed"] - p["resumed_from"] for p in summary["parts"]) == N_IMAGES + 1 - 8
    assert [c for c in calls if c[0] == "partitions"] == [("partitions", d, 2) for d in range(3)]


def test_a_rerun_redoes_nothing_and_duplicates_no_row(setup):
    base, run, folder, plain, out, _, _ = setup
    again = _embed_with_ray(folder, out, partitions=2, index=False, run=run, backend="torch", workers=0)
    assert [p["status"] for p in again["parts"]] == ["complete", "complete"]
    assert again["status"] == "up to date" and again["added"] == 0
    _same_store(out, plain)


def test_cli_engine_ray_writes_indexes_and_says_where_outputs_went(setup, tmp_path):
    _, run, folder, plain, _, _, _ = setup
    out = tmp_path / "cli.h5"
    res = CliRunner().invoke(app, ["embed", str(folder), str(out), "--engine", "ray", "--partitions", "2", "--run",
                                   str(run), "--backend", "torch", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["engine"] == "ray" and summary["partitions"] == 2 and summary["out"] == str(out)
    assert summary["shards"] == [str(shard_path(out, (i, 2))) for i in range(2)]
    _same_store(out, plain)
    assert read_sidecar(out)["n"] == N_IMAGES  # indexed as a plain run is
    assert summary["index"]["path"]


def _one_line(res, words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.output


def test_missing_ray_is_one_line_naming_the_extra(setup, monkeypatch, tmp_path):
    _, run, folder, _, _, _, _ = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as on a machine without it
    res = CliRunner().invoke(app, ["embed", str(folder), str(tmp_path / "x.h5"), "--engine", "ray", "--run",
                                   str(run), "--backend", "torch"])
    _one_line(res, "pip install 'sjea-tools[ray]'")
    assert not (tmp_path / "x.h5").exists()


def test_unreachable_cluster_is_one_line_at_once(setup, tmp_path, monkeypatch):
    import ray

    _, run, folder, _, _, _, _ = setup
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a fresh driver, not this module's local Ray
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray's own ray.init retries for minutes: the address must be refused before Ray is asked at all.
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called for an unreachable address"))
    with pytest.raises(SjeaError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        _embed_with_ray(folder, tmp_path / "x.h5", address=f"127.0.0.1:{port}", run=run)
    with pytest.raises(SjeaError, match="HOST:PORT"):
        _embed_with_ray(folder, tmp_path / "x.h5", address="headnode", run=run)


@pytest.mark.parametrize("args, words", [
    (["--partitions", "2"], "--partitions applies to --engine ray"),
    (["--engine", "ray", "--update"], "--update runs on the plain engine only"),
    (["--engine", "ray", "--shard", "0/2"], "--shard and --engine ray do not combine"),
    (["--engine", "ray", "--partitions", "999"], "--partitions must be a whole number from 1 to the 65"),
    (["--engine", "ray", "--ray-gpus", "1"], "no Ray node can run a task of 1 CPU + 1 GPU"),
    (["--engine", "spark"], "--engine must be local or ray"),
])
def test_bad_engine_options_are_one_line_before_any_work(setup, tmp_path, args, words):
    _, run, folder, _, _, _, _ = setup
    res = CliRunner().invoke(app, ["embed", str(folder), str(tmp_path / "x.h5"), "--run", str(run), "--backend",
                                   "torch", *args])
    _one_line(res, words)
    assert list(tmp_path.iterdir()) == []  # no shard, journal or lock left behind


def test_an_existing_store_is_refused_before_the_tasks_run(setup):
    _, run, folder, plain, _, _, _ = setup
    with pytest.raises(SjeaError, match="already exists; pass --overwrite"):
        _embed_with_ray(folder, plain, partitions=2, run=run, backend="torch")
    assert not shard_path(plain, (0, 2)).exists()
