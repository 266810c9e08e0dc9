"""Issue 13, item 1: a store that grows by segments instead of copies, and stays crash-safe.

Real images, a real (tiny, random) model. `--update`, `sjea merge` and `sjea compact` are killed
(SIGKILL) between every two of their durable steps (in a forked child whose copy of
sjea_tools/store/segments.py the test patches to die there: `KILL_POINTS`) and at journal commits
picked by recorded seeds (the real CLI); afterwards the store opens with every row once, or the
same command again gives exactly the clean result.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import journal_pause, kill, make_run, start_paused, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.embed import Embedder, embed_folder
from sjea_tools.errors import SjeaError
from sjea_tools.store import (compact_store, merge_stores, open_store, partial_path, segments, segments_dir,
                              verify_store)

SJEA = str(Path(sys.executable).with_name("sjea"))
LATE = "Ankle_boot"  # the class the update brings: it sorts before every other, so old labels renumber


@pytest.fixture(scope="module")
def env(tmp_path_factory, fmnist_test):
    """G: a folder that grows (its first images, then the rest); `base`: the store of the first
    images; `grown`: base + an uninterrupted --update; `single`: one clean run of the whole G."""
    tmp = tmp_path_factory.mktemp("segments")
    run = make_run(tmp / "run")
    full = write_fmnist_folder(tmp / "full", fmnist_test, 60)
    (full / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    files = sorted(p.relative_to(full) for p in full.rglob("*.png"))
    first = [p for p in files if p.parts[0] != LATE and p.name != "broken.png"][:36]
    grow = tmp / "G"
    _copy(full, grow, first)
    emb = Embedder.from_source(run=run, backend="torch")
    base = tmp / "base.h5"
    embed_folder(grow, base, embedder=emb, workers=0, batch_size=16)
    _copy(full, grow, [p for p in files if p not in first])
    grown = tmp / "grown.h5"
    shutil.copy(base, grown)
    embed_folder(grow, grown, embedder=emb, workers=0, batch_size=16, update=True)
    single = tmp / "single.h5"
    embed_folder(grow, single, embedder=emb, workers=0, batch_size=16)
    return {"tmp": tmp, "run": run, "G": grow, "emb": emb, "base": base, "grown": grown, "single": single,
            "first": len(first)}


def _copy(src: Path, dst: Path, rel: list[Path]) -> None:
    for p in rel:
        (dst / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / p, dst / p)


def _contents(path):
    """What a store holds, with labels as class names (their numbers depend on the class list)."""
    with open_store(path) as s:
        names = s.label_names
        labels = [names[i] for i in s.labels] if s.labels is not None else None
        return {"paths": s.paths, "labels": labels, "names": names, "failed": s.failed,
                "rows": [s.read_embeddings(k) for k in s.levels]}


def _assert_same(path, reference):
    got, want = _contents(path), _contents(reference)
    assert got["paths"] == want["paths"]  # same order, every row once
    assert got["labels"] == want["labels"] and got["names"] == want["names"] and got["failed"] == want["failed"]
    for a, b in zip(got["rows"], want["rows"]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def _by_path(path):
    c = _contents(path)
    return {p: (c["labels"][i], [r[i] for r in c["rows"]]) for i, p in enumerate(c["paths"])}, set(c["failed"])


def _assert_clean_layout(out: Path):
    """No temporary file, no journal, and the segment folder holds exactly what the store names."""
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")]
    assert not partial_path(out).exists()
    with open_store(out) as s:
        named = {Path(n).name for g in s.segments or [] for n in (g["file"], g.get("labels")) if n}
    on_disk = ({p.name for p in segments_dir(out).iterdir()} - {segments.OWNER_FILE}) if segments_dir(out).exists() else set()
    assert on_disk == named


# The durable steps of the three writers, and how a forked child is stopped just there: the
# function of segments.py that it dies before or after (the fault injection lives here, not in the
# library).
KILL_POINTS = {
    "update-linked": ("write_store", "before"),  # the old file linked as a segment, the new one not written
    "update-segment": ("write_store", "after"),  # the new segment whole, no top-level file names it
    "labels-written": ("write_labels_file", "after"),  # renumbered labels beside a segment
    "top-written": ("atomic_path", "before-rename"),  # the new top-level file written, not renamed over OUT
    "update-published": ("publish", "after"),
    "merge-linked": ("link_segment", "after"),
    "merge-published": ("publish", "after"),
    "compact-written": ("write_store", "after"),
}


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    """Patch segments.py (in this process) so that it SIGKILLs itself at `point`."""
    name, when = KILL_POINTS[point]
    real = getattr(segments, name)

    def dies_before(*args, **kwargs):
        _die()

    def dies_after(*args, **kwargs):
        real(*args, **kwargs)
        _die()

    @contextlib.contextmanager
    def dies_before_rename(path, *args, **kwargs):
        with real(path, *args, **kwargs) as tmp:
            yield tmp
            if not Path(path).parent.name.endswith(segments.SEGMENTS_SUFFIX):  # the top-level file
                _die()

    setattr(segments, name, {"before": dies_before, "after": dies_after, "before-rename": dies_before_rename}[when])


def _killed_at(point: str, work) -> bool:
    """Run work() in a forked child that SIGKILLs itself at `point` (a KILL_POINTS name, or a
    kill work() makes itself); True when it died there."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if point in KILL_POINTS:
                _arm(point)
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, f"the child failed before crash point {point}"
        return False
    return os.WTERMSIG(status) == signal.SIGKILL


