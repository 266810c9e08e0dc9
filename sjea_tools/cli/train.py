"""`sjea train`: options -> RunConfig -> trainers.trainer.train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.progress import ProgressColumn
from rich.text import Text

from . import app
from .common import (quiet_option, json_option, console, err_console, handle_errors, markup_safe, non_negative_float, non_negative_int,
                     positive_float, positive_int, print_json, rich_progress)

PRESET_HELP = ("Named preset: tiny (CPU default, Fashion-MNIST), cifar10-paper, stl10-paper, vicreg-official "
               "(LARS recipe of the VICReg code), vicreg-r18, vicreg-r50.")


def _parse_sets(sets: list[str]) -> dict:
    from ..errors import SjeaError

    out = {}
    for item in sets:
        if "=" not in item:
            raise SjeaError(f"--set takes section.key=value (e.g. optim.warmup_epochs=2), not '{item}'.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# Long only by its option declarations, one per option (Typer reads them from the signature);
# the body is 48 lines.
@app.command()
@handle_errors
def train(
    preset: str = typer.Option("tiny", "--preset", "-p", help=PRESET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML, TOML or JSON file of settings "
                                          "(sections model, data, optim, loss, train) applied over the preset."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder to write \\[default: runs/<preset>]."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last "
                                          "checkpoint (its saved config is used)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="fashion-mnist, cifar10, cifar100, stl10, or a "
                                          "path to an image folder (class = first sub-folder)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local dataset files (Fashion-MNIST: the four "
                                            "IDX .gz files; CIFAR/STL: the extracted official archive)."),
    limit: Optional[int] = typer.Option(None, "--limit", callback=positive_int, help="Train on the first N images only."),
    image_size: Optional[int] = typer.Option(None, "--image-size", callback=positive_int, help="Input size in pixels \\[default: the "
                                             "dataset's]."),
    levels: Optional[int] = typer.Option(None, "--levels", "-l", callback=positive_int, help="Number of stacked levels (1 = plain VICReg)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Level-0 encoder: resnet18, resnet34, resnet50."),
    stem: Optional[str] = typer.Option(None, "--stem", help="auto, small (3x3, no max-pool) or standard (7x7 + "
                                       "max-pool)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Higher-level encoder: resnet (one-channel "
                                          "ResNet-18 on the reshaped vector) or mlp."),
    level_input: Optional[str] = typer.Option(None, "--level-input", help="What level k reads from level k-1: "
                                              "representation (paper) or embedding (authors' code)."),
    projector: Optional[str] = typer.Option(None, "--projector", help="Projector sizes, e.g. 512-512-256."),
    stop_gradient: Optional[bool] = typer.Option(None, "--stop-gradient/--no-stop-gradient",
                                                 help="Detach each level's input from the level below."),
    epochs: Optional[float] = typer.Option(None, "--epochs", "-e", callback=positive_float, help="Training epochs (fractions allowed)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=positive_int, help="Images per step (per process)."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=positive_float, help="Peak learning rate (LARS: base lr x batch/256)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam (authors) or lars (official VICReg)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", callback=non_negative_float, help="Weight decay."),
    sim_coeff: Optional[str] = typer.Option(None, "--sim-coeff", help="Invariance coefficient; one value or one "
                                            "per level, comma-separated."),
    std_coeff: Optional[str] = typer.Option(None, "--std-coeff", help="Variance coefficient(s)."),
    cov_coeff: Optional[str] = typer.Option(None, "--cov-coeff", help="Covariance coefficient(s), e.g. 1,0.1."),
    level_weights: Optional[str] = typer.Option(None, "--level-weights", help="Per-level loss weights lambda_k."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=non_negative_int, help="Data-loading worker processes."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, "
                                            "fp16."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    seed: Optional[int] = typer.Option(None, "--seed", callback=non_negative_int, help="Random seed (data order and augmentation)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", callback=positive_int, help="Stop early after this many steps (the lr schedule still spans --epochs)."),
    sets: list[str] = typer.Option([], "--set", help="Any setting as section.key=value, e.g. "
                                   "--set data.blur_p=0.5 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and per-level parameter "
                                 "counts; train nothing."),
    quiet: bool = quiet_option(),
    json_out: bool = json_option("a summary"),
) -> None:
    """Train stacked encoders (S-JEA; --levels 1 is plain VICReg) and write a run folder:
    config.json, metrics.jsonl, checkpoints/last.pt and model.pt. Several GPUs or CPU processes:
    torchrun --nproc_per_node N $(which sjea) train ..."""
    from ..config import resolve_config
    from ..errors import SjeaError

    overrides = {
        "data.dataset": dataset, "data.data_dir": str(data_dir) if data_dir else None, "data.limit": limit,
        "data.image_size": image_size, "data.workers": workers,
        "model.levels": levels, "model.backbone": backbone, "model.stem": stem, "model.encoder": encoder,
        "model.level_input": level_input, "model.projector": projector, "model.stop_gradient": stop_gradient,
        "train.epochs": epochs, "train.batch_size": batch_size, "train.device": device,
        "train.precision": precision, "train.compile": compile, "train.seed": seed, "train.max_steps": max_steps,
        "optim.lr": lr, "optim.optimizer": optimizer, "optim.weight_decay": weight_decay,
        "loss.sim_coeff": sim_coeff, "loss.std_coeff": std_coeff, "loss.cov_coeff": cov_coeff,
        "loss.level_weights": level_weights,
    }
    named = dict(overrides)
    overrides.update(_parse_sets(sets))
    if resume is not None:
        if overwrite:
            raise SjeaError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it.")
        given = [option for option, value in (("--config", config), ("--out", out), ("--set", sets),
                                                ("--dry-run", dry_run)) if value]
        given += ["--" + key.split(".")[-1].replace("_", "-") for key, value in named.items() if value is not None]
        if given:
            raise SjeaError(f"--resume continues {resume} with its saved settings; drop {', '.join(given)} "
                            "(or start a new run with --out).")
        from trainers.trainer import train as run_training

        cfg = resolve_config(preset)  # replaced by the run's saved config
        run_dir = _train_with_progress(run_training, cfg, quiet, out_dir=resume, resume=True)
    else:
        cfg = resolve_config(preset, config, overrides)
        # torch is imported only now: a refused configuration answers without that wait.
        from trainers.trainer import describe, train as run_training

        if dry_run:
            summary = describe(cfg)
            if json_out:
                print_json(summary)
            else:
                _print_dry_run(summary)
            return
        run_dir = _train_with_progress(run_training, cfg, quiet, out_dir=out, overwrite=overwrite)
    if json_out:
        from ..runs import MODEL_FILE, METRICS_FILE

        print_json({"run": str(run_dir), "model": str(run_dir / MODEL_FILE), "metrics": str(run_dir / METRICS_FILE)})
    else:
        console.print(f"run folder: {markup_safe(run_dir)}")


class _StepMetrics(ProgressColumn):
    """The latest logged losses per level and images/s, drawn beside the training bar."""

    def __init__(self):
        super().__init__()
        self.text, self.last_step = "", None

    def render(self, task) -> Text:
        return Text(self.text)

    def log(self, row: dict) -> None:
        """trainers.trainer's metrics callback: step rows update the text, epoch rows may warn."""
        if row["kind"] == "step":
            self.last_step = row["step"]
            losses = " ".join(f"L{k}={level['loss']:.3f}" for k, level in enumerate(row["levels"]))
            self.text = f"{losses}  {row['images_per_s']:.0f} img/s"
        elif row.get("collapsed_levels"):
            err_console.print(f"[yellow]warning:[/] level(s) {row['collapsed_levels']} look collapsed (embedding std "
                              "or effective rank fell); check the variance coefficient and the lr.")


