"""sjea_tools.pipeline from Python: embed -> index -> cluster tree, and shards merged without torchrun."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_run, write_fmnist_folder
from sjea_tools.clusters import read_tree
from sjea_tools.embed import EmbedRequest, Embedder, RayOptions, embed_folder, embed_held
from sjea_tools.engines import run_embed
from sjea_tools.engines.torchrun import rank_device, torchrun_shard
from sjea_tools.errors import SjeaError
from sjea_tools.index import index_dir, read_sidecar
from sjea_tools.pipeline import embed_and_index, index_held, merge_shards, shard_path
from sjea_tools.store import guard, open_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fmnist_test):
    base = tmp_path_factory.mktemp("pipeline")
    run = make_run(base / "run")
    folder = write_fmnist_folder(base / "imgs", fmnist_test, 90)
    (folder / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    emb = Embedder.from_source(run=run, backend="torch")
    clean = base / "clean.h5"
    embed_folder(folder, clean, embedder=emb, workers=0, batch_size=32)
    return folder, emb, clean


def _contents(path):
    with open_store(path) as s:
        return s.paths, s.failed, s.label_names, [s.read_embeddings(k) for k in s.levels]


def _indexed(path) -> bool:
    with open_store(path) as s:
        tree, why = read_tree(s)
        n = s.n
    sidecar = read_sidecar(path)
    return sidecar is not None and sidecar["n"] == n and tree is not None and tree["attrs"]["n"] == n


def test_embed_folder_alone_builds_no_index_and_no_cluster_tree(setup):
    _, _, clean = setup
    assert not index_dir(clean).exists()
    with open_store(clean) as s:
        assert read_tree(s)[0] is None


def test_embed_and_index_runs_every_step_and_reports_progress(setup, tmp_path):
    folder, emb, clean = setup
    calls = []
    summary = embed_and_index(folder, tmp_path / "s.h5", embedder=emb, workers=0, batch_size=32,
                              progress=lambda task, done, total: calls.append((task, done, total)))
    assert _indexed(tmp_path / "s.h5")
    assert summary["index"]["path"] == str(index_dir(tmp_path / "s.h5"))
    assert summary["index"]["clusters"]  # the tree's sizes, per depth
    embedding = [(done, total) for task, done, total in calls if task == "embedding"]
    assert embedding[0] == (0, 91) and embedding[-1] == (91, 91)
    assert [d for d, _ in embedding] == sorted(d for d, _ in embedding)  # cumulative
    assert any(task != "embedding" for task, _, _ in calls)  # the index steps report too
    a, b = _contents(tmp_path / "s.h5"), _contents(clean)
    assert a[:3] == b[:3]


def test_two_shards_then_merge_equal_one_run(setup, tmp_path):
    folder, emb, clean = setup
    out = tmp_path / "all.h5"
    for i in range(2):
        summary = embed_and_index(folder, shard_path(out, (i, 2)), shard=(i, 2), index=False, embedder=emb,
                                  workers=0, batch_size=32)
        assert "index" not in summary
    assert shard_path(out, "1/2").name == "all-shard001of002.h5"
    merged = merge_shards(out, 2)
    assert merged["shards"] == 2 and merged["rows"] == 90 and merged["failed"] == 1
    paths, failed, names, rows = _contents(out)
    c_paths, c_failed, c_names, c_rows = _contents(clean)
    assert (paths, failed, names) == (c_paths, c_failed, c_names)
    for got, want in zip(rows, c_rows):  # within 1e-6, not bitwise: docs/store-format.md, "Shards"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert _indexed(out)


def test_run_embed_without_torchrun_is_embed_and_index(setup, tmp_path, monkeypatch):
    folder, emb, _ = setup
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_shard() is None
    summary = run_embed(EmbedRequest(folder, tmp_path / "s.h5", shard="0/3", index=False, workers=0), embedder=emb)
    with open_store(tmp_path / "s.h5") as s:
        assert s.attrs["shard"] == "0/3" and s.n + len(s.failed) == 91 // 3
    assert "merged" not in summary and not index_dir(tmp_path / "s.h5").exists()


def test_torchrun_environment_gives_each_rank_its_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert torchrun_shard() == (2, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torchrun_shard() is None
    assert rank_device("cpu") == "cpu" and rank_device("cuda:1") == "cuda:1"


def test_the_writer_lock_is_taken_once_for_embedding_and_indexing(setup, tmp_path, monkeypatch):
    """One acquire of OUT's lock for the whole command, held by every step beneath it."""
    folder, emb, _ = setup
    out = tmp_path / "s.h5"
    acquired, seen = [], []
    real_acquire = guard._acquire
    monkeypatch.setattr(guard, "_acquire", lambda path, store: acquired.append(path) or real_acquire(path, store))
    progress = lambda task, done, total: seen.append(guard.held(out))  # noqa: E731
    embed_and_index(folder, out, embedder=emb, workers=0, batch_size=32, progress=progress)
    assert acquired == [guard.lock_path(out)]
    assert seen and all(seen) and not guard.held(out)


def test_steps_refuse_to_run_without_their_callers_lock(setup, tmp_path):
    folder, emb, clean = setup
    with pytest.raises(RuntimeError, match="writer lock"):
        embed_held(EmbedRequest(folder, tmp_path / "x.h5"), embedder=emb)
    with pytest.raises(RuntimeError, match="writer lock"):
        index_held(clean)
    assert not (tmp_path / "x.h5").exists() and not index_dir(clean).exists()


@pytest.mark.parametrize("options, words", [
    (dict(dtype="int8"), "--dtype must be float32 or float16"),
    (dict(batch_size=0), "--batch-size must be a whole number"),
    (dict(workers=-1), "--workers must be 0"),
    (dict(commit_every_s=float("inf")), "--commit-every must be a finite number"),
    (dict(update=True, overwrite=True), "not both"),
    (dict(shard="3/3"), "--shard 3/3"),
    (dict(engine="spark"), "--engine must be local or ray"),
    (dict(ray=RayOptions(address="h:1")), "--ray-address applies to --engine ray"),
    (dict(engine="ray", shard="0/2"), "--shard and --engine ray do not combine"),
    (dict(engine="ray", update=True), "--update runs on the plain engine only"),
    (dict(engine="ray", ray=RayOptions(gpus_per_task=-1.0)), "--ray-gpus must be a number >= 0"),
])
def test_a_request_is_checked_when_built(options, words, tmp_path):
    with pytest.raises(SjeaError, match=words):
        EmbedRequest(tmp_path, tmp_path / "x.h5", **options)


def test_a_request_keeps_its_normalised_forms():
    r = EmbedRequest("imgs", "out.h5", shard="1/4")
    assert r.shard == (1, 4) and str(r.out) == "out.h5" and r.engine == "local" and r.index
    with pytest.raises(AttributeError):
        r.batch_size = 1  # frozen: what the CLI asked for is what the runner gets