def _update(env, out, **kw):
    return embed_folder(env["G"], out, embedder=env["emb"], workers=0, batch_size=16, update=True, **kw)


# --- growth without copies ----------------------------------------------------------------------

def test_an_update_adds_a_segment_and_copies_no_stored_row(env, tmp_path):
    out = tmp_path / "s.h5"
    shutil.copy(env["base"], out)
    inode, size = out.stat().st_ino, out.stat().st_size
    with open_store(out) as s:
        old_print, old_n = s.fingerprint, s.n
    summary = _update(env, out)
    assert summary["status"] == "written" and summary["added"] == summary["rows"] - old_n > 0
    with open_store(out) as s:
        segs = s.segments
        assert [g["rows"] for g in segs] == [old_n, s.n - old_n]
        assert s.rows_unchanged_since(old_print) == old_n  # what a growing index needs to know
        assert s.rows_unchanged_since("not-a-version") is None
        assert s.history[-1] == (s.fingerprint, s.n)
    first = out.parent / segs[0]["file"]
    assert first.stat().st_ino == inode  # the old file became the first segment: a link, not a copy
    new_bytes = (out.parent / segs[1]["file"]).stat().st_size + out.stat().st_size
    assert new_bytes < size  # 24 new rows cost less than the 36 stored ones
    assert segs[0]["labels"]  # its class numbers changed (a class sorting first arrived): renumbered beside it
    _assert_same(out, env["grown"])
    rows, failed = _by_path(out)
    want_rows, want_failed = _by_path(env["single"])
    assert failed == want_failed and rows.keys() == want_rows.keys()
    for p, (label, levels) in rows.items():  # each row equals a single clean run's row of that image
        assert label == want_rows[p][0]
        assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(levels, want_rows[p][1]))
    assert verify_store(out)["rows"] == len(rows)
    _assert_clean_layout(out)


def test_a_store_of_segments_reads_with_plain_h5py_and_h5dump_and_moves_as_a_folder(env, tmp_path):
    moved = tmp_path / "elsewhere"  # the file and its segment folder moved together, read from another cwd
    moved.mkdir()
    out = moved / "grown.h5"
    shutil.copy(env["grown"], out)
    shutil.copytree(segments_dir(env["grown"]), segments_dir(out))
    shutil.move(segments_dir(env["grown"]), tmp_path / "gone")  # the originals out of reach
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with h5py.File(out, "r") as f:
            assert f["paths"].is_virtual and f["level_0/embeddings"].is_virtual
            plain = {"paths": list(f["paths"].asstr(errors="surrogateescape")[:]),
                     "labels": [f["label_names"].asstr()[i] for i in f["labels"][:]],
                     "failed": list(zip(f["failed/paths"].asstr()[:], f["failed/errors"].asstr()[:])),
                     "rows": [f[f"level_{k}/embeddings"][:] for k in f.attrs["levels"]]}
    finally:
        os.chdir(cwd)
        shutil.move(tmp_path / "gone", segments_dir(env["grown"]))
    want = _contents(env["grown"])
    assert plain["paths"] == want["paths"] and plain["labels"] == want["labels"]
    assert plain["failed"] == want["failed"] and want["failed"]
    assert all(np.array_equal(a, b) for a, b in zip(plain["rows"], want["rows"]))
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump is not installed (apt-get install hdf5-tools); the h5py half passed")
    dump = subprocess.run(["h5dump", "-d", "/paths", "-d", "/labels", "-d", "/level_1/embeddings", str(out)],
                          capture_output=True, text=True, cwd="/")
    assert dump.returncode == 0, dump.stderr
    assert f'"{want["paths"][-1]}"' in dump.stdout and "nan" not in dump.stdout.lower()
    assert f"( {len(want['paths'])}, " in dump.stdout  # the embeddings' whole shape, every segment


