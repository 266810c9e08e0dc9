"""Issue 14, the store side: never destroy, never lie.

One test (or a few) per numbered item: outputs that are other files (1), a stale index (2), file
names that are not UTF-8 (4), two writers started together (5), a busy store (6), flipped bytes
(8), full and read-only disks (10), and the smaller cases of 11. Every test uses real stores,
real models (tiny, random weights) and real Fashion-MNIST images.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_run, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.errors import SjeaError
from sjea_tools.store import open_store, partial_path, verify_store, write_store

ATTRS = {"sjea_version": "0.1.0", "model_id": "a" * 64, "model_source": "/runs/x", "backend": "torch",
         "levels": [0, 1], "dims": [8, 4], "image_size": 28, "mean": [0.5] * 3, "std": [0.25] * 3,
         "normalized": True, "dtype": "float32", "root": "/data/imgs", "created": "now"}
ROOT = Path(__file__).resolve().parents[1]


def _unit_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, d in ((0, 8), (1, 4)):
        x = rng.standard_normal((n, d)).astype(np.float32)
        out[k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _write(path, n=50, seed=0, **attrs):
    paths = [f"c{i % 3}/{i:04d}.png" for i in range(n)]
    write_store(path, {**ATTRS, **attrs}, [[(paths, _unit_rows(n, seed))]], [("c0/bad.png", "OSError: x")])
    return path


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _content(path):
    with open_store(path) as s:
        return s.fingerprint, s.paths, s.failed, [s.read_embeddings(k).tolist() for k in s.levels]


def _one_line_error(res, words, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert words in lines[0], res.output


def _temp_files(folder):
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def env(tmp_path_factory, fmnist_test):
    base = tmp_path_factory.mktemp("reliability")
    run = make_run(base / "run")
    imgs = write_fmnist_folder(base / "imgs", fmnist_test, 30)
    other = write_fmnist_folder(base / "imgs_b", fmnist_test, 30, start=500)  # same names, other pictures
    return base, run, imgs, other


def _embed(folder, out, run, *extra):
    return CliRunner().invoke(app, ["embed", str(folder), str(out), "--run", str(run), "--backend", "torch",
                                    "--workers", "0", "--quiet", *extra])


# --- 1: an output that is some other file ---------------------------------------------------------

def test_1_merge_refuses_to_replace_a_file_it_did_not_write(tmp_path):
    s0 = _write(tmp_path / "s0.h5", 20, shard="0/2", scan_count=40)
    s1 = tmp_path / "s1.h5"
    write_store(s1, {**ATTRS, "shard": "1/2", "scan_count": 40},
                [[([f"d/{i}.png" for i in range(20)], _unit_rows(20, 1))]], [])
    for name, content in (("notes.txt", b"my notes\n"), ("picture.png", b"\x89PNG not really")):
        target = tmp_path / name
        target.write_bytes(content)
        res = CliRunner().invoke(app, ["merge", str(s0), str(s1), str(target), "--no-index"])
        _one_line_error(res, "--overwrite")
        assert target.read_bytes() == content
    other_store = _write(tmp_path / "other.h5", 5)
    before = _sha(other_store)
    _one_line_error(CliRunner().invoke(app, ["merge", str(s0), str(s1), str(other_store), "--no-index"]),
                    "--overwrite")
    assert _sha(other_store) == before
    # The output is never an input, not even through a hard link.
    os.link(s0, tmp_path / "alias.h5")
    before = _sha(s0)
    res = CliRunner().invoke(app, ["merge", str(s0), str(s1), str(tmp_path / "alias.h5"), "--no-index", "--overwrite"])
    _one_line_error(res, "also one of the inputs")
    assert _sha(s0) == before
    # Its own earlier result is not "another file": a rerun is up to date, --overwrite rewrites.
    out = tmp_path / "merged.h5"
    assert CliRunner().invoke(app, ["merge", str(s0), str(s1), str(out), "--no-index"]).exit_code == 0
    before = _sha(out)
    res = CliRunner().invoke(app, ["merge", str(s0), str(s1), str(out), "--no-index", "--json"])
    assert res.exit_code == 0 and '"status": "up to date"' in res.stdout and _sha(out) == before
    res = CliRunner().invoke(app, ["merge", str(s0), str(s1), str(tmp_path / "notes.txt"), "--no-index",
                                   "--overwrite"])
    assert res.exit_code == 0, res.output
    with open_store(tmp_path / "notes.txt") as s:
        assert s.n == 40


def test_1_embed_output_is_never_one_of_its_inputs(env, tmp_path):
    base, run, imgs, _ = env
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(imgs.rglob("*.png"))[:3]))
    before = listing.read_bytes()
    _one_line_error(_embed(listing, listing, run, "--overwrite", "--allow-outside"), "also an input")
    assert listing.read_bytes() == before


# --- 2: a stale index -----------------------------------------------------------------------------

def test_2_an_index_of_a_rewritten_store_is_refused_by_search(env, tmp_path):
    base, run, imgs, other = env
    st = tmp_path / "st.h5"
    assert _embed(imgs, st, run).exit_code == 0
    # Same model, same row count, same names: only the content differs.
    assert _embed(other, st, run, "--overwrite", "--no-index").exit_code == 0
    before = _sha(st)
    res = CliRunner().invoke(app, ["search", "--id", "0", "--store", str(st), "--level", "0"])
    _one_line_error(res, f"sjea index {st}")
    assert "stale" in res.output
    assert _sha(st) == before
    from sjea_tools.index import load_indexes

    with open_store(st) as s, pytest.raises(SjeaError, match="built from an earlier version"):
        load_indexes(st, s.model_id, s.n, [0])
    assert CliRunner().invoke(app, ["index", str(st), "--quiet", "--no-clusters"]).exit_code == 0
    with open_store(st) as s:
        assert set(load_indexes(st, s.model_id, s.n, [0, 1])) == {0, 1}


def test_2_every_write_of_a_store_gets_a_new_fingerprint(tmp_path):
    prints = set()
    for _ in range(3):
        _write(tmp_path / "s.h5")
        with open_store(tmp_path / "s.h5") as s:
            prints.add(s.fingerprint)
    assert len(prints) == 3 and None not in prints


# --- 4: file names that are not UTF-8 -------------------------------------------------------------

def test_4_names_that_are_not_utf8_are_stored_losslessly_and_a_rerun_works(env, tmp_path, fmnist_test):
    from PIL import Image

    base, run, _, _ = env
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 6)
    raw_dir = os.fsencode(folder) + b"/Caf\xe9"  # a Latin-1 folder name, as old archives have
    os.mkdir(raw_dir)
    Image.fromarray(fmnist_test.pixels[100]).save(raw_dir + b"/\xff\xfe odd.png")
    out = tmp_path / "s.h5"
    assert _embed(folder, out, run, "--no-index").exit_code == 0
    with open_store(out) as s:
        odd = [p for p in s.paths if "\udcff" in p]
        assert len(odd) == 1 and (folder / odd[0]).is_file()  # the stored name opens the file
        assert os.fsencode(folder / odd[0]) == raw_dir + b"/\xff\xfe odd.png"
        assert "Caf\udce9" in s.label_names
    with h5py.File(out, "r") as f:  # plain h5py reads it back too
        assert any(p.endswith("\udcff\udcfe odd.png") for p in f["paths"].asstr(errors="surrogateescape")[:])
    # A second odd name added later, then the same command again: both work.
    Image.fromarray(fmnist_test.pixels[101]).save(raw_dir + b"/\x80second.png")
    assert _embed(folder, out, run, "--no-index", "--update").exit_code == 0
    res = _embed(folder, out, run, "--no-index", "--json")
    assert res.exit_code == 0, res.output
    with open_store(out) as s:
        assert s.n == 8 and verify_store(out)["ok"]


# --- 5: two writers started together --------------------------------------------------------------

# Each trial, the two processes start the same embed; the one that gets the writer lock holds it
# until the other's whole attempt has ended (an event, not a time), so every trial is a real
# contention, and the holder reports that it saw the other's attempt while it held the lock.
RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from sjea_tools.embed import Embedder, embed_folder
    from sjea_tools.errors import SjeaError
    from sjea_tools.store import guard
    images, base, run, trials, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    emb = Embedder.from_source(run=run, backend="torch")
    acquire, held_while_other_tried = guard._acquire, {}

    def other_done(t):
        return (base / f"done-{t}-{1 - me}").exists()

    def acquire_then_wait_for_the_other(path, store):
        fd = acquire(path, store)  # StoreBusyError when the other holds it
        if store.name.startswith("race"):
            t = int(store.stem[4:])
            while not other_done(t):
                time.sleep(0.001)
            held_while_other_tried[t] = True
        return fd

    guard._acquire = acquire_then_wait_for_the_other
    print("ready", flush=True)
    sys.stdin.readline()  # both go together
    for t in range(trials):
        try:
            status = embed_folder(images, base / f"race{t}.h5", embedder=emb, workers=0, batch_size=4,
                                  commit_every_s=0)["status"]
        except SjeaError as e:
            status = "error: " + str(e)
        except Exception as e:
            status = "CRASH: " + repr(e)
        finally:
            (base / f"done-{t}-{me}").touch()
        print(json.dumps([t, status, held_while_other_tried.get(t, False)]), flush=True)
""")


