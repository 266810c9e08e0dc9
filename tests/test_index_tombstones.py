"""Tombstones (index.tombstones): after rows are removed from a store, its indexes keep their files
and record the removed ids; every search answers store rows as they are now, the same as a fresh
index of the live rows for an exact kind and never a removed row for any kind. Past the bound, or
where the removals cannot be followed, the index is rebuilt as before."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from sjea_tools import index as ix
from sjea_tools.index import tombstones as tb
from sjea_tools.store import append_segment, compact_store, open_store, write_store
from sjea_tools.store.removal import REMOVAL_ATTRS, rewrite_rows
from sjea_tools.vectors import l2_normalize

DIMS = (16, 8)
ATTRS = {"sjea_version": "0.1.0", "model_id": "a" * 64, "model_source": "/runs/x", "backend": "torch",
         "levels": [0, 1], "dims": list(DIMS), "image_size": 28, "mean": [0.5] * 3, "std": [0.25] * 3,
         "normalized": True, "dtype": "float32", "root": "/data/imgs", "created": "2026-01-01T00:00:00"}
KINDS = [("flat", {}), ("hnsw", {}), ("ivf-flat", {"nlist": 16})]


# --- the pure mapping ----------------------------------------------------------------------------

def test_ids_and_rows_map_both_ways_as_a_list_with_the_removed_items_taken_out():
    rng = np.random.default_rng(0)
    items = list(range(300))  # index ids; the list is the store's rows after each removal
    tombs = tb.NO_TOMBSTONES
    for _ in range(5):
        removed = np.sort(rng.choice(len(items), 17, replace=False))
        tombs = tb.add_tombstones(tombs, removed)
        items = [x for i, x in enumerate(items) if i not in set(removed.tolist())]
        assert tombs.tolist() == sorted(set(range(300)) - set(items))
        np.testing.assert_array_equal(tb.rows_to_ids(np.arange(len(items)), tombs), items)
        rows = tb.ids_to_rows(np.arange(-1, 300).reshape(1, -1), tombs)[0]
        want = [-1] + [items.index(i) if i in items else -1 for i in range(300)]
        np.testing.assert_array_equal(rows, want)
        mask = rng.random(len(items)) < 0.5
        np.testing.assert_array_equal(np.flatnonzero(tb.id_mask(mask, tombs, 300)), np.asarray(items)[mask])
    np.testing.assert_array_equal(tb.rows_after(np.array([0, 5, 9]), np.array([1, 2, 7])), [0, 3, 6])
    np.testing.assert_array_equal(tb.ids_to_rows(np.array([3, -1]), tb.NO_TOMBSTONES), [3, -1])


def test_the_bound_is_a_share_of_the_ids_and_an_absolute_count():
    assert tb.over_bound(100, 1000) is None and "over the limit of 100" in tb.over_bound(101, 1000)
    assert tb.over_bound(tb.TOMBSTONE_MAX_ROWS + 1, 10_000_000) is not None


# --- stores ----------------------------------------------------------------------------------------

def vectors(n, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, d in enumerate(DIMS):
        c = np.random.default_rng(1000 + d).standard_normal((40, d)).astype(np.float32)
        out[k] = l2_normalize(c[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32))
    return out


class Folder:
    """A store and the rows it should hold (path -> vectors), changed as --update changes it."""

    def __init__(self, path, n, seed=0):
        self.path, self.seed, self.added = path, seed, 0
        self.names = [f"c{i % 3}/{i:05d}.png" for i in range(n)]
        self.vecs = {p: (v0, v1) for p, v0, v1 in zip(self.names, *vectors(n, seed).values())}
        write_store(path, ATTRS, [[(self.names, self.block(self.names))]], [])

    def block(self, names):
        return {k: np.stack([self.vecs[p][k] for p in names]) for k in range(len(DIMS))}

    def remove(self, rows):
        gone = {self.names[i] for i in rows}
        assert rewrite_rows(self.path, gone, set(), None) == len(self.names) - len(gone)
        self.names = [p for p in self.names if p not in gone]

    def add(self, n):
        """An append as embed.runner's --update does it (the removal log carried over)."""
        new = [f"new/{self.seed}-{self.added + i:05d}.png" for i in range(n)]
        self.added += n
        for p, v0, v1 in zip(new, *vectors(n, self.seed + 100 + self.added).values()):
            self.vecs[p] = (v0, v1)
        with open_store(self.path) as s:
            carry = {k: s.attrs[k] for k in REMOVAL_ATTRS if s.attrs.get(k) is not None}
        append_segment(self.path, {**ATTRS, **carry}, new, [(new, self.block(new))], [])
        self.names += new

    def fresh(self, path):
        write_store(path, ATTRS, [[(self.names, self.block(self.names))]], [])
        return path


