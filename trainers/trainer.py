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
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sjea_tools.config import RunConfig, save_config
from sjea_tools.data.augment import per_image_transforms, two_views
from sjea_tools.data.datasets import PixelDataset, load_dataset, resize_pixels, train_split
from sjea_tools.data.preprocess import normalize_pixels
from sjea_tools.errors import SjeaError
from sjea_tools.losses import stacked_vicreg_loss
from sjea_tools.metrics import effective_rank, mean_std
from sjea_tools.models import build_model
from sjea_tools.io import atomic_write_text
from sjea_tools.runs import (CHECKPOINT_FILE, CONFIG_FILE, DEFAULT_RUNS_DIR, METRICS_FILE, read_metrics, save_model,
                             set_latest)

from .checkpoint import load_checkpoint, restore_rng, save_checkpoint
from .distributed import DistInfo, barrier, cleanup_distributed, setup_distributed
from .optim import build_optimizer, lr_factor, peak_lr, set_lr


class TwoViewObjective(nn.Module):
    """Both views through the stack (separately, so BatchNorm sees each view's own batch, as in
    the official VICReg code) and the stacked loss. DDP wraps this module."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        _, z1 = self.model.forward_train(v1)
        _, z2 = self.model.forward_train(v2)
        return stacked_vicreg_loss(z1, z2, self.cfg.per_level("sim_coeff"), self.cfg.per_level("std_coeff"),
                                   self.cfg.per_level("cov_coeff"), self.cfg.per_level("level_weights"))


def pick_device(requested: str, info: DistInfo) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SjeaError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
        return torch.device("cuda", info.local_rank if info.enabled else torch.device(requested).index or 0)
    if requested != "cpu":
        raise SjeaError(f"unknown device '{requested}' (use auto, cpu, cuda or cuda:N).")
    return torch.device("cpu")


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
                                         pin_memory=pin, persistent_workers=False)
    for item in loader:
        yield item[0] if cfg.train.augment_on_device else tuple(item)


@torch.no_grad()
def level_statistics(model, probe: torch.Tensor, device: torch.device, batch: int = 256) -> list[dict]:
    """Embedding std (of L2-normalised rows) and effective rank per level on fixed images."""
    was_training = model.training
    model.eval()
    zs: list[list[torch.Tensor]] = [[] for _ in range(model.num_levels)]
    for i in range(0, len(probe), batch):
        for k, z in enumerate(model.forward_embeddings(probe[i:i + batch].to(device))):
            zs[k].append(z.float().cpu())
    model.train(was_training)
    stats = []
    for level in zs:
        z = torch.cat(level)
        stats.append({"std": mean_std(z), "effective_rank": effective_rank(z), "dim": z.shape[1]})
    return stats


def collapse_warning(stats: list[dict], previous: list[dict] | None) -> list[int]:
    """Levels whose embeddings look collapsed: spread far below a healthy 1/sqrt(D), or effective
    rank fallen to under half of the last epoch's."""
    bad = []
    for k, s in enumerate(stats):
        low_spread = s["std"] < 0.2 / math.sqrt(s["dim"])
        rank_drop = previous is not None and s["effective_rank"] < 0.5 * previous[k]["effective_rank"]
        if low_spread or rank_drop:
            bad.append(k)
    return bad


