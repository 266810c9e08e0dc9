"""Search over a real store (Fashion-MNIST PNGs embedded by a run): self-matches, JSON = table,
grid PNG, stale/mismatched indexes refused with the fix, bad input as one line with exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from sjea_tools.cli import app
from sjea_tools.errors import SjeaError
from sjea_tools.search import search_store

N = 120


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_test):
    from conftest import make_run, write_fmnist_folder
    from sjea_tools.embed import embed_folder

    root = tmp_path_factory.mktemp("search")
    run = make_run(root / "runs" / "tiny", levels=2)
    images = write_fmnist_folder(root / "imgs", fmnist_test, N)
    out = root / "emb.h5"
    embed_folder(images, out, run=run, backend="torch", workers=0)
    from sjea_tools.pipeline import index_store

    info = index_store(out)  # the indexes and the cluster tree, as sjea embed / sjea index make them
    assert info["n"] == N and {e["kind"] for e in info["levels"].values()} == {"flat"}  # 120 rows: exact
    return {"root": root, "run": run, "images": images, "out": out}


def invoke(args, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args)


def test_every_sampled_image_finds_itself_first_at_every_level(store):
    from sjea_tools.store import open_store

    with open_store(store["out"]) as s:
        paths = s.paths
    sample = [store["images"] / paths[i] for i in (0, 17, 58, 119)]
    res = search_store(store["out"], queries=sample, k=5, mode="both")
    for q, r in zip(sample, res["results"]):
        rel = str(q.relative_to(store["images"]))
        for lv in ("0", "1"):
            assert r["per_level"][lv][0]["path"] == rel and r["per_level"][lv][0]["score"] >= 0.999
        top = r["hierarchical"][0]
        assert top["path"] == rel and min(top["scores"].values()) >= 0.999
        assert len(r["cluster_path"]) == 2


def test_json_carries_the_table(store, monkeypatch):
    default = json.loads(invoke(["search", "--id", "3", "--store", str(store["out"]), "--json"]).stdout)
    assert default["mode"] == "per-level" and set(default["results"][0]["per_level"]) == {"0", "1"}
    args = ["search", "--id", "3", "--store", str(store["out"]), "--k", "4", "--mode", "hierarchical"]
    table = invoke(args)
    data = json.loads(invoke(args + ["--json"]).stdout)
    assert table.exit_code == 0 and data["mode"] == "hierarchical"
    hits = data["results"][0]["hierarchical"]
    assert len(hits) == 4 and hits[0]["id"] == 3
    for h in hits:  # each JSON row appears in the table with the same scores
        line = next(ln for ln in table.stdout.splitlines() if h["path"] in ln)
        assert f"{h['scores']['0']:.4f}" in line and f"{h['scores']['1']:.4f}" in line


def test_grid_png_has_a_row_per_level_and_hierarchy(store, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    r = invoke(["search", "--id", "0", "--store", str(store["out"]), "--k", "5", "--grid", str(out)])
    assert r.exit_code == 0, r.output
    from sjea_tools.grid import CAPTION, LABEL_W, PAD, THUMB

    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (LABEL_W + (THUMB + PAD) * 6 + 3 * PAD, 3 * (THUMB + CAPTION + PAD) + PAD + CAPTION)


def test_newest_store_in_folder_is_used_and_named(store, monkeypatch):
    r = invoke(["search", "--id", "1", "--k", "2", "--mode", "per-level"], cwd=store["root"], monkeypatch=monkeypatch)
    assert r.exit_code == 0 and "using store emb.h5" in r.output


def test_stale_index_is_refused_with_the_fix(store, tmp_path, fmnist_test):
    from conftest import write_fmnist_folder
    from sjea_tools.embed import embed_folder

    out = tmp_path / "grown.h5"
    shutil.copy(store["out"], out)
    shutil.copytree(store["out"].with_name("emb.h5.index"), tmp_path / "grown.h5.index")
    images = tmp_path / "imgs"
    shutil.copytree(store["images"], images)
    write_fmnist_folder(images, fmnist_test, 5, start=N)
    embed_folder(images, out, run=store["run"], backend="torch", workers=0, overwrite=True)
    with pytest.raises(SjeaError, match=f"stale.*sjea index {out}"):
        search_store(out, ids=[0], k=3, mode="per-level")
    r = invoke(["search", "--id", "0", "--store", str(out), "--mode", "per-level"])
    assert r.exit_code == 2 and "sjea index" in r.output and len(r.output.strip().splitlines()) == 1


def test_query_model_other_than_the_stores_is_refused(store, tmp_path):
    from conftest import make_run
    from sjea_tools.embed import Embedder

    other = Embedder.from_source(run=make_run(tmp_path / "other", levels=2, seed=1), backend="torch")
    with pytest.raises(SjeaError, match="not the model that wrote"):
        search_store(store["out"], queries=[store["images"]], k=3, embedder=other)


@pytest.mark.parametrize("args,needle", [
    (["--id", "0", "--k", "0"], "--k must be"),
    (["--id", "0", "--level", "7"], "level 7 does not exist; levels here: 0, 1"),
    (["--id", "0", "--level", "0,0"], "repeats a level"),
    (["--id", "0", "--order", "1"], "--order needs at least 2"),
    (["--id", "0", "--order", "0,0"], "repeats a level"),
    (["--id", "0", "--level", "1", "--mode", "hierarchical"], "its levels are the cluster tree's"),
    (["--id", "0", "--order", "0,5"], "level 5 does not exist; levels here: 0, 1"),
    (["--id", "0", "--min-score", "2"], "--min-score must be a cosine from -1 to 1"),
    (["--id", "0", "--min-score", "nan"], "--min-score must be"),
    (["--id", "0", "--factor", "nan"], "No such option: --factor"),
    (["--id", "0", "--probes", "0"], "--probes must be"),
    (["--id", "0", "--margin", "-0.1"], "--margin must be a cosine difference from 0 to 2"),
    (["--id", "0", "--margin", "3"], "--margin must be a cosine difference"),
    (["--id", "0", "--margin", "nan"], "--margin"),
    (["--id", "0", "--within", "sideways"], "--within must be one of"),
    (["--id", "999"], "out of range"),
    (["--id", "0", "--mode", "sideways"], "--mode must be one of"),
    (["--id", "0", "--mode", "per-level", "--order", "1,0"], "--order sets the levels of hierarchical search"),
    (["NOT_AN_IMAGE"], "not a readable image"),
    (["missing.png"], "does not exist"),
])
def test_bad_input_one_line_exit_2(store, args, needle, tmp_path):
    (tmp_path / "NOT_AN_IMAGE").write_text("hello")
    args = [str(tmp_path / a) if a in ("NOT_AN_IMAGE", "missing.png") else a for a in args]
    r = invoke(["search", *args, "--store", str(store["out"])])
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1


def test_level_spellings_pick_the_per_level_searches(store):
    by_list = search_store(store["out"], ids=[5], k=2, level=["1", "0"])
    assert by_list["mode"] == "per-level" and by_list["levels"] == [0, 1]
    assert set(by_list["results"][0]["per_level"]) == {"0", "1"}
    assert search_store(store["out"], ids=[5], k=2, level="all")["levels"] == [0, 1]
    r = invoke(["search", "--id", "5", "--k", "2", "--level", "1", "--level", "0", "--store", str(store["out"]),
                "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["per_level"] == by_list["results"][0]["per_level"]
    tree_order = search_store(store["out"], ids=[5], k=2, mode="hierarchical")["order"]
    hier = search_store(store["out"], ids=[5], k=2, mode="hierarchical", order=",".join(map(str, tree_order)))
    assert hier["order"] == tree_order and hier["results"][0]["hierarchical"][0]["id"] == 5
    with pytest.raises(SjeaError, match="rebuild it: sjea clusters .* --order"):
        search_store(store["out"], ids=[5], k=2, mode="hierarchical", order=",".join(map(str, tree_order[::-1])))


def test_missing_store_and_k_clipped(store, tmp_path):
    r = invoke(["search", "--id", "0", "--store", str(tmp_path / "none.h5")])
    assert r.exit_code == 2 and "does not exist" in r.output
    res = search_store(store["out"], ids=[0], k=500, mode="per-level", level=1)
    assert len(res["results"][0]["per_level"]["1"]) == N and any("larger than the store" in n for n in res["notes"])


def test_build_indexes_from_python_is_silent_and_writes_files_with_the_umask_mode(store, tmp_path, capfd):
    import os

    from sjea_tools.index import build_indexes

    out = tmp_path / "copy.h5"
    shutil.copy(store["out"], out)
    old = os.umask(0o022)
    try:
        info = build_indexes(out, kind="hnsw")
    finally:
        os.umask(old)
    assert capfd.readouterr() == ("", "")  # no progress bar unless a progress callable is given
    folder = tmp_path / "copy.h5.index"
    files = sorted(p.name for p in folder.iterdir())
    expected = {"index.json", *(e[f] for e in info["levels"].values() for f in ("file", "probe"))}
    assert files == sorted(expected)  # the index and recall-probe files of each level, no temp file left
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o644"}


def test_rebuild_removes_the_previous_build_and_a_killed_builds_temp_files(store, tmp_path):
    from sjea_tools.index import build_indexes

    out = tmp_path / "copy.h5"
    shutil.copy(store["out"], out)
    first = build_indexes(out)
    stale = tmp_path / "copy.h5.index" / ".level0-19700101T000000000000.faiss.abc123.tmp"
    stale.write_bytes(b"half an index")
    second = build_indexes(out, rebuild=True)  # unchanged rows alone would be "up to date"
    names = {p.name for p in (tmp_path / "copy.h5.index").iterdir()}
    assert names == {"index.json", *(e[f] for e in second["levels"].values() for f in ("file", "probe"))}
    assert not names & {e["file"] for e in first["levels"].values()}


def test_clusters_cli_lists_sizes_and_examples(store):
    r = invoke(["clusters", str(store["out"]), "--json"])
    tree = json.loads(r.stdout)
    assert sum(c["size"] for c in tree["clusters"]) == N
    for c in tree["clusters"]:
        assert sum(ch["size"] for ch in c["children"]) == c["size"] and c["examples"]


def test_index_cli_forced_kind_records_model_rows_and_recall(store, tmp_path):
    out = tmp_path / "copy.h5"
    shutil.copy(store["out"], out)
    r = invoke(["index", str(out), "--kind", "hnsw", "--ef-search", "16", "--no-clusters", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    side = json.loads((tmp_path / "copy.h5.index" / "index.json").read_text())
    assert side["n"] == N and side["model_id"] == info["model_id"]
    for e in side["levels"].values():
        assert e["kind"] == "hnsw" and e["search_params"] == {"efSearch": 16} and 0 < e["recall_at_10"] <= 1
    res = search_store(out, ids=[7], k=3, mode="per-level")
    assert all(res["results"][0]["per_level"][lv][0]["id"] == 7 for lv in ("0", "1"))
    bad = invoke(["index", str(out), "--kind", "lsh"])
    assert bad.exit_code == 2 and "unknown index kind" in bad.output


# --- hierarchical search on the real store: the coarse cluster decides, the output keeps the groups

def test_hierarchical_differs_from_every_level_and_keeps_groups(store, tmp_path):
    """On this store the levels disagree; the hierarchical answer comes from the query's coarse
    cluster only, so for some queries it is neither level's own list; the groups show in the table,
    --json and the grid."""
    from sjea_tools.clusters import read_tree
    from sjea_tools.grid import GROUP_BAR, grid_rows
    from sjea_tools.store import open_store

    res = search_store(store["out"], ids=list(range(N)), k=10, mode="both")
    with open_store(store["out"]) as s:
        tree, _ = read_tree(s)
    order = res["order"]
    assert order == [int(v) for v in tree["attrs"]["levels"]] and tree["attrs"]["order"] == "measured"
    differs, disagree = [], []
    for r in res["results"]:
        hier = [h["id"] for h in r["hierarchical"]]
        # the decision the fine level cannot undo: every hit is in the query's gate cluster(s)
        assert set(tree["assign"][hier, 0]) <= set(r["gate"]["clusters"])
        assert all(h["group"] == [int(c) for c in tree["assign"][h["id"]]] for h in r["hierarchical"])
        level_sets = [{h["id"] for h in r["per_level"][lv]} for lv in ("0", "1")]
        disagree.append(level_sets[0] != level_sets[1])
        if all(set(hier) != ls for ls in level_sets):
            differs.append(r["query_id"])
    assert sum(disagree) > N // 2  # the levels disagree on most queries' top 10
    assert differs, "no query where the hierarchical top 10 differs from both levels' top 10"
    qid = differs[0]
    args = ["search", "--id", str(qid), "--store", str(store["out"]), "--k", "10", "--mode", "hierarchical"]
    data = json.loads(invoke(args + ["--json"]).stdout)
    hits = data["results"][0]["hierarchical"]
    assert data["results"][0]["cluster_path"][0] in data["results"][0]["gate"]["clusters"]
    table = invoke(args)
    assert table.exit_code == 0, table.output
    for h in hits:  # the table row of each hit names its group as JSON gives it
        group = " > ".join(f"L{lv}:{c}" for lv, c in zip(order, h["group"]))
        line = next(ln for ln in table.stdout.splitlines() if h["path"] in ln)
        assert group in line and f"{h['scores'][str(order[-1])]:.4f}" in line
    assert f"answer from cluster(s) L{order[0]}:" in table.stdout
    # grid: the hierarchical row captions each hit with its sub-cluster and draws a bar between groups
    out = tmp_path / "g.png"
    r = invoke(args[:-2] + ["--grid", str(out), "--within", "groups"])  # the grid: both modes
    assert r.exit_code == 0, r.output
    grouped = search_store(store["out"], ids=[qid], k=10, mode="both", within="groups")
    row = [rw for rw in grid_rows(grouped) if rw[0].startswith("hier.")][0]
    assert [g for _, _, g in row[2]] == [f"g{h['group'][-1]}" for h in grouped["results"][0]["hierarchical"]]
    from PIL import Image

    with Image.open(out) as im:
        has_bar = bool(np.all(np.asarray(im.convert("RGB")) == GROUP_BAR, axis=-1).any())
    assert has_bar == (len({g for _, _, g in row[2]}) > 1)


def test_margin_widens_the_gate_to_the_clusters_near_the_querys(store):
    """--margin 2 gates every coarse cluster (any two cosines differ by at most 2): the answer is then
    the fine level's own top k; margin 0 is the hard gate."""
    hard = search_store(store["out"], ids=list(range(20)), k=5, mode="both")
    soft = search_store(store["out"], ids=list(range(20)), k=5, mode="hierarchical", margin=2.0)
    fine = str(hard["order"][-1])
    assert soft["margin"] == 2.0 and hard["margin"] == 0.0
    for h, s in zip(hard["results"], soft["results"]):
        assert len(s["gate"]["clusters"]) >= len(h["gate"]["clusters"]) and s["gate"]["rows"] == N
        assert [x["id"] for x in s["hierarchical"]] == [x["id"] for x in h["per_level"][fine]]
    assert any(len(s["gate"]["clusters"]) > len(h["gate"]["clusters"]) for h, s in zip(hard["results"], soft["results"]))


