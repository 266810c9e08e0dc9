"""The README's "Your own photos" walkthrough, run as written on a messy folder of real photos
(tests/photo_folder.py: JPEG and PNG of mixed sizes, a nested folder, three broken files): the
commands are read from the README, so the doc and this test cannot drift. Each step must exit 0
without a traceback and leave what it promises; `sjea serve` is started on a free port of
127.0.0.1, asked one question, and stopped."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from photo_folder import make_photo_folder

README = Path(__file__).resolve().parents[1] / "README.md"
CLI = [sys.executable, "-c", "from sjea_tools.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "200"}
STEP_TIMEOUT = 300


def walkthrough_commands() -> list[list[str]]:
    """The `sjea ...` lines of the README's "Your own photos" code block, comments dropped."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Your own photos", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("sjea ")]


COMMANDS = walkthrough_commands()


def step_id(args: list[str]) -> str:
    return "-".join(a.lstrip("-") for a in args[1:] if a in (args[1], "--dry-run"))


def run_serve(args: list[str], cwd: Path) -> dict:
    """`sjea serve STORE` on a free port: its URL from the ready line, one /api/info answer, then stop."""
    proc = subprocess.Popen(CLI + args[1:] + ["--host", "127.0.0.1", "--port", "0"], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(STEP_TIMEOUT, proc.kill)  # never hang the suite on a server that stays silent
    watchdog.start()
    lines, info = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/)", line):
                with urllib.request.urlopen(m.group(1) + "api/info", timeout=60) as r:
                    info = json.loads(r.read())
                break
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=60)
        watchdog.cancel()
    return {"rc": 0 if info is not None else proc.returncode, "out": "".join(lines) + rest, "info": info}


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> dict:
    """Every step run in order in one folder: {step id: {"rc", "out"[, "info"]}}."""
    cwd = tmp_path_factory.mktemp("walkthrough")
    folder = make_photo_folder(cwd / "photos")
    # A user's folder holds copies: one photo saved twice under another name, for `sjea duplicates`.
    original = next(p for p in folder["images"] if not p.startswith("cat/"))
    copy = original.rsplit(".", 1)[0] + "_copy." + original.rsplit(".", 1)[1]
    shutil.copyfile(folder["root"] / original, folder["root"] / copy)
    folder = {**folder, "images": sorted([*folder["images"], copy]), "copy": (original, copy)}
    results = {"folder": folder, "cwd": cwd}
    for args in COMMANDS:
        if args[1] == "serve":
            results[step_id(args)] = run_serve(args, cwd)
        else:
            done = subprocess.run(CLI + args[1:], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=STEP_TIMEOUT)
            results[step_id(args)] = {"rc": done.returncode, "out": done.stdout + done.stderr,
                                      "after": sorted(p.name for p in cwd.iterdir())}
    return results


def check_dry_run(cwd: Path, out: str, folder: dict, after: list[str]) -> None:
    assert "images: " in out and "estimated time" in out and "resolved: image_size" in out
    assert after == ["photos"]  # a dry run writes nothing


def check_train(cwd: Path, out: str, folder: dict) -> None:
    run = cwd / "runs" / "photos"
    assert (run / "model.pt").is_file() and (run / "config.json").is_file()
    skipped = (run / "skipped.jsonl").read_text()
    assert all(name in skipped and name in out for name in folder["broken"])


def check_embed(cwd: Path, out: str, folder: dict) -> None:
    from sjea_tools.store import open_store

    with open_store(cwd / "photos.h5") as store:
        assert sorted(store.paths) == folder["images"]
    assert (cwd / "photos.h5.index").is_dir()
    assert f"{len(folder['broken'])} failed" in out


def check_search(cwd: Path, out: str, folder: dict) -> None:
    rows = re.findall(r"│\s+(\d+) │ ([\d.]+) │ (\S+)", out)
    assert rows and rows[0][0] == "1" and rows[0][2] == "cat/cat_000.jpg", out[:2000]


def check_duplicates(cwd: Path, out: str, folder: dict) -> None:
    original, copy = folder["copy"]
    assert original in out and copy in out, out


def check_eval(cwd: Path, out: str, folder: dict) -> None:
    assert "random init" in out and "pixels" in out
    assert (cwd / "photos.h5.eval.json").is_file()


def check_serve(cwd: Path, out: str, folder: dict, info: dict) -> None:
    assert info["n"] == len(folder["images"]) and info["cluster_tree"] is True


CHECKS = {"train-dry-run": check_dry_run, "train": check_train, "embed": check_embed, "search": check_search,
          "duplicates": check_duplicates, "eval": check_eval, "serve": check_serve}


def test_the_readme_walkthrough_is_the_one_tested():
    assert [step_id(a) for a in COMMANDS] == list(CHECKS)
    assert all(a[0] == "sjea" for a in COMMANDS)


@pytest.mark.parametrize("step", list(CHECKS))
def test_walkthrough_step(walkthrough, step):
    result = walkthrough[step]
    assert result["rc"] == 0, result["out"][-3000:]
    assert "Traceback" not in result["out"], result["out"][-3000:]
    extra = (result["info"],) if step == "serve" else (result["after"],) if step == "train-dry-run" else ()
    CHECKS[step](walkthrough["cwd"], result["out"], walkthrough["folder"], *extra)