def _train_with_progress(run_training, cfg, quiet: bool, **options) -> Path:
    from ..io import writing_error

    metrics = _StepMetrics()
    try:
        with rich_progress(quiet, metrics) as progress:
            run_dir = run_training(cfg, progress=progress, log=None if quiet else metrics.log, **options)
    except RuntimeError as e:
        # torch.save on a full disk raises RuntimeError ("unexpected pos ...") with no errno; the
        # checkpoint is written atomically, so what was written before it stays as it was.
        disk = writing_error(e, options.get("out_dir") or Path("runs"))
        if disk is None:
            raise
        raise disk from None
    if metrics.last_step is not None:  # rows reach rank 0 only: other torchrun processes stay silent
        from ..runs import MODEL_FILE, METRICS_FILE

        err_console.print(f"trained {metrics.last_step} steps; model: {markup_safe(run_dir / MODEL_FILE)}; "
                          f"metrics: {markup_safe(run_dir / METRICS_FILE)}")
    return run_dir


def _print_dry_run(summary: dict) -> None:
    import json

    from rich.table import Table

    console.print_json(json.dumps(summary["config"]))
    table = Table(title="parameters per level")
    for col in ("level", "encoder", "projector", "Y dim", "Z dim"):
        table.add_column(col, justify="right")
    for lv in summary["levels"]:
        table.add_row(str(lv["level"]), f"{lv['encoder']:,}", f"{lv['projector']:,}", str(lv["representation_dim"]),
                      str(lv["embedding_dim"]))
    console.print(table)
    console.print(f"total parameters: {summary['total_parameters']:,}")
