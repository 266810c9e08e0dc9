"""`sjea train` on a user's messy folder of real colour photos (tests/photo_folder.py): broken files
skipped and named, a recipe chosen from the data and shown by --dry-run, a failed start that does
not block the rerun, one-line refusals, plain progress lines off a terminal, a summary, the
collapse warning only when it persists, and LATEST pointers that never replace a user's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sjea_tools

from photo_folder import BROKEN, make_photo_folder
from test_train import run_cli

FAST = ["--workers", "0", "--max-steps", "3", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 readable photos (40-120 px, JPEG and PNG, 6 classes, a nested folder) and 3 broken files."""
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=4)


def test_broken_files_are_skipped_listed_and_the_config_is_resolved(tmp_path, photos):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "LATEST").write_text("my own notes\n")  # a user's file beside the run
    result = run_cli(["train", "--dataset", str(photos["root"]), "--batch-size", "8", "--out", "mine/run", *FAST],
                     tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "mine" / "run"
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert [row["path"] for row in skipped] == sorted(BROKEN)
    assert "truncated" in skipped[0]["reason"]
    for name in BROKEN:  # named in the printed summary too
        assert name in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["images"], summary["skipped"], summary["steps"]) == (len(photos["images"]), 3, 3)
    assert [sorted(lv) for lv in summary["final"]["levels"]] == [["covariance", "invariance", "loss", "variance"]] * 2
    # 24 images are too few to whiten any level: each is centred only, and the summary says what it needs.
    assert summary["scores"]["whitened_levels"] == [] and sorted(summary["scores"]["centred_only"]) == ["0", "1"]
    assert "level 0 centred only (whitening a" in result.output
    assert sjea_tools.load_model(run).whitenings is None and sjea_tools.load_model(run).centres is not None
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["image_size"] is not None and len(data["mean"]) == 3 and len(data["std"]) == 3
    # Off a terminal (CliRunner is not one), progress comes as plain lines, the last step included.
    assert "decoding: 27/27" in result.output and "step 3/3" in result.output
    assert (tmp_path / "mine" / "LATEST").read_text() == "my own notes\n"
    # --out outside runs/: no pointer written anywhere, the note says to pass --run
    assert not (tmp_path / "runs").exists() and "pass --run" in result.output


def test_dry_run_shows_the_recipe_chosen_from_the_folder(tmp_path, photos):
    result = run_cli(["train", "--dataset", str(photos["root"]), "--dry-run", "--json", "--workers", "0"], tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    cfg, plan = summary["config"], summary["plan"]
    # 40-120 px photos: trained at their median short side (under the 64 px folder size), colour measured.
    assert 16 <= cfg["data"]["image_size"] < 64 and summary["data"]["colour_mode"] == "RGB"
    assert cfg["data"]["mean"][0] != cfg["data"]["mean"][2]  # measured per channel, not a grey default
    # 27 files: the batch halves to 16 (one step per epoch), epochs rise to the cap of 300.
    assert (cfg["train"]["batch_size"], cfg["train"]["epochs"]) == (16, 300)
    assert (plan["images"], plan["steps_per_epoch"], plan["total_steps"], plan["too_short"]) == (27, 1, 300, True)
    assert summary["estimate"]["seconds"] > 0 and summary["estimate"]["timed_steps"] == 2
    assert sorted(Path(p).relative_to(photos["root"]).as_posix() for p in summary["data"]["unreadable_in_sample"]) \
        == sorted(BROKEN)
    assert not (tmp_path / "runs").exists()

    text = run_cli(["train", "--dataset", str(photos["root"]), "--dry-run", "--batch-size", "8", "--epochs", "2",
                    "--workers", "0"], tmp_path)
    assert text.exit_code == 0, text.output
    assert f"resolved: image_size {cfg['data']['image_size']}, mean (" in text.output
    assert "images: 27; steps: 3 per epoch (batch 8) x 2 epochs = 6" in text.output
    assert "estimated time: about" in text.output and "likely too short to learn" in text.output


def test_given_batch_and_epochs_are_kept(tmp_path, photos):
    from sjea_tools.config import resolve_config
    from sjea_tools.data import load_dataset
    from sjea_tools.data.recipe import resolve_recipe

    cfg = resolve_config("tiny", overrides={"data.dataset": str(photos["root"]), "train.batch_size": 4,
                                            "train.epochs": 2})
    resolved, facts = resolve_recipe(cfg, load_dataset(str(photos["root"])), fixed={"train.batch_size", "train.epochs"})
    assert (resolved.train.batch_size, resolved.train.epochs) == (4, 2)
    assert resolved.data.image_size == max(16, min(64, facts.median_short_side))


def test_grey_folder_gets_grey_statistics_at_its_own_size(tmp_path, fmnist_test, write_fmnist_folder):
    from sjea_tools.config import resolve_config
    from sjea_tools.data import load_dataset
    from sjea_tools.data.recipe import resolve_recipe

    root = write_fmnist_folder(tmp_path / "fm", fmnist_test, 40)
    cfg = resolve_config("tiny", overrides={"data.dataset": str(root)})
    resolved, facts = resolve_recipe(cfg, load_dataset(str(root)))
    assert resolved.data.image_size == 28 and facts.colour_mode == "grayscale"
    assert len(set(resolved.data.mean)) == 1 and len(set(resolved.data.std)) == 1


def test_folder_smaller_than_a_batch_is_one_line(tmp_path, photos):
    result = run_cli(["train", "--dataset", str(photos["root"]), "--batch-size", "64", *FAST, "--out", "runs/s"],
                     tmp_path)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if not line.startswith("decoding:")]  # progress lines
    assert lines == ["error: 24 readable images (3 unreadable skipped) are fewer than one batch of 64; pass "
                     "--batch-size 16 or less, or add images."], result.output
    assert not (tmp_path / "runs" / "s").exists()


