"""Issue 22 (trust at the edges), store and index parts: a renamed store, swapped parts, crafted
files, non-finite rows, a merged shard written in place, the working directory's segments, and
the layout of a grown index for plain FAISS clients. Real images, a real (tiny, random) model."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_run, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.embed import Embedder, embed_folder
from sjea_tools.errors import SjeaError
from sjea_tools.index import build_indexes, index_dir, load_indexes, read_sidecar
from sjea_tools.store import compact_store, merge_stores, open_store, segments_dir, verify_store


def _copy(src: Path, dst: Path, rel) -> Path:
    for p in rel:
        (dst / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / p, dst / p)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory, fmnist_test):
    """A folder A of 40 images (its store `base`) and two sets of three other images, B and C;
    `update(out, extra)` grows the store `out` by an --update with those images in A (then takes
    them out again: a store's root folder is part of its identity); `grown(out, extra)`: base so grown."""
    tmp = tmp_path_factory.mktemp("edges")
    full = write_fmnist_folder(tmp / "full", fmnist_test, 46)
    files = sorted(p.relative_to(full) for p in full.rglob("*.png"))
    a = _copy(full, tmp / "A", files[:40])
    extra = {"B": files[40:43], "C": files[43:46]}
    emb = Embedder.from_source(run=make_run(tmp / "run"), backend="torch")
    base = tmp / "base.h5"
    embed_folder(a, base, embedder=emb, workers=0, batch_size=16)

    def update(out: Path, which: str) -> Path:
        _copy(full, a, extra[which])
        try:
            embed_folder(a, out, embedder=emb, workers=0, batch_size=16, update=True)
        finally:
            for p in extra[which]:
                (a / p).unlink()
        return out

    def grown(out: Path, which: str) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(base, out)
        return update(out, which)

    return {"tmp": tmp, "A": a, "emb": emb, "base": base, "grown": grown, "update": update}


def _rows(path):
    with open_store(path) as s:
        return s.paths, [s.read_embeddings(k) for k in s.levels]


def _same(path, want):
    paths, rows = _rows(path)
    assert paths == want[0] and all(np.array_equal(x, y) for x, y in zip(rows, want[1]))


def _one_line(res, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3, res.output
    return " ".join(res.output.split())


# --- item 1: a store renamed with mv ------------------------------------------------------------

def test_a_renamed_store_keeps_its_segments_when_a_new_store_takes_its_name(env, tmp_path):
    s, old = tmp_path / "s.h5", tmp_path / "s-old.h5"
    env["grown"](s, "B")
    want = _rows(s)
    os.rename(s, old)  # what `mv s.h5 s-old.h5` does
    embed_folder(env["A"], s, embedder=env["emb"], workers=0, batch_size=16)  # a new store under the old name
    _same(old, want)
    assert verify_store(old)["ok"] and verify_store(s)["rows"] == 40
    # growing the new store would write into the folder the renamed one reads: one line, nothing lost
    with pytest.raises(SjeaError, match=r"holds the segments of another store, .*s-old\.h5.*sjea compact") as e:
        env["update"](s, "B")
    assert "\n" not in str(e.value)
    _same(old, want)
    compact_store(old)  # the fix the message gives: then the old name's folder is free
    assert not segments_dir(s).exists()
    env["update"](s, "B")
    _same(old, want)
    assert verify_store(s)["rows"] == 43 and verify_store(old)["ok"]


def test_overwrite_of_a_store_of_segments_still_removes_its_own_folder(env, tmp_path):
    s = env["grown"](tmp_path / "s.h5", "B")
    embed_folder(env["A"], s, embedder=env["emb"], workers=0, batch_size=16, overwrite=True)
    assert not segments_dir(s).exists() and verify_store(s)["rows"] == 40


# --- item 2: parts bound to their store ---------------------------------------------------------

@pytest.fixture(scope="module")
def pair(env):
    """Two stores of A grown by other images (same model, same shapes), each indexed."""
    p = env["grown"](env["tmp"] / "pair" / "p" / "s.h5", "B")
    q = env["grown"](env["tmp"] / "pair" / "q" / "s.h5", "C")
    for store in (p, q):
        build_indexes(store, kind="flat")
    return p, q


def test_a_segment_swapped_for_another_stores_is_refused_everywhere(pair, tmp_path):
    p, q = pair
    s = tmp_path / "s.h5"
    shutil.copy(p, s)
    shutil.copytree(segments_dir(p), segments_dir(s))
    with open_store(s) as st:
        mine = st.segments[-1]["file"]
    with open_store(q) as st:
        theirs = q.parent / st.segments[-1]["file"]
    shutil.copy(theirs, s.parent / mine)
    with pytest.raises(SjeaError, match="is not the one the store recorded") as e:
        open_store(s)
    assert "\n" not in str(e.value)
    for args in (["search", "--id", "0", "--store", str(s), "--json"], ["verify", str(s)], ["compact", str(s)]):
        assert "is not the one the store recorded" in _one_line(CliRunner().invoke(app, args))


def _swap_copy(p: Path, tmp_path: Path) -> Path:
    s = tmp_path / "s.h5"
    shutil.copy(p, s)
    shutil.copytree(segments_dir(p), segments_dir(s))
    shutil.copytree(index_dir(p), index_dir(s))
    return s


def test_an_index_file_from_another_store_is_refused_and_rebuilt(pair, tmp_path):
    p, q = pair
    s = _swap_copy(p, tmp_path)
    mine, theirs = read_sidecar(s)["levels"]["0"]["file"], read_sidecar(q)["levels"]["0"]["file"]
    shutil.copy(index_dir(q) / theirs, index_dir(s) / mine)
    with open_store(s) as st:
        with pytest.raises(SjeaError, match=r"is not the index file built for .*--rebuild"):
            load_indexes(s, st.model_id, st.n, st.levels)
    assert "is not the index file" in _one_line(CliRunner().invoke(app, ["search", "--id", "0", "--store", str(s)]))
    sidecar = build_indexes(s, kind="flat")
    assert sidecar["levels"]["0"]["action"] == "rebuilt" and "replaced or swapped" in sidecar["levels"]["0"]["status"]
    with open_store(s) as st:
        assert load_indexes(s, st.model_id, st.n, st.levels)


def test_level_files_swapped_are_one_line_not_an_assertion(pair, tmp_path):
    s = _swap_copy(pair[0], tmp_path)
    entries = read_sidecar(s)["levels"]
    f0, f1 = index_dir(s) / entries["0"]["file"], index_dir(s) / entries["1"]["file"]
    b0, b1 = f0.read_bytes(), f1.read_bytes()
    f0.write_bytes(b1)
    f1.write_bytes(b0)
    out = _one_line(CliRunner().invoke(app, ["search", "--id", "0", "--store", str(s), "--level", "1"]))
    assert "--rebuild" in out and "AssertionError" not in out


def test_another_stores_index_folder_is_refused(pair, tmp_path):
    p, q = pair
    s = _swap_copy(p, tmp_path)
    shutil.rmtree(index_dir(s))
    shutil.copytree(index_dir(q), index_dir(s))
    with open_store(s) as st, pytest.raises(SjeaError, match="rebuild"):
        load_indexes(s, st.model_id, st.n, st.levels)


# --- item 3: a store's bytes come only from its file and its segments ----------------------------

def test_a_paths_dataset_in_an_external_file_is_refused(env, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:TOP-SECRET:/root:/bin/bash\n" * 40)
    s = tmp_path / "s.h5"
    shutil.copy(env["base"], s)
    with h5py.File(s, "r+") as f:
        n = f["paths"].shape[0]
        del f["paths"]
        f.create_dataset("paths", shape=(n,), dtype="S16", external=[(str(secret), 0, 16 * n)])
    with pytest.raises(SjeaError, match="external file .*secret.txt"):
        open_store(s)
    out = _one_line(CliRunner().invoke(app, ["search", "--id", "0", "--store", str(s), "--json"]))
    assert "TOP-SECRET" not in out and "read only its own file" in out


def test_a_virtual_dataset_reading_another_store_is_refused(env, pair, tmp_path):
    s = tmp_path / "s.h5"
    shutil.copy(env["base"], s)
    with h5py.File(s, "r+") as f:
        shape, dtype = f["level_0/embeddings"].shape, f["level_0/embeddings"].dtype
        del f["level_0/embeddings"]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(str(pair[1].resolve()), "level_0/embeddings", shape=(43, shape[1]))[:shape[0]]
        f.create_virtual_dataset("level_0/embeddings", layout)
    with pytest.raises(SjeaError, match="not one of its segment files"):
        verify_store(s)


# --- item 10: non-finite rows; a merged shard is never written in place ---------------------------

def test_a_nan_row_with_a_valid_checksum_is_found_by_verify_and_refused_by_index(env, tmp_path):
    s = tmp_path / "s.h5"
    shutil.copy(env["base"], s)
    with h5py.File(s, "r+") as f:
        f["level_0/embeddings"][5] = np.nan  # written through HDF5: its Fletcher32 checksum is valid
    with pytest.raises(SjeaError, match="NaN or infinity"):
        verify_store(s)
    with pytest.raises(SjeaError, match=r"row 5 .*NaN or infinity"):
        build_indexes(s, kind="flat")


def test_writing_a_shard_after_merge_leaves_the_merged_segment_alone(env, tmp_path):
    shards = [tmp_path / f"out-{i}.h5" for i in range(2)]
    for i, shard in enumerate(shards):
        embed_folder(env["A"], shard, embedder=env["emb"], workers=0, batch_size=16, shard=(i, 2))
    merged = tmp_path / "out.h5"
    merge_stores(shards, merged)
    with open_store(merged) as st:
        segment = merged.parent / st.segments[0]["file"]
    before = segment.read_bytes()
    with open_store(shards[0], "a") as st:  # what `sjea index out-0.h5` does with its cluster tree
        st.write_group("clusters", {"x": np.arange(3)})
    assert segment.read_bytes() == before and os.stat(shards[0]).st_nlink == 1
    assert verify_store(merged)["ok"]
    with open_store(shards[0]) as st:
        assert st.read_group("clusters") is not None


# --- item 12: the working directory's segments folder ---------------------------------------------

def test_a_same_named_segments_folder_in_the_working_directory_is_never_read(pair, tmp_path, monkeypatch):
    p, q = pair  # two stores of one model and shapes
    lone = tmp_path / "here" / "s.h5"
    lone.parent.mkdir()
    shutil.copy(p, lone)  # its segments folder not beside it ...
    cwd = tmp_path / "cwd"  # ... but a same-named one, whose last segment is q's, in the working directory
    shutil.copytree(segments_dir(p), segments_dir(cwd / "s.h5"))
    with open_store(p) as st, open_store(q) as sq:
        shutil.copy(q.parent / sq.segments[-1]["file"], cwd / st.segments[-1]["file"])
    monkeypatch.chdir(cwd)
    with h5py.File(lone, "r") as f:  # plain HDF5 falls back to the working directory (documented)
        assert f["paths"].asstr()[-1] == _rows(q)[0][-1] != _rows(p)[0][-1]
    with pytest.raises(SjeaError, match="is missing"):
        open_store(lone)
    shutil.copytree(cwd / "s.h5.segments", lone.parent / "s.h5.segments")  # and beside it: not the recorded one
    with pytest.raises(SjeaError, match="is not the one the store recorded"):
        open_store(lone)


# --- item 13: a grown index for plain FAISS clients ------------------------------------------------

def test_the_documented_plain_faiss_snippet_reads_a_grown_index(env, tmp_path):
    import faiss

    s = tmp_path / "s.h5"
    shutil.copy(env["base"], s)
    build_indexes(s, kind="flat")
    env["update"](s, "B")
    grown = build_indexes(s, kind="flat")
    assert grown["levels"]["0"].get("parts"), grown["levels"]["0"]["status"]
    doc = (Path(__file__).parents[1] / "docs" / "store-format.md").read_text()
    snippet = re.search(r"<!-- plain-faiss -->\n```python\n(.*?)```", doc, re.S).group(1)
    scope = {"STORE": str(s), "LEVEL": 0}
    exec(snippet, scope)  # noqa: S102 - the documented snippet, as a user runs it
    with open_store(s) as st:
        q = st.read_embeddings(0, [41])
        idx = load_indexes(s, st.model_id, st.n, [0])[0]
    want = idx.search(q, 5)
    got = scope["search"](q, 5)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
    assert got[1][0, 0] == 41 and isinstance(scope["indexes"][0], faiss.Index)


def test_a_nan_row_is_never_a_query_nor_a_hit(env, tmp_path):
    """Item 10, the search side: `--id` of a damaged row is one line (was an empty list, rc 0), and a
    damaged row is never ranked among the hits of other queries (was third, score nan)."""
    from sjea_tools.pipeline import index_store
    from sjea_tools.search import search_store

    s = tmp_path / "s.h5"
    shutil.copy(env["base"], s)
    index_store(s, kind="flat")
    victim = search_store(s, ids=[0], k=10, level=0)["results"][0]["per_level"]["0"][1]["id"]
    with h5py.File(s, "r+") as f:
        f["level_0/embeddings"][victim] = np.nan
    with pytest.raises(SjeaError, match=rf"row {victim} of .* non-finite values at level 0.*sjea verify"):
        search_store(s, ids=[victim], k=5, level=0)
    hits = search_store(s, ids=[0], k=10, level=0)["results"][0]["per_level"]["0"]
    assert len(hits) == 9 and all(h["id"] != victim and np.isfinite(h["score"]) for h in hits)


def test_sjea_serve_answers_409_for_a_foreign_segment_or_index_file(pair, tmp_path):
    """The files on disk are in a state the server cannot answer from: 409 with one message, as
    docs/serve.md documents for a store changed under the server (was 400, a client error)."""
    from fastapi.testclient import TestClient

    from sjea_tools.serve import create_app

    p, q = pair
    s = _swap_copy(p, tmp_path)
    mine, theirs = read_sidecar(s)["levels"]["0"]["file"], read_sidecar(q)["levels"]["0"]["file"]
    shutil.copy(index_dir(q) / theirs, index_dir(s) / mine)
    with TestClient(create_app(s)) as c:
        res = c.get("/api/search", params={"id": 0, "level": 0})
    assert res.status_code == 409 and "is not the index file" in res.json()["error"], res.text
