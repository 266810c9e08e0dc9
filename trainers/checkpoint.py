"""Full resume state, saved atomically (temporary file + rename) and loaded with weights_only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sjea_tools.runs import CHECKPOINT_FILE, atomic_torch_save, safe_torch_load


def save_checkpoint(run_dir: Path, *, model, optimizer, scaler, step: int, cfg_dict: dict) -> Path:
    from sjea_tools import __version__

    state = {
        "format": "sjea-checkpoint/1",
        "version": __version__,
        "config": cfg_dict,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    path = Path(run_dir) / CHECKPOINT_FILE
    atomic_torch_save(state, path)
    return path


def load_checkpoint(run_dir: Path) -> dict:
    return safe_torch_load(Path(run_dir) / CHECKPOINT_FILE)


def restore_checkpoint(state: dict, *, model, optimizer, scaler) -> int:
    """Put a loaded checkpoint's weights, optimiser, scaler and RNG states back; returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state)
    return int(state["step"])


def restore_rng(state: dict) -> None:
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), 0, 0.0))


def _numpy_state() -> dict:
    _, keys, pos, _, _ = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
