"""The end-of-epoch collapse check: embedding spread and effective rank per level."""

from __future__ import annotations

import math

import torch

from sjea_tools.metrics import effective_rank, mean_std


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