def test_a_failed_start_does_not_block_the_rerun(tmp_path, photos, monkeypatch):
    import sjea_tools.trainers.trainer as trainer

    real = trainer.build_training
    monkeypatch.setattr(trainer, "build_training", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room")))
    args = ["train", "--dataset", str(photos["root"]), "--batch-size", "8", *FAST, "--out", "runs/f", "--quiet"]
    failed = run_cli(args, tmp_path)
    assert isinstance(failed.exception, MemoryError)
    assert not (tmp_path / "runs" / "f").exists()
    monkeypatch.setattr(trainer, "build_training", real)
    # What a SIGKILL at the same point leaves (the saved config alone) does not block it either.
    from sjea_tools.config import resolve_config, save_config

    (tmp_path / "runs" / "f").mkdir(parents=True)
    save_config(resolve_config("tiny"), tmp_path / "runs" / "f" / "config.json")
    again = run_cli(args, tmp_path)
    assert again.exit_code == 0, again.output
    assert (tmp_path / "runs" / "f" / "model.pt").is_file()


def test_a_users_own_config_file_in_the_out_folder_is_not_a_failed_start(tmp_path):
    from sjea_tools.errors import SjeaError
    from sjea_tools.runs import is_failed_start, prepare_run_dir
    from sjea_tools.config import resolve_config

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "config.json").write_text('{"train": {"epochs": 2}}')
    assert not is_failed_start(folder)
    with pytest.raises(SjeaError, match="already exists"):
        prepare_run_dir(resolve_config("tiny"), folder, overwrite=False, runs_dir=tmp_path / "runs")
    assert (folder / "config.json").read_text() == '{"train": {"epochs": 2}}'


def test_latest_pointer_replaces_only_its_own_kind(tmp_path):
    from sjea_tools.config import resolve_config, save_config
    from sjea_tools.runs import set_latest

    runs, run = tmp_path / "runs", tmp_path / "elsewhere" / "run"
    run.mkdir(parents=True)
    save_config(resolve_config("tiny"), run / "config.json")
    runs.mkdir()
    assert set_latest(run, runs) and (runs / "LATEST").read_text() == f"{run.resolve()}\n"
    assert not (run.parent / "LATEST").exists()  # the run's own parent is not a runs root
    other = tmp_path / "gone"  # a pointer to a run deleted since is still sjea's: replaced
    (runs / "LATEST").write_text(f"{other}\n")
    assert set_latest(run, runs)
    for users in ("todo: buy milk\n", f"{tmp_path}\n", "/a\n/b\n"):  # not a pointer to a run folder
        (runs / "LATEST").write_text(users)
        assert not set_latest(run, runs)
        assert (runs / "LATEST").read_text() == users


def test_collapse_warns_only_when_two_checks_in_a_row_flag_it():
    from sjea_tools.cli.common import err_console
    from sjea_tools.cli.train import _CollapseWatch

    watch = _CollapseWatch()
    with err_console.capture() as seen:
        watch.epoch({"epoch": 1, "collapsed_levels": [1]})  # epoch 1 alone: the usual transient
        watch.epoch({"epoch": 2, "collapsed_levels": []})
        watch.epoch({"epoch": 3, "collapsed_levels": [0]})
    assert seen.get() == ""
    with err_console.capture() as seen:
        watch.epoch({"epoch": 4, "collapsed_levels": [0]})
        watch.epoch({"epoch": 5, "collapsed_levels": [0]})  # said once
    assert seen.get().count("look collapsed") == 1 and "[0]" in seen.get()


def test_summary_reports_collapse_at_the_end_only_when_it_persists(tmp_path):
    from sjea_tools.trainers.trainer import run_summary

    def epoch(e, flagged):
        return {"kind": "epoch", "epoch": e, "step": e, "collapsed_levels": flagged,
                "levels": [{"std": 0.01, "effective_rank": 1.0, "dim": 8}]}

    for rows, persistent, last in (([epoch(1, [0]), epoch(2, [])], [], []), ([epoch(1, [0]), epoch(2, [0])], [0], [0]),
                                   ([epoch(1, []), epoch(2, [0])], [], [0])):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = run_summary(tmp_path, 10, {}, 2, 1, 1.0)
        assert summary["collapse"]["collapsed_levels"] == persistent
        assert summary["collapse"]["flagged_last_check"] == last
