"""Filters and export (issue 20, item 4): `--where folder=|label=|path=` and `--exclude-same-folder`
give the true top k among the allowed rows (brute force on hand-made stores, flat and HNSW, per
level and hierarchical, and on /api/search); results as CSV / JSON lines; --copy-to never overwrites."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sjea_tools.cli import app
from sjea_tools.errors import SjeaError
from sjea_tools.filters import WHERE_KEYS, RowFilter
from sjea_tools.index import build_indexes
from sjea_tools.pipeline import index_store
from sjea_tools.search import search_store
from sjea_tools.store import write_store
from sjea_tools.vectors import l2_normalize

DIMS = (16, 8)
N = 600
FOLDERS = ("cat", "cat/kitten", "dog", "bird/2023", "bird/2024")


def attrs(root):
    return {"sjea_version": "0.1.0", "model_id": "a" * 64, "model_source": "/runs/gone", "backend": "torch",
            "levels": [0, 1], "dims": list(DIMS), "image_size": 28, "mean": [0.5] * 3, "std": [0.25] * 3,
            "normalized": True, "dtype": "float32", "root": str(root), "created": "2026-01-01T00:00:00"}


def vectors(n=N, seed=0):
    """Clustered rows whose clusters do not follow the folders: a filter's answer differs from the
    unfiltered one, and continuous noise leaves no ties."""
    rng = np.random.default_rng(seed)
    out = {}
    for level, d in enumerate(DIMS):
        centres = rng.standard_normal((12, d)).astype(np.float32)
        out[level] = l2_normalize(centres[rng.integers(0, 12, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32))
    return out


def row_paths(n=N):
    exts = (".jpg", ".png")
    return [f"{FOLDERS[i % len(FOLDERS)]}/{i:04d}{exts[(i // 5) % 2]}" for i in range(n)]


def make_store(tmp, kind="flat"):
    root = tmp / "imgs"
    paths = row_paths()
    for p in paths:  # stand-ins for the images: --copy-to copies bytes
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(p.encode())
    out = tmp / "emb.h5"
    vec = vectors()
    write_store(out, attrs(root), [[(paths, vec)]], [])
    index_store(out)  # flat index (small store) and the cluster tree
    if kind != "flat":
        build_indexes(out, kind=kind, rebuild=True)
    return {"out": out, "root": root, "paths": paths, "vec": vec}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("filters"))


@pytest.fixture(scope="module")
def hnsw_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("filters_hnsw"), kind="hnsw")


def brute_force(vec, q_row, allowed, k):
    """Ids of the exact top k among `allowed` rows by cosine, best first."""
    allowed = np.flatnonzero(allowed)
    sims = vec[allowed] @ vec[q_row]
    return [int(i) for i in allowed[np.argsort(-sims, kind="stable")[:k]]]


def folder_of(path):
    return path.rsplit("/", 1)[0]


# --- the filter itself ----------------------------------------------------------------------


def test_where_clauses_select_rows_and_combine_with_and():
    paths = ["cat/a.jpg", "cat/kitten/b.jpg", "dog/c.png", "top.jpg", "bird/2023/d.jpg"]
    labels, names = np.array([1, 1, 2, 0, 0]), ["bird", "cat", "dog"]

    def rows(*where):
        return [p for p, keep in zip(paths, RowFilter.parse(where).base_mask(paths, labels, names)) if keep]

    assert rows("folder=cat") == ["cat/a.jpg", "cat/kitten/b.jpg"]  # the folder and below
    assert rows("folder=cat/kitten/") == ["cat/kitten/b.jpg"]
    assert rows("folder=.") == ["top.jpg"]
    assert rows("label=dog") == ["dog/c.png"]
    assert rows("path=*/2023/*.jpg") == ["bird/2023/d.jpg"]
    assert rows("path=*.jpg", "folder=cat") == ["cat/a.jpg", "cat/kitten/b.jpg"]
    assert rows("folder=cat", "label=dog") == []
    assert rows("folder=ca") == []  # a folder name, not a prefix of one


@pytest.mark.parametrize("where", ["folder", "colour=red", "=cat", "label=", "folder:cat"])
def test_bad_where_names_the_valid_keys(where):
    with pytest.raises(SjeaError) as e:
        RowFilter.parse([where])
    assert all(key in str(e.value) for key in WHERE_KEYS) and "\n" not in str(e.value)


def test_unknown_label_and_store_without_labels_say_what_exists():
    f = RowFilter.parse(["label=cow"])
    with pytest.raises(SjeaError, match="cat, dog"):
        f.base_mask(["cat/a.jpg", "dog/b.jpg"], np.array([0, 1]), ["cat", "dog"])
    with pytest.raises(SjeaError, match="folder=F"):
        f.base_mask(["a.jpg"], None, None)


# --- search on a store ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["store", "hnsw_store"])
@pytest.mark.parametrize("where", [["folder=cat"], ["path=*/2023/*.jpg"], ["label=dog", "path=*.png"],
                                   ["path=bird/2024/0004.jpg"]])
def test_filtered_hits_are_the_true_top_k_among_allowed_rows(request, which, where):
    s = request.getfixturevalue(which)
    f = RowFilter.parse(where)
    allowed = f.base_mask(s["paths"], *label_arrays(s["paths"]))
    assert 0 < allowed.sum() < N
    ids = [3, 100, 257]
    res = search_store(s["out"], ids=ids, k=10, mode="per-level", level="all", row_filter=f)
    for q, r in zip(ids, res["results"]):
        for lv in ("0", "1"):
            got = [h["id"] for h in r["per_level"][lv]]
            assert all(allowed[got])
            assert got == brute_force(s["vec"][int(lv)], q, allowed, 10)
            scores = [h["score"] for h in r["per_level"][lv]]
            want = s["vec"][int(lv)][got] @ s["vec"][int(lv)][q]
            np.testing.assert_allclose(scores, want, atol=1e-5)
    assert res["where"] == where and any("allows" in n for n in res["notes"])


def label_arrays(paths):
    names = sorted({p.split("/")[0] for p in paths})
    return np.array([names.index(p.split("/")[0]) for p in paths]), names


def test_exclude_same_folder_leaves_out_the_querys_folder_only(store):
    ids = [0, 1, 7]  # folders cat, cat/kitten, bird/2023
    res = search_store(store["out"], ids=ids, k=20, mode="per-level", level=0,
                       row_filter=RowFilter.parse([], exclude_same_folder=True))
    for q, r in zip(ids, res["results"]):
        own = folder_of(store["paths"][q])
        hits = r["per_level"]["0"]
        assert len(hits) == 20 and all(folder_of(h["path"]) != own for h in hits)
        allowed = np.array([folder_of(p) != own for p in store["paths"]])
        assert [h["id"] for h in hits] == brute_force(store["vec"][0], q, allowed, 20)
    # cat/kitten is below cat, yet not cat's own folder: its rows stay for a query from cat
    assert any(folder_of(h["path"]) == "cat/kitten" for h in res["results"][0]["per_level"]["0"])


def test_hierarchical_search_honours_the_filter(store):
    f = RowFilter.parse(["folder=dog"])
    allowed = f.base_mask(store["paths"], None, None)
    for within in ("score", "groups"):
        res = search_store(store["out"], ids=[5, 11], k=10, mode="hierarchical", within=within, row_filter=f)
        for r in res["results"]:
            hits = r["hierarchical"]
            assert len(hits) == 10 and all(allowed[h["id"]] for h in hits)
            assert r["gate"]["rows"] >= 10  # the gate widened until it held k allowed rows


def test_a_filter_that_allows_nothing_gives_no_hits(store):
    f = RowFilter.parse(["path=*.gif"])
    res = search_store(store["out"], ids=[0], k=5, mode="both", row_filter=f)
    r = res["results"][0]
    assert r["per_level"] == {"0": [], "1": []} and r["hierarchical"] == []
    assert any("allows 0 of" in n for n in res["notes"])


# --- the command ----------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, ["search", *map(str, args)])


def test_cli_bad_where_is_one_line_exit_2_listing_the_keys(store):
    r = invoke("--store", store["out"], "--id", 0, "--where", "size=big")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output
    assert all(key in lines[0] for key in WHERE_KEYS)


def test_cli_csv_and_jsonl_rows_per_hit(store):
    r = invoke("--store", store["out"], "--id", 2, "--level", 0, "-k", 4, "--where", "folder=dog", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [int(x["rank"]) for x in rows] == [1, 2, 3, 4]
    assert all(x["path"].startswith("dog/") and x["file"].endswith(x["path"]) for x in rows)
    r = invoke("--store", store["out"], "--id", 2, "--id", 3, "-k", 3, "--format", "jsonl")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 * 2 * 3 and {x["query"] for x in lines} == {"id:2", "id:3"}
    assert invoke("--store", store["out"], "--id", 2, "--json", "--format", "csv").exit_code == 2


def test_cli_out_file_is_refused_when_it_exists(store, tmp_path):
    out = tmp_path / "hits.jsonl"
    r = invoke("--store", store["out"], "--id", 2, "-k", 3, "--level", 1, "--out", out)
    assert r.exit_code == 0 and f"results written to {out}" in r.output
    assert [json.loads(x)["rank"] for x in out.read_text().splitlines()] == [1, 2, 3]
    before = out.read_text()
    r = invoke("--store", store["out"], "--id", 5, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.output and out.read_text() == before
    assert invoke("--store", store["out"], "--id", 5, "--out", tmp_path / "hits.txt").exit_code == 2


def test_copy_to_never_overwrites_and_link_makes_symlinks(store, tmp_path):
    dest = tmp_path / "picked"
    args = ("--store", store["out"], "--id", 4, "-k", 3, "--level", 0, "--where", "folder=cat")
    r = invoke(*args, "--copy-to", dest)
    assert r.exit_code == 0 and f"3 hit file(s) copied into {dest}" in r.output
    first = sorted(p.name for p in dest.iterdir())
    assert len(first) == 3 and all(n[:4] in ("001-", "002-", "003-") for n in first)
    contents = {p.name: p.read_bytes() for p in dest.iterdir()}
    r = invoke(*args, "--copy-to", dest)  # the same names again: new names, old files untouched
    assert r.exit_code == 0
    names = sorted(p.name for p in dest.iterdir())
    assert len(names) == 6 and all(dest.joinpath(n).read_bytes() == b for n, b in contents.items())
    assert all(n.rsplit(".", 1)[0].endswith("-1") for n in set(names) - set(first))
    linked = tmp_path / "linked"
    r = invoke(*args, "--copy-to", linked, "--link", "--id", 9)
    assert r.exit_code == 0
    subfolders = sorted(p.name for p in linked.iterdir())
    assert subfolders == ["id_4", "id_9"]  # one folder per query
    for f in (linked / "id_4").iterdir():
        assert f.is_symlink() and f.resolve().read_bytes() == f.read_bytes()
        assert f.resolve().relative_to((store["root"] / "cat").resolve())
    assert invoke("--store", store["out"], "--id", 1, "--link").exit_code == 2


# --- the API --------------------------------------------------------------------------------


def test_api_search_takes_the_same_filters(store):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sjea_tools.serve import create_app

    with TestClient(create_app(store["out"])) as c:
        r = c.get("/api/search", params=[("id", 0), ("k", 8), ("mode", "per-level"), ("where", "folder=bird"),
                                         ("where", "path=*.jpg"), ("exclude_same_folder", "true")])
        assert r.status_code == 200, r.text
        want = search_store(store["out"], ids=[0], k=8, mode="per-level",
                            row_filter=RowFilter.parse(["folder=bird", "path=*.jpg"], True))
        for lv, hits in r.json()["results"][0]["per_level"].items():
            assert [h["id"] for h in hits] == [h["id"] for h in want["results"][0]["per_level"][lv]]
            assert all(h["path"].startswith("bird/") and h["path"].endswith(".jpg") for h in hits)
        bad = c.get("/api/search", params={"id": 0, "where": "colour=red"})
        assert bad.status_code == 400 and list(bad.json()) == ["error"]
        assert all(key in bad.json()["error"] for key in WHERE_KEYS)
