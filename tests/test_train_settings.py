"""Training settings that must mean what they say: resume uses the run's own config from the start,
the NaN message names a command that works, max_steps stops early, and the official VICReg LARS
setting (lr, weight decay, eta, exclusions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sjea_tools.config import resolve_config

from test_train import SMALL, run_cli, steps_logged  # the CLI helpers of the training tests


def test_resume_uses_the_runs_device_and_seed_from_the_start(tmp_path, monkeypatch):
    import sjea_tools.trainers.trainer as trainer

    first = run_cli(["train", *SMALL, "--device", "cpu", "--seed", "7", "--epochs", "1", "--max-steps", "3",
                     "--out", "runs/r", "--set", "train.checkpoint_every=1"], tmp_path)
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "r"
    # Make the checkpoint look interrupted at step 3 of a longer run: resume must continue it.
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    state["config"]["train"]["max_steps"] = 5
    torch.save(state, run / "checkpoints" / "last.pt")

    seen = {"devices": [], "seeds": [], "distributed": []}
    real_device, real_seed, real_setup = trainer.process_device, torch.manual_seed, trainer.setup_distributed
    monkeypatch.setattr(trainer, "process_device",
                        lambda req, info: seen["devices"].append(req) or real_device(req, info))
    monkeypatch.setattr(trainer.torch, "manual_seed", lambda s: seen["seeds"].append(s) or real_seed(s))
    # setup_distributed picks its backend (NCCL or gloo) from the device it is given
    monkeypatch.setattr(trainer, "setup_distributed", lambda d: seen["distributed"].append(d) or real_setup(d))
    resumed = run_cli(["train", "--resume", "runs/r", "--quiet"], tmp_path)
    assert resumed.exit_code == 0, resumed.output
    assert seen["devices"] == ["cpu"]
    assert seen["seeds"][0] == 7  # the first seed set is the run's, not the default 0
    assert seen["distributed"] == ["cpu"]
    assert steps_logged(run)[-1] == 5


def test_max_steps_stops_early_without_shortening_the_schedule(tmp_path):
    # 512 images / 32 = 16 steps per epoch, 1 epoch, warm-up 2 steps. The 4th step (index 3) is 1/14 of
    # the way down the cosine if the schedule spans the epoch; a schedule shortened to 4 steps would be
    # half way down (lr 0.5 x peak).
    result = run_cli(["train", *SMALL, "--epochs", "1", "--max-steps", "4", "--lr", "0.001", "--out", "runs/m",
                      "--set", "train.log_every=1", "--set", "optim.warmup_epochs=0.125"], tmp_path)
    assert result.exit_code == 0, result.output
    rows = [json.loads(r) for r in (tmp_path / "runs/m/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert math.isclose(rows[-1]["lr"], 0.001 * 0.5 * (1 + math.cos(math.pi / 14)), rel_tol=1e-6)


def test_nan_message_names_an_action_that_works(tmp_path, monkeypatch):
    import sjea_tools.trainers.trainer as trainer

    real_loss = trainer.stacked_vicreg_loss

    def nan_loss(*a, **k):
        loss, terms = real_loss(*a, **k)
        return loss * float("nan"), terms

    args = ["train", *SMALL, "--max-steps", "2", "--out", "runs/n", "--set", "train.log_every=1"]
    monkeypatch.setattr(trainer, "stacked_vicreg_loss", nan_loss)
    failed = run_cli(args, tmp_path)
    assert failed.exit_code == 1
    message = " ".join(failed.output.split())
    lower = f"{resolve_config('tiny').optim.lr / 4:g}"  # a quarter of the preset's lr
    assert f"--lr {lower}" in message and "--overwrite" in message and "--resume" not in message.replace(
        "resuming would", "")
    # The action it names works (with a loss that stays finite again).
    monkeypatch.setattr(trainer, "stacked_vicreg_loss", real_loss)
    again = run_cli([*args, "--lr", lower, "--overwrite"], tmp_path)
    assert again.exit_code == 0, again.output


def test_official_vicreg_lars_setting():
    from sjea_tools.trainers.optim import LARS, build_optimizer, peak_lr

    cfg = resolve_config("vicreg-official", overrides={"train.batch_size": 512})
    o = cfg.optim
    assert (o.optimizer, o.lr, o.weight_decay, o.eta, o.momentum) == ("lars", 0.2, 1e-6, 0.001, 0.9)
    assert (o.warmup_epochs, o.final_lr_ratio) == (10, 0.001)
    assert cfg.model.projector == "8192-8192-8192" and cfg.model.projector_last_bias is False
    assert cfg.data.augment == "vicreg"
    assert math.isclose(peak_lr(o, 512), 0.4)  # base lr 0.2 x batch / 256

    weight = torch.nn.Parameter(torch.full((4, 3), 2.0))
    bias = torch.nn.Parameter(torch.full((4,), 2.0))  # biases and norm parameters: 1-D, excluded
    opt = build_optimizer([weight, bias], o, 512)
    assert isinstance(opt, LARS) and opt.param_groups[0]["lr"] == pytest.approx(0.4)
    weight.grad = torch.full((4, 3), 0.5)
    bias.grad = torch.full((4,), 0.5)
    opt.step()
    # bias: plain momentum SGD step, no weight decay, no trust ratio
    assert torch.allclose(bias.detach(), torch.full((4,), 2.0 - 0.4 * 0.5))
    # weight: update = eta * |w| / |g + wd w| * (g + wd w)
    d = 0.5 + 1e-6 * 2.0
    q = 0.001 * (2.0 * math.sqrt(12)) / (d * math.sqrt(12))
    assert torch.allclose(weight.detach(), torch.full((4, 3), 2.0 - 0.4 * q * d), atol=1e-7)
