"""Searches served from memory: the loaded store answers from its held (or memory-mapped) vectors
exactly as the library answers from the file, opens no HDF5 file per request, and batches (many
ids, many uploads, many query files) give each query the answer it gets alone."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from sjea_tools.search import search_store
from sjea_tools.serve import state
from sjea_tools.serve.state import CACHE_PREFIX, StoreHolder

N = 200
MODES = ("per-level", "hierarchical", "both")


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_test):
    from conftest import indexed_store

    return indexed_store(tmp_path_factory.mktemp("memory"), fmnist_test, N)


def same_answers(got: dict, want: dict) -> None:
    """Every field of the library's answer, bit-equal (cluster_path is the server's addition)."""
    for key, value in want.items():
        if key not in ("results", "root"):
            assert got[key] == value, key
    for g, w in zip(got["results"], want["results"], strict=True):
        assert {k: g[k] for k in w} == w


@pytest.mark.parametrize("budget", [state.VECTORS_IN_MEMORY_MAX, 0], ids=["in-memory", "memory-mapped"])
def test_loaded_store_answers_as_the_library_and_opens_no_file_per_request(store, budget, monkeypatch):
    loaded = StoreHolder(store["out"], in_memory_max=budget).current()
    assert loaded.vectors.mapped == (budget == 0)

    def no_open(*args, **kwargs):
        raise AssertionError("a request opened the store file")

    monkeypatch.setattr(state, "open_store", no_open)
    for mode in MODES:
        same_answers(loaded.search(ids=[17, 3], k=6, mode=mode), search_store(store["out"], ids=[17, 3], k=6, mode=mode))


def test_memory_mapped_cache_is_written_once_per_store_version(store, tmp_path):
    out = tmp_path / "copy.h5"
    shutil.copyfile(store["out"], out)
    shutil.copytree(store["out"].with_name(store["out"].name + ".index"), out.with_name(out.name + ".index"))
    folder = out.with_name(out.name + ".index")
    holder = StoreHolder(out, in_memory_max=0)
    first = holder.current()
    files = sorted(folder.glob(f"{CACHE_PREFIX}*.npy"))
    assert len(files) == len(first.levels)
    stamps = [p.stat().st_mtime_ns for p in files]
    again = StoreHolder(out, in_memory_max=0).current()  # a second server on the same version reuses them
    assert [p.stat().st_mtime_ns for p in files] == stamps
    for j, lv in enumerate(first.levels):
        with state.open_store(out) as s:
            raw = s.read_embeddings(lv)
        np.testing.assert_array_equal(np.asarray(again.vectors.arrays[j]), first.indexes.prepare(raw))
    assert not list(folder.glob(".*.tmp"))  # written atomically: no temp file left


def test_many_ids_in_one_call_answer_each_as_alone(store):
    ids = list(range(0, N, 5))  # 40 queries: their candidates cover the level, read whole once
    batch = search_store(store["out"], ids=ids, k=5, mode="both")
    for i, r in zip(ids, batch["results"]):
        alone = search_store(store["out"], ids=[i], k=5, mode="both")["results"][0]
        assert r == alone


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_several_uploads_in_one_request_answer_each_in_order(store):
    from fastapi.testclient import TestClient

    from sjea_tools.serve import create_app

    rows = [42, 7, 150]
    files = [("file", (f"q{i}.png", (store["images"] / store["paths"][i]).read_bytes(), "image/png")) for i in rows]
    with TestClient(create_app(store["out"])) as c:
        res = c.post("/api/search/image", files=files, data={"k": "3", "mode": "both"})
        assert res.status_code == 200, res.text
        got = res.json()["results"]
        assert [r["query"] for r in got] == [f"upload:q{i}.png" for i in rows]
        for i, r, f in zip(rows, got, files, strict=True):
            assert r["per_level"]["0"][0]["path"] == store["paths"][i]
            alone = c.post("/api/search/image", files=[f], data={"k": "3", "mode": "both"}).json()["results"][0]
            assert r == alone