def test_a_missing_or_replaced_segment_is_one_line_never_fill_values(env, tmp_path):
    out = tmp_path / "grown.h5"
    shutil.copy(env["grown"], out)
    shutil.copytree(segments_dir(env["grown"]), segments_dir(out))
    with open_store(out) as s:
        last = out.parent / s.segments[-1]["file"]
    saved = last.read_bytes()
    last.unlink()
    with pytest.raises(SjeaError, match="segment file .* is missing") as e:
        open_store(out)
    assert "\n" not in str(e.value)
    shutil.copy(env["single"], last)  # some other store in its place
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 2 and "is not the one the store recorded" in res.output
    last.write_bytes(saved)
    assert verify_store(out)["ok"]


def test_an_old_single_file_store_grows_into_segments_that_search_and_compact(env, tmp_path):
    from sjea_tools.index import index_is_current
    from sjea_tools.pipeline import embed_and_index

    out = tmp_path / "s.h5"
    shutil.copy(env["base"], out)
    embed_and_index(env["G"], out, embedder=env["emb"], workers=0, update=True)
    for store in (env["base"], out):  # a store written before segments existed, and a grown one
        res = CliRunner().invoke(app, ["search", "--id", "0", "--store", str(store), "--level", "0", "--json"]
                                 if store == out else ["verify", str(store)])
        assert res.exit_code == 0, res.output
    # sjea compact: one file again; rows, fingerprint and cluster tree kept, so the index stays current.
    with open_store(out) as s:
        fingerprint, groups = s.fingerprint, {g.name for g in s.derived_groups()}
    res = CliRunner().invoke(app, ["compact", str(out)])
    assert res.exit_code == 0 and "compacted 2 segments into" in res.output and str(out) in res.output
    with open_store(out) as s:
        assert s.segments is None and s.fingerprint == fingerprint
        assert groups and {g.name for g in s.derived_groups()} == groups  # the cluster tree kept
    assert index_is_current(out) and not segments_dir(out).exists()
    _assert_same(out, env["grown"])
    res = CliRunner().invoke(app, ["compact", str(out), "--json"])
    assert res.exit_code == 0 and '"status": "already one file"' in res.stdout


def test_many_updates_compact_their_newest_segments_automatically(tmp_path, monkeypatch):
    from sjea_tools.store import append_segment, write_store

    monkeypatch.setattr(segments, "AUTO_COMPACT_SEGMENTS", 3)
    attrs = {"model_id": "a" * 64, "levels": [0], "dims": [4], "normalized": False, "dtype": "float32",
             "root": "/imgs"}
    rng = np.random.default_rng(0)
    out = tmp_path / "s.h5"
    paths = [f"b/{i:03d}.png" for i in range(20)]
    rows = rng.standard_normal((20, 4)).astype(np.float32)
    write_store(out, attrs, [[(paths, {0: rows})]], [("b/x.png", "bad")])
    with open_store(out) as s:
        first = s.fingerprint
    counts = []
    for step in range(6):
        new = [f"{'ac'[step % 2]}/{step}-{i}.png" for i in range(3)]  # class "a" sorts before "b"
        block = rng.standard_normal((3, 4)).astype(np.float32)
        append_segment(out, attrs, new, [(new, {0: block})], [(f"a/bad{step}.png", "bad")] if step == 2 else [])
        paths, rows = paths + new, np.vstack([rows, block])
        with open_store(out) as s:
            counts.append(len(s.segments))
    assert max(counts) <= 3 and counts[-1] < 3 + 1
    with open_store(out) as s:
        assert s.paths == paths and np.array_equal(s.read_embeddings(0), rows)
        assert [s.label_names[i] for i in s.labels] == [p[0] for p in paths]
        assert s.failed == [("b/x.png", "bad"), ("a/bad2.png", "bad")]
        assert s.rows_unchanged_since(first) == 20 and s.segments[0]["rows"] == 20
    assert verify_store(out)["rows"] == 38
    _assert_clean_layout(out)