def search(path, level, queries, k=10, mask=None):
    with open_store(path) as s:
        h = ix.open_indexes(path).load(s.model_id, s.n, [level])
        return h.search(level, h.prepare(queries), k, lambda r: h.prepare(s.read_embeddings(level, r)), mask=mask)


def check_answers(folder, kind, tmp_path, params, mask_share=None):
    """Never a removed row; for flat, the fresh index's ids and scores; for the others, exact
    scores of what they name and recall against the fresh flat truth."""
    fresh = folder.fresh(tmp_path / f"fresh-{kind}-{len(folder.names)}.h5")
    ix.build_indexes(fresh, kind="flat")
    with open_store(folder.path) as s:
        assert s.paths == folder.names
    rng = np.random.default_rng(len(folder.names))
    mask = None if mask_share is None else rng.random(len(folder.names)) < mask_share
    for level in range(len(DIMS)):
        live = folder.block(folder.names)[level]
        queries = np.concatenate([live[::37], vectors(5, 99)[level]])
        scores, ids = search(folder.path, level, queries, mask=mask)
        want_scores, want_ids = search(fresh, level, queries, mask=mask)
        assert ((ids >= 0) & (ids < len(folder.names))).all()
        if mask is not None:
            assert mask[ids].all()
        if kind == "flat":
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        else:
            np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, live[ids]), atol=1e-5)
            assert ix.recall_at_k(ids, want_ids) >= 0.9


def levels_status(info):
    return {e["action"] for e in info["levels"].values()}, " | ".join(e["status"] for e in info["levels"].values())


# --- removals followed ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,params", KINDS)
def test_removal_keeps_the_files_and_search_equals_a_fresh_index(tmp_path, kind, params):
    f = Folder(tmp_path / "s.h5", 2000)
    first = ix.build_indexes(f.path, kind=kind, params=params)
    files = {e["file"] for e in first["levels"].values()}
    f.remove([0, 1, 17, 500, 1999, 1200])
    info = ix.build_indexes(f.path, kind=kind, params=params)
    actions, status = levels_status(info)
    assert actions == {"tombstoned"} and "tombstoned (6 rows removed, 6 in all" in status
    assert {e["file"] for e in info["levels"].values()} == files  # the base files are kept
    assert all(e["tombstones"]["count"] == 6 and e["recall_with_removed"] == 6 for e in info["levels"].values())
    assert ix.index_is_current(f.path)
    with open_store(f.path) as s:
        assert s.normalized  # kept by the removal (publish writes it itself)
    check_answers(f, kind, tmp_path, params)
    check_answers(f, kind, tmp_path, params, mask_share=0.3)
    assert levels_status(ix.build_indexes(f.path, kind=kind, params=params))[0] == {"up to date"}


@pytest.mark.parametrize("kind,params", KINDS)
def test_removal_then_growth_then_removal_continues_the_ids(tmp_path, kind, params):
    f = Folder(tmp_path / "s.h5", 2000)
    ix.build_indexes(f.path, kind=kind, params=params)
    f.remove(range(100, 130))
    f.add(40)  # the same --update: removal, then the new rows
    info = ix.build_indexes(f.path, kind=kind, params=params)
    actions, status = levels_status(info)
    assert actions == {"tombstoned"} and "30 rows removed" in status and "delta part 1" in status
    part = info["levels"]["0"]["parts"][0]
    assert part["first_row"] == 2000 and part["rows"] == 40  # ids go on after the old end
    check_answers(f, kind, tmp_path, params)
    f.remove([5, 1985, 1990])  # 1985+: rows of the delta part
    f.add(7)
    info = ix.build_indexes(f.path, kind=kind, params=params)
    assert info["levels"]["0"]["tombstones"]["count"] == 33 and len(info["levels"]["0"]["parts"]) == 2
    check_answers(f, kind, tmp_path, params)
    check_answers(f, kind, tmp_path, params, mask_share=0.5)


