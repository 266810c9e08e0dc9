"""`sjea train`: options -> RunConfig -> sjea_tools.trainers.trainer.train."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from rich.progress import ProgressColumn
from rich.text import Text

from . import app
from .common import (overwrite_option, device_option, data_dir_option, quiet_option, json_option, console, err_console, handle_errors, markup_safe, non_negative_float, non_negative_int,
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
# the body is 53 lines.
@app.command()
@handle_errors
def train(
    preset: str = typer.Option("tiny", "--preset", "-p", help=PRESET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML, TOML or JSON file of settings "
                                          "(sections model, data, optim, loss, train) applied over the preset."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder to write \\[default: runs/<preset>]."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last "
                                          "checkpoint (its saved config is used)."),
    overwrite: bool = overwrite_option("Replace an existing run folder."),
    from_: Optional[Path] = typer.Option(None, "--from", help="Train higher levels on frozen ones: a run folder "
                                         "(all its levels frozen; its architecture and preprocessing kept), a "
                                         "torchvision ResNet state_dict .pt/.pth (level 0 frozen) or an ONNX image "
                                         "encoder .onnx (level 0 frozen: an sjea export's top level with its "
                                         "preprocessing, or your own graph's output; --set train.from_output=NAME "
                                         "picks another). Without --levels, one level is added."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="fashion-mnist, cifar10, cifar100, stl10, or a "
                                          "path to an image folder (class = first sub-folder)."),
    data_dir: Optional[Path] = data_dir_option("Local dataset files (Fashion-MNIST: the four "
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
    device: Optional[str] = device_option(None, "auto, cpu, cuda or cuda:N."),
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
                                                ("--dry-run", dry_run), ("--from", from_)) if value]
        given += ["--" + key.split(".")[-1].replace("_", "-") for key, value in named.items() if value is not None]
        if given:
            raise SjeaError(f"--resume continues {resume} with its saved settings; drop {', '.join(given)} "
                            "(or start a new run with --out).")
        from sjea_tools.trainers.trainer import train as run_training

        cfg = resolve_config(preset)  # replaced by the run's saved config
        run_dir = _train_with_progress(run_training, cfg, quiet, json_out, out_dir=resume, resume=True)
    else:
        cfg = resolve_config(preset, config, overrides)
        fixed = _fixed_keys(preset, config, named, sets)
        if from_ is not None:
            from sjea_tools.trainers.frozen import apply_source

            cfg = apply_source(cfg, from_, fixed)
        cfg, facts, images = _resolve_for_data(cfg, fixed, dry_run)
        # torch is imported only now: a refused configuration answers without that wait.
        from sjea_tools.trainers.trainer import describe, train as run_training

        if dry_run:
            summary = describe(cfg, facts, images)
            if json_out:
                print_json(summary)
            else:
                _print_dry_run(summary)
            return
        _warn_if_too_short(cfg, images)
        run_dir = _train_with_progress(run_training, cfg, quiet, json_out, out_dir=out, overwrite=overwrite)
    summary = _read_summary(run_dir)
    if json_out:
        from ..runs import MODEL_FILE, METRICS_FILE

        print_json({"run": str(run_dir), "model": str(run_dir / MODEL_FILE), "metrics": str(run_dir / METRICS_FILE),
                    "summary": summary})
    else:
        _print_summary(run_dir, summary)


def _fixed_keys(preset: str, config: Optional[Path], named: dict, sets: list[str]) -> set[str]:
    """Dotted settings the user chose (option, --set, --config file, or a preset other than the
    default): the data-derived recipe leaves them as they are."""
    from ..config import load_config_file

    fixed = {key for key, value in named.items() if value is not None} | set(_parse_sets(sets))
    if config is not None:
        fixed |= {f"{section}.{key}" for section, table in load_config_file(config).items()
                  if isinstance(table, dict) for key in table}
    if preset != "tiny":  # a named recipe's batch and epochs are deliberate
        fixed |= {"train.batch_size", "train.epochs"}
    return fixed


def _resolve_for_data(cfg, fixed: set[str], dry_run: bool):
    """(cfg with the recipe's values filled, what the folder sample showed, the image count; None
    for a benchmark dataset not on this machine when only dry-running: the rest still prints)."""
    from ..config import DATASETS
    from ..data import load_dataset
    from ..data.datasets import ImageData, train_split
    from ..data.recipe import resolve_recipe
    from ..errors import SjeaError

    try:
        data = train_split(load_dataset(cfg.data.dataset, cfg.data.data_dir, "train"), cfg.data.holdout,
                           cfg.data.split_seed, cfg.data.limit)
    except SjeaError:
        if not (dry_run and cfg.data.dataset in DATASETS):
            raise
        return resolve_recipe(cfg, ImageData(cfg.data.dataset), fixed)[0], None, None
    cfg, facts = resolve_recipe(cfg, data, fixed)
    return cfg, facts, len(data)


def _warn_if_too_short(cfg, images: int | None) -> None:
    from ..data.recipe import plan_steps, too_short_warning

    plan = plan_steps(images, cfg) if images is not None else None
    # None at all: the trainer refuses it; --max-steps: a chosen quick look (the summary still says it).
    if plan and plan["steps_per_epoch"] and plan["too_short"] and not cfg.train.max_steps:
        err_console.print(f"[yellow]warning:[/] {too_short_warning(plan['stop_step'])}")


class _CollapseWatch:
    """Warns when a level looks collapsed at two epoch checks in a row: a single flag (often epoch 1,
    before the variance term has spread the embeddings) is not reported."""

    def __init__(self):
        self.previous: set[int] = set()
        self.warned: set[int] = set()

    def epoch(self, row: dict) -> None:
        flagged = set(row.get("collapsed_levels") or [])
        persistent = sorted((flagged & self.previous) - self.warned)
        self.previous = flagged
        if persistent:
            self.warned |= set(persistent)
            err_console.print(f"[yellow]warning:[/] level(s) {persistent} look collapsed at two epoch checks in a "
                              f"row (epoch {row['epoch']}: embedding std or effective rank fell); check the variance "
                              "coefficient and the lr.")


class _StepMetrics(ProgressColumn):
    """The latest logged losses per level and images/s, drawn beside the training bar."""

    def __init__(self):
        super().__init__()
        self.text, self.watch = "", _CollapseWatch()

    def render(self, task) -> Text:
        return Text(self.text)

    def log(self, row: dict) -> None:
        """sjea_tools.trainers.trainer's metrics callback: step rows update the text, epoch rows may warn."""
        if row["kind"] == "step":
            self.text = f"{_losses(row)}  {row['images_per_s']:.0f} img/s"
        else:
            self.watch.epoch(row)


