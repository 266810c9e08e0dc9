"""S-JEA against plain VICReg on real Fashion-MNIST, on CPU: 3 seeds per model, VICReg matched in
the *encoder* parameter count, pixel and random-init floors; regenerates the results section of
docs/reproduction.md (nothing in it is typed by hand).

    .venv/bin/python benchmarks/reproduce_fashion_mnist.py                     # train (if needed), evaluate, write
    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --retrain           # train every run again
    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --limit 512 --epochs 0.1 --max-train 500 \
        --max-test 200 --seeds 0 --doc /tmp/smoke.md --runs /tmp/smoke-runs         # a smoke test of the script

    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --train-only --select mlp &   # training split over
    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --train-only --select vicreg  # two processes, then
    .venv/bin/python benchmarks/reproduce_fashion_mnist.py                                # evaluate and write

Models, all from the `tiny` preset (same data, epochs, batch, optimiser, augmentations per seed):
- S-JEA, 2 levels, level 1 an MLP encoder (`--level1 mlp`, the default);
- S-JEA, 2 levels, level 1 the authors' one-channel ResNet-18 (`--level1 mlp,resnet`; its step
  costs several times the MLP model's on CPU, docs/benchmarks.md "bench_step": a GPU run);
- VICReg, 1 level, whose level-0 backbone is the registered one whose total parameter count
  (encoder + projector) is closest to each S-JEA model's: the extra parameters go into the
  encoder that evaluation uses, not into a projector that evaluation throws away (method.md);
- VICReg, 1 level, on S-JEA's own level-0 backbone (the simpler method on the same encoder).
Every model trains with seeds 0, 1, 2 (`--seeds`); each metric is reported as mean +- std over
seeds, beside raw/centred pixels and each architecture at random init, under the same protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reproduction.md"
BEGIN, END = "<!-- results:begin (written by benchmarks/reproduce_fashion_mnist.py) -->", "<!-- results:end -->"
METRICS = (("linear_top1", "probe top-1"), ("knn_top1", "k-NN top-1"), ("knn_top1_centred", "k-NN centred"),
           ("coarse_p10", "coarse P@10"), ("fine_p10", "fine P@10"))


def total_params(cfg) -> int:
    from sjea_tools.models import build_model

    return sum(c["encoder"] + c["projector"] for c in build_model(cfg).parameter_counts())


LEVEL1 = {"mlp": "MLP", "resnet": "ResNet"}


def model_configs(common: dict, level1: list[str]) -> dict:
    """name -> config overrides. Per S-JEA model, two VICReg models: the backbone whose total
    parameter count is closest (method.md's comparison), and S-JEA's own level-0 backbone alone (the
    simpler method on the same encoder: what the stacked level does to level 0)."""
    from sjea_tools.config import resolve_config
    from sjea_tools.models import BACKBONES

    models = {f"S-JEA ({LEVEL1[e]} level 1)": {"model.levels": 2, "model.encoder": e} for e in level1}
    out = dict(models)
    for name, sets in models.items():
        target = total_params(resolve_config("tiny", overrides={**common, **sets}))
        best = min(BACKBONES, key=lambda b: abs(total_params(resolve_config(
            "tiny", overrides={**common, "model.levels": 1, "model.backbone": b})) - target))
        out[f"VICReg {best}"] = {"model.levels": 1, "model.backbone": best}
        own = resolve_config("tiny", overrides={**common, **sets}).model.backbone
        if own != best:
            out[f"VICReg {own} (S-JEA level-0 encoder)"] = {"model.levels": 1, "model.backbone": own}
    return out


def train_if_needed(cfg, run_dir: Path, retrain: bool) -> float | None:
    """Train (or resume, or skip if done); returns the training wall time in seconds when trained now."""
    from sjea_tools.trainers.trainer import train

    if (run_dir / "model.pt").is_file() and not retrain:
        return None
    t0 = time.perf_counter()
    if (run_dir / "checkpoints" / "last.pt").is_file() and not retrain:
        train(cfg, out_dir=run_dir, resume=True)
    else:
        train(cfg, out_dir=run_dir, overwrite=True)
    return time.perf_counter() - t0


def training_seconds(run: Path) -> float:
    """Wall time of a finished training: model.pt's time minus config.json's (written at the start)."""
    return (run / "model.pt").stat().st_mtime - (run / "config.json").stat().st_mtime


def evaluated(run: Path, weights: str, args, seed: int) -> dict:
    """evaluate_run's result, reused from an earlier call when the model and the protocol are unchanged."""
    from sjea_tools import evaluation
    from sjea_tools.io import atomic_write_text

    out, key_file = run / f"repro-{weights}.json", run / f"repro-{weights}.protocol.json"
    key = {"model_mtime_ns": (run / "model.pt").stat().st_mtime_ns, "max_train": args.max_train,
           "max_test": args.max_test, "seed": seed, "device": args.device,
           "threads": args.threads}  # the thread count changes float sums: a probe moves by ~0.02
    if out.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key and not args.reevaluate:
        return json.loads(out.read_text())
    result = evaluation.evaluate_run(run, max_train=args.max_train, max_test=args.max_test, seed=seed,
                                     random_init=weights == "random-init", device=args.device, baselines=True,
                                     out=out)
    atomic_write_text(key_file, json.dumps(key))
    return result


def draw_plots(run: Path, images: Path, prefix: str, device: str) -> list[Path]:
    """`sjea plot`'s pictures of one run (t-SNE per level, covariance term, top-level sub-clusters of
    'Sandal') as <images>/<prefix>_<kind>.png."""
    import shutil
    import tempfile

    from sjea_tools import plots

    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        written = plots.plot_run(run, out_dir=tmp, class_name="Sandal", device=device)
        return [Path(shutil.move(str(path), images / f"{prefix}_{path.name}")) for path in written]


def flatten(result: dict) -> list[dict]:
    """Per level: the metrics of METRICS from one evaluate_run result."""
    centred = {r["level"]: r["knn_top1_centred"] for r in result.get("baselines", {}).get("model", [])}
    return [{"level": lv["level"], "linear_top1": lv["linear_top1"], "knn_top1": lv["knn_top1"],
             "knn_top1_centred": centred.get(lv["level"]),
             "coarse_p10": lv["hierarchy"]["coarse"]["precision_at_10"],
             "fine_p10": lv["hierarchy"]["fine"]["precision_at_10"]} for lv in result["levels"]]


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def cell(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def table(rows: dict[str, list[list[dict]]]) -> list[str]:
    """rows: label -> one flatten() list per seed."""
    lines = ["| model | level | seeds | " + " | ".join(h for _, h in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for label, per_seed in rows.items():
        for i, level in enumerate(per_seed[0]):
            cells = [cell([seed[i][k] for seed in per_seed]) for k, _ in METRICS]
            lines.append(f"| {label} | {level['level']} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return lines


def beyond(difference: float, spread: float) -> bool:
    """The page's rule: a difference of means counts when it exceeds the summed standard deviations."""
    return abs(difference) > spread


def comparisons(trained: dict[str, list[list[dict]]]) -> list[str]:
    """Every S-JEA level against every VICReg model, metric by metric: does the difference of the
    means exceed the seed spread (sum of the two standard deviations)?"""
    lines = []
    vicregs = [k for k in trained if k.startswith("VICReg")]
    for name in (k for k in trained if k.startswith("S-JEA")):
        for level_index, level in enumerate(trained[name][0]):
            for v in vicregs:
                for key, label in METRICS:
                    a = [seed[level_index][key] for seed in trained[name]]
                    b = [seed[0][key] for seed in trained[v]]
                    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
                    d = ma - mb
                    verdict = "exceeds the seed spread" if beyond(d, sa + sb) else "is within the seed spread"
                    lines.append(f"- {name} level {level['level']} vs {v}, {label}: {ma:.2f} vs {mb:.2f}, "
                                 f"difference {d:+.2f}, which {verdict} ({sa:.2f} + {sb:.2f}).")
    return lines


def against_floors(trained: dict[str, list[list[dict]]], floors: dict[str, list[list[dict]]],
                   pixels: list[dict]) -> list[str]:
    """Every trained level against the best pixel row and its own architecture at random init."""
    best_pixels = {key: max(pixels, key=lambda p: p[key]) for key in ("knn_top1", "linear_top1")}
    lines = []
    for name, per_seed in trained.items():
        for i, level in enumerate(per_seed[0]):
            parts = []
            for key, label in (("knn_top1", "k-NN top-1"), ("linear_top1", "probe top-1")):
                (m, s), (mr, sr) = mean_std([x[i][key] for x in per_seed]), mean_std([x[i][key] for x in floors[name]])
                p = best_pixels[key]
                to_pixels = "beyond" if beyond(m - p[key], s) else "within"
                to_random = "beyond" if beyond(m - mr, s + sr) else "within"
                parts.append(f"{label} {m:.2f} ± {s:.2f}: {m - p[key]:+.2f} against {p['features']} ({p[key]:.2f}; "
                             f"{to_pixels} the seed spread), {m - mr:+.2f} against random init "
                             f"({mr:.2f} ± {sr:.2f}; {to_random} the seed spread)")
            lines.append(f"- {name} level {level['level']}: " + "; ".join(parts) + ".")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=None, help="training epochs (default: the tiny preset's)")
    ap.add_argument("--limit", type=int, default=None, help="training images (default: the tiny preset's)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    ap.add_argument("--max-train", type=int, default=None, help="k-NN bank / probe training images (default all)")
    ap.add_argument("--max-test", type=int, default=None, help="query images (default: the whole test split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--retrain", action="store_true", help="train every run again")
    ap.add_argument("--reevaluate", action="store_true", help="evaluate again even where a result is kept")
    ap.add_argument("--level1", default="mlp",
                    help="S-JEA level-1 encoders, comma-separated: mlp, resnet (the authors'; several times the MLP's "
                         "step on CPU, see benchmarks/bench_step.py: use a GPU); each brings its parameter-matched "
                         "VICReg")
    ap.add_argument("--select", default="",
                    help="only the models whose name contains this text (with --train-only: split training "
                         "over several processes)")
    ap.add_argument("--train-only", action="store_true", help="train the selected runs and stop (no page)")
    ap.add_argument("--no-plots", action="store_true", help="skip the pictures (t-SNE, covariance, sub-clusters)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the run folders go")
    ap.add_argument("--doc", type=Path, default=DOC, help="the page whose results section is rewritten")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    from sjea_tools.config import resolve_config
    from sjea_tools.io import atomic_write_text

    common = {"train.device": args.device}
    if args.epochs is not None:
        common["train.epochs"] = args.epochs
    if args.limit is not None:
        common["data.limit"] = args.limit
    seeds = [int(s) for s in args.seeds.split(",")]
    level1 = [e.strip() for e in args.level1.split(",") if e.strip()]
    if unknown := sorted(set(level1) - set(LEVEL1)):
        raise SystemExit(f"--level1: unknown encoder(s) {', '.join(unknown)}; choose from {', '.join(LEVEL1)}")
    models = {n: sets for n, sets in model_configs(common, level1).items() if args.select.lower() in n.lower()}
    if not models:
        raise SystemExit(f"--select {args.select!r} matches no model; leave it out to run them all")
    trained: dict[str, list[list[dict]]] = {}
    floors: dict[str, list[list[dict]]] = {}
    info: dict[str, dict] = {}
    pictures: dict[str, list[Path]] = {}
    first_vicreg = next((n for n in models if n.startswith("VICReg")), None)
    pixels = None
    for name, sets in models.items():
        slug = name.lower().replace(" ", "-").replace("(", "").replace(")", "")
        for seed in seeds:
            cfg = resolve_config("tiny", overrides={**common, **sets, "train.seed": seed, "name": f"{slug}-s{seed}"})
            run = args.runs / f"repro-{slug}-s{seed}"
            wall = train_if_needed(cfg, run, args.retrain)
            info.setdefault(name, {"params": total_params(cfg), "cfg": cfg, "walls": []})
            info[name]["walls"].append(wall if wall is not None else training_seconds(run))
            if args.train_only:
                continue
            for weights in ("trained", "random-init"):
                # The random-init floor of seed s is the architecture initialised with seed s.
                result = evaluated(run, weights, args, seed=0 if weights == "trained" else seed)
                (trained if weights == "trained" else floors).setdefault(name, []).append(flatten(result))
                pixels = pixels or result["baselines"]["pixels"]
                n_train, n_test = result["n_train"], result["n_test"]
            if seed == seeds[0] and not args.no_plots:
                prefix = "fmnist_sjea" if name == "S-JEA (MLP level 1)" else (
                    "fmnist_vicreg" if name == first_vicreg else f"fmnist_{slug}")
                pictures[name] = draw_plots(run, args.doc.parent / "images", prefix, args.device)
            print(f"{name} seed {seed}: done", flush=True)
    if args.train_only:
        return

    any_cfg = next(iter(info.values()))["cfg"]
    out = [BEGIN, "",
           f"Measured by `benchmarks/reproduce_fashion_mnist.py {' '.join(sys.argv[1:])}` on "
           f"{time.strftime('%Y-%m-%d')}, device {args.device}, {args.threads} torch thread(s) in this command, {os.cpu_count()} CPU "
           f"cores visible, 1-min load average at the end {os.getloadavg()[0]:.1f}. Training: "
           f"{any_cfg.data.limit or 'all'} Fashion-MNIST training images, {any_cfg.train.epochs:g} epochs, batch "
           f"{any_cfg.train.batch_size}, seeds {args.seeds}. Evaluation: bank / probe training set {n_train} "
           f"training images, {n_test} test queries; k-NN cosine k=200 T=0.1 (as is, and centred by the bank's "
           "mean); probe = the cheap protocol (one linear layer on frozen standardised features, 20 epochs, no "
           "augmentation).", "",
           "| model | parameters (encoders + projectors) | training wall time per seed (s; from the run folder's file times) |", "|---|---|---|"]
    for name, i in info.items():
        walls = ", ".join(f"{w:.0f}" for w in i["walls"])
        out.append(f"| {name} | {i['params']:,} | {walls} |")
    out += ["", "### Trained (mean ± std over seeds)", "", *table(trained), "",
            "### The same architectures at random initialisation (BatchNorm statistics from training images)", "",
            *table(floors), "", "### Pixels, same protocol", "",
            "| features | dim | k-NN top-1 | k-NN centred | probe top-1 |", "|---|---|---|---|---|"]
    for p in pixels or []:
        out.append(f"| {p['features']} | {p['dim']} | {p['knn_top1']:.2f} | {p['knn_top1_centred']:.2f} | "
                   f"{p['linear_top1']:.2f} |")
    out += ["", "### Against the floors (the best pixel row per metric, the same architecture at random init)", "",
            *against_floors(trained, floors, pixels or []),
            "", "### S-JEA against VICReg, as measured", "", *comparisons(trained), ""]
    if pictures:
        out += [f"### Pictures (seed {seeds[0]}; `sjea plot`: test images, t-SNE per level, covariance term "
                "during training, k-means sub-clusters of 'Sandal' at the top level)", ""]
        for name, paths in pictures.items():
            out += [f"**{name}**", ""] + [f"![{name} {p.stem}](images/{p.name})" for p in paths] + [""]
    out.append(END)
    doc = args.doc
    text = doc.read_text() if doc.is_file() else f"# Reproduction\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the result markers; add them where the results go.")
    head, rest = text.split(BEGIN, 1)
    atomic_write_text(doc, head + "\n".join(out) + rest.split(END, 1)[1])
    print(json.dumps({name: [[{k: v for k, v in lv.items()} for lv in seed] for seed in per]
                      for name, per in trained.items()}, indent=1))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
