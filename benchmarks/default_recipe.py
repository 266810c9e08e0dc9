"""The default recipe, measured as a user meets it: `sjea train` with no options (timed, with the
machine's load beside it), then `sjea eval --json`, whose k-NN and probe rows for the model and for
the raw / centred pixel floors (same protocol, same command) go into docs/benchmarks.md.

    python benchmarks/default_recipe.py [--work DIR] [--random-init] [--write-docs]

`--random-init` also evaluates the same architecture at random init (`sjea eval --random-init`).
Run it on an idle machine: the wall time of training is the claim.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import write_block  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- default_recipe:begin -->", "<!-- default_recipe:end -->"
SJEA = str(Path(sys.executable).with_name("sjea"))


def _run(args: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = subprocess.run([SJEA, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sjea {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return time.perf_counter() - t0, result.stdout


def measure(work: Path, random_init: bool) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = os.getloadavg()
    train_s, _ = _run(["train", "--out", "run", "--quiet"], work)
    load_after = os.getloadavg()
    eval_s, out = _run(["eval", "--run", "run", "--json"], work)
    result = {"train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
              "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in load_after],
              "cpus": os.cpu_count(), "eval": json.loads(out),
              "config": json.loads((work / "run" / "config.json").read_text()),
              "steps": max(json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    if random_init:
        _, out = _run(["eval", "--run", "run", "--random-init", "--json"], work)
        result["random_init"] = json.loads(out)
    return result


def render(r: dict) -> str:
    e, cfg = r["eval"], r["config"]
    m, d, o, t = cfg["model"], cfg["data"], cfg["optim"], cfg["train"]
    lines = [BEGIN, "## The default recipe: `sjea train`, then `sjea eval` (`benchmarks/default_recipe.py`)", "",
             f"`{m['backbone']}` ({m['stem']} stem), {m['levels']} levels ({m['encoder']} level 1), projector "
             f"{m['projector']}, {t['epochs']:g} epochs of {d['dataset']} ({r['steps']} steps of {t['batch_size']}), "
             f"{o['optimizer']} lr {o['lr']:g}. Training took **{r['train_s']:.0f} s** on {r['cpus']} CPU cores "
             f"(load average before/after: {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}); "
             f"commit {r['commit']}, {r['date']}.", "",
             "Every row below is printed by the same `sjea eval` (weighted k-NN, cosine, k=200, T=0.1, bank = "
             "the training images, queries = the test images; the probe is the cheap one: a linear layer on "
             "frozen, standardised features, 20 epochs, no augmentation):", "",
             "| features | k-NN top-1 | k-NN, centred | linear probe |", "|---|---|---|---|"]
    centred = {m["level"]: m["knn_top1_centred"] for m in e.get("baselines", {}).get("model", [])}
    for level in e["levels"]:
        lines.append(f"| level {level['level']} | {level['knn_top1']:.2f} | {centred.get(level['level'], float('nan')):.2f} | "
                     f"{level['linear_top1']:.2f} |")
    if "random_init" in r:
        for level in r["random_init"]["levels"]:
            lines.append(f"| level {level['level']}, same network at random init | {level['knn_top1']:.2f} | - | "
                         f"{level['linear_top1']:.2f} |")
    for b in e.get("baselines", {}).get("pixels", []):
        lines.append(f"| {b['features']} | {b['knn_top1']:.2f} | {b['knn_top1_centred']:.2f} | {b['linear_top1']:.2f} |")
    lines += ["", "`python benchmarks/default_recipe.py --random-init --write-docs`", "", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sjea-default-recipe"))
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--from-json", type=Path, help="render a result saved earlier instead of measuring")
    args = parser.parse_args()
    result = json.loads(args.from_json.read_text()) if args.from_json else measure(args.work, args.random_init)
    if not args.from_json:
        (args.work / "result.json").write_text(json.dumps(result, indent=1))
    block = render(result)
    print(block)
    if args.write_docs:
        write_block(DOC, BEGIN, END, block, heading="")


if __name__ == "__main__":
    main()
