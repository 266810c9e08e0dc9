"""The run folder: where a training run keeps everything later commands load.

    runs/<name>/config.json        the resolved RunConfig
    runs/<name>/metrics.jsonl      one JSON object per logged step / epoch
    runs/<name>/checkpoints/last.pt  full resume state (sjea_tools.trainers.checkpoint)
    runs/<name>/model.pt           the final weights with their config
    runs/<name>/skipped.jsonl      image files training skipped, with the reason (one JSON per line)
    runs/<name>/summary.json       what the finished run did: images, skipped, steps, time, final losses
    runs/LATEST                    path of the run written last (what commands use by default)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import RunConfig
from .errors import SjeaError
from .io import atomic_write, atomic_write_text, sha256_file

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"
SKIPPED_FILE = "skipped.jsonl"
SUMMARY_FILE = "summary.json"
LATEST_FILE = "LATEST"
DEFAULT_RUNS_DIR = Path("runs")


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: a kill never leaves a broken file."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: Path) -> dict:
    """torch.load with weights_only=True; a corrupt file is a one-line error."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SjeaError(f"{path} does not exist.") from None
    except Exception as e:
        raise SjeaError(f"{path} is not a readable sjea checkpoint ({type(e).__name__}); retrain or "
                        "restore the file.") from None


def set_latest(run_dir: Path, runs_dir: Path = DEFAULT_RUNS_DIR) -> bool:
    """Point runs_dir/LATEST (what commands use without --run) at the run; False, and nothing
    written, when a file of that name exists that is not such a pointer (a user's own file)."""
    run_dir = Path(run_dir).resolve()
    pointer = Path(runs_dir) / LATEST_FILE
    if pointer.exists() and not is_latest_pointer(pointer):
        return False
    atomic_write_text(pointer, str(run_dir) + "\n")
    return True


def is_latest_pointer(path: Path) -> bool:
    """Whether `path` holds what set_latest writes: one absolute path, to a run folder or to
    nothing (a run deleted since)."""
    try:
        if not path.is_file() or path.stat().st_size > 4096:
            return False
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    if len(lines) != 1 or not Path(lines[0]).is_absolute():
        return False
    target = Path(lines[0])
    return not target.exists() or (target / CONFIG_FILE).is_file()


# What a run that failed before its first checkpoint leaves: nothing worth keeping.
START_FILES = (CONFIG_FILE, METRICS_FILE, SKIPPED_FILE)


def is_failed_start(run_dir: Path) -> bool:
    """A folder holding only what a run writes before its first checkpoint (no model, nothing else)."""
    names = {p.name for p in Path(run_dir).iterdir()}
    checkpoints = Path(run_dir) / CHECKPOINT_FILE.parent
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return False
    return names <= set(START_FILES) | {CHECKPOINT_FILE.parent.name} and _is_saved_config(Path(run_dir) / CONFIG_FILE)


def _is_saved_config(path: Path) -> bool:
    """Whether `path` is absent or a full RunConfig as save_config writes it (a user's own partial
    settings file named config.json is not, and is never removed)."""
    if not path.exists():
        return True
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and set(saved) == set(RunConfig().to_dict())


def discard_failed_start(run_dir: Path) -> None:
    """Remove what a run wrote before failing ahead of its first checkpoint, so that the same
    command can run again; a folder holding anything else is left alone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_failed_start(run_dir):
        return
    for name in START_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in (run_dir / CHECKPOINT_FILE.parent, run_dir):
        try:
            folder.rmdir()
        except OSError:
            pass  # absent, or not empty (a temporary file being written): leave it


def prepare_run_dir(cfg: RunConfig, out_dir: Path | None, overwrite: bool, runs_dir: Path) -> Path:
    """Create the folder of a new run (`out_dir`, else runs_dir/<config name>); an existing
    non-empty one is refused unless `overwrite`, which empties it first."""
    run_dir = Path(out_dir) if out_dir else Path(runs_dir) / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise SjeaError(f"{run_dir} exists and is not a folder; choose another --out.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if is_failed_start(run_dir):  # what a killed start left (config.json only): nothing to continue
            discard_failed_start(run_dir)
        elif not overwrite:
            raise SjeaError(f"run folder {run_dir} already exists; continue it with --resume {run_dir}, "
                            "replace it with --overwrite, or pick another --out.")
        else:
            shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SjeaError(f"cannot create run folder {run_dir}: {e.strerror or e}; choose another --out.") from None
    return run_dir


def find_run(run: str | Path | None = None, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    """The run folder named, or the latest one under ./runs."""
    if run is None:
        pointer = Path(runs_dir) / LATEST_FILE
        if not pointer.is_file():
            raise SjeaError(f"no run found ({pointer} is missing): train one with 'sjea train' or pass --run RUN.")
        run = pointer.read_text().strip()
    path = Path(run)
    if path.is_file() and path.suffix == ".pt":
        return path.parent
    if not path.is_dir():
        raise SjeaError(f"run folder {path} does not exist; pass the folder 'sjea train' wrote (e.g. runs/tiny).")
    if not (path / MODEL_FILE).is_file() and not (path / CHECKPOINT_FILE).is_file():
        raise SjeaError(f"{path} holds no model ({MODEL_FILE}) or checkpoint; is it a run folder from 'sjea train'?")
    return path


def model_file(run_dir: Path) -> Path:
    """The final model if training finished, else the last checkpoint."""
    final = Path(run_dir) / MODEL_FILE
    return final if final.is_file() else Path(run_dir) / CHECKPOINT_FILE


def save_model(run_dir: Path, model, cfg: RunConfig) -> Path:
    from . import __version__

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(run_dir) / MODEL_FILE
    atomic_torch_save({"format": "sjea-model/1", "version": __version__, "config": cfg.to_dict(),
                       "model": state}, path)
    return path


def load_model(run: str | Path | None = None, device: str | torch.device = "cpu"):
    """The model of a run (default: the latest), in eval mode, with its config attached."""
    from .models import build_model
    from .models.stacked import CENTRE_PREFIX, WHITEN_PREFIX

    run_dir = find_run(run)
    path = model_file(run_dir)
    blob = safe_torch_load(path)
    if not isinstance(blob, dict) or "config" not in blob or "model" not in blob:
        raise SjeaError(f"{path} is not an sjea model file; pass a run folder written by 'sjea train'.")
    cfg = RunConfig.from_dict(blob["config"])
    model = build_model(cfg)
    try:
        centres = [blob["model"].get(f"{CENTRE_PREFIX}{k}") for k in range(model.num_levels)]
        if any(c is not None for c in centres):  # a model.pt from before centring has none: not centred
            model.set_centres(centres, [blob["model"].get(f"{WHITEN_PREFIX}{k}") for k in range(model.num_levels)])
        model.load_state_dict(blob["model"])
    except RuntimeError as e:
        raise SjeaError(f"{path} does not match its config ({str(e).splitlines()[0]}).") from None
    except (ValueError, TypeError) as e:  # centres of the wrong width, or only some levels'
        raise SjeaError(f"{path} does not match its config ({e}).") from None
    model.run_dir = run_dir
    model.model_file = path
    model.eval()
    return model.to(device)


def model_id(model_or_path) -> str:
    """sha256 of the file a model was loaded from: what stores and exports record."""
    path = getattr(model_or_path, "model_file", model_or_path)
    return sha256_file(Path(path))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise SjeaError(f"{path} does not exist: this run has no training metrics.")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """After a resume, drop metric rows a killed run wrote past its last checkpoint (at `step`)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [row for row in read_metrics(run_dir) if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