def test_min_score_filters_hits(store):
    res = search_store(store["out"], ids=[0], k=20, mode="both")
    scores = sorted(h["score"] for h in res["results"][0]["per_level"]["0"])
    cut = scores[len(scores) // 2]
    kept = search_store(store["out"], ids=[0], k=20, mode="both", min_score=cut)
    assert [h["score"] for h in kept["results"][0]["per_level"]["0"]] == [
        h["score"] for h in res["results"][0]["per_level"]["0"] if h["score"] >= cut]
    assert all(h["score"] >= cut for h in kept["results"][0]["hierarchical"])


def test_store_without_cluster_tree_one_line(store, tmp_path):
    import h5py

    out = tmp_path / "notree.h5"
    shutil.copy(store["out"], out)
    shutil.copytree(store["out"].with_name("emb.h5.index"), tmp_path / "notree.h5.index")
    with h5py.File(out, "a") as f:
        del f["clusters"]
    r = invoke(["search", "--id", "0", "--store", str(out), "--mode", "hierarchical"])
    assert r.exit_code == 2 and "needs the store's cluster tree" in r.output and len(r.output.strip().splitlines()) == 1
    r = invoke(["search", "--id", "0", "--store", str(out), "--mode", "per-level", "--k", "2"])
    assert r.exit_code == 0


def test_grid_never_overwrites_the_store_or_an_existing_file(store, tmp_path):
    before = store["out"].read_bytes()
    for target in (store["out"], store["out"].with_name("emb.h5.index") / "index.json"):
        for extra in ([], ["--overwrite"]):
            r = invoke(["search", "--id", "0", "--store", str(store["out"]), "--grid", str(target), *extra])
            assert r.exit_code == 2 and "is an input of this search" in r.output
            assert len(r.output.strip().splitlines()) == 1
    assert store["out"].read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    r = invoke(["search", "--id", "0", "--store", str(store["out"]), "--grid", str(notes)])
    assert r.exit_code == 2 and "--overwrite" in r.output and notes.read_text() == "keep me"
    r = invoke(["search", "--id", "0", "--store", str(store["out"]), "--grid", str(notes), "--overwrite"])
    assert r.exit_code == 0 and notes.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    query = tmp_path / "q.png"
    shutil.copy(store["images"] / __import__("sjea_tools.store", fromlist=["open_store"]).open_store(
        store["out"]).paths[0], query)
    r = invoke(["search", str(query), "--store", str(store["out"]), "--grid", str(query), "--overwrite"])
    assert r.exit_code == 2 and "is an input" in r.output


@pytest.fixture(scope="module")
def odd_store(store, tmp_path_factory):
    """The same images, three renamed to names rich would read as markup or that hold a newline."""
    from sjea_tools.embed import embed_folder
    from sjea_tools.pipeline import index_store

    root = tmp_path_factory.mktemp("odd")
    images = root / "imgs"
    shutil.copytree(store["images"], images)
    files = sorted(p for p in images.rglob("*.png"))[:3]
    names = ["a[b]c.png", "[/bold]x.png", "new\nline.png"]  # the second: folder "[" holding "bold]x.png"
    (images / "[").mkdir()
    for p, name in zip(files, names):
        p.rename(images / name if "/" in name else p.with_name(name))
    out = root / "odd.h5"
    embed_folder(images, out, run=store["run"], backend="torch", workers=0)
    index_store(out)
    return {"out": out, "names": names}


def test_odd_file_names_print_as_text_one_row_each(odd_store):
    from sjea_tools.store import open_store

    with open_store(odd_store["out"]) as s:
        rows = {name: next(i for i, p in enumerate(s.paths) if p.endswith(name)) for name in odd_store["names"]}
    for name, row in rows.items():
        for mode in ("per-level", "hierarchical"):
            r = invoke(["search", "--id", str(row), "--store", str(odd_store["out"]), "--k", "3", "--mode", mode])
            assert r.exit_code == 0, r.output
            shown = name.replace("\n", "\\n")
            data_rows = [ln for ln in r.stdout.splitlines() if ln.startswith("│") and "rank" not in ln]
            assert any(shown in ln for ln in data_rows), r.stdout
            assert len(data_rows) == (3 * 2 if mode == "per-level" else 3)  # one row per hit, none split
    r = invoke(["clusters", str(odd_store["out"])])
    assert r.exit_code == 0, r.output


def test_clusters_prints_odd_example_names_as_text(odd_store, capsys):
    # The tree shows 3 examples per node, nearest the centre: put the odd names among them.
    from sjea_tools.cli.clusters import print_tree
    from sjea_tools.clusters import cluster_tree

    tree = cluster_tree(odd_store["out"])
    tree["clusters"][0]["examples"] = odd_store["names"]
    print_tree(odd_store["out"], tree)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "a[b]c.png" in ln)
    assert "[/bold]x.png" in line and "new\\nline.png" in line  # one line, nothing read as markup


def test_the_index_handle_answers_what_search_store_answers(store):
    from sjea_tools.index import open_indexes
    from sjea_tools.store import open_store

    with open_store(store["out"]) as s:
        handle = open_indexes(store["out"])
        assert handle.metric == "cosine" and handle.kinds == {"0": "flat", "1": "flat"} and handle.loaded == {}
        handle.load(s.model_id, s.n, [1])
        queries = handle.prepare(s.read_embeddings(1, [3, 40]))
        scores, ids = handle.search(1, queries, 4, lambda rows: handle.prepare(s.read_embeddings(1, rows)))
    res = search_store(store["out"], ids=[3, 40], k=4, mode="per-level", level=1)
    for qi, r in enumerate(res["results"]):
        assert [h["id"] for h in r["per_level"]["1"]] == ids[qi].tolist() and ids[qi, 0] == [3, 40][qi]
        assert [h["score"] for h in r["per_level"]["1"]] == pytest.approx(scores[qi].tolist(), abs=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)  # (scores, ids), best first
