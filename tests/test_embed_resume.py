"""Never lose work: SIGKILL at random points then resume, and 2 shards merged, equal one clean run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import journal_pause, kill, make_run, start_paused, write_fmnist_folder
from sjea_tools.embed import Embedder, embed_folder
from sjea_tools.store import open_store

SJEA = str(Path(sys.executable).with_name("sjea"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fmnist_test):
    base = tmp_path_factory.mktemp("resume")
    run = make_run(base / "run")
    folder = write_fmnist_folder(base / "imgs", fmnist_test, 240)
    (folder / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "Coat" / "empty.jpg").write_bytes(b"")
    clean = base / "clean.h5"
    emb = Embedder.from_source(run=run, backend="torch")
    embed_folder(folder, clean, embedder=emb, workers=1, batch_size=16)
    return run, folder, clean, emb


def _contents(path):
    with open_store(path) as s:
        return s.paths, s.failed, [s.read_embeddings(k) for k in s.levels], s.label_names


def _assert_same_as_clean(path, clean):
    paths, failed, rows, names = _contents(path)
    c_paths, c_failed, c_rows, c_names = _contents(clean)
    assert paths == c_paths  # same order, no duplicates, none missing
    assert failed == c_failed and names == c_names
    for got, want in zip(rows, c_rows):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-6


def _cmd(folder, out, run, *extra):
    return [SJEA, "embed", str(folder), str(out), "--run", str(run), "--backend", "torch", "--workers", "1",
            "--batch-size", "16", "--no-index", "--quiet", *extra]


# Recorded seeds (never the clock): each picks two kill points, a row count and whether the kill
# lands before or after the commit that counts it (seed 1: before then after; 5: after then before).
@pytest.mark.parametrize("seed", [1, 5])
def test_sigkill_at_random_points_then_resume_equals_a_clean_run(setup, tmp_path, seed):
    run, folder, clean, _ = setup
    out = tmp_path / "killed.h5"
    partial = out.with_name(out.name + ".partial")
    rng = random.Random(seed)
    first = rng.randrange(8, 100)
    second = rng.randrange(first + 16, 200)  # beyond what the first kill left committed (batches of 8)
    kills = [(rows, rng.choice(["before-commit", "after-commit"])) for rows in (first, second)]
    # Two kills, each at the first journal commit that counts `rows` rows: after its batch was
    # written but before it counts, or just after; the second kills the resumed run.
    for rows, when in kills:
        args = _cmd(folder, out, run, "--commit-every", "0", "--batch-size", "8")[1:]
        kill(start_paused(journal_pause(when, rows), args))
        commit = json.loads((partial / "commit.json").read_text())
        written = (partial / "paths.jsonl").stat().st_size
        # Before the commit, the killed batch's rows are on disk beyond what commit.json counts.
        assert (written > commit["paths_bytes"]) == (when == "before-commit"), (seed, rows, when, commit)
        assert (commit["rows"] >= rows) == (when == "after-commit"), (seed, rows, when, commit)
        assert not out.exists(), f"seed {seed}: a store before the run finished"
    done = subprocess.run(_cmd(folder, out, run, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"seed {seed}: {done.stderr}"
    assert not partial.exists()
    assert json.loads(done.stdout)["resumed_from"] == commit["rows"] + commit["failed"], f"seed {seed}, kills {kills}"
    _assert_same_as_clean(out, clean)


def test_two_shards_merged_equal_a_single_run(setup, tmp_path):
    from typer.testing import CliRunner

    from sjea_tools.cli import app

    run, folder, clean, emb = setup
    for i in range(2):
        embed_folder(folder, tmp_path / f"out-{i}.h5", embedder=emb, shard=f"{i}/2", workers=1, batch_size=16)
    with open_store(tmp_path / "out-0.h5") as s0, open_store(tmp_path / "out-1.h5") as s1:
        assert s0.n > 0 and s1.n > 0 and not set(s0.paths) & set(s1.paths)
        assert (s0.attrs["shard"], s1.attrs["shard"]) == ("0/2", "1/2")
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "out-1.h5"), str(tmp_path / "out-0.h5"),
                                   str(tmp_path / "out.h5"), "--no-index"])
    assert res.exit_code == 0, res.output
    assert "merged 2 shards" in res.output
    _assert_same_as_clean(tmp_path / "out.h5", clean)


def test_a_finished_store_with_a_leftover_journal_is_complete(setup, tmp_path):
    """A kill between renaming the finished store into place and deleting the journal loses nothing."""
    run, folder, clean, emb = setup
    import shutil

    out = tmp_path / "s.h5"
    shutil.copy(clean, out)
    with open_store(out) as s:
        token = s.attrs["run_token"]
    from sjea_tools.store import Journal

    attrs = {k: v for k, v in _attrs(clean).items() if k not in ("created", "run_token", "format")}
    j = Journal.create(out.with_name(out.name + ".partial"), attrs)
    j.meta["token"] = token
    j.close()
    (out.with_name(out.name + ".partial") / "meta.json").write_text(__import__("json").dumps(j.meta))
    summary = embed_folder(folder, out, embedder=emb, workers=1)
    assert summary["status"] == "complete"
    assert not out.with_name(out.name + ".partial").exists()
    _assert_same_as_clean(out, clean)


def _attrs(path):
    with open_store(path) as s:
        return dict(s.attrs)


def test_torchrun_ranks_embed_one_shard_each_and_rank0_merges(setup, tmp_path):
    run, folder, clean, _ = setup
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "tr.h5"
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", SJEA, "embed",
                          str(folder), str(out), "-r", str(run), "--backend", "torch", "--workers", "0",
                          "--batch-size", "16", "--no-index", "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "merged all shards" in res.stdout
    for i in range(2):
        with open_store(tmp_path / f"tr-shard{i:03d}of002.h5") as s:
            assert s.attrs["shard"] == f"{i}/2"
    _assert_same_as_clean(out, clean)
