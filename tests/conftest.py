"""Shared fixtures: small real runs and folders of real Fashion-MNIST images.

`make_run` saves a randomly initialised model as a run folder (what `sjea train` writes at the
end), so export/embed/search tests need no training; tests that claim quality train for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread per test process: the suite runs with one pytest-xdist worker per core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist_test():
    from sjea_tools.data import load_dataset

    return load_dataset("fashion-mnist", split="test")


def make_run(run_dir: Path, levels: int = 2, encoder: str = "mlp", seed: int = 0, centred: bool = False,
             whitened: bool = False, **model_overrides) -> Path:
    """A run folder holding a randomly initialised tiny model, as `sjea train` lays it out; with
    `centred`, its centring means taken over 1,000 Fashion-MNIST test images as training's end
    takes them (trainers.centring), else none (a run trained before centring); with `whitened`,
    means and whitening over 6,000 (ten images per dimension of the default 512-wide level 1)."""
    from sjea_tools.config import resolve_config, save_config
    from sjea_tools.models import build_model
    from sjea_tools.runs import save_model, set_latest

    overrides = {"model.levels": levels, "model.encoder": encoder, "name": Path(run_dir).name}
    overrides.update({f"model.{k}": v for k, v in model_overrides.items()})
    cfg = resolve_config("tiny", overrides=overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    # A few forward passes in train mode give BatchNorm real running statistics.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.forward_train(torch.randn(32, 3, cfg.image_size, cfg.image_size))
    if centred or whitened:
        from sjea_tools.data import load_dataset
        from sjea_tools.trainers.centring import level_centring

        means, whitenings = level_centring(model, load_dataset("fashion-mnist", split="test").pixels[:6000 if whitened
                                                                                                      else 1000])
        model.set_centres(means, whitenings if whitened else None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    save_model(run_dir, model, cfg)
    set_latest(run_dir, runs_dir=run_dir.parent)  # not the cwd: tests must not touch ./runs
    return run_dir


@pytest.fixture(name="make_run")
def make_run_fixture():
    return make_run


def write_fmnist_folder(root: Path, data, n: int, fmt: str = "png", start: int = 0) -> Path:
    """n real Fashion-MNIST images as files in class sub-folders."""
    from PIL import Image

    root = Path(root)
    for i in range(start, start + n):
        cls = data.class_names[int(data.labels[i])].replace("/", "-").replace(" ", "_")
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.pixels[i]).save(root / cls / f"{i:05d}.{fmt}")
    return root


@pytest.fixture(name="write_fmnist_folder")
def write_fmnist_folder_fixture():
    return write_fmnist_folder


def indexed_store(root: Path, data, n: int, name: str = "emb.h5") -> dict:
    """A real store of n Fashion-MNIST images, embedded and indexed (with its cluster tree) by a
    fresh 2-level run: {"root", "run", "images", "out", "paths"}."""
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.store import open_store

    run = make_run(root / "runs" / "tiny", levels=2)
    images = write_fmnist_folder(root / "imgs", data, n)
    out = root / name
    embed_and_index(images, out, run=run, backend="torch", workers=0)
    with open_store(out) as s:
        paths = s.paths
    return {"root": root, "run": run, "images": images, "out": out, "paths": paths}


# --- kills placed by events, not by time ---------------------------------------------------------

PAUSED = "sjea-test: paused at the kill point"
# `sjea ARGS` in a subprocess with `patch` applied first: the patch calls pause() at the event the
# test wants to kill at; the process then says so on stdout and waits there until it is killed.
PAUSING_CLI = """
import sys
PAUSED = {paused!r}

def pause():
    print(PAUSED, flush=True)
    sys.stdin.read()  # the test SIGKILLs the process while it waits here
    raise SystemExit("the test closed stdin instead of killing this run")

{patch}
from sjea_tools.cli import main
sys.argv[0] = "sjea"
main()
"""


def start_paused(patch: str, args: list[str], cwd: Path | None = None):
    """Start `sjea ARGS` with `patch` applied and return it once it waits at its pause() (its
    stdout is read up to that point); fails when the command ends before reaching it."""
    import subprocess
    import sys
    import tempfile
    import textwrap

    err = tempfile.TemporaryFile(mode="w+")
    script = PAUSING_CLI.format(paused=PAUSED, patch=textwrap.dedent(patch))
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    for line in proc.stdout:
        if line.strip() == PAUSED:
            return proc
    proc.wait()
    err.seek(0)
    raise AssertionError(f"the command ended (exit {proc.returncode}) before its kill point: {err.read()[-2000:]}")


def kill(proc) -> None:
    """SIGKILL a process start_paused returned, and reap it."""
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


# Pauses an embed when a journal commit counts `rows` rows or more: "before-commit" after the
# batch's data were written and fsynced, before commit.json counts them (the resume must cut
# them off); "after-commit" once commit.json is in place.
JOURNAL_PAUSE = """
import json
from pathlib import Path
from sjea_tools.store import journal

WHEN, ROWS = {when!r}, {rows!r}
write = journal.atomic_write_text

def write_then_maybe_pause(path, text, *args, **kwargs):
    due = Path(path).name == "commit.json" and json.loads(text)["rows"] >= ROWS
    if due and WHEN == "before-commit":
        pause()
    write(path, text, *args, **kwargs)
    if due and WHEN == "after-commit":
        pause()

journal.atomic_write_text = write_then_maybe_pause
"""


def journal_pause(when: str, rows: int) -> str:
    assert when in ("before-commit", "after-commit"), when
    return JOURNAL_PAUSE.format(when=when, rows=rows)