def test_5_two_embeds_started_together_never_both_write(env, tmp_path, fmnist_test):
    """Ten trials of two processes running the same embed into the same new store, each with a
    real contention (see RACER): the old code (lock taken after the journal folder was recreated)
    left no store or a broken journal. Fails when a trial did not race."""
    import json

    base, run, _, _ = env
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 4)
    trials = 10
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), str(tmp_path), str(run), str(trials), str(me)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for me in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    results = [{t: (status, raced) for t, status, raced in map(json.loads, out.splitlines())} for out, _ in outputs]
    for t in range(trials):
        (status_a, raced_a), (status_b, raced_b) = results[0][t], results[1][t]
        statuses = [status_a, status_b]
        assert not any(s.startswith("CRASH") for s in statuses), statuses
        # The race happened: one held the lock through the other's whole attempt, which was refused.
        assert sorted([raced_a, raced_b]) == [False, True], (t, statuses)
        winner, loser = (status_a, status_b) if raced_a else (status_b, status_a)
        assert winner == "written" and "another sjea process is using" in loser, (t, statuses)
        out = tmp_path / f"race{t}.h5"
        with open_store(out) as s:
            assert s.n == 4 and len(set(s.paths)) == 4
        assert not partial_path(out).exists() and not _temp_files(tmp_path)


