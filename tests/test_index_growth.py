"""Indexes that grow (issue 13, item 2): added rows go into the existing FAISS index; a rebuild
happens only when the kind, the rows, the settings or the recall say so, and says why."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from sjea_tools import index as ix
from sjea_tools.cli import app
from sjea_tools.store import open_store, write_store
from sjea_tools.vectors import l2_normalize

DIMS = (16, 8)
ATTRS = {"sjea_version": "0.1.0", "model_id": "a" * 64, "model_source": "/runs/x", "backend": "torch",
         "levels": [0, 1], "dims": list(DIMS), "image_size": 28, "mean": [0.5] * 3, "std": [0.25] * 3,
         "normalized": True, "dtype": "float32", "root": "/data/imgs", "created": "2026-01-01T00:00:00"}


def clustered(n, d, seed=0, centres=40, noise=0.4):
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1000 + d).standard_normal((centres, d)).astype(np.float32)
    return l2_normalize(c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32))


def rows(n, seed=0):
    """n stored rows, the same first rows for any n (what an --update appends to)."""
    return {k: clustered(n, d, seed) if n else np.zeros((0, d), np.float32) for k, d in enumerate(DIMS)}


def grown_rows(n_old, n, seed=0):
    old, new = rows(n_old, seed), rows(n - n_old, seed + 1)
    return {k: np.concatenate([old[k], new[k]]) for k in old}


def write(path, vectors, paths=None, **attrs):
    n = len(vectors[0])
    paths = paths or [f"c{i % 3}/{i:05d}.png" for i in range(n)]
    write_store(path, {**ATTRS, **attrs}, [[(paths, vectors)]], [])
    return path


def statuses(info):
    return {lv: e["status"] for lv, e in info["levels"].items()}


def fresh_flat(vectors):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def loaded(path):
    with open_store(path) as s:
        return ix.load_indexes(path, s.model_id, s.n, s.levels)


def test_flat_growth_reads_only_the_added_rows_and_equals_a_fresh_build(tmp_path, monkeypatch):
    st = write(tmp_path / "s.h5", rows(500))
    first = ix.build_indexes(st)
    assert {e["action"] for e in first["levels"].values()} == {"built"}
    write(st, grown_rows(500, 700))
    from sjea_tools.store import Store

    asked = []
    real = Store.read_embeddings
    monkeypatch.setattr(Store, "read_embeddings", lambda self, level, rows=None: asked.append(rows) or
                        real(self, level, rows))
    info = ix.build_indexes(st)
    assert statuses(info) == {"0": "grown (+200 rows)", "1": "grown (+200 rows)"}
    assert all(r is not None for r in asked) and max(len(r) for r in asked) == 200  # never the whole level
    monkeypatch.undo()
    fresh = shutil.copy(st, tmp_path / "fresh.h5")
    assert {e["action"] for e in ix.build_indexes(fresh)["levels"].values()} == {"built"}
    indexes, fresh_indexes = loaded(st), loaded(fresh)
    for level, vectors in grown_rows(500, 700).items():
        want_scores, want_ids = fresh_indexes[level].search(vectors[::7], 10)
        scores, ids = indexes[level].search(vectors[::7], 10)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)
        assert info["levels"][str(level)]["recall_at_10"] == 1.0
    files = {p.name for p in ix.index_dir(st).iterdir()}
    assert files == {"index.json", *(e[f] for e in info["levels"].values() for f in ("file", "probe"))}


@pytest.mark.parametrize("kind,params", [("hnsw", {}), ("ivf-flat", {"nlist": 16})])
def test_grown_ivf_and_hnsw_keep_their_structure_and_reach_the_target_against_flat(tmp_path, kind, params):
    st = write(tmp_path / "s.h5", rows(1500))
    ix.build_indexes(st, kind=kind, params=params)
    before = ix.read_faiss(ix.index_dir(st) / ix.read_sidecar(st)["levels"]["0"]["file"])
    write(st, grown_rows(1500, 2000))
    info = ix.build_indexes(st, kind=kind, params=params)
    assert statuses(info) == {"0": "grown (+500 rows)", "1": "grown (+500 rows)"}
    indexes = loaded(st)
    for level, vectors in grown_rows(1500, 2000).items():
        queries = vectors[::10]  # old and added rows alike
        _, truth = fresh_flat(vectors).search(queries, 10)
        _, found = indexes[level].search(queries, 10)
        assert ix.recall_at_k(found, truth) >= ix.TARGET_RECALL
    if kind == "ivf-flat":  # the trained quantizer is kept, not retrained
        import faiss

        centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 16) for i in (before, indexes[0])]
        np.testing.assert_array_equal(*centroids)


def test_kind_chosen_for_the_new_size_rebuilds_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(ix.choose, "FLAT_MAX_ROWS", 600)
    st = write(tmp_path / "s.h5", rows(500))
    ix.build_indexes(st)
    write(st, grown_rows(500, 700))
    info = ix.build_indexes(st)
    assert statuses(info)["0"] == "rebuilt: the index kind chosen for 700 rows is HNSW, the existing one is Flat"
    assert info["levels"]["0"]["kind"] == "hnsw" and loaded(st)[0].ntotal == 700


@pytest.mark.parametrize("change,why", [
    ("other images", "written anew"), ("another order", "not the indexed images in the same order"),
    ("other pixels", "stored vectors of the indexed rows changed"), ("fewer rows", "fewer than the 500 indexed")])
def test_a_store_rewritten_with_other_rows_is_never_grown(tmp_path, change, why):
    st = write(tmp_path / "s.h5", rows(500))
    ix.build_indexes(st)
    vectors, names = grown_rows(500, 600), [f"c{i % 3}/{i:05d}.png" for i in range(600)]
    if change == "other images":  # --overwrite with another folder's images (a new `created`)
        write(st, vectors, [f"x/{i:05d}.png" for i in range(600)], created="2026-02-01T00:00:00")
    elif change == "another order":  # a merge of the same shards in another order
        order = np.r_[100:600, 0:100]
        write(st, {k: v[order] for k, v in vectors.items()}, [names[i] for i in order])
    elif change == "other pixels":  # the same names re-embedded from changed files
        write(st, {k: v[::-1].copy() for k, v in vectors.items()}, names)
    else:
        write(st, rows(400))
    info = ix.build_indexes(st)
    assert all(s.startswith("rebuilt: ") and why in s for s in statuses(info).values()), statuses(info)
    with open_store(st) as s:
        for level, index in loaded(st).items():
            stored = s.read_embeddings(level)
            _, found = index.search(stored[:50], 1)
            assert (found[:, 0] == np.arange(50)).all()  # the index describes the rows as they are now


def test_recall_below_target_after_growth_rebuilds(tmp_path, monkeypatch):
    st = write(tmp_path / "s.h5", rows(1500))
    ix.build_indexes(st, kind="hnsw")
    write(st, grown_rows(1500, 1700))
    real = ix.tune_and_measure

    def worse_after_growth(index, vectors, spec, **kw):
        measured = real(index, vectors, spec, **kw)
        return {**measured, "recall_at_k": 0.91} if vectors is None else measured  # growth passes no vectors

    monkeypatch.setattr(ix.growth, "tune_and_measure", worse_after_growth)
    info = ix.build_indexes(st, kind="hnsw")
    assert statuses(info)["0"] == "rebuilt: recall@10 0.91 after growth is below the target 0.95"
    assert info["levels"]["0"]["recall_at_10"] >= ix.TARGET_RECALL and info["levels"]["0"]["action"] == "rebuilt"


def test_unchanged_store_is_up_to_date_and_rebuild_forces_a_fresh_build(tmp_path):
    st = write(tmp_path / "s.h5", rows(300))
    first = ix.build_indexes(st)
    sidecar = (ix.index_dir(st) / "index.json").read_text()
    again = ix.build_indexes(st)
    assert statuses(again) == {"0": "up to date", "1": "up to date"}
    assert (ix.index_dir(st) / "index.json").read_text() == sidecar
    forced = ix.build_indexes(st, rebuild=True)
    assert statuses(forced) == {"0": "rebuilt: --rebuild asked", "1": "rebuilt: --rebuild asked"}
    assert forced["levels"]["0"]["file"] != first["levels"]["0"]["file"]
    assert not (ix.index_dir(st) / first["levels"]["0"]["file"]).exists()


def test_explicit_settings_that_differ_from_the_index_rebuild(tmp_path):
    st = write(tmp_path / "s.h5", rows(1000))
    ix.build_indexes(st, kind="ivf-flat", params={"nlist": 16})
    write(st, grown_rows(1000, 1100))
    info = ix.build_indexes(st, kind="ivf-flat", params={"nlist": 8})
    assert statuses(info)["0"] == "rebuilt: --nlist 8 asked, the existing index has 16"
    assert info["levels"]["0"]["params"]["nlist"] == 8
    info = ix.build_indexes(st, kind="ivf-flat", metric="inner-product", params={"nlist": 8})
    assert statuses(info)["0"] == "rebuilt: --metric inner-product asked, the index uses cosine"


def test_a_crash_mid_growth_leaves_the_old_index_and_a_rerun_grows(tmp_path, monkeypatch):
    st = write(tmp_path / "s.h5", rows(500))
    ix.build_indexes(st)
    folder = ix.index_dir(st)
    sidecar_before = (folder / "index.json").read_text()
    write(st, grown_rows(500, 650))
    real, saved = ix.save_level, []

    def crash_on_second_level(*a, **kw):
        if saved:
            raise KeyboardInterrupt  # a kill after level 0's new files were written
        saved.append(real(*a, **kw))
        return saved[-1]

    for module in (ix.growth, ix.level_file):  # a fold saves through growth, a rebuild through level_file
        monkeypatch.setattr(module, "save_level", crash_on_second_level)
    with pytest.raises(KeyboardInterrupt):
        ix.build_indexes(st)
    assert (folder / "index.json").read_text() == sidecar_before  # readers still see the old set
    old = json.loads(sidecar_before)
    for e in old["levels"].values():
        assert ix.read_faiss(folder / e["file"]).ntotal == 500 and (folder / e["probe"]).is_file()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    info = ix.build_indexes(st)
    assert statuses(info) == {"0": "grown (+150 rows)", "1": "grown (+150 rows)"}
    assert {p.name for p in folder.iterdir()} == {"index.json", *(e[f] for e in info["levels"].values()
                                                                 for f in ("file", "probe"))}


def test_index_cli_says_per_level_what_happened_and_json_carries_it(tmp_path):
    st = write(tmp_path / "s.h5", rows(400))
    runner = CliRunner()
    r = runner.invoke(app, ["index", str(st), "--no-clusters", "--quiet"])
    assert r.exit_code == 0 and "level 0: built: no index yet" in r.output, r.output
    write(st, grown_rows(400, 450))
    r = runner.invoke(app, ["index", str(st), "--no-clusters", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert {e["action"] for e in info["levels"].values()} == {"grown"} and info["levels"]["1"]["added"] == 50
    r = runner.invoke(app, ["index", str(st), "--no-clusters", "--rebuild"])
    assert r.exit_code == 0 and "level 1: rebuilt: --rebuild asked" in r.output, r.output
    r = runner.invoke(app, ["index", str(st), "--no-clusters"])
    assert "level 0: up to date" in r.output and "index kept as it was" in r.output, r.output


def test_a_deleted_index_file_is_rebuilt_not_fatal(tmp_path):
    st = write(tmp_path / "s.h5", rows(300))
    first = ix.build_indexes(st)
    (ix.index_dir(st) / first["levels"]["1"]["file"]).unlink()
    write(st, grown_rows(300, 350))
    info = ix.build_indexes(st)
    assert statuses(info)["0"] == "grown (+50 rows)"
    assert statuses(info)["1"] == f"rebuilt: {first['levels']['1']['file']} or its recall probe is missing or unreadable"
    assert set(loaded(st)) == {0, 1}


def read_text_calls(monkeypatch):
    """The names of the string datasets read from any store from now on."""
    from sjea_tools.store import Store

    names, real = [], Store.read_text
    monkeypatch.setattr(Store, "read_text", lambda self, name: names.append(name) or real(self, name))
    return names


def append(st, n_old, n, seed=0):
    """What `sjea embed --update` does to the store: rows n_old..n-1 become a new segment."""
    from sjea_tools.store import append_segment

    new = {k: v[n_old:] for k, v in grown_rows(n_old, n, seed).items()}
    names = [f"c{i % 3}/{i:05d}.png" for i in range(n_old, n)]
    append_segment(st, ATTRS, names, [(names, new)], [])


def test_growth_after_update_and_compaction_is_vouched_by_the_store_history_without_reading_paths(
        tmp_path, monkeypatch):
    from sjea_tools.store import compact_store

    st = write(tmp_path / "s.h5", rows(500))
    ix.build_indexes(st)
    append(st, 500, 700)
    read = read_text_calls(monkeypatch)
    info = ix.build_indexes(st)
    assert statuses(info) == {"0": "grown (+200 rows)", "1": "grown (+200 rows)"}
    assert "paths" not in read, read  # the O(1) check: the fingerprint is in the store's history
    with open_store(st) as s:
        assert info["store_fingerprint"] == s.fingerprint and s.rows_unchanged_since(info["store_fingerprint"]) == 700
    compact_store(st)  # same rows and fingerprint in one file: the index stays current
    sidecar = (ix.index_dir(st) / "index.json").read_text()
    read.clear()
    assert statuses(ix.build_indexes(st)) == {"0": "up to date", "1": "up to date"} and "paths" not in read, read
    assert (ix.index_dir(st) / "index.json").read_text() == sidecar
    append(st, 700, 760)  # the store's writers read paths; build_indexes must not
    read.clear()
    info = ix.build_indexes(st)
    assert statuses(info) == {"0": "grown (+60 rows, delta part 1 of 8)", "1": "grown (+60 rows, delta part 1 of 8)"}
    assert "paths" not in read, read
    monkeypatch.undo()
    with open_store(st) as s:
        for level, index in loaded(st).items():
            stored = s.read_embeddings(level)
            _, found = index.search(stored[::40], 1)
            assert (found[:, 0] == np.arange(0, 760, 40)).all()


def test_a_store_rewritten_after_a_history_growth_is_rebuilt_not_grown(tmp_path):
    st = write(tmp_path / "s.h5", rows(500))
    ix.build_indexes(st)
    append(st, 500, 600)
    assert ix.build_indexes(st)["rows"]["paths_sha256"] is None  # paths not read, so no digest recorded
    # The same names re-embedded (same `created`, a new fingerprint, no history): nothing vouches for the rows.
    vectors = grown_rows(500, 650)
    write(st, {k: v[::-1].copy() for k, v in vectors.items()}, [f"c{i % 3}/{i:05d}.png" for i in range(650)])
    info = ix.build_indexes(st)
    assert all(s.startswith("rebuilt: ") and "no history of the version indexed" in s
               for s in statuses(info).values()), statuses(info)
    assert info["rows"]["paths_sha256"] is not None  # a build reads them: later rewrites can be checked
    with open_store(st) as s:
        for level, index in loaded(st).items():
            _, found = index.search(s.read_embeddings(level)[:50], 1)
            assert (found[:, 0] == np.arange(50)).all()


def test_a_doubling_that_gains_no_recall_is_undone_and_growth_does_not_retry_it(tmp_path, monkeypatch):
    real = ix.recall_at_k
    monkeypatch.setattr(ix.recall, "recall_at_k", lambda found, truth: min(0.9, real(found, truth)))  # a ceiling (ties, PQ)
    st = write(tmp_path / "s.h5", rows(1500))
    built = ix.build_indexes(st, kind="hnsw")["levels"]["0"]
    assert built["recall_tuning"] == [{"efSearch": 64, "recall": 0.9}, {"efSearch": 128, "recall": 0.9}]
    assert built["search_params"] == {"efSearch": 64}  # the doubling bought nothing: every search stays cheap
    write(st, grown_rows(1500, 1700))  # past the delta parts' 10%: the base grows and is measured again
    grown = ix.build_indexes(st, kind="hnsw")["levels"]["0"]
    assert grown["status"] == "grown (+200 rows)" and grown["search_params"] == {"efSearch": 64}
    assert grown["recall_tuning"] == [{"efSearch": 64, "recall": 0.9}]  # one search: the ceiling was known
    assert loaded(st)[0].hnsw.efSearch == 64


# --------------------------------------------------------------------------------------------
# Delta parts: a small growth writes the added rows as an exact part beside the base


def collection(n, n_base=1000):
    """The first n rows of one growing collection: successive growths append to the same rows."""
    return {k: v[:n] for k, v in grown_rows(n_base, n_base + 300).items()}


def base_stat(st, level="0"):
    path = ix.index_dir(st) / ix.read_sidecar(st)["levels"][level]["file"]
    stat = path.stat()
    return path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino


def listed_files(info):
    return {"index.json", *(f for e in info["levels"].values() for f in (*ix.level_files(e), e["probe"]))}


def test_small_growths_become_delta_parts_and_flat_search_equals_a_fresh_build(tmp_path, monkeypatch):
    st = write(tmp_path / "s.h5", rows(1000))
    ix.build_indexes(st)
    before = {lv: base_stat(st, lv) for lv in ("0", "1")}
    read = []
    real = ix.read_faiss
    for module in (ix.growth, ix.load):
        monkeypatch.setattr(module, "read_faiss", lambda path, mmap=None: read.append(path.name) or real(path, mmap))
    write(st, collection(1050))
    info = ix.build_indexes(st)
    assert statuses(info) == {"0": "grown (+50 rows, delta part 1 of 8)", "1": "grown (+50 rows, delta part 1 of 8)"}
    write(st, collection(1090))
    info = ix.build_indexes(st)
    assert statuses(info) == {"0": "grown (+40 rows, delta part 2 of 8)", "1": "grown (+40 rows, delta part 2 of 8)"}
    assert read == []  # neither growth read an index file: the base is untouched
    monkeypatch.undo()
    for lv, e in info["levels"].items():
        assert [(p["first_row"], p["rows"]) for p in e["parts"]] == [(1000, 50), (1050, 40)]
        assert e["base_rows"] == 1000 and e["recall_at_10"] == 1.0 and base_stat(st, lv) == before[lv]
    assert {p.name for p in ix.index_dir(st).iterdir()} == listed_files(info)
    indexes, fresh = loaded(st), {lv: fresh_flat(v) for lv, v in collection(1090).items()}
    for level, vectors in collection(1090).items():
        assert isinstance(indexes[level], ix.PartedIndex) and indexes[level].ntotal == 1090
        want_scores, want_ids = fresh[level].search(vectors[::9], 10)
        scores, ids = indexes[level].search(vectors[::9], 10)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)  # sgemm rounding of other shapes
    # What search returns (ids and exact scores from the stored rows) equals a from-scratch build's.
    from sjea_tools.search import search_store

    copy = shutil.copy(st, tmp_path / "fresh.h5")
    assert {e["action"] for e in ix.build_indexes(copy)["levels"].values()} == {"built"}
    grown, built = (search_store(s, ids=range(0, 1090, 9), k=10, mode="per-level")["results"] for s in (st, copy))
    assert grown == built


@pytest.mark.parametrize("kind,params", [("hnsw", {}), ("ivf-flat", {"nlist": 16})])
def test_hnsw_and_ivf_bases_with_parts_reach_the_target_against_flat(tmp_path, kind, params):
    st = write(tmp_path / "s.h5", rows(1500))
    ix.build_indexes(st, kind=kind, params=params)
    for n in (1560, 1620):
        write(st, collection(n, 1500))
        info = ix.build_indexes(st, kind=kind, params=params)
        assert all(e["status"].startswith("grown (+60 rows, delta part") for e in info["levels"].values())
    indexes = loaded(st)
    for level, vectors in collection(1620, 1500).items():
        assert len(info["levels"][str(level)]["parts"]) == 2
        assert info["levels"][str(level)]["recall_at_10"] >= ix.TARGET_RECALL
        queries = np.concatenate([vectors[:1500:10], vectors[1500:]])  # base rows and every added row
        _, truth = fresh_flat(vectors).search(queries, 10)
        _, found = indexes[level].search(queries, 10)
        assert ix.recall_at_k(found, truth) >= ix.TARGET_RECALL
        _, first = indexes[level].search(vectors[1500:], 1)
        assert (first[:, 0] == np.arange(1500, 1620)).all()  # an added row is its own nearest
    assert indexes[0].hnsw.efSearch == 64 if kind == "hnsw" else indexes[0].nprobe >= 1  # the base's settings


def test_past_the_limits_the_parts_are_folded_into_the_base_once(tmp_path, monkeypatch):
    st = write(tmp_path / "s.h5", rows(1000))
    ix.build_indexes(st)
    for n in (1040, 1080):  # 80 rows in parts: within 10% of the base's 1,000
        write(st, collection(n))
        ix.build_indexes(st)
    write(st, collection(1120))  # 120 rows after the base: past 10%
    info = ix.build_indexes(st)
    assert statuses(info)["0"] == "grown and folded (+120 rows into the base, 2 delta parts dropped)"
    e = info["levels"]["0"]
    assert "parts" not in e and e["base_rows"] == 1120 and e["recall_at_10"] == 1.0 and e["added"] == 40
    assert {p.name for p in ix.index_dir(st).iterdir()} == listed_files(info)
    monkeypatch.setattr(ix.growth, "DELTA_MAX_PARTS", 1)
    write(st, collection(1130))
    assert statuses(ix.build_indexes(st))["0"] == "grown (+10 rows, delta part 1 of 1)"
    write(st, collection(1140))  # a second part would pass DELTA_MAX_PARTS
    info = ix.build_indexes(st)
    assert statuses(info)["0"] == "grown and folded (+20 rows into the base, 1 delta part dropped)"
    vectors = collection(1140)
    for level, index in loaded(st).items():
        assert not isinstance(index, ix.PartedIndex) and index.ntotal == 1140
        np.testing.assert_array_equal(index.search(vectors[level][::7], 10)[1],
                                      fresh_flat(vectors[level]).search(vectors[level][::7], 10)[1])


def test_a_rebuild_drops_the_parts(tmp_path):
    st = write(tmp_path / "s.h5", rows(1000))
    ix.build_indexes(st)
    write(st, collection(1050))
    parts = [p["file"] for p in ix.build_indexes(st)["levels"]["0"]["parts"]]
    info = ix.build_indexes(st, rebuild=True)
    assert all("parts" not in e and e["base_rows"] == 1050 for e in info["levels"].values())
    assert not any((ix.index_dir(st) / f).exists() for f in parts)
    assert {p.name for p in ix.index_dir(st).iterdir()} == listed_files(info)


def test_a_kill_between_the_part_and_the_sidecar_leaves_the_old_index_usable(tmp_path, monkeypatch):
    st = write(tmp_path / "s.h5", rows(1000))
    ix.build_indexes(st)
    write(st, collection(1050))
    ix.build_indexes(st)  # one part already
    folder = ix.index_dir(st)
    sidecar_before = (folder / "index.json").read_text()
    with open_store(st) as s:
        old_fingerprint = s.fingerprint
    write(st, collection(1080))
    real = ix.build.atomic_write_text

    def killed_at_the_sidecar(path, text):
        if path.name == "index.json":
            raise KeyboardInterrupt  # the parts and probes are written, the sidecar not yet
        return real(path, text)

    monkeypatch.setattr(ix.build, "atomic_write_text", killed_at_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        ix.build_indexes(st)
    monkeypatch.undo()
    assert (folder / "index.json").read_text() == sidecar_before
    orphans = {p.name for p in folder.iterdir()} - listed_files(json.loads(sidecar_before))
    assert {n for n in orphans if ".delta1." in n} == set() and len(orphans) == 4  # a part and a probe per level
    old = ix.load_indexes(st, ATTRS["model_id"], 1050, [0, 1], fingerprint=old_fingerprint)  # the old set
    vectors = collection(1050)
    for level, index in old.items():
        assert (index.search(vectors[level][1000:], 1)[1][:, 0] == np.arange(1000, 1050)).all()
    info = ix.build_indexes(st)  # the next run removes the orphans and grows
    assert statuses(info)["0"] == "grown (+30 rows, delta part 2 of 8)"
    assert {p.name for p in folder.iterdir()} == listed_files(info)


def test_a_probe_without_the_base_answers_gets_them_once_and_still_adds_a_part(tmp_path):
    st = write(tmp_path / "s.h5", rows(1500))
    info = ix.build_indexes(st, kind="hnsw")
    for e in info["levels"].values():  # what an older sjea wrote: no answers in the probe
        path = ix.index_dir(st) / e["probe"]
        probe = ix.read_probe(path)
        np.savez(path, **{k: probe[k] for k in ix.PROBE_KEYS})
    write(st, collection(1560, 1500))
    info = ix.build_indexes(st, kind="hnsw")
    assert statuses(info)["0"] == "grown (+60 rows, delta part 1 of 8)"
    assert info["levels"]["0"]["recall_at_10"] >= ix.TARGET_RECALL
    assert set(ix.ANSWER_KEYS) <= set(ix.read_probe(ix.index_dir(st) / info["levels"]["0"]["probe"]))


def test_a_row_in_a_delta_part_is_found_by_sjea_search_and_by_the_server(tmp_path):
    from sjea_tools.serve.state import LoadedStore, fingerprint

    st = write(tmp_path / "s.h5", rows(1000))
    ix.build_indexes(st)
    write(st, collection(1030))
    assert "delta part 1" in statuses(ix.build_indexes(st))["0"]
    row = 1017
    r = CliRunner().invoke(app, ["search", "--id", str(row), "--store", str(st), "--mode", "per-level", "--k", "3",
                                 "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"][0]["per_level"]
    assert {lv: h[0]["id"] for lv, h in hits.items()} == {"0": row, "1": row}
    served = LoadedStore(st, fingerprint(st)).search(ids=[row], k=3, mode="per-level")
    assert {lv: h[0]["id"] for lv, h in served["results"][0]["per_level"].items()} == {"0": row, "1": row}
    assert served["results"][0]["per_level"]["0"][0]["score"] == pytest.approx(1.0, abs=1e-5)
