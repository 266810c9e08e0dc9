"""Choosing the compute device, once for every command."""

from __future__ import annotations

from .errors import SjeaError


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cpu', 'cuda', 'cuda:N' are checked."""
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return device  # before importing torch: the CPU query path runs without it
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise SjeaError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto.")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise SjeaError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); "
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}.")
        return device
    raise SjeaError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'.")
