"""Real embeddings at 1M+ rows for bench_hierarchical_scale.py: Fashion-MNIST's 70,000 images and
seeded augmented copies, embedded by a trained run (every level), cached as .npy.

Queries: `queries` test images drawn with a seed, never in the bank (neither they nor copies of them).
Bank: the other 69,000 images (copy 0, as they are) and `copies` - 1 augmented copies of each
(copy c: rows c * 69,000 ...): a horizontal flip with p = 0.5, a crop/zoom of scale 0.85-1.0, a
shift of up to 2 pixels each way, and a brightness factor of 0.8-1.2, drawn per image from
torch.Generator(seed + c). Written into one memory-mapped .npy per level, a copy at a time; a
marker file records the copies done, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def augment(x, gen):
    """Seeded flip, small crop/shift and brightness of a float (N, 3, H, W) batch in [0, 1]."""
    import torch
    import torch.nn.functional as F

    n = len(x)
    u = torch.rand(n, 5, generator=gen)
    flip = torch.where(u[:, 0] < 0.5, -1.0, 1.0)
    scale = 0.85 + 0.15 * u[:, 1]
    shift = (u[:, 2:4] * 2 - 1) * (2.0 * 2 / x.shape[-1])  # up to 2 pixels, in grid units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out * (0.8 + 0.4 * u[:, 4]).view(n, 1, 1, 1)).clamp_(0, 1)


def embed_scale(run: str, copies: int, queries: int, cache: Path, seed: int = 0, batch: int = 1024,
                log=print) -> dict:
    """{"model_id", "bank": [path per level], "query": [path per level], "rows", "originals"}; embeds
    what the cache lacks."""
    import torch

    from sjea_tools.data import load_dataset
    from sjea_tools.evaluation import random_subset
    from sjea_tools.runs import find_run, load_model, model_id

    torch.set_num_threads(2)
    model = load_model(find_run(run))
    mid = model_id(model)
    folder = Path(cache) / f"{mid[:16]}-{copies}-{queries}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = load_dataset("fashion-mnist", None, "train"), load_dataset("fashion-mnist", None, "test")
    held = random_subset(len(test), queries, seed + 1)
    rest = np.setdiff1d(np.arange(len(test)), held)
    originals = np.concatenate([train.pixels, test.pixels[rest]])
    levels = list(range(model.num_levels))
    mean = torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1)

    def embed(pixels, gen=None):
        out = [[] for _ in levels]
        with torch.no_grad():
            for s in range(0, len(pixels), batch):
                x = torch.as_tensor(pixels[s:s + batch]).permute(0, 3, 1, 2).float().div_(255.0)
                if gen is not None:
                    x = augment(x, gen)
                for lv, y in zip(levels, model.forward_levels((x - mean) / std, levels)):
                    out[lv].append(y.float().numpy())
        return [np.concatenate(o) for o in out]

    query_paths = [folder / f"query{lv}.npy" for lv in levels]
    if not all(p.exists() for p in query_paths):
        for p, y in zip(query_paths, embed(test.pixels[held])):
            np.save(p, y)
        np.save(folder / "query_labels.npy", test.labels[held])
    n0, rows = len(originals), len(originals) * copies
    bank_paths = [folder / f"bank{lv}.npy" for lv in levels]
    marker = folder / "copies_done.json"
    done = json.loads(marker.read_text()) if marker.exists() else []
    if not all(p.exists() for p in bank_paths):
        done = []
    dims = [np.load(p, mmap_mode="r").shape[1] for p in query_paths]
    maps = [np.lib.format.open_memmap(p, mode="r+" if done else "w+", dtype=np.float32, shape=(rows, d))
            for p, d in zip(bank_paths, dims)]
    for c in range(copies):
        if c in done:
            continue
        t0 = time.perf_counter()
        ys = embed(originals, None if c == 0 else torch.Generator().manual_seed(seed * 1000 + c))
        for m, y in zip(maps, ys):
            m[c * n0:(c + 1) * n0] = y
            m.flush()
        done.append(c)
        marker.write_text(json.dumps(done))
        log(f"copy {c + 1}/{copies} embedded in {time.perf_counter() - t0:.0f} s")
    np.save(folder / "bank_labels.npy", np.tile(np.concatenate([train.labels, test.labels[rest]]), copies))
    return {"model_id": mid, "bank": bank_paths, "query": query_paths, "rows": rows, "originals": n0,
            "folder": folder}
