"""The store: HDF5 layout read with plain h5py, the crash-safe journal, shards and merging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sjea_tools.errors import SjeaError
from sjea_tools.store import (Journal, merge_stores, open_store, parse_shard, shard_slice, write_store)

ATTRS = {"sjea_version": "0.1.0", "model_id": "a" * 64, "model_source": "/runs/x", "backend": "torch",
         "levels": [0, 1], "dims": [4, 3], "image_size": 28, "mean": [0.5] * 3, "std": [0.25] * 3,
         "normalized": True, "dtype": "float32", "root": "/data/imgs", "created": "now"}


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return {0: rng.standard_normal((n, 4)).astype(np.float32), 1: rng.standard_normal((n, 3)).astype(np.float32)}


def _write(path, paths, rows, failures=(), **attrs):
    write_store(path, {**ATTRS, **attrs}, [[(paths, rows)]], list(failures))
    return path


def test_layout_is_readable_with_plain_h5py(tmp_path):
    paths = ["cat/a.jpg", "cat/b.png", "dog/ü ñ.jpg"]
    rows = _rows(3)
    _write(tmp_path / "s.h5", paths, rows, [("dog/bad.jpg", "OSError: truncated")])
    # A separate interpreter that never imports sjea_tools reads every part of the layout.
    script = f"""
import json, h5py
with h5py.File({str(tmp_path / 's.h5')!r}, 'r') as f:
    out = {{
        'paths': [p.decode() for p in f['paths'][:]],
        'l0': f['level_0/embeddings'][:].tolist(), 'l1_shape': list(f['level_1/embeddings'].shape),
        'l0_chunks': list(f['level_0/embeddings'].chunks), 'l0_max': list(f['level_0/embeddings'].maxshape),
        'labels': f['labels'][:].tolist(), 'names': [n.decode() for n in f['label_names'][:]],
        'failed': [p.decode() for p in f['failed/paths'][:]], 'errors': [e.decode() for e in f['failed/errors'][:]],
        'attrs': sorted(f.attrs.keys()), 'levels': f.attrs['levels'].tolist(), 'norm': bool(f.attrs['normalized']),
    }}
