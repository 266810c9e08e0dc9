"""The S-JEA training loop, readable top to bottom.

    data (uint8 pixels) -> two augmented views -> every level's Y and Z -> per-level VICReg
    -> weighted sum -> one optimiser step for all levels -> metrics, checkpoints, final model

Runs on one CPU, one GPU, or several processes under torchrun (DDP; NCCL on GPUs, gloo on CPU).
Resuming restores model, optimiser, scaler, step and RNG, and continues with the same batches:
the data order and the augmentation randomness are pure functions of (seed, step, rank).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from sjea_tools.config import ONNX_BACKBONE, RunConfig, save_config
from sjea_tools.data.augment import per_image_transforms, two_views
from sjea_tools.data.datasets import PixelDataset, load_dataset, train_split
from sjea_tools.data.preprocess import normalize_pixels
from sjea_tools.data.recipe import MIN_STEPS_TO_LEARN, FolderFacts, plan_steps, resolve_recipe
from sjea_tools.errors import SjeaError
from sjea_tools.losses import stacked_vicreg_loss
from sjea_tools.workers import end_with_this_process
from sjea_tools.models import build_model
from sjea_tools.progress import ProgressFn, report
from sjea_tools.io import atomic_write_text, writing_error
from sjea_tools.runs import (CHECKPOINT_FILE, CONFIG_FILE, DEFAULT_RUNS_DIR, METRICS_FILE, SKIPPED_FILE, SUMMARY_FILE,
                             discard_failed_start, prepare_run_dir, read_metrics, save_model, set_latest,
                             truncate_metrics)
from sjea_tools.spec import PreprocessSpec

from .centring import CENTRE_IMAGES, WHITEN_IMAGES_PER_DIM, at_model_size, level_centring
from .collapse import collapse_warning, level_statistics
from .checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from .distributed import DistInfo, barrier, cleanup_distributed, process_device, setup_distributed
from .frozen import frozen_centres, frozen_state, load_frozen
from .optim import build_optimizer, lr_factor, peak_lr, set_lr


class TwoViewObjective(nn.Module):
    """Both views through the stack (separately, so BatchNorm sees each view's own batch, as in
    the official VICReg code) and the stacked loss. DDP wraps this module."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        """The loss of the levels that train, and their terms (frozen levels have no loss)."""
        f = self.model.frozen_levels
        _, z1 = self.model.forward_train(v1)
        _, z2 = self.model.forward_train(v2)
        return stacked_vicreg_loss(z1[f:], z2[f:], *(self.cfg.per_level(name)[f:] for name in (
            "sim_coeff", "std_coeff", "cov_coeff", "level_weights")))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def step_batches(n: int, batch: int, info: DistInfo, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's image indices for every step of an epoch: a seeded permutation, split by rank."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // (batch * info.world_size)
    return [perm[(s * info.world_size + info.rank) * batch:(s * info.world_size + info.rank + 1) * batch]
            for s in range(steps)]


class _TwoViewPixels(torch.utils.data.Dataset):
    """The straightforward path: per-image torchvision augmentation in DataLoader workers."""

    def __init__(self, base: PixelDataset, transforms):
        self.base, self.transforms = base, transforms

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        px, _ = self.base[i]
        img = px.permute(2, 0, 1)
        return self.transforms[0](img), self.transforms[1](img)


def batch_source(data, cfg: RunConfig, batches: list[np.ndarray], device: torch.device):
    """Yield uint8 (B, H, W, 3) pixel batches (on-device augmentation) or (v1, v2) float views."""
    size = cfg.image_size
    pin = device.type == "cuda"
    if cfg.train.augment_on_device and data.pixels is not None and data.pixels.shape[1] == size:
        for idx in batches:  # in memory at model size: no loader needed
            px = torch.from_numpy(data.pixels[idx])
            yield px.pin_memory() if pin else px
        return
    base = PixelDataset(data, size)
    dataset = base if cfg.train.augment_on_device else _TwoViewPixels(
        base, per_image_transforms(cfg.data, size, cfg.mean, cfg.std))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.workers,
                                         pin_memory=pin, persistent_workers=False,
                                         worker_init_fn=end_with_this_process())
    for item in loader:
        yield item[0] if cfg.train.augment_on_device else tuple(item)


@dataclass
class Training:
    """What one process trains with, built once by `build_training`."""

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    model: nn.Module  # the plain stack: what is saved, evaluated and checkpointed
    objective: nn.Module  # what a step calls: the two-view loss, DDP-wrapped and compiled as configured
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    lr_peak: float
    warmup_steps: int
    total_steps: int  # the length of the lr schedule (all epochs)
    stop_step: int  # where training stops: total_steps, or train.max_steps when that is earlier


def build_training(cfg: RunConfig, info: DistInfo, device: torch.device, steps_per_epoch: int,
                   frozen: dict | None = None) -> Training:
    """The model (with `frozen`, the frozen levels' weights, copied in), its (DDP-wrapped)
    objective, optimiser (of the levels that train), precision and schedule for this process."""
    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)  # the lr schedule spans all epochs
    # max_steps stops early without shortening the schedule (a quick look at the start of a real run).
    stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    model = build_model(cfg).to(device)
    if frozen is not None:
        load_frozen(model, frozen)
    model.freeze(cfg.train.frozen_levels)  # before DDP, which registers only parameters that train
    if cfg.train.channels_last:  # faster on CPU too (oneDNN): benchmarks/bench_step.py
        model = model.to(memory_format=torch.channels_last)
    objective: nn.Module = TwoViewObjective(model, cfg)
    if info.enabled:
        if device.type == "cuda":
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
            model = objective.model
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    global_batch = cfg.train.batch_size * info.world_size
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    return Training(cfg, info, device, model, torch.compile(objective) if cfg.train.compile else objective,
                    build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, global_batch),
                    torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None, amp_dtype,
                    peak_lr(cfg.optim, global_batch), round(cfg.optim.warmup_epochs * steps_per_epoch), total_steps,
                    stop_step)


def train_step(t: Training, v1: torch.Tensor, v2: torch.Tensor, step: int):
    """One optimiser step of every level on two views; returns the loss and each level's terms."""
    set_lr(t.optimizer, t.lr_peak * lr_factor(step, t.warmup_steps, t.total_steps, t.cfg.optim.final_lr_ratio))
    with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
        loss, terms = t.objective(v1, v2)
    t.optimizer.zero_grad(set_to_none=True)
    if t.scaler is not None:
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        loss.backward()
        t.optimizer.step()
    return loss, terms


def two_views_on_device(t: Training, item, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from `batch_source` as two views on the training device."""
    cfg, info, device = t.cfg, t.info, t.device
    if isinstance(item, tuple):
        v1, v2 = (v.to(device, non_blocking=True) for v in item)
    else:
        # Augmentation randomness depends only on (seed, step, rank): exact on resume.
        g = torch.Generator(device=device).manual_seed(
            (cfg.train.seed * 1_000_003 + step) * max(1, info.world_size) + info.rank)
        spec = cfg.preprocess_spec
        v1, v2 = two_views(item.to(device, non_blocking=True), cfg.data, spec.image_size, spec.mean, spec.std, g)
    if cfg.train.channels_last:
        v1 = v1.contiguous(memory_format=torch.channels_last)
        v2 = v2.contiguous(memory_format=torch.channels_last)
    return v1, v2


class MetricsLog:
    """The run's metrics.jsonl, appended by rank 0 alone; every row also goes to `log` (rank 0)."""

    def __init__(self, run_dir: Path, info: DistInfo, log: Callable[[dict], None] | None):
        self.file = open(Path(run_dir) / METRICS_FILE, "a") if info.is_main else None
        self.log = log if info.is_main else None

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()  # a kill loses at most the row being written
        if self.log:
            self.log(row)

    def close(self) -> None:
        if self.file:
            self.file.close()


class Throughput:
    """Images per second of wall time since the last reading."""

    def __init__(self):
        self.images, self.since = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.since, 1e-9)
        self.images, self.since = 0, now
        return rate


def step_row(t: Training, step: int, steps_per_epoch: int, loss: torch.Tensor, terms, images_per_s: float,
             run_dir: Path) -> dict:
    """The metrics row of a logged step; a loss that is no longer finite stops the run here."""
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        cfg = t.cfg
        raise SjeaError(f"the loss became {loss_value} at step {step}: train again with a lower "
                        f"--lr (this run: {cfg.optim.lr:g}) or more warm-up (--set "
                        f"optim.warmup_epochs=N, this run: {cfg.optim.warmup_epochs:g}), e.g. the "
                        f"same command with --lr {cfg.optim.lr / 4:g} --overwrite (resuming would "
                        "reload the same settings).", exit_code=1)
    return {"kind": "step", "step": step, "epoch": step / steps_per_epoch, "lr": t.optimizer.param_groups[0]["lr"],
            "images_per_s": images_per_s, "loss": loss_value,
            "levels": [dict.fromkeys(TERMS) | {"frozen": True} for _ in range(t.model.frozen_levels)] + [
                {name: float(value.detach()) for name, value in zip(TERMS, level)} for level in terms]}


TERMS = ("loss", "invariance", "variance", "covariance")  # a frozen level's are null: never computed


class CollapseMonitor:
    """The end-of-epoch check: embedding spread and effective rank per level on fixed images."""

    def __init__(self, data, spec: PreprocessSpec, n: int = 1024):
        pixels = PixelDataset(data, spec.image_size)
        self.probe = normalize_pixels(torch.stack([pixels[i][0] for i in range(min(n, len(data)))]),
                                      spec.mean, spec.std)
        self.previous: list[dict] | None = None

    def epoch_row(self, t: Training, step: int, steps_per_epoch: int) -> dict:
        stats = level_statistics(t.model, self.probe, t.device)
        bad = collapse_warning(stats, self.previous)
        self.previous = stats
        return {"kind": "epoch", "epoch": step // steps_per_epoch, "step": step, "levels": stats,
                "collapse_warning": bool(bad), "collapsed_levels": bad}


def end_of_step(t: Training, run_dir: Path, step: int, steps_per_epoch: int, monitor: CollapseMonitor,
                metrics: MetricsLog) -> None:
    """Checkpoint when due; at an epoch's end also the collapse check and a barrier."""
    epoch_end = step % steps_per_epoch == 0
    if t.info.is_main and (step % t.cfg.train.checkpoint_every == 0 or epoch_end or step == t.stop_step):
        save_checkpoint(run_dir, model=t.model, optimizer=t.optimizer, scaler=t.scaler, step=step,
                        cfg_dict=t.cfg.to_dict())
    if epoch_end:
        if t.info.is_main:
            metrics.write(monitor.epoch_row(t, step, steps_per_epoch))
        barrier(t.info)


def run_steps(t: Training, data, run_dir: Path, start_step: int, steps_per_epoch: int,
              progress: ProgressFn | None, log: Callable[[dict], None] | None) -> None:
    """Train from `start_step` to `t.stop_step`, logging, checkpointing and checking each epoch."""
    monitor = CollapseMonitor(data, t.cfg.preprocess_spec)
    metrics, rate = MetricsLog(run_dir, t.info, log), Throughput()
    progress = progress if t.info.is_main else None
    report(progress, "train", start_step, t.stop_step)
    t.model.train()
    step = start_step
    try:
        while step < t.stop_step:
            epoch = step // steps_per_epoch
            batches = step_batches(len(data), t.cfg.train.batch_size, t.info, t.cfg.train.seed, epoch)
            first = step - epoch * steps_per_epoch
            last = min(steps_per_epoch, first + t.stop_step - step)
            for item in batch_source(data, t.cfg, batches[first:last], t.device):
                v1, v2 = two_views_on_device(t, item, step)
                loss, terms = train_step(t, v1, v2, step)
                step += 1
                rate.add(len(v1) * t.info.world_size)
                if step % t.cfg.train.log_every == 0 or step == t.stop_step:
                    metrics.write(step_row(t, step, steps_per_epoch, loss, terms, rate.take(), run_dir))
                report(progress, "train", step, t.stop_step)
                end_of_step(t, run_dir, step, steps_per_epoch, monitor, metrics)
    finally:
        metrics.close()


def load_training_data(cfg: RunConfig, info: DistInfo, progress: ProgressFn | None = None):
    """(cfg with its image size and mean/std resolved, the training split at model size, steps per
    epoch for this world size, {path: reason} of skipped files). An image folder is decoded once
    here: unreadable files are skipped and named, and a folder with too few images is refused
    before anything is written."""
    data = train_split(load_dataset(cfg.data.dataset, cfg.data.data_dir, "train"), cfg.data.holdout,
                       cfg.data.split_seed, cfg.data.limit)
    # Only nulls are filled here; choosing batch and epochs from the count is the caller's (the CLI's).
    cfg, _ = resolve_recipe(cfg, data, fixed={"train.batch_size", "train.epochs"}, world_size=info.world_size)
    data, skipped = at_model_size(data, cfg, progress)
    batch = cfg.train.batch_size
    steps_per_epoch = len(data) // (batch * info.world_size)
    if steps_per_epoch == 0:
        raise SjeaError(too_few_images(len(data), batch, info.world_size, skipped))
    return cfg, data, steps_per_epoch, skipped


def too_few_images(n: int, batch: int, world_size: int, skipped: dict[str, str]) -> str:
    """The one-line refusal of a dataset smaller than one batch."""
    unread = f" ({len(skipped)} unreadable skipped)" if skipped else ""
    if n < 2 * world_size:
        return f"only {n} readable image(s){unread}: training needs at least 2 per process; add images."
    fit = 2 ** int(math.log2(n // world_size))
    procs = f" x {world_size} processes" if world_size > 1 else ""
    return (f"{n} readable images{unread} are fewer than one batch of {batch}{procs}; pass --batch-size "
            f"{fit} or less, or add images.")


def resume_state(out_dir: Path | str | None) -> tuple[RunConfig, dict]:
    """The saved configuration and full state of the run to continue."""
    run_dir = Path(out_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise SjeaError(f"{run_dir} has no checkpoint to resume from ({CHECKPOINT_FILE}); start a new run.")
    state = load_checkpoint(run_dir)
    return RunConfig.from_dict(state["config"]), state


def train(cfg: RunConfig, out_dir: Path | str | None = None, resume: bool = False, overwrite: bool = False,
          runs_dir: Path | str = DEFAULT_RUNS_DIR, progress: ProgressFn | None = None,
          log: Callable[[dict], None] | None = None) -> Path:
    """Train a stack; returns the run folder. With resume=True, `out_dir` is the run to continue and
    its saved configuration is used, before anything reads it (device, seed, distributed backend).
    Rank 0 reports `progress("train", step, stop_step)` and hands `log` every row it writes to
    metrics.jsonl; other ranks are silent."""
    cfg, state = resume_state(out_dir) if resume else (cfg, None)
    info = setup_distributed(cfg.train.device)
    try:
        return _train(cfg, state, out_dir, resume, overwrite, Path(runs_dir), info, progress, log)
    finally:
        cleanup_distributed()


def _train(cfg, state, out_dir, resume, overwrite, runs_dir: Path, info: DistInfo, progress, log) -> Path:
    started = time.perf_counter()
    device = process_device(cfg.train.device, info)
    torch.manual_seed(cfg.train.seed)
    # Data problems are found before anything is written, so a failed start leaves no run folder.
    cfg, data, steps_per_epoch, skipped = load_training_data(cfg, info, progress if info.is_main else None)
    frozen = frozen_state(cfg) if cfg.train.frozen_levels and not resume else None  # resume: the checkpoint has them
    if resume:
        run_dir = Path(out_dir)
    else:
        run_dir = prepare_run_dir(cfg, out_dir, overwrite, runs_dir) if info.is_main else Path(
            out_dir or runs_dir / cfg.name)
        if info.is_main:
            save_config(cfg, run_dir / CONFIG_FILE)
    if info.is_main:
        atomic_write_text(run_dir / SKIPPED_FILE, "".join(
            json.dumps({"path": p, "reason": r}) + "\n" for p, r in sorted(skipped.items())))
    try:
        barrier(info)
        t = build_training(cfg, info, device, steps_per_epoch, frozen)
        start_step = 0
        if state is not None:
            start_step = restore_checkpoint(state, model=t.model, optimizer=t.optimizer, scaler=t.scaler)
            if info.is_main:
                truncate_metrics(run_dir, start_step)
        run_steps(t, data, run_dir, start_step, steps_per_epoch, progress, log)
    except BaseException as e:
        # Judged before the discard frees the disk: torch reports a full disk as a RuntimeError
        # without errno, recognised by the free space left where the run writes.
        disk = writing_error(e, run_dir) if isinstance(e, (OSError, RuntimeError)) else None
        if info.is_main and not resume:
            discard_failed_start(run_dir)  # only when no checkpoint was written: the rerun is not refused
        if disk is not None:
            raise disk from None
        raise
    if info.is_main:
        # The centring (means, whitening) is fixed here, once, over the images just trained on
        # (trainers.centring); frozen levels keep their source run's, so their rows stay the source's rows.
        (centres, whitenings), kept = level_centring(t.model, data.pixels, t.device, seed=cfg.train.seed), frozen_centres(cfg)
        if kept:
            centres, whitenings = [*kept[0], *centres[len(kept[0]):]], [*kept[1], *whitenings[len(kept[1]):]]
        t.model.set_centres(centres, whitenings)
        save_model(run_dir, t.model, cfg)
        summary = run_summary(run_dir, len(data), skipped, t.stop_step, steps_per_epoch, time.perf_counter() - started)
        # Only a run inside the runs root moves its pointer: `--out elsewhere/run` writes nothing in
        # the working directory's runs/ (None: not asked; False: a user's file there was left alone).
        inside = Path(run_dir).resolve().is_relative_to(Path(runs_dir).resolve())
        summary["latest_updated"] = set_latest(run_dir, runs_dir) if inside else None
        summary["scores"] = score_summary(len(data), t.model)
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    barrier(info)
    return run_dir


def score_summary(images: int, model) -> dict:
    """How the run's rows will score: the levels whitened (trainers.centring) and the images the
    centring was taken over; a level left centred only says why (too few images per dimension)."""
    whitenings = model.whitenings or [None] * model.num_levels
    sample = min(images, CENTRE_IMAGES)
    return {"centring_images": sample, "whitened_levels": [k for k, w in enumerate(whitenings) if w is not None],
            "centred_only": {str(k): f"whitening a {d}-wide level needs {WHITEN_IMAGES_PER_DIM * d:,} images, "
                                     f"{WHITEN_IMAGES_PER_DIM} per dimension"
                             for k, (w, d) in enumerate(zip(whitenings, model.level_dims)) if w is None}}


def run_summary(run_dir: Path, images: int, skipped: dict[str, str], steps: int, steps_per_epoch: int,
                seconds: float) -> dict:
    """summary.json: what the run did, its last losses and its collapse state at the end. A level
    counts as collapsed at the end only when the last two epoch checks both flag it (epoch 1 alone
    often does, then recovers)."""
    rows = read_metrics(run_dir)
    last_step = next((r for r in reversed(rows) if r["kind"] == "step"), None)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    flagged = [set(r.get("collapsed_levels", [])) for r in epochs[-2:]]
    persistent = sorted(set.intersection(*flagged)) if len(flagged) == 2 else []
    return {
        "images": images, "skipped": len(skipped), "skipped_file": SKIPPED_FILE,
        "skipped_paths": sorted(skipped)[:20], "steps": steps, "epochs": steps / steps_per_epoch,
        "seconds": round(seconds, 1), "too_short": steps < MIN_STEPS_TO_LEARN,
        "final": None if last_step is None else {"step": last_step["step"], "loss": last_step["loss"],
                                                 "levels": last_step["levels"]},
        "collapse": None if not epochs else {"epoch": epochs[-1]["epoch"], "flagged_last_check":
                                              epochs[-1].get("collapsed_levels", []), "collapsed_levels": persistent,
                                              "levels": epochs[-1]["levels"]},
    }


def describe(cfg: RunConfig, facts: FolderFacts | None = None, images: int | None = None,
             time_steps: int = 2) -> dict:
    """What --dry-run prints: the resolved config, each level's parameter count, and with `images`
    the step plan and a time estimate from `time_steps` real steps timed on this machine."""
    model = build_model(cfg)
    if cfg.model.backbone == ONNX_BACKBONE:  # the module is built from the graph, which the source holds
        load_frozen(model, frozen_state(cfg))
    counts = model.parameter_counts()
    out = {"config": cfg.to_dict(), "levels": [
        {"level": k, "encoder": c["encoder"], "projector": c["projector"], "representation_dim": model.level_dims[k],
         "embedding_dim": model.embedding_dims[k], "frozen": k < cfg.train.frozen_levels} for k, c in enumerate(counts)],
        "total_parameters": sum(c["encoder"] + c["projector"] for c in counts)}
    if facts is not None:
        out["data"] = {"files": facts.count, "colour_mode": facts.colour_mode,
                       "median_short_side": facts.median_short_side, "sampled": facts.sampled,
                       "unreadable_in_sample": facts.unreadable_in_sample, "recipe": facts.notes}
    if images is not None:
        plan = plan_steps(images, cfg)
        out["plan"] = plan
        if plan["steps_per_epoch"]:
            out["estimate"] = estimate_time(cfg, plan["stop_step"], images, facts, time_steps)
    return out


def estimate_time(cfg: RunConfig, steps: int, images: int, facts: FolderFacts | None, time_steps: int = 2) -> dict:
    """Seconds the run should take here: `time_steps` real training steps (after one untimed
    warm-up step) of the configured model, batch and device on random pixels, times the step count,
    plus decoding the folder once at the per-image cost measured on its sample."""
    device = process_device(cfg.train.device, DistInfo())
    torch.manual_seed(cfg.train.seed)
    frozen = frozen_state(cfg) if cfg.model.backbone == ONNX_BACKBONE else None  # a graph's module needs its bytes
    t = build_training(cfg, DistInfo(), device, steps_per_epoch=max(1, steps), frozen=frozen)
    size, batch = cfg.image_size, cfg.train.batch_size
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    t.model.train()
    timed = []
    for step in range(time_steps + 1):
        start = time.perf_counter()
        v1, v2 = two_views_on_device(t, pixels, step)
        train_step(t, v1, v2, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed.append(time.perf_counter() - start)
    step_s = sum(timed[1:]) / max(1, time_steps)
    decode_s = 0.0
    if facts is not None and facts.decode_s_per_image:
        decode_s = facts.decode_s_per_image * images / max(1, min(cfg.data.workers, torch.get_num_threads()) or 1)
    return {"seconds": round(step_s * steps + decode_s, 1), "step_s": round(step_s, 4), "timed_steps": time_steps,
            "decode_s": round(decode_s, 1), "device": str(device)}