def test_successive_removals_accumulate_indexed_or_not_in_between(tmp_path):
    f = Folder(tmp_path / "s.h5", 1500)
    ix.build_indexes(f.path, kind="flat")
    f.remove([3, 4, 700])
    ix.build_indexes(f.path, kind="flat")
    f.remove([3, 1000])
    f.remove([0])  # two removals with no index between: the log follows both
    info = ix.build_indexes(f.path, kind="flat")
    assert levels_status(info)[0] == {"tombstoned"} and info["levels"]["1"]["tombstones"]["count"] == 6
    check_answers(f, "flat", tmp_path, {})


def test_compaction_keeps_the_tombstoned_index_current(tmp_path):
    f = Folder(tmp_path / "s.h5", 1000)
    f.add(100)
    ix.build_indexes(f.path, kind="flat")
    f.remove([10, 1050])
    ix.build_indexes(f.path, kind="flat")
    compact_store(f.path)
    assert ix.index_is_current(f.path)
    assert levels_status(ix.build_indexes(f.path, kind="flat"))[0] == {"up to date"}
    check_answers(f, "flat", tmp_path, {})


# --- rebuilt as before ------------------------------------------------------------------------------

def test_past_the_bound_or_on_rebuild_the_index_is_rebuilt(tmp_path):
    f = Folder(tmp_path / "s.h5", 1000)
    ix.build_indexes(f.path, kind="flat")
    f.remove(range(0, 1000, 9))  # 112 rows: over 10% of 1,000 ids
    actions, status = levels_status(ix.build_indexes(f.path, kind="flat"))
    assert actions == {"rebuilt"} and "112 removed rows would be tombstoned, over the limit of 100" in status
    assert not any(e.get("tombstones") for e in ix.read_sidecar(f.path)["levels"].values())
    f.remove([1, 2])
    ix.build_indexes(f.path, kind="flat")
    f.remove(range(100, 190))  # 2 + 90 > 10% of 888: the earlier tombstones count too
    assert "92 removed rows would be tombstoned" in levels_status(ix.build_indexes(f.path, kind="flat"))[1]
    f.remove([7])
    ix.build_indexes(f.path, kind="flat")
    info = ix.build_indexes(f.path, kind="flat", rebuild=True)
    assert levels_status(info)[0] == {"rebuilt"} and not list(ix.index_dir(f.path).glob("*.npy"))
    check_answers(f, "flat", tmp_path, {})


def test_a_growth_that_would_fold_tombstoned_parts_rebuilds(tmp_path):
    f = Folder(tmp_path / "s.h5", 1000)
    ix.build_indexes(f.path, kind="flat")
    f.remove([1])
    f.add(150)  # over DELTA_MAX_SHARE of the base: a fold, which cannot keep the ids
    actions, status = levels_status(ix.build_indexes(f.path, kind="flat"))
    assert actions == {"rebuilt"} and "1 removed rows are tombstoned" in status
    check_answers(f, "flat", tmp_path, {})


def test_a_swapped_tombstones_file_or_a_rewritten_store_is_refused_as_before(tmp_path):
    f = Folder(tmp_path / "s.h5", 1000)
    ix.build_indexes(f.path, kind="flat")
    f.remove([1, 2, 3])
    info = ix.build_indexes(f.path, kind="flat")
    folder = ix.index_dir(f.path)
    t0 = folder / info["levels"]["0"]["tombstones"]["file"]
    np.save(t0, np.array([1, 2, 4], np.int64))  # same size, other ids
    with pytest.raises(ix.ForeignIndexError, match="not the index file built"):
        search(f.path, 0, vectors(2)[0][:2])
    assert not ix.index_is_current(f.path)
    assert "replaced or swapped" in levels_status(ix.build_indexes(f.path, kind="flat"))[1]
    f2 = Folder(tmp_path / "s2.h5", 1000)  # removal recorded, then the store written anew
    ix.build_indexes(f2.path, kind="flat")
    f2.remove([4])
    write_store(f2.path, {**ATTRS, "created": "2026-02-01T00:00:00"}, [[(f2.names, f2.block(f2.names))]], [])
    with pytest.raises(Exception, match="stale"):
        search(f2.path, 0, vectors(2)[0][:2])
    actions, status = levels_status(ix.build_indexes(f2.path, kind="flat"))
    assert actions == {"rebuilt"} and "the store has 999 rows, fewer than the 1,000 indexed" in status