def prepare_run_dir(cfg: RunConfig, out_dir: Path | None, overwrite: bool, runs_dir: Path) -> Path:
    run_dir = Path(out_dir) if out_dir else Path(runs_dir) / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise SjeaError(f"{run_dir} exists and is not a folder; choose another --out.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise SjeaError(f"run folder {run_dir} already exists; continue it with --resume {run_dir}, "
                            "replace it with --overwrite, or pick another --out.")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SjeaError(f"cannot create run folder {run_dir}: {e.strerror or e}; choose another --out.") from None
    return run_dir


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric rows a killed run wrote past its last checkpoint."""
    if not path.is_file():
        return
    keep = [row for row in read_metrics(path.parent) if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def train(cfg: RunConfig, out_dir: Path | str | None = None, resume: bool = False, overwrite: bool = False,
          quiet: bool = False, runs_dir: Path | str = DEFAULT_RUNS_DIR, log=None) -> Path:
    """Train a stack; returns the run folder. With resume=True, `out_dir` is the run to continue and
    its saved configuration is used, before anything reads it (device, seed, distributed backend)."""
    if resume:
        cfg = resume_config(out_dir)
    info = setup_distributed("cuda" if cfg.train.device.startswith("cuda") or (
        cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        return _train(cfg, out_dir, resume, overwrite, quiet, Path(runs_dir), info, log)
    finally:
        cleanup_distributed()


def resume_config(run_dir) -> RunConfig:
    """The configuration a run was trained with, from its checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise SjeaError(f"{run_dir} has no checkpoint to resume from ({CHECKPOINT_FILE}); start a new run.")
    return RunConfig.from_dict(load_checkpoint(run_dir)["config"])


