"""The default recipe's CPU training step, part by part, two ways each, in one run:

    augmentation : both views of a grey batch as one channel (expanded at the end) against all
                   three channels (`sjea_tools.data.augment.augment_batch`, grey=True / False)
    crop         : `resized_crop_flip`'s sampling grid from two per-image vectors against the same
                   grid through F.affine_grid (the code before), same pixels
    model step   : forward, backward and optimiser step of the `tiny` model with its inputs and
                   weights in channels_last against the default (contiguous) memory format
    level 1      : the same step with the authors' ResNet-18 level 1 instead of the default's MLP
                   (what `reproduce_fashion_mnist.py --level1 resnet` costs a run; --resnet-reps 0 skips)

Real Fashion-MNIST batches, the trainer's own functions (`build_training`, `train_step`), the two
ways alternating so that load changes hit both alike; median milliseconds and the ratio.

    .venv/bin/python benchmarks/bench_step.py [--reps 40] [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docblock import write_block  # noqa: E402
from sjea_tools.config import resolve_config  # noqa: E402
from sjea_tools.data import augment as A  # noqa: E402
from sjea_tools.trainers.distributed import DistInfo  # noqa: E402
from sjea_tools.trainers.trainer import build_training, train_step  # noqa: E402

BEGIN, END = "<!-- bench_step:begin -->", "<!-- bench_step:end -->"


def alternate(ways: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of each zero-argument callable, run in turn `reps` times (2 warm-ups)."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(reps + 2):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 2:
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def affine_grid_crop(x: torch.Tensor, size: int, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The crop as it was before bench_step: the same sampling grid through F.affine_grid (a batched
    matmul over every output pixel), kept here as the other way."""
    import torch.nn.functional as F

    n, _, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = w / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1).view(n, 1, 1, 2)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], dim=1).view(n, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--resnet-reps", type=int, default=6,
                    help="repetitions of the step with the authors' ResNet-18 level 1 (slow on CPU; 0 skips it)")
    ap.add_argument("--write-docs", action="store_true", help="write the result block into docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sjea_tools.data import load_dataset

    cfg = resolve_config("tiny", overrides={"train.device": "cpu"})
    spec, batch = cfg.preprocess_spec, cfg.train.batch_size
    data = load_dataset("fashion-mnist", split="train")
    px = torch.from_numpy(np.ascontiguousarray(data.pixels[:batch]))
    views = A.view_settings(cfg.data)
    g = torch.Generator().manual_seed(0)

    def augment(grey: bool):
        return lambda: [A.augment_batch(px, v, spec.image_size, spec.mean, spec.std, g, grey) for v in views]

    aug = alternate({"one channel": augment(True), "three channels": augment(False)}, args.reps)

    x = px.permute(0, 3, 1, 2).float().div(255)
    boxes = A.crop_boxes(batch, x.shape[2], x.shape[3], views[0].crop_scale, views[0].crop_ratio, g)
    flip = torch.rand(batch, generator=g) < 0.5
    same = (A.resized_crop_flip(x, spec.image_size, boxes, flip)
            - affine_grid_crop(x, spec.image_size, boxes, flip)).abs().amax().item()
    assert same < 1e-5, f"the two crops differ by {same}"
    crop = alternate({"two vectors": lambda: A.resized_crop_flip(x, spec.image_size, boxes, flip),
                      "affine_grid": lambda: affine_grid_crop(x, spec.image_size, boxes, flip)}, args.reps)

    v1, v2 = (A.augment_batch(px, v, spec.image_size, spec.mean, spec.std, g) for v in views)
    trainings = {}
    for name, cl in (("channels_last", True), ("contiguous", False)):
        torch.manual_seed(0)
        way = resolve_config("tiny", overrides={"train.device": "cpu", "train.channels_last": cl})
        t = build_training(way, DistInfo(), torch.device("cpu"), steps_per_epoch=469)  # converts the model
        fmt = torch.channels_last if cl else torch.contiguous_format
        inputs = tuple(v.contiguous(memory_format=fmt) for v in (v1, v2))
        conv = next(w for w in t.model.parameters() if w.dim() == 4)
        assert conv.is_contiguous(memory_format=fmt), "the trainer did not set the model's memory format"
        trainings[name] = (t, inputs)
    step = alternate({name: (lambda t=t, i=i: train_step(t, *i, step=100)) for name, (t, i) in trainings.items()},
                     args.reps)

    level1 = {}
    if args.resnet_reps:  # what the reproduction's `--level1 resnet` costs against the default's MLP level 1
        resnet = build_training(resolve_config("tiny", overrides={"train.device": "cpu", "model.encoder": "resnet"}),
                                DistInfo(), torch.device("cpu"), steps_per_epoch=469)
        t, i = trainings["channels_last"]
        level1 = alternate({"mlp": lambda: train_step(t, *i, step=100),
                            "resnet": lambda: train_step(resnet, *i, step=100)}, args.resnet_reps)
    steps = math.ceil(cfg.train.epochs * (len(data) // batch))  # as the trainer: whole batches per epoch

    result = {"threads": args.threads, "batch": batch, "reps": args.reps, "load_before": os.getloadavg()[0],
              "augment_ms": aug, "augment_ratio": aug["three channels"] / aug["one channel"],
              "crop_ms": crop, "crop_ratio": crop["affine_grid"] / crop["two vectors"], "crop_max_difference": same,
              "step_ms": step, "step_ratio": step["contiguous"] / step["channels_last"],
              "level1_step_ms": level1, "steps_per_run": steps}
    print(json.dumps(result, indent=1))
    if args.write_docs:
        block = "\n".join([
            BEGIN, "",
            f"`.venv/bin/python benchmarks/bench_step.py --reps {args.reps} --threads {args.threads} --write-docs` "
            f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {args.threads} torch threads, 1-min load "
            f"{result['load_before']:.2f} at the start); the `tiny` preset, batch {batch}, real Fashion-MNIST, "
            "median ms over alternating repetitions:", "",
            "| part | this way | ms | other way | ms | ratio |", "|---|---|---|---|---|---|",
            f"| both views' augmentation | one channel | {aug['one channel']:.1f} | three channels | "
            f"{aug['three channels']:.1f} | **{result['augment_ratio']:.2f}x** |",
            f"| crop + flip of one view (three channels; same pixels within {same:.0e}) | grid from two vectors | "
            f"{crop['two vectors']:.2f} | F.affine_grid | {crop['affine_grid']:.2f} | **{result['crop_ratio']:.2f}x** |",
            f"| model step (forward, backward, Adam) | channels_last | {step['channels_last']:.1f} | contiguous | "
            f"{step['contiguous']:.1f} | **{result['step_ratio']:.2f}x** |"]
            + ([f"| model step, level 1 (both channels_last) | MLP (the default) | {level1['mlp']:.1f} | the authors' "
                f"ResNet-18 | {level1['resnet']:.1f} | **{level1['resnet'] / level1['mlp']:.2f}x** the cost |", "",
                f"At the default's {steps:,} steps, the steps alone of one run take {steps * level1['mlp'] / 60e3:.1f} "
                f"min with the MLP level 1 and {steps * level1['resnet'] / 60e3:.1f} min with the ResNet level 1 "
                f"({args.resnet_reps} repetitions of the latter)."] if level1 else [])
            + ["", END])
        write_block(ROOT / "docs" / "benchmarks.md", BEGIN, END, block,
                    "## The CPU training step, part by part (`benchmarks/bench_step.py`)")
        print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
