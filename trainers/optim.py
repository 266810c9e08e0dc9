"""Optimisers and the per-step learning-rate schedule (linear warm-up, then cosine)."""

from __future__ import annotations

import math

import torch

from sjea_tools.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS as in the official VICReg code; biases and norm parameters (1-D) are excluded from
    weight decay and from the trust-ratio adaptation."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Adam uses lr as given; LARS scales the base lr linearly with the batch (VICReg recipe)."""
    return cfg.lr * batch_size / 256 if cfg.optimizer == "lars" else cfg.lr


def build_optimizer(params, cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    lr = peak_lr(cfg, batch_size)
    if cfg.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.eta)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak lr at a step: linear warm-up from 0, then cosine to final_ratio."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
