"""Plain VICReg (1 level) against 2-level S-JEA on real Fashion-MNIST, on CPU, at a matched
parameter budget and the same number of images seen; regenerates every number and picture of
docs/reproduction.md.

    .venv/bin/python benchmarks/reproduce_fashion_mnist.py            # train (if needed), evaluate, plot, write
    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --retrain  # train both again from scratch

S-JEA is the `tiny` preset as it is (ResNet-18 level 0, MLP level 1). The VICReg baseline is the
same preset with one level and a wider projector, its hidden width chosen here so that the total
parameter count is as close as possible to S-JEA's. Both train on the same images for the same
epochs with the same seed. Runs go to runs/repro-*; the tables and plots are written between the
markers of docs/reproduction.md and to docs/images/.
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reproduction.md"
IMAGES = ROOT / "docs" / "images"
BEGIN, END = "<!-- results:begin (written by benchmarks/reproduce_fashion_mnist.py) -->", "<!-- results:end -->"


def configs(epochs: float, limit: int, device: str, data_dir: str | None):
    from sjea_tools.config import resolve_config
    from sjea_tools.models import build_model

    common = {"train.epochs": epochs, "data.limit": limit, "train.seed": 0, "train.device": device,
              "data.data_dir": data_dir}
    sjea = resolve_config("tiny", overrides={**common, "model.levels": 2, "name": "repro-sjea"})
    target = total_params(build_model(sjea))
    best = None
    for hidden in range(512, 2049, 64):  # a wider projector is the cheapest way to add parameters at one level
        cfg = resolve_config("tiny", overrides={**common, "model.levels": 1, "name": "repro-vicreg",
                                                "model.projector": f"{hidden}-{hidden}-256"})
        n = total_params(build_model(cfg))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (cfg, n)
    return sjea, best[0]


def total_params(model) -> int:
    return sum(c["encoder"] + c["projector"] for c in model.parameter_counts())


def train_if_needed(cfg, run_dir: Path, retrain: bool) -> Path:
    from trainers.trainer import train

    if (run_dir / "model.pt").is_file() and not retrain:
        print(f"{run_dir}: trained already (pass --retrain to train again)")
        return run_dir
    if (run_dir / "checkpoints" / "last.pt").is_file() and not retrain:
        train(cfg, out_dir=run_dir, resume=True)  # an interrupted training continues
    else:
        train(cfg, out_dir=run_dir, overwrite=True)
    return run_dir


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def level_table(rows: list[tuple[str, dict]]) -> str:
    head = ("| model | level | probe top-1 | probe top-5 | k-NN top-1 | RankMe | mean std | coarse k-NN | "
            "coarse P@10 | fine P@10 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, result in rows:
        for lv in result["levels"]:
            h = lv["hierarchy"]
            lines.append(f"| {name} | {lv['level']} | {fmt(lv['linear_top1'])} | {fmt(lv['linear_top5'])} | "
                         f"{fmt(lv['knn_top1'])} | {fmt(lv['effective_rank'])} | {lv['mean_std']:.4f} | "
                         f"{fmt(h['coarse']['knn_top1'])} | {fmt(h['coarse']['precision_at_10'])} | "
                         f"{fmt(h['fine']['precision_at_10'])} |")
    return head + "\n".join(lines) + "\n"


def search_table(result: dict) -> str:
    head = "| search order | coarse k-NN | coarse P@10 | fine k-NN | fine P@10 |\n|---|---|---|---|---|\n"
    lines = [f"| {' → '.join(map(str, r['order']))} | {fmt(r['coarse']['knn_top1'])} | "
             f"{fmt(r['coarse']['precision_at_10'])} | {fmt(r['fine']['knn_top1'])} | {fmt(r['fine']['precision_at_10'])} |"
             for r in result.get("hierarchical_search", [])]
    return head + "\n".join(lines) + "\n"


def versus(name: str, a: float, b: float, what: str) -> str:
    d = a - b
    word = "ahead of" if d > 0.05 else "behind" if d < -0.05 else "level with"
    return f"- {name} is {word} VICReg on {what}: {a:.1f} against {b:.1f} ({d:+.1f} points)."


def comparison(sjea: dict, vicreg: dict) -> str:
    v = vicreg["levels"][0]
    lines = []
    for lv in sjea["levels"]:
        name = f"S-JEA level {lv['level']}"
        lines.append(versus(name, lv["linear_top1"], v["linear_top1"], "the linear probe (top-1)"))
        lines.append(versus(name, lv["knn_top1"], v["knn_top1"], "weighted k-NN (top-1)"))
        lines.append(versus(name, lv["hierarchy"]["coarse"]["precision_at_10"], v["hierarchy"]["coarse"]["precision_at_10"],
                            "coarse precision@10"))
    lo, hi = sjea["levels"][0]["hierarchy"], sjea["levels"][-1]["hierarchy"]
    for label in ("coarse", "fine"):
        d = hi[label]["precision_at_10"] - lo[label]["precision_at_10"]
        lines.append(f"- From S-JEA level 0 to level {sjea['levels'][-1]['level']}, {label} precision@10 "
                     f"{'rises' if d > 0 else 'falls'} by {abs(d):.1f} points "
                     f"({lo[label]['precision_at_10']:.1f} → {hi[label]['precision_at_10']:.1f}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2.0, help="training epochs of both models (the tiny preset's)")
    ap.add_argument("--limit", type=int, default=20000, help="training images (the tiny preset's)")
    ap.add_argument("--max-train", type=int, default=20000, help="k-NN bank / probe training images")
    ap.add_argument("--max-test", type=int, default=None, help="query images (default: the whole test split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--device", default="cpu", help="training and evaluation device (the comparison is a CPU one)")
    ap.add_argument("--data-dir", default=None, help="folder of the four Fashion-MNIST IDX files (default: the usual places)")
    ap.add_argument("--retrain", action="store_true", help="train both models again")
    ap.add_argument("--train-only", action="store_true", help="stop after training")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the two run folders go")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    from sjea_tools import evaluation, plots
    from sjea_tools.models import build_model

    sjea_cfg, vicreg_cfg = configs(args.epochs, args.limit, args.device, args.data_dir)
    runs = {}
    for key, cfg in (("sjea", sjea_cfg), ("vicreg", vicreg_cfg)):
        runs[key] = train_if_needed(cfg, args.runs / f"repro-{key}", args.retrain)
    params = {key: [c["encoder"] + c["projector"] for c in build_model(cfg).parameter_counts()]
              for key, cfg in (("sjea", sjea_cfg), ("vicreg", vicreg_cfg))}
    if args.train_only:
        return

    results = {}
    for key, run in runs.items():
        for weights in ("trained", "random-init"):
            t0 = time.perf_counter()
            results[key, weights] = evaluation.evaluate_run(run, max_train=args.max_train, max_test=args.max_test,
                                                            random_init=weights == "random-init", device=args.device)
            print(f"{key} {weights}: evaluated in {time.perf_counter() - t0:.0f} s")

    IMAGES.mkdir(parents=True, exist_ok=True)
    pictures = {}
    for key, run in runs.items():
        cls = "Sandal"
        for path in plots.plot_run(run, class_name=cls, device=args.device):
            target = IMAGES / f"fmnist_{key}_{path.name}"
            shutil.copyfile(path, target)
            pictures[key, path.stem.split("_")[0]] = target.relative_to(DOC.parent)

    def images_and_seconds(run: Path) -> tuple[int, float]:
        """Images seen (last step x batch) and training seconds summed from the logged throughput."""
        from sjea_tools.runs import read_metrics

        batch = json.loads((run / "config.json").read_text())["train"]["batch_size"]
        steps = [r for r in read_metrics(run) if r.get("kind") == "step"]
        seconds, previous = 0.0, 0
        for r in steps:
            seconds += (r["step"] - previous) * batch / r["images_per_s"]
            previous = r["step"]
        return previous * batch, seconds

    s, v = results["sjea", "trained"], results["vicreg", "trained"]
    sr, vr = results["sjea", "random-init"], results["vicreg", "random-init"]
    out = [BEGIN, "",
           f"Measured by `benchmarks/reproduce_fashion_mnist.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}, "
           f"device {args.device}, {args.threads} torch thread(s) ({os.cpu_count()} CPU cores visible). Training: {args.limit} Fashion-MNIST training images, {args.epochs:g} epochs, "
           f"batch {sjea_cfg.train.batch_size}, seed 0, for both models. Evaluation: k-NN bank and probe training set "
           f"= {s['n_train']} random training images, queries = {s['n_test']} test images; "
           f"probe {s['settings']['probe_epochs']} epochs, lr {s['settings']['probe_lr']}; k-NN k={s['settings']['knn_k']}, "
           f"T={s['settings']['knn_temperature']}.", "",
           "| model | parameters per level (encoder + projector) | total | images seen (steps × batch) | training time (from logged throughput) |",
           "|---|---|---|---|---|"]
    for key, label in (("sjea", "S-JEA, 2 levels (`tiny`)"), ("vicreg", f"VICReg, 1 level, projector `{vicreg_cfg.model.projector}`")):
        seen, secs = images_and_seconds(runs[key])
        out.append(f"| {label} | {' + '.join(f'{n:,}' for n in params[key])} | {sum(params[key]):,} | "
                   f"{seen:,} | {secs:.0f} s |")
    out += ["", "### Every metric, per level (trained weights)", "", level_table([("S-JEA", s), ("VICReg", v)]),
            "### The same architectures at random initialisation (BatchNorm statistics from training images)", "",
            level_table([("S-JEA random", sr), ("VICReg random", vr)]),
            "### Hierarchical search in S-JEA (candidates from the first level of the order, re-ranked by the next)", "",
            search_table(s), "### S-JEA against VICReg, as measured", "", comparison(s, v),
            "### Plots", ""]
    for key, label in (("sjea", "S-JEA"), ("vicreg", "VICReg")):
        for kind, caption in (("tsne", "t-SNE of each level (paper Fig. 2)"), ("covariance", "covariance term over training (Fig. 4)"),
                              ("subclusters", "top-level sub-clusters of class 'Sandal' (Fig. 3)")):
            if (key, kind) in pictures:
                out.append(f"**{label}: {caption}**\n\n![{label} {kind}]({pictures[key, kind]})\n")
    out.append(END)
    text = DOC.read_text() if DOC.is_file() else f"# Reproduction\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the result markers; add them where the results go.")
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + "\n".join(out) + rest.split(END, 1)[1])
    summary = {f"{k}/{w}": [{m: lv[m] for m in ("level", "linear_top1", "linear_top5", "knn_top1")} for lv in r["levels"]]
               for (k, w), r in results.items()}
    print(json.dumps(summary, indent=1))
    print(f"wrote {DOC} and {len(pictures)} images in {IMAGES}")


if __name__ == "__main__":
    main()
