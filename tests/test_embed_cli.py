"""`sjea embed` / `sjea merge` from the command line: output, JSON, and one-line errors on bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_run, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.store import open_store


@pytest.fixture(scope="module")
def env(tmp_path_factory, fmnist_test):
    base = tmp_path_factory.mktemp("cli")
    run = make_run(base / "run")
    other = make_run(base / "other", seed=1)
    folder = write_fmnist_folder(base / "imgs", fmnist_test, 20)
    out = base / "store.h5"
    res = CliRunner().invoke(app, ["embed", str(folder), str(out), "--run", str(run), "--backend", "torch",
                                   "--workers", "0", "--no-index", "--json"])
    assert res.exit_code == 0, res.output
    return base, run, other, folder, out, json.loads(res.stdout)


def test_embed_prints_a_summary_and_json(env, tmp_path):
    base, run, _, folder, out, summary = env
    assert summary["rows"] == 20 and summary["out"] == str(out) and summary["backend"] == "torch"
    res = CliRunner().invoke(app, ["embed", str(folder), str(tmp_path / "x.h5"), "--run", str(run), "--backend",
                                   "torch", "--levels", "0", "--dtype", "float16", "--workers", "0", "--no-index"])
    assert res.exit_code == 0, res.output
    assert "20 rows" in res.output and str(tmp_path / "x.h5") in res.output
    with open_store(tmp_path / "x.h5") as s:
        assert s.levels == [0] and s.attrs["dtype"] == "float16"


def test_embed_then_indexes_and_cluster_tree_unless_no_index(env, tmp_path):
    from sjea_tools.clusters import read_tree
    from sjea_tools.index import index_dir

    base, run, _, folder, out, _ = env
    assert not index_dir(out).exists()  # the fixture passed --no-index
    res = CliRunner().invoke(app, ["embed", str(folder), str(tmp_path / "i.h5"), "--run", str(run), "--backend",
                                   "torch", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert f"search indexes: {index_dir(tmp_path / 'i.h5')}" in res.output
    with open_store(tmp_path / "i.h5") as s:
        assert read_tree(s)[0] is not None


def test_level_is_repeatable_and_levels_still_works(env, tmp_path):
    base, run, _, folder, _, _ = env
    cmd = ["embed", str(folder), "--run", str(run), "--backend", "torch", "--workers", "0", "--no-index"]
    for i, (spelling, want) in enumerate([(["--level", "1", "--level", "0"], [0, 1]), (["-l", "all"], [0, 1]),
                                          (["--levels", "1"], [1])]):
        out = tmp_path / f"s{i}.h5"
        res = CliRunner().invoke(app, [*cmd[:2], str(out), *cmd[2:], *spelling])
        assert res.exit_code == 0, res.output
        with open_store(out) as s:
            assert s.levels == want, spelling
    res = CliRunner().invoke(app, [*cmd[:2], str(tmp_path / "x.h5"), *cmd[2:], "--level", "0", "--levels", "1"])
    _one_line_error(res, "--level")
    assert "(old spelling, removed in the next release)" in CliRunner().invoke(app, ["embed", "--help"],
                                                                           env={"COLUMNS": "400"}).output


def _one_line_error(res, words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert words in " ".join(lines), res.output


def test_a_file_that_is_no_store_is_replaced_only_with_overwrite(env, tmp_path):
    base, run, _, folder, _, _ = env
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"my notes, not a store")
    cmd = ["embed", str(folder), str(junk), "--run", str(run), "--backend", "torch", "--workers", "0", "--no-index"]
    res = CliRunner().invoke(app, cmd)
    _one_line_error(res, "--overwrite")
    assert junk.read_bytes() == b"my notes, not a store"
    res = CliRunner().invoke(app, [*cmd, "--overwrite"])
    assert res.exit_code == 0, res.output
    with open_store(junk) as s:
        assert s.n == 20


@pytest.mark.parametrize("case", ["no images", "missing folder", "output is a folder", "other model", "bad shard",
                                  "exists"])
def test_bad_input_is_one_line_and_leaves_the_store_intact(env, tmp_path, case):
    base, run, other, folder, out, _ = env
    before = out.read_bytes()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    if case == "exists":  # another input, same root (the very same command again is "complete")
        listing = folder / "list-exists.txt"
        listing.write_text("".join(f"{p.relative_to(folder)}\n" for p in sorted(folder.rglob("*.png"))[:5]))
    args = {
        "no images": ([str(tmp_path / "empty"), str(out)], "no images"),
        "missing folder": ([str(tmp_path / "nope"), str(out)], "does not exist"),
        "output is a folder": ([str(folder), str(tmp_path)], "is a folder"),
        "other model": ([str(folder), str(out), "--run", str(other), "--update"], "another model"),
        "bad shard": ([str(folder), str(out), "--shard", "3/2"], "--shard 3/2"),
        "exists": ([str(folder / "list-exists.txt"), str(out)], "--update"),
    }[case]
    extra = [] if "--run" in args[0] else ["--run", str(run)]
    res = CliRunner().invoke(app, ["embed", *args[0], *extra, "--backend", "torch", "--workers", "0", "--no-index"])
    _one_line_error(res, args[1])
    assert out.read_bytes() == before
    assert not out.with_name(out.name + ".partial").exists()


def test_merge_refuses_non_shards_in_one_line(env, tmp_path):
    base, run, _, folder, out, _ = env
    res = CliRunner().invoke(app, ["merge", str(out), str(tmp_path / "m.h5"), "--no-index"])
    _one_line_error(res, "not a shard")
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "m.h5")])
    _one_line_error(res, "sjea merge out-*.h5 out.h5")
    assert not (tmp_path / "m.h5").exists()


def test_update_follows_the_folder_and_says_what_changed(env, tmp_path):
    import shutil

    _, run, other, folder, _, _ = env
    mine = tmp_path / "imgs"
    shutil.copytree(folder, mine)
    out = tmp_path / "u.h5"
    base = ["embed", str(mine), str(out), "--backend", "torch", "--workers", "0", "--no-index"]
    assert CliRunner().invoke(app, [*base, "--run", str(run)]).exit_code == 0
    files = sorted(p for p in mine.rglob("*.png"))
    files[0].unlink()
    shutil.copyfile(files[1], mine / "loose.png")  # a loose file: labels kept, "(root)" for it
    res = CliRunner().invoke(app, [*base, "--update"])  # no --run: the store's own model
    assert res.exit_code == 0, res.output
    assert "1 row(s) of vanished files removed" in res.output and "20 rows" in res.output
    with open_store(out) as s:
        assert s.label_names is not None and "(root)" in s.label_names
    res = CliRunner().invoke(app, [*base, "--update", "--json"])
    assert json.loads(res.stdout)["status"] == "up to date"
    res = CliRunner().invoke(app, [*base, "--update", "--run", str(other)])
    _one_line_error(res, "written by another model")
    assert "without --run/--onnx" in res.output and "new file" in res.output
    _one_line_error(CliRunner().invoke(app, [*base, "--keep-missing"]), "--keep-missing applies to --update")
