"""Search for the CPU default recipe (`tiny` preset) by measurement, and write docs/recipe_search.md.

Every trial trains one configuration with the real trainer, then scores level 0 with the project's
k-NN protocol on the full splits (bank = all 60,000 Fashion-MNIST training images, queries = the
10,000 test images; cosine, k=200, T=0.1), once on the features as they are and once on features
centred by the bank's mean. Beside every trial: the same architecture at random init (BatchNorm
statistics from training images) and the raw / centred pixel rows, under the same two protocols.

    python benchmarks/recipe_search.py trial NAME [--set section.key=value ...] [--probe]
    python benchmarks/recipe_search.py curve NAME --epochs E --at 1,2,4 [--set ...]   # k-NN during one schedule
    python benchmarks/recipe_search.py level1 NAME --from RUN [--seed S] [--set ...]   # level 1 on RUN's frozen level 0
    python benchmarks/recipe_search.py floors                # pixel rows (once)
    python benchmarks/recipe_search.py report                # rewrite docs/recipe_search.md

Trials are appended to benchmarks/results/recipe_search.jsonl (one JSON row each, with the full
resolved config, wall time, steps and the load average of the machine before and after), and the
report is rendered from that file only: nothing in the page is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "recipe_search.jsonl"
DOC = ROOT / "docs" / "recipe_search.md"


def _load_rows() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def _append(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


_SPLITS = None


def splits():
    global _SPLITS
    if _SPLITS is None:
        from sjea_tools.evaluation import load_eval_splits

        _SPLITS = load_eval_splits("fashion-mnist", None, 0)
    return _SPLITS


def knn_pair(train_x, test_x) -> dict:
    """k-NN top-1 of the features as they are and centred by the bank's mean (same bank/queries)."""
    from sjea_tools.baselines import centre
    from sjea_tools.evaluation import knn_accuracy

    train, test = splits()
    ctr, cte = centre(train_x, test_x)
    return {"knn": round(knn_accuracy(train_x, train.labels, test_x, test.labels), 2),
            "knn_centred": round(knn_accuracy(ctr, train.labels, cte, test.labels), 2)}


def probe(train_x, test_x) -> float:
    from sjea_tools.evaluation import linear_probe

    train, test = splits()
    return linear_probe(train_x, train.labels, test_x, test.labels)["top1"]


def level0_features(model):
    from sjea_tools.evaluation import extract_features

    train, test = splits()
    return extract_features(model, train, [0])[0], extract_features(model, test, [0])[0]


def arch_key(cfg) -> str:
    from sjea_tools.models.stacked import resolve_stem

    return f"{cfg.model.backbone}/{resolve_stem(cfg)}/{cfg.image_size}px"


def random_init_floor(cfg, with_probe: bool) -> dict:
    """Level-0 k-NN of the architecture at random init; cached per architecture in the results file."""
    import torch

    from sjea_tools.evaluation import calibrate_batchnorm
    from sjea_tools.models import build_model

    key = arch_key(cfg)
    for row in _load_rows():
        if row.get("kind") == "random-init" and row["arch"] == key and (row.get("probe") is not None or not with_probe):
            return row
    torch.manual_seed(0)
    model = build_model(cfg)
    calibrate_batchnorm(model, splits()[0])
    tr, te = level0_features(model)
    row = {"kind": "random-init", "arch": key, **knn_pair(tr, te), "probe": probe(tr, te) if with_probe else None}
    _append(row)
    return row


def pixel_floors() -> dict:
    from sjea_tools.baselines import pixel_baseline_features
    from sjea_tools.evaluation import knn_accuracy

    for row in _load_rows():
        if row.get("kind") == "pixels":
            return row
    train, test = splits()
    out = {"kind": "pixels"}
    for name, (tr, te) in pixel_baseline_features(train, test).items():
        out[name] = {"knn": round(knn_accuracy(tr, train.labels, te, test.labels), 2), "probe": probe(tr, te)}
    _append(out)
    return out


