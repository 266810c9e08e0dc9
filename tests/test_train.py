"""`sjea train` end to end on real Fashion-MNIST: levels, encoder kinds, resume after SIGKILL,
torchrun with gloo, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sjea_tools
from conftest import kill, start_paused
from sjea_tools.cli import app
from sjea_tools.data import load_dataset

SJEA = str(Path(sys.executable).with_name("sjea"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# Small but real: 512 Fashion-MNIST images, batches of 32.
SMALL = ["--limit", "512", "--batch-size", "32", "--workers", "0", "--quiet"]


def run_cli(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


@pytest.mark.parametrize("levels,encoder,level_input,stop_gradient", [
    (1, "mlp", "representation", False),
    (2, "mlp", "embedding", True),
    (2, "resnet", "representation", False),
    (3, "resnet", "embedding", False),
    (3, "mlp", "representation", True),
])
def test_levels_and_encoder_kinds_train(tmp_path, levels, encoder, level_input, stop_gradient):
    args = ["train", *SMALL, "--max-steps", "3", "--out", "runs/x", "--levels", str(levels), "--encoder", encoder,
            "--level-input", level_input, "--stop-gradient" if stop_gradient else "--no-stop-gradient",
            "--set", "train.log_every=1"]
    result = run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "x"
    assert steps_logged(run) == [1, 2, 3]
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["levels"]) == levels for r in rows)
    assert all(set(r["levels"][0]) == {"loss", "invariance", "variance", "covariance"} for r in rows)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["levels"] == levels and saved["model"]["encoder"] == encoder
    assert saved["model"]["stop_gradient"] == stop_gradient
    model = sjea_tools.load_model(run)
    assert not model.training and model.num_levels == levels
    # The centring means are fixed at the end: each level's mean over the 512 training images.
    from sjea_tools.trainers.centring import level_centring, training_pixels

    want = level_centring(model, training_pixels(model.cfg))[0]
    assert model.centres is not None
    for got, mean in zip(model.centres, want):
        torch.testing.assert_close(got, mean, rtol=0, atol=1e-5)
    ys = model.forward_levels(torch.randn(4, 3, 28, 28))
    assert [y.shape for y in ys] == [torch.Size([4, d]) for d in model.level_dims]
    # The latest-run pointer lets later commands find it without options.
    assert Path((tmp_path / "runs" / "LATEST").read_text().strip()) == run.resolve()


def test_epoch_metrics_report_std_and_effective_rank(tmp_path):
    result = run_cli(["train", *SMALL, "--epochs", "1", "--out", "runs/e", "--levels", "2"], tmp_path)
    assert result.exit_code == 0, result.output
    rows = [json.loads(r) for r in (tmp_path / "runs/e/metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 1 and len(epochs[0]["levels"]) == 2
    assert isinstance(epochs[0]["collapse_warning"], bool)
    # Recomputed here, in numpy, on the same fixed images (the first 512 training images, as many
    # as --limit keeps) with the saved model: one epoch ends at the last step, so it is the model
    # the statistics were measured on.
    model = sjea_tools.load_model(tmp_path / "runs/e")
    pixels = load_dataset("fashion-mnist", split="train").pixels[:512].astype(np.float32) / 255
    x = (pixels - np.array(model.mean, np.float32)) / np.array(model.std, np.float32)
    with torch.no_grad():
        zs = model.forward_embeddings(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    for level, z in zip(epochs[0]["levels"], zs):
        z = z.double().numpy()
        rows_unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        singular = np.linalg.svd(z, compute_uv=False)
        p = singular / singular.sum()
        assert level["dim"] == z.shape[1]
        assert level["std"] == pytest.approx(rows_unit.std(axis=0, ddof=1).mean(), rel=1e-3)
        assert level["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-3)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    common = ["train", "--limit", "384", "--batch-size", "32", "--workers", "0", "--epochs", "2", "--levels", "2",
              "--set", "train.checkpoint_every=4", "--set", "train.log_every=1"]
    total = 2 * (384 // 32)
    # Uninterrupted reference.
    ref = subprocess.run([SJEA, *common, "--out", "runs/ref", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    # Killed run: SIGKILLed at an event, not a time: once step 6's metrics row is written (the
    # checkpoint of step 4 exists and training went past it) the run waits to be killed.
    proc = start_paused(METRICS_PAUSE.format(step=6), [*common, "--out", "runs/k", "--quiet"], cwd=tmp_path)
    kill(proc)
    run = tmp_path / "runs/k"
    assert steps_logged(run) == list(range(1, 7)) and not (run / "model.pt").exists()
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == 4
    resumed = subprocess.run([SJEA, "train", "--resume", "runs/k", "--quiet"], cwd=tmp_path, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert steps_logged(run) == list(range(1, total + 1))  # no step lost or logged twice
    assert not list(run.rglob("*.tmp"))
    # Exact continuation: the steps right after the checkpoint see the same weights, optimiser
    # state, lr, batch and augmentation as the uninterrupted run, so their losses agree. (Weights
    # after many more steps are not compared: float reductions may differ in the last bit between
    # processes, and Adam amplifies that over steps.)
    resumed_loss = step_losses(run)
    reference_loss = step_losses(tmp_path / "runs/ref")
    first = ckpt["step"] + 1
    for step in range(first, first + 3):
        assert resumed_loss[step] == pytest.approx(reference_loss[step], rel=1e-5), f"step {step}"
    assert resumed_loss[total] == pytest.approx(reference_loss[total], rel=0.05)
    sjea_tools.load_model(run)


# Pauses `sjea train` right after the metrics row of step {step} is written.
METRICS_PAUSE = """
from sjea_tools.trainers import trainer

