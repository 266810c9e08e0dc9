"""VICReg, exactly as the official code computes it, and the weighted sum over stack levels.

Pure functions on tensors. Under torch.distributed the variance and covariance terms see the
embeddings of every rank (gathered with gradients), the invariance term the local batch only,
as in the official implementation; averaging the ranks' losses (what DDP does to gradients)
gives the single-process loss on the concatenated batch.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


class VICRegTerms(NamedTuple):
    total: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's share
    (the official VICReg FullGatherLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to each rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def _off_diagonal_sq_sum(c: torch.Tensor) -> torch.Tensor:
    return c.pow(2).sum() - c.diagonal().pow(2).sum()


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gather: bool = True) -> VICRegTerms:
    """VICReg loss of two (N, D) embedding batches; the terms are returned unweighted."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"vicreg_loss needs two (N, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()  # the statistics are unstable in half precision
    invariance = F.mse_loss(z1, z2)
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n, d = z1.shape
    if n < 2:  # the variance and covariance divide by n - 1: one row would give NaN silently
        raise ValueError(f"vicreg_loss needs at least 2 rows in the (gathered) batch, got {n}")
    z1 = z1 - z1.mean(dim=0)
    z2 = z2 - z2.mean(dim=0)
    std1 = torch.sqrt(z1.var(dim=0) + 1e-4)
    std2 = torch.sqrt(z2.var(dim=0) + 1e-4)
    variance = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
    cov1 = (z1.T @ z1) / (n - 1)
    cov2 = (z2.T @ z2) / (n - 1)
    covariance = _off_diagonal_sq_sum(cov1) / d + _off_diagonal_sq_sum(cov2) / d
    total = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return VICRegTerms(total, invariance, variance, covariance)


def stacked_vicreg_loss(z1s: Sequence[torch.Tensor], z2s: Sequence[torch.Tensor],
                        sim_coeffs: Sequence[float], std_coeffs: Sequence[float],
                        cov_coeffs: Sequence[float], level_weights: Sequence[float],
                        gather: bool = True) -> tuple[torch.Tensor, list[VICRegTerms]]:
    """Sum over levels of lambda_k * VICReg_k; also returns every level's terms for logging."""
    per_level = [
        vicreg_loss(a, b, s, v, c, gather=gather)
        for a, b, s, v, c in zip(z1s, z2s, sim_coeffs, std_coeffs, cov_coeffs)
    ]
    total = sum(w * t.total for w, t in zip(level_weights, per_level))
    return total, per_level
