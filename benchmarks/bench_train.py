"""Training throughput: this trainer against a straightforward baseline, same model and batch.

    this trainer : uint8 batches, two views augmented batched on the training device,
                   bf16 autocast + channels_last on GPU
    baseline     : per-image torchvision augmentation in DataLoader workers, fp32,
                   default memory format (the usual PyTorch recipe)

Both run the real `sjea_tools.trainers.trainer.train` on real Fashion-MNIST; images/s comes from the
trainer's own metrics (images per second of wall time between log rows, first row dropped).

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps 40] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from sjea_tools.config import resolve_config
from sjea_tools.trainers.trainer import train


def measure(device: str, steps: int, batch: int, fast: bool, workers: int, preset: str, levels: int,
            extra: dict) -> float:
    overrides = {**extra,
        "train.device": device, "train.max_steps": steps, "train.batch_size": batch, "train.log_every": 5,
        "train.checkpoint_every": 10**9, "train.augment_on_device": fast, "train.channels_last": fast,
        "train.precision": "auto" if fast else "fp32", "data.workers": workers, "model.levels": levels,
    }
    cfg = resolve_config(preset, overrides=overrides)
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, out_dir=Path(tmp) / "run", runs_dir=Path(tmp),
              log=lambda row: rates.append(row["images_per_s"]) if row["kind"] == "step" else None)
    return statistics.median(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra config override section.key=value")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    base = measure(args.device, args.steps, args.batch_size, False, args.workers, args.preset, args.levels, extra)
    fast = measure(args.device, args.steps, args.batch_size, True, args.workers, args.preset, args.levels, extra)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
              "cores": torch.get_num_threads(), "preset": args.preset, "levels": args.levels,
              "batch_size": args.batch_size, "steps": args.steps, "overrides": extra, "baseline_images_per_s": round(base, 1),
              "sjea_images_per_s": round(fast, 1), "speedup": round(fast / base, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