write = trainer.MetricsLog.write

def write_then_maybe_pause(self, row):
    write(self, row)
    if row.get("kind") == "step" and row["step"] == {step}:
        pause()

trainer.MetricsLog.write = write_then_maybe_pause
"""


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}


def test_torchrun_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29531", SJEA, "train", "--preset", "tiny", *SMALL,
         "--max-steps", "4", "--out", "runs/ddp", "--set", "train.log_every=1"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/ddp"
    assert steps_logged(run) == [1, 2, 3, 4]  # rank 0 alone writes
    assert len(list((run / "checkpoints").iterdir())) == 1
    assert sjea_tools.load_model(run).centres is not None  # rank 0 fixes the centring means at the end


# The trainer's own set-up and step (sjea_tools.trainers.trainer.build_training / train_step) under torchrun,
# fed fixed views so that a single process can repeat the same training.
DDP_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from sjea_tools.config import RunConfig
    from sjea_tools.trainers.distributed import cleanup_distributed, process_device, setup_distributed
    from sjea_tools.trainers.trainer import build_training, train_step

    torch.set_num_threads(1)
    folder = sys.argv[1]
    cfg = RunConfig.from_dict(__import__("json").load(open(f"{folder}/config.json")))
    views = np.load(f"{folder}/views.npz")
    info = setup_distributed(cfg.train.device)
    assert info.world_size == 2
    torch.manual_seed(0)
    t = build_training(cfg, info, process_device(cfg.train.device, info), steps_per_epoch=len(views["v1"]))
    rows = slice(info.rank * cfg.train.batch_size, (info.rank + 1) * cfg.train.batch_size)
    for step in range(len(views["v1"])):
        train_step(t, torch.from_numpy(views["v1"][step, rows]), torch.from_numpy(views["v2"][step, rows]), step)
    np.savez(f"{folder}/rank{info.rank}.npz", **{n: p.detach().numpy() for n, p in t.model.named_parameters()})
    cleanup_distributed()
    """
)