def test_5_a_run_never_touches_the_journal_folder_of_a_writer_still_creating_it(env, tmp_path):
    """The window the race above hits by chance, held open: another process holds the writer lock
    and has made OUT.h5.partial/ but not yet its meta.json. The old code deleted that folder (it
    looked abandoned) before taking any lock; now the run stops at the lock and touches nothing."""
    base, run, imgs, _ = env
    out = tmp_path / "st.h5"
    folder = partial_path(out)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from sjea_tools.store import writer_lock
        with writer_lock({str(out)!r}):
            Path({str(folder)!r}).mkdir()
            (Path({str(folder)!r}) / "paths.jsonl").touch()
            print("creating", flush=True)
            sys.stdin.read()  # holds the lock until killed, however slow the test is
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "creating"
        res = _embed(imgs, out, run, "--no-index")
        _one_line_error(res, "another sjea process is using")
        assert (folder / "paths.jsonl").is_file() and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert _embed(imgs, out, run, "--no-index").exit_code == 0  # the killed writer's lock is gone
    with open_store(out) as s:
        assert s.n == 30


# --- 6: a busy store ------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, h5py
    f = h5py.File(sys.argv[1], sys.argv[2])   # what a search ("r") or a cluster write ("r+") holds
    print("holding", flush=True)
    sys.stdin.read()  # until killed, however slow the test is