import sys
assert 'sjea_tools' not in sys.modules
print(json.dumps(out))
"""
    res = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert res["paths"] == paths
    np.testing.assert_array_equal(np.asarray(res["l0"], np.float32), rows[0])
    assert res["l1_shape"] == [3, 3]
    assert res["l0_max"] == [None, 4] and res["l0_chunks"][1] == 4
    assert res["labels"] == [0, 0, 1] and res["names"] == ["cat", "dog"]
    assert res["failed"] == ["dog/bad.jpg"] and res["errors"] == ["OSError: truncated"]
    for key in ("sjea_version", "model_id", "levels", "dims", "image_size", "mean", "std", "normalized", "root",
                "created", "format"):
        assert key in res["attrs"]
    assert res["levels"] == [0, 1] and res["norm"] is True


def test_store_api_reads_rows_in_any_order_and_float16(tmp_path):
    rows = _rows(5)
    _write(tmp_path / "s.h5", [f"{i}.png" for i in range(5)], rows, dtype="float16")
    with open_store(tmp_path / "s.h5") as s:
        assert (s.n, s.levels, s.dims, s.normalized, s.labels, s.label_names) == (5, [0, 1], [4, 3], True, None, None)
        got = s.read_embeddings(0, [4, 1, 1, 3])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, rows[0][[4, 1, 1, 3]], atol=2e-3)
        with pytest.raises(SjeaError, match="not level 2"):
            s.read_embeddings(2)


def test_write_group_replaces_and_reads_back(tmp_path):
    _write(tmp_path / "s.h5", ["a.png", "b.png"], _rows(2))
    with open_store(tmp_path / "s.h5", "a") as s:
        s.write_group("clusters", {"level0": np.array([1, 0]), "names": np.array(["x", "y"])}, {"k": 2})
        s.write_group("clusters", {"level0": np.array([0, 1])}, {"k": 3})
        arrays, attrs = s.read_group("clusters")
        assert arrays["level0"].tolist() == [0, 1] and "names" not in arrays and attrs["k"] == 3
        assert s.read_group("missing") is None
        with pytest.raises(SjeaError, match="part of the store layout"):
            s.write_group("paths", {"x": np.zeros(1)})
    with open_store(tmp_path / "s.h5") as s, pytest.raises(SjeaError, match="mode='a'"):
        s.write_group("clusters", {"x": np.zeros(1)})


def test_open_store_refuses_non_stores(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(SjeaError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")
    with pytest.raises(SjeaError, match="does not exist"):
        open_store(tmp_path / "none.h5")
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(SjeaError, match="not an sjea embedding store"):
        open_store(tmp_path / "other.h5")


def test_journal_drops_rows_written_after_the_last_commit(tmp_path):
    j = Journal.create(tmp_path / "j", ATTRS)
    rows = _rows(6)
    j.append(["a", "b"], {k: v[:2] for k, v in rows.items()}, [("bad", "ValueError: x")])
    j.commit()
    # Rows appended but never committed stand for a kill mid-batch.
    j.append(["c", "d"], {k: v[2:4] for k, v in rows.items()}, [("worse", "OSError")])
    j.close()  # without a commit: what a kill after these writes leaves behind
    j2 = Journal.open(tmp_path / "j")
    assert (j2.rows, j2.failed, j2.paths(), j2.failures()) == (2, 1, ["a", "b"], [("bad", "ValueError: x")])
    j2.append(["e"], {k: v[4:5] for k, v in rows.items()}, [])
    j2.commit()
    (paths, block), = list(j2.iter_rows())
    assert paths == ["a", "b", "e"]
    np.testing.assert_array_equal(block[1], rows[1][[0, 1, 4]])


def test_journal_refuses_a_commit_that_claims_lost_data(tmp_path):
    j = Journal.create(tmp_path / "j", ATTRS)
    j.append(["a"], {k: v[:1] for k, v in _rows(1).items()}, [])
    j.commit()
    j.close()
    (tmp_path / "j" / "level_1.bin").write_bytes(b"")
    with pytest.raises(SjeaError, match="shorter than its commit"):
        Journal.open(tmp_path / "j")


@pytest.mark.parametrize("count,n", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shards_cover_every_item_once_in_order(count, n):
    parts = [list(range(count))[shard_slice(count, (i, n))] for i in range(n)]
    assert sum(parts, []) == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_parse_shard():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/2", "2/2", "-1/2", "x", "1/0"):
        with pytest.raises(SjeaError, match="--shard"):
            parse_shard(bad)


def test_merge_concatenates_shards_in_order_and_checks_them(tmp_path):
    rows = _rows(5)
    names = ["a/1.png", "a/2.png", "b/3.png", "b/4.png", "b/5.png"]
    s0 = _write(tmp_path / "s0.h5", names[:2], {k: v[:2] for k, v in rows.items()}, [("a/x.png", "bad")],
                shard="0/2", scan_count=6)
    s1 = _write(tmp_path / "s1.h5", names[2:], {k: v[2:] for k, v in rows.items()}, shard="1/2", scan_count=6)
    summary = merge_stores([s1, s0], tmp_path / "all.h5")  # any order on the command line
    assert summary["rows"] == 5 and summary["shards"] == 2
    with open_store(tmp_path / "all.h5") as s:
        assert s.paths == names and s.failed == [("a/x.png", "bad")] and s.label_names == ["a", "b"]
        np.testing.assert_array_equal(s.read_embeddings(0), rows[0])
        assert "shard" not in s.attrs
    with pytest.raises(SjeaError, match="missing"):
        merge_stores([s0], tmp_path / "m.h5")
    with pytest.raises(SjeaError, match="both shard 0/2"):
        merge_stores([s0, s0], tmp_path / "m.h5")
    other = _write(tmp_path / "o.h5", names[2:], {k: v[2:] for k, v in rows.items()}, shard="1/2", scan_count=6,
                   model_id="b" * 64)
    with pytest.raises(SjeaError, match="another model"):
        merge_stores([s0, other], tmp_path / "m.h5")
    with pytest.raises(SjeaError, match="not a shard"):
        merge_stores([tmp_path / "all.h5"], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_a_journal_has_one_writer_at_a_time_and_a_killed_writer_frees_it(tmp_path):
    folder = tmp_path / "out.h5.partial"
    writer = subprocess.Popen(
        [sys.executable, "-c", f"""