# --- SIGKILL at every step, and at random times -------------------------------------------------

def _opens_with_every_row_once(out: Path, allowed: set[int]) -> None:
    with open_store(out) as s:
        assert s.n in allowed and len(set(s.paths)) == s.n
        assert np.isfinite(s.read_embeddings(0)).all()  # no fill values: every segment it names is there


def test_sigkill_at_every_step_of_an_update_then_the_same_command_gives_the_clean_result(env, tmp_path):
    with open_store(env["base"]) as b, open_store(env["grown"]) as g:
        sizes = {b.n, g.n}
    for point in ("update-linked", "update-segment", "labels-written", "top-written", "update-published"):
        out = tmp_path / f"{point}.h5"
        shutil.copy(env["base"], out)
        assert _killed_at(point, lambda: _update(env, out)), point
        _opens_with_every_row_once(out, sizes)
        assert _update(env, out)["status"] in ("written", "up to date")
        _assert_same(out, env["grown"])
        _assert_clean_layout(out)


# Recorded seeds (never the clock), each a kill at the first journal commit that counts `rows`
# rows: 1 before that commit (the batch written, not counted), 5 just after it.
@pytest.mark.parametrize("seed", [1, 5])
def test_sigkill_of_the_cli_update_while_embedding_then_it_resumes(env, tmp_path, seed):
    rng = random.Random(seed)
    rows, when = rng.randrange(1, 24), rng.choice(["before-commit", "after-commit"])
    out = tmp_path / "s.h5"
    shutil.copy(env["base"], out)
    args = ["embed", str(env["G"]), str(out), "--run", str(env["run"]), "--backend", "torch", "--workers", "0",
            "--batch-size", "4", "--commit-every", "0", "--no-index", "--quiet", "--update"]
    kill(start_paused(journal_pause(when, rows), args))
    assert (_journal_rows(out) >= rows) == (when == "after-commit"), (seed, rows, when, _journal_rows(out))
    _opens_with_every_row_once(out, {len(_contents(env["base"])["paths"])})  # the old store, untouched
    done = subprocess.run([SJEA, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"seed {seed}: {done.stderr}"
    _assert_same(out, env["grown"])
    _assert_clean_layout(out)


def _journal_rows(out: Path) -> int:
    try:
        return json.loads((partial_path(out) / "commit.json").read_text())["rows"]
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def shards(env):
    files = [env["tmp"] / f"shard-{i}.h5" for i in range(2)]
    for i, f in enumerate(files):
        embed_folder(env["G"], f, embedder=env["emb"], workers=0, batch_size=16, shard=f"{i}/2")
    return files


def test_sigkill_at_every_step_of_a_merge_then_the_same_merge_gives_a_single_runs_store(env, shards, tmp_path):
    inodes = [f.stat().st_ino for f in shards]
    for point in ("merge-linked", "labels-written", "top-written", "merge-published"):
        out = tmp_path / f"{point}.h5"
        assert _killed_at(point, lambda: merge_stores(shards, out)), point
        if out.exists():
            _opens_with_every_row_once(out, {len(_contents(env["single"])["paths"])})
        summary = merge_stores(shards, out)
        assert summary["status"] in ("written", "up to date") and summary["shards"] == 2
        assert summary["rows"] == len(_contents(env["single"])["paths"]) and summary["failed"] == 1
        _assert_same(out, env["single"])
        _assert_clean_layout(out)
        with open_store(out) as s:  # the shards' own files, linked: no row copied
            assert [(out.parent / g["file"]).stat().st_ino for g in s.segments] == inodes


def test_sigkill_while_compacting_leaves_the_store_whole(env, tmp_path):
    def kill_mid_write(task, done, total):
        os.kill(os.getpid(), signal.SIGKILL)

    for point in ("mid-write", "compact-written"):
        (tmp_path / point).mkdir()
        out = tmp_path / point / "grown.h5"  # the name its segments are filed under
        shutil.copy(env["grown"], out)
        shutil.copytree(segments_dir(env["grown"]), segments_dir(out))
        progress = kill_mid_write if point == "mid-write" else None
        assert _killed_at(point, lambda: compact_store(out, progress=progress)), point
        _assert_same(out, env["grown"])  # the old store of segments, or the compacted file
        assert compact_store(out)["status"] in ("compacted", "already one file")
        with open_store(out) as s:
            assert s.segments is None
        _assert_same(out, env["grown"])
        _assert_clean_layout(out)