""")


@contextlib.contextmanager
def _held(path, mode):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        yield
    finally:
        p.kill()
        p.wait()


def test_6_a_busy_store_is_reported_as_busy_without_destructive_advice(env, tmp_path):
    base, run, imgs, _ = env
    st = tmp_path / "cs.h5"
    assert _embed(imgs, st, run, "--no-index").exit_code == 0
    before = _content(st)
    with _held(st, "r"):  # a search reads it: the cluster tree cannot be written now
        res = CliRunner().invoke(app, ["index", str(st), "--quiet"])
        _one_line_error(res, f"another sjea process is using {st}; wait for it")
    with _held(st, "r+"):  # another process writes it: not even a read works
        for extra in ((), ("--update",)):
            res = _embed(imgs, st, run, "--no-index", *extra)
            _one_line_error(res, "another sjea process is using")
            assert "--overwrite" not in res.output and "re-create" not in res.output
            assert "not a readable" not in res.output
    assert _content(st) == before  # (the holder opening it for writing touches only the superblock flags)
    res = CliRunner().invoke(app, ["index", str(st), "--quiet"])  # free again: works
    assert res.exit_code == 0, res.output


# --- 8: flipped bytes -----------------------------------------------------------------------------

def test_8_flipped_embedding_bytes_are_an_error_not_garbage(tmp_path):
    st = _write(tmp_path / "s.h5", 200)
    with h5py.File(st, "r") as f:
        info = f["level_0/embeddings"].id.get_chunk_info(0)
    data = bytearray(st.read_bytes())
    for i in range(info.byte_offset + 40, info.byte_offset + 48):
        data[i] ^= 0x5A
    st.write_bytes(bytes(data))
    with open_store(st) as s, pytest.raises(SjeaError, match="is damaged: cannot read /level_0/embeddings"):
        s.read_embeddings(0)
    res = CliRunner().invoke(app, ["verify", str(st)])
    _one_line_error(res, "is damaged")


def test_8_flipped_path_bytes_fail_their_checksum(tmp_path):
    st = _write(tmp_path / "s.h5", 50)
    data = st.read_bytes()
    at = data.index(b"c1/0004.png")
    st.write_bytes(data[:at] + b"c1/0005.png" + data[at + 11:])  # a name swapped for another, same length
    with open_store(st) as s, pytest.raises(SjeaError, match="/paths does not match its checksum"):
        s.paths
    _one_line_error(CliRunner().invoke(app, ["verify", str(st)]), "damaged")


def test_8_flipped_header_bytes_give_one_line_or_the_same_content(tmp_path):
    """Every byte outside the embeddings' chunks flipped in turn (a sample of 300 positions): either
    the store reads back exactly as written, or one SjeaError; never a traceback or other values."""
    st = _write(tmp_path / "s.h5", 50)
    with open_store(st) as s:
        want = (s.paths, s.failed, s.read_embeddings(0).tolist(), s.read_embeddings(1).tolist(), s.label_names)
    with h5py.File(st, "r") as f:
        chunks = [f[f"level_{k}/embeddings"].id.get_chunk_info(0) for k in (0, 1)]
    original = st.read_bytes()
    inside = set()
    for c in chunks:
        inside.update(range(c.byte_offset, c.byte_offset + c.size))
    positions = [i for i in range(len(original)) if i not in inside]
    rng = np.random.default_rng(0)
    errors = 0
    for pos in sorted(rng.choice(positions, size=min(300, len(positions)), replace=False)):
        flipped = bytearray(original)
        flipped[pos] ^= 0xFF
        st.write_bytes(bytes(flipped))
        try:
            verify_store(st)
            with open_store(st) as s:
                got = (s.paths, s.failed, s.read_embeddings(0).tolist(), s.read_embeddings(1).tolist(),
                       s.label_names)
            assert got == want, f"byte {pos} flipped: different content read without an error"
        except SjeaError as e:
            assert "\n" not in str(e)
            errors += 1
    assert errors > 0  # the sample does hit metadata that matters
    st.write_bytes(original)
    assert verify_store(st)["rows"] == 50


def test_8_normalized_is_a_plain_integer_and_old_stores_still_read(tmp_path):
    st = _write(tmp_path / "s.h5", 5)
    with h5py.File(st, "r") as f:
        assert f.attrs["normalized"].dtype.kind == "u"  # not an HDF5 enum (what numpy bools become)
        assert f["level_0/embeddings"].fletcher32 and f["labels"].fletcher32
    with h5py.File(st, "a") as f:  # how stores were written before: a bool attribute (an enum)
        f.attrs["normalized"] = np.True_
        assert f.attrs["normalized"].dtype.kind == "b"
    with open_store(st) as s:
        assert s.normalized is True


# --- 10: full and read-only disks -----------------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        reason = f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'}); the full-disk test needs one"
        print(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the file system's free space."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_10_a_full_disk_is_one_line_keeps_what_was_written_and_resumes(env, tmp_path, fmnist_test):
    base, run, imgs, _ = env
    more = write_fmnist_folder(tmp_path / "more", fmnist_test, 240, start=1000)
    with _tmpfs(tmp_path / "small", "12M") as disk:
        out, s1 = disk / "st.h5", disk / "st1.h5"
        assert _embed(more, out, run, "--no-index", "--shard", "0/2").exit_code == 0  # fits
        assert _embed(more, s1, run, "--no-index", "--shard", "1/2").exit_code == 0
        before = _sha(out)
        filler = _fill(disk, 4096)
        embed = ["--run", str(run), "--backend", "torch", "--workers", "0", "--no-index"]
        for cmd in (["embed", str(more), str(disk / "new.h5"), *embed], ["index", str(out)],
                    ["merge", str(out), str(s1), str(disk / "m.h5"), "--no-index"]):
            res = CliRunner().invoke(app, [*cmd, "--quiet"])
            _one_line_error(res, "no space left on the device")
            assert "Nothing already written was lost" in res.output
            assert not _temp_files(disk), _temp_files(disk)
        assert _sha(out) == before
        filler.unlink()  # space freed: the same commands now finish
        res = CliRunner().invoke(app, ["embed", str(more), str(disk / "new.h5"), "--run", str(run), "--backend",
                                       "torch", "--workers", "0", "--no-index", "--quiet"])
        assert res.exit_code == 0, res.output
        with open_store(disk / "new.h5") as s:
            assert s.n == 240
        assert CliRunner().invoke(app, ["index", str(out), "--quiet"]).exit_code == 0
        assert not _temp_files(disk)


def test_10_a_full_disk_during_the_final_write_resumes_from_the_journal(env, tmp_path, fmnist_test):
    base, run, _, _ = env
    more = write_fmnist_folder(tmp_path / "more", fmnist_test, 200, start=2000)
    with _tmpfs(tmp_path / "small", "8M") as disk:
        out = disk / "st.h5"
        # Rows go to the journal; the final HDF5 copy needs as much again: leave room for one, not both.
        journal_bytes = 200 * (sum(_dims(run)) * 4 + 60) + 64 * 1024
        filler = _fill(disk, journal_bytes)
        res = _embed(more, out, run, "--no-index")
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "no space left on the device" in res.output
        assert not out.exists() and not _temp_files(disk)
        filler.unlink()
        res = _embed(more, out, run, "--no-index", "--json")
        assert res.exit_code == 0, res.output
        with open_store(out) as s:
            assert s.n == 200 and verify_store(out)["ok"]


def _dims(run):
    from sjea_tools.embed import Embedder

    return Embedder.from_source(run=run, backend="torch").dims


def test_10_read_only_output_folders_are_one_line(env, tmp_path):
    base, run, imgs, _ = env
    st = _write(tmp_path / "src.h5", 30)
    s0 = _write(tmp_path / "s0.h5", 10, shard="0/2", scan_count=20)
    write_store(tmp_path / "s1.h5", {**ATTRS, "shard": "1/2", "scan_count": 20},
                [[([f"z/{i}.png" for i in range(10)], _unit_rows(10, 3))]], [])
    with _tmpfs(tmp_path / "ro", "1M") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        for args in (["embed", str(imgs), str(ro / "x.h5"), "--run", str(run), "--backend", "torch", "--workers",
                      "0", "--no-index"],
                     ["merge", str(s0), str(tmp_path / "s1.h5"), str(ro / "m.h5"), "--no-index"]):
            res = CliRunner().invoke(app, [*args, "--quiet"])
            _one_line_error(res, "read-only")
    # An index folder that cannot be written: the store beside it stays as it was.
    before = _sha(st)
    index_dir = tmp_path / "src.h5.index"
    with _tmpfs(index_dir, "1M"):
        subprocess.run(["mount", "-o", "remount,ro", str(index_dir)], check=True)
        _one_line_error(CliRunner().invoke(app, ["index", str(st), "--quiet"]), "read-only")
    assert _sha(st) == before


# --- 11: the smaller cases ------------------------------------------------------------------------

def test_11_temp_files_of_killed_runs_are_removed_by_the_next_run(env, tmp_path):
    base, run, imgs, _ = env
    out = tmp_path / "k3.h5"
    left = [tmp_path / ".k3.h5.x1y2.tmp"]  # what a write killed before its rename leaves
    for p in left:
        p.write_bytes(b"half")
    assert _embed(imgs, out, run, "--no-index").exit_code == 0
    folder = tmp_path / "k3.h5.index"
    folder.mkdir()
    killed_index = [folder / ".level0-20260101T000000.faiss.ab12.tmp", folder / ".index.json.cd34.tmp",
                    folder / "level0-20260101T000000.faiss"]
    for p in killed_index:
        p.write_bytes(b"half")
    assert not any(p.exists() for p in left)
    assert CliRunner().invoke(app, ["index", str(out), "--quiet"]).exit_code == 0
    assert not any(p.exists() for p in killed_index)
    s0 = _write(tmp_path / "m0.h5", 4, shard="0/1", scan_count=4)
    (tmp_path / ".m1.h5.zz.tmp").write_bytes(b"half")
    assert CliRunner().invoke(app, ["merge", str(s0), str(tmp_path / "m1.h5"), "--no-index"]).exit_code == 0
    assert not _temp_files(tmp_path)


def test_11_an_embed_killed_while_indexing_finishes_the_index_when_rerun(env, tmp_path):
    from sjea_tools.index import index_dir, index_is_current

    base, run, imgs, _ = env
    out = tmp_path / "st.h5"
    assert _embed(imgs, out, run, "--no-index").exit_code == 0  # the store was renamed into place...
    index_dir(out).mkdir()
    (index_dir(out) / "level0-20260101T000000.faiss").write_bytes(b"half")  # ...then the kill
    before = _sha(out)
    res = _embed(imgs, out, run, "--json")  # the same command again
    assert res.exit_code == 0, res.output
    assert '"status": "complete"' in res.stdout
    assert index_is_current(out) and not (index_dir(out) / "level0-20260101T000000.faiss").exists()
    with open_store(out) as s:
        assert s.n == 30 and s.attrs["created"]
    sidecar = (index_dir(out) / "index.json").read_text()
    res = _embed(imgs, out, run, "--json")  # and again: nothing left to do, nothing rebuilt
    assert res.exit_code == 0 and '"status": "complete"' in res.stdout
    assert (index_dir(out) / "index.json").read_text() == sidecar


@pytest.mark.parametrize("args,words", [
    (["--commit-every", "-1"], "--commit-every"), (["--commit-every", "nan"], "--commit-every"),
    (["--commit-every", "inf"], "--commit-every"), (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers")])
def test_11_embed_number_options_are_validated(env, tmp_path, args, words):
    base, run, imgs, _ = env
    res = _embed(imgs, tmp_path / "x.h5", run, "--no-index", *args)
    assert res.exit_code == 2 and "Traceback" not in res.output and words in res.output, res.output
    assert not (tmp_path / "x.h5").exists()


def test_11_library_refuses_the_same_numbers(env, tmp_path):
    from sjea_tools.embed import embed_folder
    from sjea_tools.index import build_indexes

    base, run, imgs, _ = env
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(SjeaError, match="--commit-every"):
            embed_folder(imgs, tmp_path / "x.h5", run=run, commit_every_s=bad)
    st = _write(tmp_path / "s.h5", 30)
    for params, words in (({"nprobe": -1}, "--nprobe"), ({"ef_search": 0}, "--ef-search"), ({"nlist": 0}, "--nlist")):
        with pytest.raises(SjeaError, match=words):
            build_indexes(st, kind="hnsw", params=params)
    for budget in ("nan", "inf", "-1G", 0):
        with pytest.raises(SjeaError, match="memory budget"):
            build_indexes(st, memory_budget=budget)


@pytest.mark.parametrize("args", [["--nprobe", "-1"], ["--ef-search", "0"], ["--nlist", "0"],
                                  ["--memory-budget", "nan"]])
def test_11_index_number_options_are_validated(tmp_path, args):
    st = _write(tmp_path / "s.h5", 30)
    res = CliRunner().invoke(app, ["index", str(st), "--kind", "ivf-flat", "--quiet", *args])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "s.h5.index").exists()


def test_11_a_folder_of_empty_files_writes_no_store(env, tmp_path):
    base, run, _, _ = env
    folder = tmp_path / "empty"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"")
    res = _embed(folder, tmp_path / "e.h5", run, "--no-index")
    _one_line_error(res, "none of the 5 images could be embedded (first: 0.png: ")
    assert not (tmp_path / "e.h5").exists() and not partial_path(tmp_path / "e.h5").exists()


def test_11_symlinks_out_of_the_root_are_not_followed_unless_asked(env, tmp_path, fmnist_test):
    base, run, _, _ = env
    secret = write_fmnist_folder(tmp_path / "private", fmnist_test, 2, start=300)
    folder = write_fmnist_folder(tmp_path / "shared", fmnist_test, 4)
    one_secret = sorted(secret.rglob("*.png"))[0]
    (folder / "Bag").mkdir(exist_ok=True)
    (folder / "Bag" / "stolen.png").symlink_to(one_secret)
    (folder / "elsewhere").symlink_to(secret, target_is_directory=True)
    inside = sorted(folder.rglob("*.png"))[0]
    (folder / "Bag" / "alias.png").symlink_to(inside)  # inside the root: fine
    out = tmp_path / "s.h5"
    assert _embed(folder, out, run, "--no-index").exit_code == 0
    with open_store(out) as s:
        assert "Bag/stolen.png" not in s.paths and not any(p.startswith("elsewhere") for p in s.paths)
        assert "Bag/alias.png" in s.paths and s.n == 5
        failed = dict(s.failed)
        assert "outside the image root" in failed["Bag/stolen.png"] and "elsewhere" in failed
    res = _embed(folder, tmp_path / "f.h5", run, "--no-index", "--follow-symlinks")
    assert res.exit_code == 0, res.output
    with open_store(tmp_path / "f.h5") as s:
        assert "Bag/stolen.png" in s.paths and s.n == 8  # 4 + the alias + the 3 files outside


def test_11_a_list_file_may_not_leave_its_folder_unless_allowed(env, tmp_path, fmnist_test):
    base, run, _, _ = env
    outside = write_fmnist_folder(tmp_path / "outside", fmnist_test, 2)
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "l.txt"
    listing.write_text("".join(f"../outside/{p.relative_to(outside)}\n" for p in sorted(outside.rglob("*.png"))))
    res = _embed(listing, tmp_path / "l.h5", run, "--no-index")
    _one_line_error(res, "--allow-outside")
    assert not (tmp_path / "l.h5").exists()
    assert _embed(listing, tmp_path / "l.h5", run, "--no-index", "--allow-outside").exit_code == 0
    with open_store(tmp_path / "l.h5") as s:
        assert not any(p.startswith("..") for p in s.paths)
        assert ".." not in (s.label_names or []) and Path(s.root) == outside.resolve()