def _losses(row: dict) -> str:
    return " ".join(f"L{k}=frozen" if level.get("frozen") else f"L{k}={level['loss']:.3f}"
                    for k, level in enumerate(row["levels"]))


class _PlainProgress:
    """Progress as plain lines, for a pipe or a log file (a live bar there shows nothing until the
    end): each stage at every tenth, training rows at every twentieth of the steps and the last."""

    def __init__(self, stream):
        self.stream, self.marks, self.total = stream, {}, None
        self.watch, self.started = _CollapseWatch(), time.perf_counter()

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __call__(self, task: str, done: int, total: int | None = None) -> None:
        if task == "train":
            self.total = total  # training lines come from the metrics rows (losses included)
            return
        if total:
            tenth = done * 10 // total
            if tenth > self.marks.get(task, -1):
                self.marks[task] = tenth
                self._line(f"{task}: {done}/{total}")

    def log(self, row: dict) -> None:
        if row["kind"] != "step":
            self.watch.epoch(row)
            return
        total = self.total or row["step"]
        twentieth = row["step"] * 20 // max(1, total)
        if twentieth > self.marks.get("train", -1) or row["step"] == total:
            self.marks["train"] = twentieth
            elapsed = time.perf_counter() - self.started
            self._line(f"step {row['step']}/{total} (epoch {row['epoch']:.1f})  {_losses(row)}  "
                       f"{row['images_per_s']:.0f} img/s  {elapsed:.0f} s")


