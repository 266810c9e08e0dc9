"""`sjea embed --update` keeps a store in step with its folder (issue 20, item 2): after files are
deleted, changed and added, the updated store equals a fresh embed of the folder (rows, vectors
within 1e-6, labels, failures), its index answers the same and its cluster tree covers the live
rows; loose files get the root label; --update uses the store's own model, not runs/LATEST."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from photo_folder import make_photo_folder
from sjea_tools.clusters import read_tree
from sjea_tools.data.datasets import ROOT_LABEL
from sjea_tools.errors import SjeaError
from sjea_tools.index import open_indexes
from sjea_tools.pipeline import embed_and_index
from sjea_tools.store import open_store, verify_store

OPTS = {"backend": "torch", "workers": 0, "batch_size": 7}


def _rows(out: Path) -> dict:
    with open_store(out) as s:
        names = s.label_names
        labels = s.labels if names is not None else None
        rows = {lv: dict(zip(s.paths, s.read_embeddings(lv))) for lv in s.levels}
        return {"paths": list(s.paths), "rows": rows, "failed": dict(s.failed), "model_id": s.model_id,
                "labels": None if labels is None else dict(zip(s.paths, (names[i] for i in labels)))}


def _change_folder(root: Path, images: list[str]) -> dict:
    """Delete two photos and a broken file, change one, add one in a class and two loose ones."""
    gone = [images[0], images[5]]
    for p in gone:
        (root / p).unlink()
    (root / "coffee/empty.jpg").unlink()
    changed = images[8]
    shutil.copyfile(root / images[12], root / changed)  # other content, other size or time
    os.utime(root / changed, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    shutil.copyfile(root / images[3], root / "cat" / "new.jpg")
    shutil.copyfile(root / images[2], root / "loose-a.jpg")
    shutil.copyfile(root / images[9], root / "loose-b.png")
    shutil.copyfile(root / images[10], root / "rocket/notes.png")  # a broken file repaired: embedded now
    return {"gone": gone, "changed": changed}


def test_update_after_deletes_changes_and_adds_equals_a_fresh_embed(tmp_path, make_run):
    folder = make_photo_folder(tmp_path / "photos", per_class=3)
    root, images = folder["root"], folder["images"]
    run = make_run(tmp_path / "runs" / "a", levels=2)
    out, fresh = tmp_path / "store.h5", tmp_path / "fresh.h5"
    embed_and_index(root, out, run=run, **OPTS)
    what = _change_folder(root, images)
    make_run(tmp_path / "runs" / "b", levels=2, seed=1)  # runs/LATEST now names another model

    summary = embed_and_index(root, out, update=True, **OPTS)  # no --run: the store's own model
    embed_and_index(root, fresh, run=run, **OPTS)

    counts = ("changed", "removed", "removed_failed", "failures_retried")
    assert [summary[k] for k in counts] == [1, 2, 1, 1]
    assert "rocket/notes.png" in _rows(out)["paths"]
    # 3 of ~20 rows removed: over the tombstone bound (index.tombstones), so rebuilt as before
    assert all("removed rows would be tombstoned" in e["status"] for e in summary["index"]["levels"].values())
    got, want = _rows(out), _rows(fresh)
    assert got["model_id"] == want["model_id"]
    assert sorted(got["paths"]) == sorted(want["paths"])
    assert not set(what["gone"]) & set(got["paths"])
    for lv in want["rows"]:
        for p, v in want["rows"][lv].items():
            np.testing.assert_allclose(got["rows"][lv][p], v, atol=1e-6, err_msg=p)
    assert got["failed"] == want["failed"]
    assert got["labels"] == want["labels"] and got["labels"]["loose-a.jpg"] == ROOT_LABEL
    assert verify_store(out)["ok"]
    _same_answers(out, fresh)
    with open_store(out) as s:
        tree, why = read_tree(s)
        assert why is None and len(tree["assign"]) == s.n == len(want["paths"])
        assert int(tree["size_0"].sum()) == s.n  # the top clusters hold every live row, once


def _same_answers(out: Path, fresh: Path) -> None:
    """The updated store's index gives, for a few queries, the top 5 of an exact scan of the fresh
    store: the same scores (within 1e-5), each naming a row whose fresh vector has that score (the
    folder holds copies, so tied rows may come in either order)."""
    with open_store(out) as s, open_store(fresh) as f:
        level = s.levels[0]
        ix = open_indexes(out).load(s.model_id, s.n, [level], fingerprint=s.fingerprint)
        truth = ix.prepare(f.read_embeddings(level))
        queries = truth[[0, 3, 7, len(truth) - 1]]
        scores, ids = ix.search(level, queries, 5, lambda r: ix.prepare(s.read_embeddings(level, r)))
        exact = -np.sort(-(queries @ truth.T), axis=1)[:, :5]
        np.testing.assert_allclose(scores, exact, atol=1e-5)
        fresh_row = {p: i for i, p in enumerate(f.paths)}
        for q in range(len(queries)):
            got = [float(truth[fresh_row[s.paths[i]]] @ queries[q]) for i in ids[q]]
            np.testing.assert_allclose(got, exact[q], atol=1e-5)


def test_keep_missing_keeps_rows_of_vanished_files(tmp_path, make_run):
    folder = make_photo_folder(tmp_path / "photos", per_class=2, broken=False)
    run = make_run(tmp_path / "runs" / "a", levels=1)
    out = tmp_path / "s.h5"
    embed_and_index(folder["root"], out, run=run, index=False, **OPTS)
    (folder["root"] / folder["images"][0]).unlink()
    summary = embed_and_index(folder["root"], out, update=True, keep_missing=True, index=False, **OPTS)
    assert summary["status"] == "up to date" and summary["kept_missing"] == 1
    assert folder["images"][0] in _rows(out)["paths"]
    summary = embed_and_index(folder["root"], out, update=True, index=False, **OPTS)
    assert summary["removed"] == 1 and folder["images"][0] not in _rows(out)["paths"]


def test_a_store_without_labels_regains_them_and_loose_files_keep_them(tmp_path, make_run):
    folder = make_photo_folder(tmp_path / "photos", per_class=2, broken=False)
    root = folder["root"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(folder["images"][:4]):
        shutil.copyfile(root / p, flat / f"{i}{Path(p).suffix}")
    run = make_run(tmp_path / "runs" / "a", levels=1)
    out = tmp_path / "s.h5"
    embed_and_index(flat, out, run=run, index=False, **OPTS)
    assert _rows(out)["labels"] is None  # a flat folder has no classes
    (flat / "cats").mkdir()
    shutil.copyfile(root / folder["images"][5], flat / "cats" / "c.png")
    summary = embed_and_index(flat, out, update=True, index=False, **OPTS)
    labels = _rows(out)["labels"]
    assert summary["labels_restored"] and labels["cats/c.png"] == "cats"
    assert {labels[f"{i}{Path(p).suffix}"] for i, p in enumerate(folder["images"][:4])} == {ROOT_LABEL}
    (flat / "aaa").mkdir()  # a class that sorts first: every earlier row's class number moves
    shutil.copyfile(root / folder["images"][7], flat / "aaa" / "a.png")
    embed_and_index(flat, out, update=True, index=False, **OPTS)
    fresh = tmp_path / "fresh.h5"
    embed_and_index(flat, fresh, run=run, index=False, **OPTS)
    assert _rows(out)["labels"] == _rows(fresh)["labels"] and verify_store(out)["ok"]


def test_update_with_another_model_says_whose_store_it_is_without_advising_overwrite_as_the_fix(tmp_path, make_run):
    folder = make_photo_folder(tmp_path / "photos", per_class=1, broken=False)
    out = tmp_path / "s.h5"
    embed_and_index(folder["root"], out, run=make_run(tmp_path / "runs" / "a", levels=1), index=False, **OPTS)
    other = make_run(tmp_path / "runs" / "b", levels=1, seed=3)
    with pytest.raises(SjeaError) as e:
        embed_and_index(folder["root"], out, run=other, update=True, index=False, **OPTS)
    msg = str(e.value)
    assert "written by another model" in msg and "without --run/--onnx" in msg and "new file" in msg
    assert "--overwrite would replace" in msg


def test_keep_missing_needs_update(tmp_path):
    with pytest.raises(SjeaError, match="--keep-missing applies to --update"):
        embed_and_index(tmp_path, tmp_path / "x.h5", keep_missing=True)


def test_removed_rows_vanish_for_plain_h5py_and_survive_compaction(tmp_path):
    import h5py

    from sjea_tools.store import append_segment, compact_store, write_store
    from sjea_tools.store.removal import rewrite_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    paths = [f"c{i % 3}/{i:03d}.png" for i in range(50)]
    attrs = {"model_id": "m", "model_source": "/m", "backend": "onnx", "levels": [0], "dims": [8], "image_size": 8,
             "mean": [0.5] * 3, "std": [0.25] * 3, "normalized": False, "dtype": "float32", "root": "/r",
             "input": "/r", "scan_count": 50, "created": "2026-01-01T00:00:00+0000"}
    out = tmp_path / "s.h5"
    write_store(out, attrs, [[(paths[:30], {0: x[:30]})]], [("c0/bad.png", "OSError: truncated")], total=30)
    append_segment(out, attrs, paths[30:], [(paths[30:], {0: x[30:]})], [])
    drop = {paths[i] for i in (0, 1, 2, 17, 29, 30, 49)}
    assert rewrite_rows(out, drop, {"c0/bad.png"}, None) == 43
    keep = [i for i in range(50) if paths[i] not in drop]
    with h5py.File(out, "r") as f:  # no sjea: the virtual datasets show the live rows only
        assert list(f["paths"].asstr()[:]) == [paths[i] for i in keep]
        np.testing.assert_array_equal(f["level_0/embeddings"][:], x[keep])
        assert f["failed/paths"].shape == (0,)
    with open_store(out) as s:
        assert [s.label_names[i] for i in s.labels] == [paths[i].split("/")[0] for i in keep]
    assert verify_store(out)["ok"]
    compact_store(out)
    with open_store(out) as s:
        assert s.paths == [paths[i] for i in keep] and not s.segments
        np.testing.assert_array_equal(s.read_embeddings(0), x[keep])
