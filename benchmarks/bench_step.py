"""The default recipe's CPU training step, part by part, two ways each, in one run:

    augmentation : both views of a grey batch as one channel (expanded at the end) against all
                   three channels (`sjea_tools.data.augment.augment_batch`, grey=True / False)
    model step   : forward, backward and optimiser step of the `tiny` model with its inputs and
                   weights in channels_last against the default (contiguous) memory format

Real Fashion-MNIST batches, the trainer's own functions (`build_training`, `train_step`), the two
ways alternating so that load changes hit both alike; median milliseconds and the ratio.

    .venv/bin/python benchmarks/bench_step.py [--reps 40] [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
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
from trainers.distributed import DistInfo  # noqa: E402
from trainers.trainer import build_training, train_step  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
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

    v1, v2 = (A.augment_batch(px, v, spec.image_size, spec.mean, spec.std, g) for v in views)
    trainings = {}
    for name, cl in (("channels_last", True), ("contiguous", False)):
        torch.manual_seed(0)
        t = build_training(cfg, DistInfo(), torch.device("cpu"), steps_per_epoch=469)
        inputs = (v1, v2)
        if cl:
            t.model.to(memory_format=torch.channels_last)
            inputs = tuple(v.contiguous(memory_format=torch.channels_last) for v in inputs)
        trainings[name] = (t, inputs)
    step = alternate({name: (lambda t=t, i=i: train_step(t, *i, step=100)) for name, (t, i) in trainings.items()},
                     args.reps)

    result = {"threads": args.threads, "batch": batch, "reps": args.reps, "load_before": os.getloadavg()[0],
              "augment_ms": aug, "augment_ratio": aug["three channels"] / aug["one channel"],
              "step_ms": step, "step_ratio": step["contiguous"] / step["channels_last"]}
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
            f"| model step (forward, backward, Adam) | channels_last | {step['channels_last']:.1f} | contiguous | "
            f"{step['contiguous']:.1f} | **{result['step_ratio']:.2f}x** |", "", END])
        write_block(ROOT / "docs" / "benchmarks.md", BEGIN, END, block,
                    "## The CPU training step, part by part (`benchmarks/bench_step.py`)")
        print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