def run_trial(name: str, sets: list[str], with_probe: bool) -> dict:
    import torch

    from sjea_tools.config import resolve_config
    from sjea_tools.runs import load_model
    from sjea_tools.trainers.trainer import train

    overrides = dict(s.split("=", 1) for s in sets)
    cfg = resolve_config("tiny", overrides={"train.device": "cpu", **overrides})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        train(cfg, out_dir=run_dir, runs_dir=Path(tmp))
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = max(r["step"] for r in metrics if r["kind"] == "step")
        model = load_model(run_dir)
    tr, te = level0_features(model)
    row = {"kind": "trial", "name": name, "sets": overrides, "config": cfg.to_dict(), "arch": arch_key(cfg),
           "wall_s": round(wall, 1), "steps": steps, "images_seen": steps * cfg.train.batch_size,
           "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in load_after],
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "host": platform.node(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "code": _code_version(), **knn_pair(tr, te),
           "probe": probe(tr, te) if with_probe else None}
    random_init_floor(cfg, with_probe)
    _append(row)
    return row


def run_level1(name: str, source: Path, sets: list[str], seed: int) -> dict:
    """Level 1 trained on the frozen levels of `source` (`sjea train --from`), with the trainer's own
    `train()`; both levels scored with the full k-NN protocol. The source's level 0 is VICReg on the
    same encoder, the floor level 1 has to reach."""
    import torch

    from sjea_tools.config import resolve_config
    from sjea_tools.evaluation import extract_features
    from sjea_tools.runs import load_model
    from sjea_tools.trainers.frozen import apply_source
    from sjea_tools.trainers.trainer import train

    overrides = {"model.levels": "2", "train.seed": str(seed), **dict(s.split("=", 1) for s in sets)}
    cfg = resolve_config("tiny", overrides={"train.device": "cpu", **overrides})
    cfg = apply_source(cfg, source, set(overrides))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        train(cfg, out_dir=run_dir, runs_dir=Path(tmp))
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = max(r["step"] for r in metrics if r["kind"] == "step")
        model = load_model(run_dir)
    train_split, test_split = splits()
    tr, te = extract_features(model, train_split, [0, 1]), extract_features(model, test_split, [0, 1])
    row = {"kind": "level1", "name": name, "source": str(source), "seed": seed, "sets": overrides,
           "config": cfg.to_dict(), "wall_s": round(wall, 1), "steps": steps,
           "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in load_after],
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"), "code": _code_version(),
           "level0": knn_pair(tr[0], te[0]), "level1": knn_pair(tr[1], te[1])}
    row["measures"] = five_measures(tr, te, seed, [row["level0"], row["level1"]])
    _append(row)
    print(json.dumps({k: row[k] for k in ("name", "seed", "wall_s", "level0", "level1")}), flush=True)
    return row


def five_measures(tr, te, seed: int, knn: list[dict]) -> list[dict]:
    """Per level, the five measures of docs/reproduction.md under its protocol (`evaluate_features`,
    probe seeded by the run's seed; k-NN centred as `knn_pair`), and the hierarchy measures."""
    from sjea_tools.evaluation import coarse_of, evaluate_features

    train, test = splits()
    result = evaluate_features(tr, train.labels, te, test.labels, [0, 1], coarse_of(train), seed=seed)
    return [{"linear_top1": lv["linear_top1"], "knn_top1": lv["knn_top1"], "knn_top1_centred": k["knn_centred"],
             "coarse_p10": lv["hierarchy"]["coarse"]["precision_at_10"],
             "fine_p10": lv["hierarchy"]["fine"]["precision_at_10"], "hierarchy": lv["hierarchy"]["measures"]}
            for lv, k in zip(result["levels"], knn)]


def run_curve(name: str, sets: list[str], epochs: float, at: list[float]) -> list[dict]:
    """One schedule of `epochs` over all 60,000 images, scored (level-0 and level-1 k-NN, both protocols)
    at the epochs in `at`: where a recipe is going, for the price of one training. The steps are the
    trainer's own (build_training, its batches and seeded views, train_step), without checkpoints
    or run folder; the chosen recipe is then checked with `trial` (the whole `train()`)."""
    import torch

    from sjea_tools.config import resolve_config
    from sjea_tools.trainers.distributed import DistInfo
    from sjea_tools.trainers.trainer import batch_source, build_training, load_training_data, step_batches, train_step, \
        two_views_on_device

    overrides = dict(s.split("=", 1) for s in sets)
    cfg = resolve_config("tiny", overrides={"train.device": "cpu", "data.limit": None, "train.epochs": epochs,
                                            **overrides})
    torch.manual_seed(cfg.train.seed)
    info = DistInfo()
    data, per_epoch = load_training_data(cfg, info)
    t = build_training(cfg, info, torch.device("cpu"), per_epoch)
    score_at = {min(t.total_steps, round(e * per_epoch)) for e in at}
    rows, step, train_s = [], 0, 0.0
    t.model.train()
    while step < t.total_steps:
        batches = step_batches(len(data), cfg.train.batch_size, info, cfg.train.seed, step // per_epoch)
        for item in batch_source(data, cfg, batches[:t.total_steps - step], t.device):
            t0 = time.perf_counter()
            train_step(t, *two_views_on_device(t, item, step), step)
            step, train_s = step + 1, train_s + time.perf_counter() - t0
            if step in score_at:
                rows.append(_curve_point(name, overrides, cfg, t.model, step, per_epoch, epochs, train_s))
                t.model.train()
    random_init_floor(cfg, with_probe=False)
    return rows


def _curve_point(name, overrides, cfg, model, step, per_epoch, epochs, train_s) -> dict:
    import torch

    from sjea_tools.evaluation import extract_features

    model.eval()
    train, test = splits()
    levels = list(range(cfg.model.levels))
    tr, te = extract_features(model, train, levels), extract_features(model, test, levels)
    scores = {f"level{k}": knn_pair(tr[k], te[k]) for k in levels}
    row = {"kind": "curve", "name": name, "sets": overrides, "config": cfg.to_dict(), "arch": arch_key(cfg),
           "epochs": epochs, "epoch": round(step / per_epoch, 2), "step": step, "train_s": round(train_s, 1),
           "load": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), "code": _code_version(),
           "date": time.strftime("%Y-%m-%d %H:%M"), **scores}
    _append(row)
    print(json.dumps({k: row[k] for k in ("name", "epoch", "train_s", "load", *scores)}), flush=True)
    return row


def _code_version() -> str:
    """Commit, plus the hash of the augmentation and model files as they were when the trial ran."""
    import hashlib
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    files = ["sjea_tools/data/augment.py", "sjea_tools/models/convnet.py", "trainers/trainer.py"]
    digest = hashlib.sha1(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()[:8]
    return f"{commit}+{digest}"


def _summary(cfg: dict) -> dict:
    d, m, o, t = cfg["data"], cfg["model"], cfg["optim"], cfg["train"]
    aug = d.get("augment", "custom")
    if aug == "custom":
        parts = [f"crop {d['crop_scale'][0]:g}-{d['crop_scale'][1]:g}"]
        if d["flip_p"]:
            parts.append("flip")
        if d["jitter_p"] and any(d["jitter"]):
            parts.append(f"jitter {','.join(f'{v:g}' for v in d['jitter'])} p{d['jitter_p']:g}")
        if d["grayscale_p"]:
            parts.append(f"gray p{d['grayscale_p']:g}")
        if d["blur_p"]:
            parts.append(f"blur p{d['blur_p']:g}")
        if d["solarize_p"]:
            parts.append(f"solarize p{d['solarize_p']:g}")
        aug = ", ".join(parts)
    for view in ("view1", "view2"):
        over = {k: v for k, v in (d.get(view) or {}).items() if v is not None}
        if over:
            aug += f"; {view}: " + ", ".join(f"{k}={v}" for k, v in over.items())
    return {"backbone": f"{m['backbone']} ({m['stem']} stem)", "size": d["image_size"] or 28,
            "images": d["limit"] or 60000, "epochs": t["epochs"], "batch": t["batch_size"],
            "optim": f"{o['optimizer']} lr {o['lr']:g}, warm-up {o['warmup_epochs']:g} ep"
                     + (f", wd {o['weight_decay']:g}" if o["weight_decay"] else ""),
            "projector": m["projector"], "levels": m["levels"], "aug": aug}


def report() -> str:
    rows = _load_rows()
    pixels = next((r for r in rows if r.get("kind") == "pixels"), None)
    floors = {r["arch"]: r for r in rows if r.get("kind") == "random-init"}
    trials = [r for r in rows if r.get("kind") == "trial"]
    lines = ["# Recipe search for the CPU default (`tiny`)", "",
             "Written by `benchmarks/recipe_search.py report` from `benchmarks/results/recipe_search.jsonl`; "
             "no number on this page is typed by hand.", "",
             "Protocol: level-0 representations, weighted k-NN top-1 (cosine, k=200, T=0.1), bank = all 60,000 "
             "Fashion-MNIST training images, queries = the 10,000 test images. *k-NN* uses the features as "
             "they are, *centred* subtracts the bank's mean from bank and queries first; pixels and random-init "
             "rows are scored the same two ways. Probe (where measured): the cheap linear probe of `sjea eval` "
             "(one linear layer on frozen, standardised features, 20 epochs SGD, no augmentation).", "",
             "Wall time is the whole `train()` call on this machine, which was shared with other jobs: the "
             "load average (1 min) before and after each trial is printed beside it; on a loaded machine the "
             "times are inflated, the step counts are not.", ""]
    if pixels:
        lines += ["## Floors", "", "| features | k-NN | probe |", "|---|---|---|"]
        for name in ("raw pixels", "centred pixels"):
            lines.append(f"| {name} | {pixels[name]['knn']:.2f} | {pixels[name]['probe']:.2f} |")
        lines += ["", "(pixels: the cosine of centred vectors *is* the centred protocol, so the centred-pixels "
                  "row is the floor for both columns below)", ""]
        lines += ["| architecture at random init | k-NN | centred | probe |", "|---|---|---|---|"]
        for key, f in floors.items():
            lines.append(f"| {key} | {f['knn']:.2f} | {f['knn_centred']:.2f} | "
                         f"{'-' if f.get('probe') is None else format(f['probe'], '.2f')} |")
        lines.append("")
    lines += ["## Trials, in the order they ran", "",
              "| # | trial | backbone | epochs x images | batch | optimiser | projector | augmentations | steps | "
              "wall s | load 1-min before/after, torch threads | k-NN | centred | probe | k-NN - random init |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(trials, 1):
        s = _summary(r["config"])
        f = floors.get(r["arch"])
        gain = "-" if f is None else f"{r['knn'] - f['knn']:+.2f}"
        lines.append(
            f"| {i} | {r['name']} | {s['backbone']}, {s['size']} px | {s['epochs']:g} x {s['images']} | {s['batch']} | "
            f"{s['optim']} | {s['projector']} | {s['aug']} | {r['steps']} | {r['wall_s']:.0f} | "
            f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}, {r['threads']} thr | {r['knn']:.2f} | {r['knn_centred']:.2f} | "
            f"{'-' if r.get('probe') is None else format(r['probe'], '.2f')} | {gain} |")
    lines.append("")
    curves = [r for r in rows if r.get("kind") == "curve"]
    order = {name: i for i, name in reversed(list(enumerate(r["name"] for r in curves)))}
    curves.sort(key=lambda r: (order[r["name"]], r["epoch"]))  # one schedule's points together, in order
    if curves:
        lines += ["## Learning curves (`curve`: one schedule, scored on the way)", "",
                  "Each row is one scoring point of one schedule (`epochs` long); the rows of 2026-11-28 ran "
                  "an earlier `curve` that copied the trainer's step (same model, augmentation, loss, optimiser "
                  "and schedule, its own data order), later ones the trainer's own steps. *train s* is the time "
                  "spent in training steps up to that point, beside the load average when it was scored. k-NN as above; "
                  "level 1 is the second encoder of the stack. On Fashion-MNIST's grey images the saturation, hue "
                  "and grayscale parts of the augmentation do nothing (they are skipped), so brightness and "
                  "contrast are the jitter that acts.", "",
                  "| curve | backbone | batch | optimiser | projector | augmentations | schedule ep | at ep | "
                  "train s | load | L0 k-NN | L0 centred | L1 k-NN | L0 - random init |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in curves:
            s_ = _summary(r["config"])
            f = floors.get(r["arch"])
            l0, l1 = r["level0"], r.get("level1", {})
            gain = "-" if f is None else f"{l0['knn'] - f['knn']:+.2f}"
            lines.append(f"| {r['name']} | {s_['backbone']} | {s_['batch']} | {s_['optim']} | {s_['projector']} | "
                         f"{s_['aug']} | {r['epochs']:g} | {r['epoch']:g} | {r['train_s']:.0f} | {r['load']:.1f} | "
                         f"{l0['knn']:.2f} | {l0['knn_centred']:.2f} | {l1.get('knn', float('nan')):.2f} | {gain} |")
        lines.append("")
        if pixels:
            floor = pixels["centred pixels"]["knn"]
            ends = [r for r in curves if r["epoch"] == r["epochs"]]
            lines.append(f"Schedules whose level-0 k-NN at the end beats centred pixels ({floor:.2f}): "
                         + (", ".join(f"{r['name']} ({r['level0']['knn']:.2f})" for r in ends
                                      if r["level0"]["knn"] > floor) or "none") + ".")
            lines.append("At least 8 points above their architecture at random init: "
                         + (", ".join(r["name"] for r in ends if r["arch"] in floors
                                      and r["level0"]["knn"] >= floors[r["arch"]]["knn"] + 8) or "none") + ".")
            lines.append("")
    if pixels and trials:
        floor = pixels["centred pixels"]["knn"]
        beat = [r for r in trials if r["knn"] > floor]
        lines.append(f"Trials whose k-NN beats centred pixels ({floor:.2f}): "
                     + (", ".join(f"{r['name']} ({r['knn']:.2f}, {r['wall_s']:.0f} s)" for r in beat) or "none") + ".")
        above = [r for r in trials if r["arch"] in floors and r["knn"] >= floors[r["arch"]]["knn"] + 8]
        lines.append("Trials at least 8 points above their architecture at random init: "
                     + (", ".join(f"{r['name']} ({r['knn'] - floors[r['arch']]['knn']:+.2f})" for r in above) or "none")
                     + ".")
        lines.append("")
    vicreg = [r["knn"] for r in trials if r["name"].startswith("default-seed")]
    lines += level1_section([r for r in rows if r.get("kind") == "level1"], pixels, vicreg)
    text = "\n".join(lines)
    DOC.write_text(text)
    return text


def level1_section(rows: list[dict], pixels: dict | None, vicreg: list[float]) -> list[str]:
    """Level 1 trained on a frozen level 0 (`level1`): every run, then each variant over its seeds."""
    if not rows:
        return []
    import statistics

    lines = ["## Level 1 on a frozen level 0 (`level1`: `sjea train --from RUN`)", "",
             "The source run's level 0 stays frozen (forward only, its weights bit-identical), so its k-NN is "
             "VICReg on the same encoder: the number level 1 has to reach. Level 1 trains alone, with the "
             "settings listed (the rest are the `tiny` defaults). k-NN as above, on the full splits.", "",
             "| variant | seed | settings | steps | wall s | load 1-min before/after | L0 k-NN | L0 centred | "
             "L1 k-NN | L1 centred | L1 - L0 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sets = ", ".join(f"{k}={v}" for k, v in r["sets"].items() if k not in ("model.levels", "train.seed")) or "defaults"
        l0, l1 = r["level0"], r["level1"]
        lines.append(f"| {r['name']} | {r['seed']} | {sets} | {r['steps']} | {r['wall_s']:.0f} | "
                     f"{r['load_before'][0]}/{r['load_after'][0]} | {l0['knn']:.2f} | {l0['knn_centred']:.2f} | "
                     f"{l1['knn']:.2f} | {l1['knn_centred']:.2f} | {l1['knn'] - l0['knn']:+.2f} |")
    by_name: dict[str, list[dict]] = {}
    for r in rows:  # seeds of one variant on one source run (another source is another frozen level 0)
        by_name.setdefault(f"{r['name']} on {Path(r['source']).name}", []).append(r)
    lines += ["", "| variant | seeds | L1 k-NN mean | min - max | L1 centred mean | frozen L0 k-NN |",
              "|---|---|---|---|---|---|"]
    for name, rs in by_name.items():
        knn = [r["level1"]["knn"] for r in rs]
        lines.append(f"| {name} | {len(rs)} | {statistics.mean(knn):.2f} | {min(knn):.2f} - {max(knn):.2f} | "
                     f"{statistics.mean(r['level1']['knn_centred'] for r in rs):.2f} | {rs[0]['level0']['knn']:.2f} |")
    if pixels:
        floor = pixels["centred pixels"]["knn"]
        above = [n for n, rs in by_name.items() if min(r["level1"]["knn"] for r in rs) > floor]
        lines += ["", f"Variants whose level-1 k-NN beats centred pixels ({floor:.2f}) on every seed: "
                  + (", ".join(above) or "none") + "."]
    if vicreg:
        low = min(vicreg)
        lines += [f"VICReg on this encoder (level 0 of the default recipe, trials default-seed*): {low:.2f} - "
                  f"{max(vicreg):.2f} over {len(vicreg)} seeds. Variants whose level-1 k-NN reaches that range on "
                  "every seed: " + (", ".join(n for n, rs in by_name.items()
                                              if min(r["level1"]["knn"] for r in rs) >= low) or "none") + "."]
    return lines + [""] + five_measures_section(by_name, pixels)


REPRODUCTION = ROOT / "docs" / "reproduction.md"
VICREG_ROW = "| VICReg convnet-32 (S-JEA level-0 encoder) | 0 |"
JOINT_ROW = "| S-JEA (MLP level 1) | 1 |"  # the default's level 1, trained jointly with level 0


def reproduction_row(prefix: str = VICREG_ROW) -> list[tuple[float, float]] | None:
    """(mean, std) of the five measures of one trained row of docs/reproduction.md's table (written by
    benchmarks/reproduce_fashion_mnist.py, 3 seeds): by default VICReg on the default level-0 encoder."""
    if not REPRODUCTION.is_file():
        return None
    line = next((ln for ln in REPRODUCTION.read_text().splitlines() if ln.startswith(prefix)), None)
    if line is None:
        return None
    cells = [c.strip() for c in line.strip("|").split("|")][3:]
    return [tuple(float(v) for v in c.split(" ± ")) for c in cells]


def reached(mean: float, std: float, reference: tuple[float, float]) -> bool:
    """Above the reference's mean, or within the seed spread (reproduction.md's rule, `beyond`)."""
    from reproduce_fashion_mnist import beyond

    return mean >= reference[0] or not beyond(mean - reference[0], std + reference[1])


def five_measures_section(by_name: dict[str, list[dict]], pixels: dict | None) -> list[str]:
    """Level 1 of every variant measured on all five measures, against VICReg's seed spread (the
    reproduction page's rule: a difference counts when it exceeds the summed standard deviations)."""
    from reproduce_fashion_mnist import METRICS as MEASURES, mean_std

    groups = {n: rs for n, rs in by_name.items() if all("measures" in r for r in rs)}
    vicreg, joint = reproduction_row(), reproduction_row(JOINT_ROW)
    if not groups or vicreg is None:
        return []
    lines = ["### Level 1 on all five measures, against VICReg on the same encoder", "",
             "The five measures of docs/reproduction.md under its protocol (probe seeded by the run's seed), "
             "mean ± std over seeds. VICReg: its convnet-32 row there (3 seeds, the default level-0 encoder, "
             "as its script wrote it). *Reached* counts the measures where level 1 is above VICReg's mean or "
             "within the seed spread (the difference no larger than the two standard deviations summed). "
             "H-AP and mistake severity (the hierarchy measures of `sjea eval`, Fashion-MNIST's five groups) "
             "beside them.", "",
             "| features | seeds | " + " | ".join(h for _, h in MEASURES) + " | H-AP | mistake severity | reached |",
             "|---|---|" + "---|" * (len(MEASURES) + 3)]
    lines.append("| VICReg convnet-32 (docs/reproduction.md) | 3 | "
                 + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in vicreg) + " | - | - | - |")
    if joint:
        lines.append("| the default's level 1, trained jointly (docs/reproduction.md) | 3 | "
                     + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in joint) + " | - | - | "
                     f"{sum(reached(m, sd, ref) for (m, sd), ref in zip(joint, vicreg))} of 5 |")
    verdicts = []
    for name, rs in groups.items():
        for level in (0, 1):
            cells, count = [], 0
            for j, (key, _) in enumerate(MEASURES):
                m, sd = mean_std([r["measures"][level][key] for r in rs])
                cells.append(f"{m:.2f} ± {sd:.2f}")
                count += reached(m, sd, vicreg[j])
            hap = mean_std([r["measures"][level]["hierarchy"]["h_ap"] for r in rs])[0]
            sev = mean_std([r["measures"][level]["hierarchy"]["mistake_severity"] for r in rs])[0]
            label = f"{name}, level {level}" + (" (frozen source)" if level == 0 else "")
            lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + f" | {hap:.2f} | {sev:.3f} | {count} of 5 |")
            if level == 1:
                above = pixels is None or min(r["level1"]["knn"] for r in rs) > pixels["centred pixels"]["knn"]
                verdicts.append((name, len(rs), count, above))
    floor = f" ({pixels['centred pixels']['knn']:.2f})" if pixels else ""
    lines += ["", f"The goal (issue 21): level-1 k-NN above centred pixels{floor} on every seed, and at least 3 of "
              "the 5 measures reached, with 3 seeds."]
    for name, seeds, count, above in verdicts:
        met = above and count >= 3 and seeds >= 3
        lines.append(f"- {name}: {seeds} seed(s), k-NN above centred pixels on every seed: "
                     f"{'yes' if above else 'no'}; {count} of 5 reached: goal {'met' if met else 'not met'}"
                     + (" (fewer than 3 seeds)" if seeds < 3 else "") + ".")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trial")
    t.add_argument("name")
    t.add_argument("--set", dest="sets", action="append", default=[])
    t.add_argument("--probe", action="store_true")
    t.add_argument("--threads", type=int, default=None, help="torch threads (1 is far faster on a shared, loaded "
                   "machine: 2 threads contending with other jobs spin)")
    c = sub.add_parser("curve")
    c.add_argument("name")
    c.add_argument("--set", dest="sets", action="append", default=[])
    c.add_argument("--epochs", type=float, required=True, help="length of the schedule, in epochs of 60,000")
    c.add_argument("--at", default="1,2,4", help="epochs at which to score, comma-separated")
    c.add_argument("--threads", type=int, default=None)
    lv = sub.add_parser("level1")
    lv.add_argument("name")
    lv.add_argument("--from", dest="source", type=Path, required=True, help="a run whose levels stay frozen")
    lv.add_argument("--seed", type=int, default=0)
    lv.add_argument("--set", dest="sets", action="append", default=[])
    sub.add_parser("floors")
    sub.add_parser("report")
    args = parser.parse_args()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "curve":
        run_curve(args.name, args.sets, args.epochs, [float(v) for v in args.at.split(",")])
    elif args.cmd == "trial":
        row = run_trial(args.name, args.sets, args.probe)
        print(json.dumps({k: row[k] for k in ("name", "wall_s", "steps", "knn", "knn_centred", "probe", "load_after")}))
    elif args.cmd == "level1":
        run_level1(args.name, args.source, args.sets, args.seed)
    elif args.cmd == "floors":
        print(json.dumps(pixel_floors()))
    else:
        print(report())


if __name__ == "__main__":
    main()