def _train_with_progress(run_training, cfg, quiet: bool, json_out: bool, **options) -> Path:
    import contextlib
    import sys

    from ..io import writing_error

    live = sys.stdout.isatty() and sys.stderr.isatty()
    if quiet or live:
        metrics = _StepMetrics()
        context, log = rich_progress(quiet, metrics), (None if quiet else metrics.log)
    else:
        plain_lines = _PlainProgress(sys.stderr if json_out else sys.stdout)  # stdout carries only JSON then
        context, log = contextlib.nullcontext(plain_lines), plain_lines.log
    try:
        with context as progress:
            return run_training(cfg, progress=progress, log=log, **options)
    except RuntimeError as e:
        # torch.save on a full disk raises RuntimeError ("unexpected pos ...") with no errno; the
        # checkpoint is written atomically, so what was written before it stays as it was.
        disk = writing_error(e, options.get("out_dir") or Path("runs"))
        if disk is None:
            raise
        raise disk from None


def _read_summary(run_dir: Path) -> dict | None:
    import json

    from ..runs import SUMMARY_FILE

    try:  # other torchrun processes return before rank 0 writes it
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _print_summary(run_dir: Path, summary: dict | None) -> None:
    """What the run did, in a few lines on stdout: images, skipped files by name, steps, time, the
    last losses per level, the collapse state at the end, and where everything is."""
    from ..runs import METRICS_FILE, MODEL_FILE, SKIPPED_FILE

    if summary is not None:
        console.print(f"trained {summary['steps']} steps ({summary['epochs']:.1f} epochs) on {summary['images']} images "
                      f"in {summary['seconds']:.0f} s", highlight=False)
        if summary["skipped"]:
            console.print(f"skipped {summary['skipped']} unreadable file(s), listed in "
                          f"{markup_safe(run_dir / SKIPPED_FILE)}:", highlight=False)
            for line in _skipped_lines(run_dir / SKIPPED_FILE):
                console.print(f"  {markup_safe(line)}", highlight=False)
        if summary["final"]:
            console.print("final losses: " + "; ".join(
                f"level {k} frozen (no loss)" if lv.get("frozen") else
                f"level {k} {lv['loss']:.3f} (invariance {lv['invariance']:.3f}, variance {lv['variance']:.3f}, "
                f"covariance {lv['covariance']:.3f})" for k, lv in enumerate(summary["final"]["levels"])), highlight=False)
        console.print(f"collapse at the end: {_collapse_text(summary['collapse'])}", highlight=False)
        if summary.get("scores"):
            console.print(_scores_text(summary["scores"]), highlight=False)
        if summary["too_short"]:
            from ..data.recipe import too_short_warning

            err_console.print(f"[yellow]warning:[/] {too_short_warning(summary['steps'])}")
        if summary.get("latest_updated") is False:
            err_console.print("note: runs/LATEST was left as it is: it is not a pointer sjea wrote; pass --run "
                              f"{markup_safe(run_dir)} to later commands.")
        elif summary.get("latest_updated") is None:
            err_console.print(f"note: the run is outside runs/, so runs/LATEST was not moved; pass --run "
                              f"{markup_safe(run_dir)} to later commands.")
    console.print(f"model: {markup_safe(run_dir / MODEL_FILE)}; metrics: {markup_safe(run_dir / METRICS_FILE)}",
                  highlight=False)
    console.print(f"run folder: {markup_safe(run_dir)}", highlight=False)


def _skipped_lines(path: Path, show: int = 10) -> list[str]:
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [f"{row['path']}: {row['reason']}" for row in rows[:show]]
    return lines + ([f"... and {len(rows) - show} more"] if len(rows) > show else [])


def _scores_text(scores: dict) -> str:
    """Which levels' rows will be centred and whitened, and why any is centred only."""
    parts = [f"level{'s' if len(scores['whitened_levels']) > 1 else ''} "
             f"{', '.join(map(str, scores['whitened_levels']))} centred and whitened"] if scores["whitened_levels"] else []
    parts += [f"level {k} centred only ({why})" for k, why in scores["centred_only"].items()]
    return f"scores: {'; '.join(parts)} (statistics over {scores['centring_images']:,} training images)"