import sys
from sjea_tools.store import Journal
j = Journal.create({str(folder)!r}, {ATTRS!r})
print("ready", flush=True)
sys.stdin.read()  # holds the journal until killed, however slow the test is
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        with pytest.raises(SjeaError, match=r"another sjea process is using .*out\.h5; wait for it"):
            Journal.open(folder)
    finally:
        writer.kill()
        writer.wait()
    Journal.open(folder).close()  # the kill released the lock


def _with_umask(mask, fn):
    import os

    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def test_written_and_merged_stores_follow_the_umask(tmp_path):
    """mkstemp makes 0600 files; a store must be readable by the group like any other output."""
    rows = _rows(4)
    s0 = _with_umask(0o022, lambda: _write(tmp_path / "s0.h5", ["a/1.png", "a/2.png"],
                                           {k: v[:2] for k, v in rows.items()}, shard="0/2", scan_count=4))
    s1 = _with_umask(0o022, lambda: _write(tmp_path / "s1.h5", ["b/3.png", "b/4.png"],
                                           {k: v[2:] for k, v in rows.items()}, shard="1/2", scan_count=4))
    _with_umask(0o022, lambda: merge_stores([s0, s1], tmp_path / "m.h5"))
    for p in (s0, s1, tmp_path / "m.h5"):
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    _with_umask(0o077, lambda: merge_stores([s0, s1], tmp_path / "private.h5"))
    assert (tmp_path / "private.h5").stat().st_mode & 0o777 == 0o600


def test_preprocessing_is_read_as_one_spec_and_old_stores_are_rgb(tmp_path):
    from sjea_tools.spec import PreprocessSpec

    _write(tmp_path / "old.h5", ["a.png"], _rows(1))  # written without colour_mode, as before the spec
    _write(tmp_path / "new.h5", ["a.png"], _rows(1), colour_mode="L")
    with open_store(tmp_path / "old.h5") as old, open_store(tmp_path / "new.h5") as new:
        assert old.preprocess == PreprocessSpec(28, (0.5,) * 3, (0.25,) * 3, "RGB")
        assert new.preprocess == PreprocessSpec(28, (0.5,) * 3, (0.25,) * 3, "L")


def test_merge_refuses_shards_with_other_preprocessing(tmp_path):
    rows = _rows(2)
    s0 = _write(tmp_path / "s0.h5", ["a/1.png"], {k: v[:1] for k, v in rows.items()}, shard="0/2", scan_count=2)
    s1 = _write(tmp_path / "s1.h5", ["a/2.png"], {k: v[1:] for k, v in rows.items()}, shard="1/2", scan_count=2,
                std=[0.5] * 3)
    with pytest.raises(SjeaError, match="preprocess"):
        merge_stores([s0, s1], tmp_path / "m.h5")


def test_merge_reports_rows_written(tmp_path):
    rows = _rows(5)
    s0 = _write(tmp_path / "s0.h5", ["a/1", "a/2"], {k: v[:2] for k, v in rows.items()}, shard="0/2", scan_count=5)
    s1 = _write(tmp_path / "s1.h5", ["a/3", "a/4", "a/5"], {k: v[2:] for k, v in rows.items()}, shard="1/2",
                scan_count=5)
    calls = []
    merge_stores([s0, s1], tmp_path / "m.h5", progress=lambda task, done, total: calls.append((task, done, total)))
    assert calls == [("merging", 2, 5), ("merging", 5, 5)]
