"""Whitening the stored vectors: measured against centring (what stores held before whitening).

    python benchmarks/bench_whitening.py --run RUN [--write-docs]

Stores held each level's representation minus the level's training mean, L2-normalised: a random
pair scores about 0, but level 1's neighbours still crowd near 1 (docs/search.md, "Scores").
PCA-whitening (Jégou & Chum, ECCV 2012: "Negative evidences and
co-occurrences in image retrieval: the benefit of PCA and whitening") also divides each principal
direction by its spread, so no few directions dominate the cosine. Every transform below is fitted
on the bank (the 60,000 Fashion-MNIST training images, no labels), like the centring mean, and
applied to bank and queries (the 10,000 test images):

- centred: minus the mean (what stores held before whitening);
- PCA-whitened, d: centred, projected on the d principal directions of largest variance, each
  divided by sqrt(its eigenvalue + EPS x the largest), then L2-normalised ("all": every direction).

- as stored: the model's own means and whitening (trainers.centring: ZCA fitted on a 20,000-image
  sample at the end of training), applied as stores apply them (vectors.centre_and_normalize); only
  for the trained levels the model whitens.

Beside the trained run's levels, under the same transforms: the same architecture at random init
(BatchNorm statistics from training images) and the pixels. Measures: weighted k-NN top-1 (cosine,
k=200, T=0.1) and fine / coarse precision@10 over the full splits; and what a score means on the
first 3,000 test images (the demo's folder): the median score of a random pair and of each image's
best other image. The block goes into docs/search.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docblock import provenance, publish  # noqa: E402

DOC = ROOT / "docs" / "search.md"
BEGIN, END = "<!-- bench_whitening:begin (written by benchmarks/bench_whitening.py) -->", "<!-- bench_whitening:end -->"
HEADING = "## Whitening the stored vectors (measured; stores hold whitened rows)"
DIMS = ("all", 128, 64)
EPS = 1e-6  # eigenvalue floor, relative to the largest: keeps near-empty directions from exploding
SCORE_ROWS = 3000


def fit_whitening(bank: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) so that (x - mean) @ W is x PCA-whitened to `dims` directions ("all": every one)."""
    bank = np.asarray(bank, dtype=np.float64)
    mean = bank.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((bank - mean).T))
    order = np.argsort(values)[::-1]
    keep = order if dims == "all" else order[:int(dims)]
    scale = 1.0 / np.sqrt(np.clip(values[keep], 0, None) + EPS * values.max())
    return mean, vectors[:, keep] * scale