def _collapse_text(collapse: dict | None) -> str:
    if collapse is None:
        return "not checked (no epoch finished)"
    stats = "; ".join(f"level {k} std {lv['std']:.3f}, effective rank {lv['effective_rank']:.1f} of {lv['dim']}"
                      for k, lv in enumerate(collapse["levels"]))
    if collapse["collapsed_levels"]:
        state = f"level(s) {collapse['collapsed_levels']} collapsed at the last two checks"
    elif collapse["flagged_last_check"]:
        state = f"level(s) {collapse['flagged_last_check']} flagged at the last check only"
    else:
        state = "none"
    return f"{state} (epoch {collapse['epoch']}: {stats})"


def _print_dry_run(summary: dict) -> None:
    import json

    from rich.table import Table

    console.print_json(json.dumps(summary["config"]))
    table = Table(title="parameters per level")
    for col in ("level", "encoder", "projector", "Y dim", "Z dim", "trains"):
        table.add_column(col, justify="right")
    for lv in summary["levels"]:
        table.add_row(str(lv["level"]), f"{lv['encoder']:,}", f"{lv['projector']:,}", str(lv["representation_dim"]),
                      str(lv["embedding_dim"]), "frozen" if lv["frozen"] else "yes")
    console.print(table)
    console.print(f"total parameters: {summary['total_parameters']:,}")
    train = summary["config"]["train"]
    if train["frozen_levels"]:
        output = f", output {markup_safe(train['from_output'])}" if train.get("from_output") else ""
        n = train["frozen_levels"]
        console.print(f"frozen: {'level 0' if n == 1 else f'levels 0-{n - 1}'} from {markup_safe(train['from_path'])} (sha256 "
                      f"{train['from_sha256'][:16]}...{output}); forward only, no loss, not optimised", highlight=False)
    _print_plan(summary)


def _print_plan(summary: dict) -> None:
    """The data, the values resolved for it, the step plan and the measured time estimate."""
    from ..data.recipe import too_short_warning

    d, data = summary["config"]["data"], summary.get("data")
    if data is not None:
        unread = data["unreadable_in_sample"]
        console.print(f"data: {markup_safe(d['dataset'])}: {data['files']} image files, {data['colour_mode']}, median "
                      f"short side {data['median_short_side']} px (sample of {data['sampled']}"
                      + (f"; {len(unread)} unreadable in it, skipped and listed when training" if unread else "")
                      + ")", highlight=False)
        for note in data["recipe"]:
            console.print(f"  chosen from the data: {note}", highlight=False)
    mean, std = (", ".join(f"{v:.4f}" for v in d[k]) for k in ("mean", "std"))
    console.print(f"resolved: image_size {d['image_size']}, mean ({mean}), std ({std}), colour mode "
                  f"{data['colour_mode'] if data else 'RGB'}", highlight=False)
    plan = summary.get("plan")
    if plan is None:
        console.print("steps: unknown (the dataset is not on this machine)", highlight=False)
        return
    train = summary["config"]["train"]
    console.print(f"images: {plan['images']}; steps: {plan['steps_per_epoch']} per epoch (batch {train['batch_size']}) "
                  f"x {train['epochs']:g} epochs = {plan['total_steps']}"
                  + (f", stopping at {plan['stop_step']} (--max-steps)" if plan["stop_step"] < plan["total_steps"] else ""),
                  highlight=False)
    est = summary.get("estimate")
    if est:
        decode = f" + decoding every image once {est['decode_s']:.0f} s" if est["decode_s"] else ""
        console.print(f"estimated time: about {_duration(est['seconds'])} on {est['device']} ({plan['stop_step']} steps x "
                      f"{est['step_s']:.3f} s, timed on {est['timed_steps']} real steps here{decode})", highlight=False)
    if plan["steps_per_epoch"] and plan["too_short"]:
        err_console.print(f"[yellow]warning:[/] {too_short_warning(plan['stop_step'])}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else (f"{minutes} min {secs} s" if minutes else f"{secs} s")