def test_torchrun_ranks_hold_the_weights_of_one_process_on_the_whole_batch(tmp_path):
    from sjea_tools.config import resolve_config, save_config
    from sjea_tools.data.augment import two_views
    from sjea_tools.losses import stacked_vicreg_loss
    from sjea_tools.models import build_model
    from sjea_tools.trainers.optim import build_optimizer

    steps, local = 2, 16
    # LARS (momentum SGD with a per-layer trust ratio) at a constant lr: its update is linear in the
    # gradient, so float noise in a gradient stays noise-sized in the weights. (Adam's first steps
    # are about lr x sign(gradient): an element whose gradient is below the float noise of the
    # reduction moves by +lr on one side and -lr on the other.)
    cfg = resolve_config("tiny", overrides={"train.batch_size": local, "train.device": "cpu", "optim.optimizer": "lars",
                                            "optim.lr": 1.0, "optim.warmup_epochs": 0, "optim.final_lr_ratio": 1.0})
    pixels = torch.from_numpy(load_dataset("fashion-mnist", split="train").pixels[:steps * 2 * local])
    g = torch.Generator().manual_seed(0)
    batches = [two_views(b, cfg.data, cfg.image_size, cfg.mean, cfg.std, g) for b in pixels.split(2 * local)]
    np.savez(tmp_path / "views.npz", v1=torch.stack([b[0] for b in batches]).numpy(),
             v2=torch.stack([b[1] for b in batches]).numpy())
    save_config(cfg, tmp_path / "config.json")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "worker.py"),
                             str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    for name in ranks[0]:  # gradients were averaged: both ranks took the same steps
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)

    # One process, the whole batch of 2 x 16 per step. On CPU each rank's BatchNorm normalises its
    # own 16 rows (no SyncBatchNorm there), so the reference forwards the two halves separately,
    # then computes the loss on the concatenated embeddings.
    torch.manual_seed(0)
    model = build_model(cfg).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model.parameters(), cfg.optim, 2 * local)
    for v1, v2 in batches:
        z1 = [torch.cat(z) for z in zip(*(model.forward_train(h)[1] for h in v1.split(local)))]
        z2 = [torch.cat(z) for z in zip(*(model.forward_train(h)[1] for h in v2.split(local)))]
        loss, _ = stacked_vicreg_loss(z1, z2, cfg.per_level("sim_coeff"), cfg.per_level("std_coeff"),
                                      cfg.per_level("cov_coeff"), cfg.per_level("level_weights"), gather=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in model.named_parameters())
    worst = max(float((p.detach() - torch.from_numpy(ranks[0][n])).abs().max()) for n, p in model.named_parameters())
    # Measured: weights moved by up to 0.19; the ranks ended 1.5e-6 from the reference with LARS
    # applied to every parameter, and 2.9e-4 once biases and norm weights were excluded from the
    # trust ratio as in the official VICReg (plain momentum SGD at lr 1 on them amplifies the
    # reduction-order noise). Without gradient averaging every element differs by about the
    # distance moved, so a bound of 0.5% of it still tells the two apart. Two steps only: this
    # small-batch training is chaotic (a one-ulp change of every initial weight moves the weights
    # by 1.7e-2 after these two steps).
    assert moved > 0.05
    assert worst < 5e-3 * moved, (worst, moved)


def test_dry_run_prints_method_parameter_counts(tmp_path):
    result = run_cli(["train", "--preset", "cifar10-paper", "--dry-run", "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [(lv["encoder"], lv["projector"]) for lv in summary["levels"]] == [(11_168_832, 658_688),
                                                                              (11_167_680, 658_688)]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "unknown preset"),
    (["--bogus-option"], "No such option"),
    (["--dataset", "imagenet-22k"], "unknown dataset"),
    (["--levels", "0"], "--levels must be 1 or more"),
    (["--batch-size", "1"], "--batch-size must be 2 or more"),
    (["--config", "missing.yaml"], "cannot read config file"),
    (["--config", "bad.yaml"], "not valid"),
    (["--data-dir", "empty"], "Fashion-MNIST train files not found"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "empty").mkdir()
    result = subprocess.run([SJEA, "train", *SMALL, *args, "--max-steps", "1", "--out", "runs/b"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path):
    first = run_cli(["train", *SMALL, "--max-steps", "1", "--out", "runs/x"], tmp_path)
    assert first.exit_code == 0, first.output
    before = (tmp_path / "runs/x/model.pt").read_bytes()
    again = subprocess.run([SJEA, "train", *SMALL, "--max-steps", "1", "--out", "runs/x"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (tmp_path / "runs/x/model.pt").read_bytes() == before  # nothing touched
    replaced = run_cli(["train", *SMALL, "--max-steps", "2", "--out", "runs/x", "--overwrite"], tmp_path)
    assert replaced.exit_code == 0, replaced.output
    assert steps_logged(tmp_path / "runs/x")[-1] == 2


def test_training_whitens_each_level_with_ten_images_per_dimension(tmp_path):
    # 512 training images: enough for a 32-wide level 1 (320 needed), not for level 0 (256 wide: 2,560).
    result = run_cli(["train", *SMALL, "--max-steps", "2", "--out", "runs/w", "--levels", "2", "--encoder", "mlp",
                      "--set", "model.mlp_dims=128-32"], tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "w"
    model = sjea_tools.load_model(run)
    assert model.level_dims[1] == 32 and model.level_dims[0] * 10 > 512
    assert model.whitenings[0] is None and tuple(model.whitenings[1].shape) == (32, 32)
    from sjea_tools.trainers.centring import level_centring, training_pixels

    means, whitenings = level_centring(model, training_pixels(model.cfg))
    torch.testing.assert_close(model.whitenings[1], whitenings[1], rtol=1e-4, atol=1e-4)
    summary = json.loads((run / "summary.json").read_text())["scores"]
    assert summary["whitened_levels"] == [1] and list(summary["centred_only"]) == ["0"]
    assert "level 1 centred and whitened; level 0 centred only" in result.output