def transformed(bank: np.ndarray, queries: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    """Both splits under one transform fitted on the bank: None = centred, else PCA-whitened."""
    from sjea_tools.vectors import l2_normalize

    if dims is None:
        mean = bank.mean(axis=0, dtype=np.float64)
        return l2_normalize(bank - mean), l2_normalize(queries - mean)
    mean, w = fit_whitening(bank, dims)
    return (l2_normalize(((bank - mean) @ w).astype(np.float32)),
            l2_normalize(((queries - mean) @ w).astype(np.float32)))


def measure(bank: np.ndarray, queries: np.ndarray, train, test, fine_to_coarse: np.ndarray) -> dict:
    from sjea_tools.evaluation import knn_accuracy, precision_at_k
    from sjea_tools.vectors import exact_top_k

    _, ids = exact_top_k(queries, bank, 10)
    sample = queries[:SCORE_ROWS]
    sims = sample @ sample.T
    np.fill_diagonal(sims, -np.inf)
    off = sims[np.triu_indices(len(sample), 1)]
    return {"knn": round(knn_accuracy(bank, train.labels, queries, test.labels), 2),
            "fine_p10": round(precision_at_k(ids, train.labels, test.labels), 2),
            "coarse_p10": round(precision_at_k(ids, fine_to_coarse[train.labels], fine_to_coarse[test.labels]), 2),
            "random_pair": round(float(np.median(off)), 3), "top1": round(float(np.median(sims.max(axis=1))), 3)}


def stored_transforms(run: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"L{k} trained": (mean, whitening)} for each level the run's model whitens, as its Embedder
    applies them."""
    from sjea_tools.embed import Embedder

    emb = Embedder.from_source(run=run, backend="torch")
    return {f"L{k} trained": (c, w) for k, c, w in zip(emb.levels, emb.centres or [], emb.whitenings or [])
            if w is not None}


def features(run: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (bank, queries)} for the run's levels, its architecture at random init, and pixels."""
    import torch

    from sjea_tools.baselines import pixel_features
    from sjea_tools.evaluation import calibrate_batchnorm, extract_features, load_eval_splits
    from sjea_tools.models import random_init
    from sjea_tools.runs import load_model

    train, test = load_eval_splits("fashion-mnist", None, 0)
    model = load_model(run)
    levels = list(range(model.num_levels))
    out = {}
    for name, m in (("trained", model), ("random init", None)):
        if m is None:
            torch.manual_seed(0)
            m = random_init(model)
            calibrate_batchnorm(m, train, seed=0)
        bank, queries = extract_features(m, train, levels), extract_features(m, test, levels)
        for lv in levels:
            out[f"L{lv} {name}"] = (bank[lv], queries[lv])
    out["pixels"] = (pixel_features(train), pixel_features(test))
    return out


def findings(results: dict) -> list[str]:
    """What the table says, computed from it: each row's change under whitening, and the trained
    level 0's lead over the best pixel row under each protocol."""
    def best(rows: dict, whitened: bool) -> tuple[str, float]:
        pick = {t: r["knn"] for t, r in rows.items() if t != "as stored" and t.startswith("PCA") == whitened}
        name = max(pick, key=pick.get)
        return name, pick[name]

    out, gains = [], []
    for name, rows in results.items():
        transform, value = best(rows, True)
        gains.append(value - rows["centred"]["knn"])
        out.append(f"- {name}: k-NN {rows['centred']['knn']:.2f} centred, {value:.2f} at best whitened ({transform}, "
                   f"{value - rows['centred']['knn']:+.2f}); best other image {rows['centred']['top1']:.3f} -> "
                   f"{rows[transform]['top1']:.3f}.")
    for level in ("L0", "L1"):
        lead = {w: best(results[f"{level} trained"], w)[1] - best(results["pixels"], w)[1] for w in (False, True)}
        out.append(f"- The trained level {level[1]}'s k-NN lead over the best pixel row: {lead[False]:+.2f} centred, "
                   f"{lead[True]:+.2f} whitened (each side's best transform).")
    for name, rows in results.items():
        if "as stored" in rows:
            r = rows["as stored"]
            out.append(f"- {name} as stored (the model's own whitening): k-NN {r['knn']:.2f}, fine P@10 "
                       f"{r['fine_p10']:.2f}, random pair {r['random_pair']:+.3f}, best other image {r['top1']:.3f}.")
    if min(gains) > 0:
        out.append(f"- Whitening lifts every row ({min(gains):+.2f} to {max(gains):+.2f} k-NN), random init and pixels "
                   "too: it is a better retrieval protocol for any features, not a property of the trained model.")
    return out


def block(data: dict) -> str:
    lines = [BEGIN, "", f"Written by `{data['command']}` (commit {data['commit']}, {data['date']}), run {data['run']}. "
             "Transforms fitted on the 60,000 training images (no labels); k-NN (k=200, T=0.1) and P@10 over the "
             f"10,000 test images; scores: medians over the first {SCORE_ROWS:,} test images.", "",
             "| features | transform | k-NN top-1 | fine P@10 | coarse P@10 | random pair | best other image |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, rows in data["results"].items():
        for transform, r in rows.items():
            lines.append(f"| {name} | {transform} | {r['knn']:.2f} | {r['fine_p10']:.2f} | {r['coarse_p10']:.2f} | "
                         f"{r['random_pair']:+.3f} | {r['top1']:.3f} |")
    lines += [""] + findings(data["results"])
    lines += ["", "<!-- bench_whitening:data " + json.dumps(data, sort_keys=True) + " -->", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A trained run (the default model).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-whitening"), help="Where result.json goes.")
    parser.add_argument("--write-docs", action="store_true", help=f"Write the block into {DOC.relative_to(ROOT)}.")
    parser.add_argument("--report", action="store_true", help="Render the block again from WORK/result.json (the "
                        "numbers and command of the run that measured them), without measuring.")
    args = parser.parse_args()
    if args.report:
        data = json.loads((args.work / "result.json").read_text())
        publish(data, block(data), args.work, DOC if args.write_docs else None, BEGIN, END, HEADING)
        return
    from sjea_tools.evaluation import coarse_of, load_eval_splits

    train, test = load_eval_splits("fashion-mnist", None, 0)
    fine_to_coarse = coarse_of(train)[0]
    from sjea_tools.vectors import centre_and_normalize

    results: dict = {}
    stored = stored_transforms(args.run)
    for name, (bank, queries) in features(args.run).items():
        rows = results[name] = {}
        for dims in (None, *DIMS):
            label = "centred" if dims is None else f"PCA-whitened, {dims}"
            rows[label] = measure(*transformed(bank, queries, dims), train, test, fine_to_coarse)
            print(name, label, rows[label], flush=True)
        if name in stored:
            rows["as stored"] = measure(centre_and_normalize(bank, *stored[name]),
                                        centre_and_normalize(queries, *stored[name]), train, test, fine_to_coarse)
            print(name, "as stored", rows["as stored"], flush=True)
    data = {**provenance(sys.argv), "run": args.run, "results": results}
    publish(data, block(data), args.work, DOC if args.write_docs else None, BEGIN, END, HEADING)


if __name__ == "__main__":
    main()