def test_a_removal_the_log_no_longer_holds_is_rebuilt_with_the_reason(tmp_path, monkeypatch):
    from sjea_tools.store import removal

    monkeypatch.setattr(removal, "REMOVAL_LOG_MAX", 1)
    f = Folder(tmp_path / "s.h5", 1000)
    ix.build_indexes(f.path, kind="flat")
    f.remove([1])
    f.remove([2])  # the log keeps only this one: the index's version is not in it
    actions, status = levels_status(ix.build_indexes(f.path, kind="flat"))
    assert actions == {"rebuilt"}
    check_answers(f, "flat", tmp_path, {})


# --- through sjea embed --update on a photo folder -----------------------------------------------

def test_update_of_a_folder_searches_like_a_fresh_embed_and_the_tree_covers_the_live_rows(
        tmp_path, make_run, monkeypatch):
    from photo_folder import make_photo_folder
    from sjea_tools.clusters import read_tree
    from sjea_tools.pipeline import embed_and_index

    from sjea_tools.index import growth

    # A tiny folder: every removal and every addition is a large share of it.
    monkeypatch.setattr(tb, "TOMBSTONE_MAX_SHARE", 1.0)
    monkeypatch.setattr(growth, "DELTA_MAX_SHARE", 1.0)
    opts = {"backend": "torch", "workers": 0, "batch_size": 7}
    folder = make_photo_folder(tmp_path / "photos", per_class=3, broken=False)
    root, images = folder["root"], folder["images"]
    run = make_run(tmp_path / "runs" / "a", levels=2)
    out, fresh = tmp_path / "store.h5", tmp_path / "fresh.h5"
    embed_and_index(root, out, run=run, **opts)
    (root / images[0]).unlink()
    shutil.copyfile(root / images[4], root / images[7])  # a changed file: removed, then added again
    os.utime(root / images[7], ns=(1_700_000_000_000_000_000,) * 2)
    shutil.copyfile(root / images[3], root / "cat" / "new.jpg")
    summary = embed_and_index(root, out, update=True, **opts)
    assert {e["action"] for e in summary["index"]["levels"].values()} == {"tombstoned"}
    embed_and_index(root, fresh, run=run, **opts)
    with open_store(out) as s, open_store(fresh) as fr:
        fresh_row = {p: i for i, p in enumerate(fr.paths)}
        for level in s.levels:
            h = ix.open_indexes(out).load(s.model_id, s.n, [level])
            truth = h.prepare(fr.read_embeddings(level))
            scores, ids = h.search(level, truth, 5, lambda r: h.prepare(s.read_embeddings(level, r)))
            exact = -np.sort(-(truth @ truth.T), axis=1)[:, :5]
            np.testing.assert_allclose(scores, exact, atol=1e-5)
            for q in range(len(truth)):
                got = [float(truth[fresh_row[s.paths[i]]] @ truth[q]) for i in ids[q]]
                np.testing.assert_allclose(got, exact[q], atol=1e-5)
        tree, why = read_tree(s)
        assert why is None and len(tree["assign"]) == s.n == fr.n
    sidecar = json.loads((ix.index_dir(out) / "index.json").read_text())
    assert all(e["tombstones"]["count"] == 2 for e in sidecar["levels"].values())


def test_the_documented_plain_faiss_snippet_reads_a_tombstoned_index(tmp_path):
    import re
    from pathlib import Path

    f = Folder(tmp_path / "s.h5", 1000)
    ix.build_indexes(f.path, kind="flat")
    f.remove([0, 41, 500])
    f.add(30)
    entry = ix.build_indexes(f.path, kind="flat")["levels"]["0"]
    assert entry.get("parts") and entry["tombstones"]["count"] == 3
    doc = (Path(__file__).parents[1] / "docs" / "store-format.md").read_text()
    snippet = re.search(r"<!-- plain-faiss -->\n```python\n(.*?)```", doc, re.S).group(1)
    scope = {"STORE": str(f.path), "LEVEL": 0}
    exec(snippet, scope)  # noqa: S102 - the documented snippet, as a user runs it
    with open_store(f.path) as s:
        q = s.read_embeddings(0, [41, 990, 5])
        want = ix.load_indexes(f.path, s.model_id, s.n, [0])[0].search(q, 8)
    got = scope["search"](q, 8)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
    assert got[1][:, 0].tolist() == [41, 990, 5]