def _train(cfg, out_dir, resume, overwrite, quiet, runs_dir, info: DistInfo, log) -> Path:
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet or not info.is_main, soft_wrap=True)
    device = pick_device(cfg.train.device, info)
    torch.manual_seed(cfg.train.seed)

    if resume:
        run_dir = Path(out_dir)
        if not (run_dir / CHECKPOINT_FILE).is_file():
            raise SjeaError(f"{run_dir} has no checkpoint to resume from ({CHECKPOINT_FILE}); start a new run.")
        state = load_checkpoint(run_dir)
        cfg = RunConfig.from_dict(state["config"])
    else:
        state = None

    # Data problems are found before anything is written, so a failed start leaves no run folder.
    data = train_split(load_dataset(cfg.data.dataset, cfg.data.data_dir, "train"), cfg.data.holdout,
                       cfg.data.split_seed, cfg.data.limit)
    if data.pixels is not None and data.pixels.shape[1] != cfg.image_size:
        data.pixels = resize_pixels(data.pixels, cfg.image_size)
    batch = cfg.train.batch_size
    steps_per_epoch = len(data) // (batch * info.world_size)
    if steps_per_epoch == 0:
        raise SjeaError(f"{len(data)} training images are fewer than one batch of {batch} x {info.world_size} "
                        "process(es); lower --batch-size.")

    if not resume:
        run_dir = prepare_run_dir(cfg, out_dir, overwrite, runs_dir) if info.is_main else Path(
            out_dir or runs_dir / cfg.name)
        if info.is_main:
            save_config(cfg, run_dir / CONFIG_FILE)
    barrier(info)

    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)  # the lr schedule spans all epochs
    # max_steps stops early without shortening the schedule (a quick look at the start of a real run).
    stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    model = build_model(cfg).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective: nn.Module = TwoViewObjective(model, cfg)
    if info.enabled:
        if device.type == "cuda":
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
            model = objective.model
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    run_objective = torch.compile(objective) if cfg.train.compile else objective
    optimizer = build_optimizer(model.parameters(), cfg.optim, batch * info.world_size)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    lr_peak = peak_lr(cfg.optim, batch * info.world_size)

    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state)
        start_step = int(state["step"])
        if info.is_main:
            _truncate_metrics(run_dir / METRICS_FILE, start_step)
        console.print(f"resuming {run_dir} at step {start_step}/{stop_step}")

    # Fixed images for the per-epoch collapse check.
    probe_n = min(1024, len(data))
    probe = normalize_pixels(torch.stack([PixelDataset(data, cfg.image_size)[i][0] for i in range(probe_n)]),
                             cfg.mean, cfg.std)

    metrics_file = open(run_dir / METRICS_FILE, "a") if info.is_main else None
    prev_stats = None
    seen_since, t_since = 0, time.perf_counter()
    last_rate = 0.0
    model.train()
    progress = _progress(console, quiet or not info.is_main)
    task = progress.add_task("train", total=stop_step, completed=start_step, info="")
    with progress:
        step = start_step
        while step < stop_step:
            epoch = step // steps_per_epoch
            batches = step_batches(len(data), batch, info, cfg.train.seed, epoch)
            first = step - epoch * steps_per_epoch
            last = min(steps_per_epoch, first + stop_step - step)
            for item in batch_source(data, cfg, batches[first:last], device):
                # Augmentation randomness depends only on (seed, step, rank): exact on resume.
                g = torch.Generator(device=device).manual_seed(
                    (cfg.train.seed * 1_000_003 + step) * max(1, info.world_size) + info.rank)
                if isinstance(item, tuple):
                    v1, v2 = (v.to(device, non_blocking=True) for v in item)
                else:
                    v1, v2 = two_views(item.to(device, non_blocking=True), cfg.data, cfg.image_size, cfg.mean,
                                       cfg.std, g)
                if device.type == "cuda" and cfg.train.channels_last:
                    v1 = v1.contiguous(memory_format=torch.channels_last)
                    v2 = v2.contiguous(memory_format=torch.channels_last)
                set_lr(optimizer, lr_peak * lr_factor(step, warmup_steps, total_steps, cfg.optim.final_lr_ratio))
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, terms = run_objective(v1, v2)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                step += 1
                seen_since += len(v1) * info.world_size
                if step % cfg.train.log_every == 0 or step == stop_step:
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise SjeaError(f"the loss became {loss_value} at step {step}: train again with a lower "
                                        f"--lr (this run: {cfg.optim.lr:g}) or more warm-up (--set "
                                        f"optim.warmup_epochs=N, this run: {cfg.optim.warmup_epochs:g}), e.g. the "
                                        f"same command with --lr {cfg.optim.lr / 4:g} --overwrite (resuming would "
                                        "reload the same settings).", exit_code=1)
                    now = time.perf_counter()
                    last_rate = seen_since / max(now - t_since, 1e-9)
                    seen_since, t_since = 0, now
                    row = {"kind": "step", "step": step, "epoch": step / steps_per_epoch,
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": last_rate, "loss": loss_value,
                           "levels": [{name: float(value.detach()) for name, value in
                                       zip(("loss", "invariance", "variance", "covariance"), t)} for t in terms]}
                    if metrics_file:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    if log:
                        log(row)
                    losses = " ".join(f"L{k}={lv['loss']:.3f}" for k, lv in enumerate(row["levels"]))
                    progress.update(task, info=f"{losses}  {last_rate:.0f} img/s")
                progress.update(task, completed=step)
                epoch_end = step % steps_per_epoch == 0
                if info.is_main and (step % cfg.train.checkpoint_every == 0 or epoch_end or step == stop_step):
                    save_checkpoint(run_dir, model=model, optimizer=optimizer, scaler=scaler, step=step,
                                    cfg_dict=cfg.to_dict())
                if epoch_end and info.is_main:
                    stats = level_statistics(model, probe, device)
                    bad = collapse_warning(stats, prev_stats)
                    prev_stats = stats
                    row = {"kind": "epoch", "epoch": step // steps_per_epoch, "step": step, "levels": stats,
                           "collapse_warning": bool(bad)}
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if bad:
                        console.print(f"[yellow]warning:[/] level(s) {bad} look collapsed (embedding std or "
                                      "effective rank fell); check the variance coefficient and the lr.")
                if epoch_end:
                    barrier(info)
    if metrics_file:
        metrics_file.close()
    if info.is_main:
        path = save_model(run_dir, model, cfg)
        set_latest(run_dir, runs_dir)
        console.print(f"trained {stop_step} steps; model: {path}; metrics: {run_dir / METRICS_FILE}")
    barrier(info)
    return run_dir


def _progress(console, disable: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, disable=disable)


def describe(cfg: RunConfig) -> dict:
    """What --dry-run prints: the resolved config and each level's parameter count."""
    model = build_model(cfg)
    counts = model.parameter_counts()
    return {"config": cfg.to_dict(), "levels": [
        {"level": k, "encoder": c["encoder"], "projector": c["projector"], "representation_dim": model.level_dims[k],
         "embedding_dim": model.embedding_dims[k]} for k, c in enumerate(counts)],
        "total_parameters": sum(c["encoder"] + c["projector"] for c in counts)}
