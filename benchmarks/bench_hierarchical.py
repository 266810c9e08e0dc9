"""Hierarchical search against each single level, and raw against centred cosine, on real Fashion-MNIST.

    .venv/bin/python benchmarks/bench_hierarchical.py --run runs/repro-sjea [--run runs/other-seed] --write-docs

Per run (one model): the representations Y[k] of --bank training images (the bank, random,
seeded) and --queries test images (the queries), every level. Then, on the same arrays:
  - which level is coarse, measured without labels (`clusters.coarse_order`: neighbourhood
    agreement of each level's own k-means clusters) and, as a check with labels, the coarse-group
    purity of those clusters;
  - per-level search (exact cosine top 10) and hierarchical search (`hierarchy.gated_search` on a
    cluster tree built as `sjea index` builds it, coarse level measured) with the hits ranked by
    score in the gate and grouped by sub-cluster, and the same with the levels the other way up;
    coarse (5 groups) and fine (10 classes) precision@10 and mAP@10, and the fraction of queries
    whose top 10 (as a set) differs from each single level's top 10;
  - the hierarchy-aware measures of every mode (`evaluation.hierarchy_measures`, tree: fine class <
    coarse group < root): H-AP@100 (HAPPIER: same class 1, same group 0.5), mistake severity of the
    top-1 mistakes and the average tree distance of the top 1, 5, 10 and 20, from one list of the
    first 100 hits per query (searched separately from the top 10 above, which grouping reorders);
  - scores: cosine of the raw representations and cosine after subtracting the bank's mean
    (a fixed per-model vector): precision@10, the median score of a random pair, of a query's
    top-1 neighbour of the same class, and of its 10th neighbour.
--write-docs replaces the blocks between the hierarchical markers in docs/reproduction.md and
docs/search.md with the tables printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sjea_tools.clusters import build_tree, coarse_order, default_sizes, kmeans  # noqa: E402
from sjea_tools.evaluation.hierarchy_measures import H_AP_DEPTH, TOP_K_DISTANCE, hierarchy_measures  # noqa: E402
from sjea_tools.hierarchy import gated_search  # noqa: E402
from sjea_tools.vectors import centre_and_normalize, cosine_top_k  # noqa: E402

K = 10
DEPTH = max(H_AP_DEPTH, max(TOP_K_DISTANCE))  # hits per query for the hierarchy measures
BEGIN, END = "<!-- hierarchical:begin (written by benchmarks/bench_hierarchical.py) -->", "<!-- hierarchical:end -->"


def features(run: str, bank: int, queries: int, seed: int, cache: Path, tune: int = 2_000) -> dict:
    """Y[k] of the bank, query and held-out (`tune`: training images outside the bank, the split the
    mixing weights are chosen on) images of one run (cached by run, sizes and seed)."""
    from sjea_tools.data import coarse_from_class_names, load_dataset
    from sjea_tools.evaluation import extract_features, random_subset
    from sjea_tools.runs import find_run, load_model, model_id

    run_dir = find_run(run)
    model = load_model(run_dir)
    mid = model_id(model)
    path = cache / f"{mid[:16]}-{bank}-{queries}-{tune}-{seed}.npz"
    if path.exists():
        got = np.load(path, allow_pickle=False)
        return {"model_id": mid, **{k: got[k] for k in got.files}}
    train, test = load_dataset("fashion-mnist", None, "train"), load_dataset("fashion-mnist", None, "test")
    in_bank = random_subset(len(train), bank, seed)
    rest = np.setdiff1d(np.arange(len(train)), in_bank)
    held = train.subset(rest[random_subset(len(rest), tune, seed + 2)])
    train = train.subset(in_bank)
    test = test.subset(random_subset(len(test), queries, seed + 1))
    fine_to_coarse, _ = coarse_from_class_names(train.class_names)
    out = {"bank_labels": train.labels, "query_labels": test.labels, "tune_labels": held.labels,
           "fine_to_coarse": fine_to_coarse}
    for name, data in (("bank", train), ("query", test), ("tune", held)):
        for lv, y in enumerate(extract_features(model, data)):
            out[f"{name}{lv}"] = y
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return {"model_id": mid, **out}


def average_precision(relevant: np.ndarray) -> np.ndarray:
    """AP@k per query from a (q, k) relevance matrix: mean of precision@i at each relevant rank i,
    over k (every class holds far more than k bank rows, so k relevant hits are always possible)."""
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    return (relevant * hits / ranks).sum(axis=1) / relevant.shape[1]


def fine_hits(ids: np.ndarray, f: dict) -> np.ndarray:
    """(q, k) bool: whether each hit has the query's class."""
    return np.where(ids >= 0, f["bank_labels"][np.maximum(ids, 0)] == f["query_labels"][:, None], False)


def paired_interval(a: np.ndarray, b: np.ndarray) -> list[float]:
    """[mean, low, high] of a - b over queries (per-query values, in points): metrics.paired_bootstrap's
    95% interval (2,000 resamples), whether a difference between two modes is more than the draw of queries."""
    from sjea_tools.metrics import paired_bootstrap

    d = paired_bootstrap(a, b, resamples=2000, seed=0)
    return [round(d["mean"], 2), round(d["low"], 2), round(d["high"], 2)]


def measure(ids: np.ndarray, f: dict, per_level: dict | None = None) -> dict:
    out = {}
    for name, bank_lab, q_lab in (("fine", f["bank_labels"], f["query_labels"]),
                                  ("coarse", f["fine_to_coarse"][f["bank_labels"]], f["fine_to_coarse"][f["query_labels"]])):
        rel = np.where(ids >= 0, bank_lab[np.maximum(ids, 0)] == q_lab[:, None], False)
        out[f"{name}_p10"] = round(100 * float(rel.mean()), 2)
        out[f"{name}_map10"] = round(100 * float(average_precision(rel).mean()), 2)
    mine = 100 * fine_hits(ids, f).mean(axis=1)
    for lv, other in (per_level or {}).items():
        differs = [set(a) != set(b) for a, b in zip(ids.tolist(), other.tolist())]
        out[f"differs_L{lv}"] = round(100 * float(np.mean(differs)), 1)
        out[f"fine_p10_vs_L{lv}"] = paired_interval(mine, 100 * fine_hits(other, f).mean(axis=1))
    return out


def tree_measures(ids: np.ndarray, f: dict) -> dict:
    """H-AP, mistake severity and average tree distance of the top k from one (q, DEPTH) list."""
    m = hierarchy_measures(ids, f["bank_labels"], f["query_labels"], f["fine_to_coarse"])
    return {"h_ap": m["h_ap"], "severity": m["mistake_severity"], "top1_error": m["top1_error"],
            **{f"dist{k}": v for k, v in m["avg_distance_at_k"].items()}}


def purity(assign: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose cluster's majority label is their own."""
    agree = sum(np.bincount(labels[assign == c]).max() for c in np.unique(assign))
    return round(100 * agree / len(labels), 2)


def model_whitenings(run: str, levels: list[int]) -> list[np.ndarray | None]:
    """The run's whitening matrix of each level as its Embedder applies it (None: centred only)."""
    from sjea_tools.embed import Embedder

    emb = Embedder.from_source(run=run, backend="torch", levels=levels)
    return emb.whitenings or [None] * len(levels)


def bench_run(run: str, args) -> dict:
    t0 = time.perf_counter()
    f = features(run, args.bank, args.queries, args.seed, Path(args.cache), args.tune)
    levels = sorted(int(k[4:]) for k in f if k.startswith("bank") and k[4:].isdigit())
    # every search on the rows as stores hold them: the bank's mean subtracted, times the model's
    # whitening matrix of the level when it has one (trainers.centring), then unit length
    means = [f[f"bank{lv}"].mean(axis=0) for lv in levels]
    ws = model_whitenings(run, levels)
    bank, qv, tv = ([centre_and_normalize(f[f"{part}{lv}"], mu, w) for lv, mu, w in zip(levels, means, ws)]
                    for part in ("bank", "query", "tune"))
    n = len(bank[0])
    sizes = default_sizes(n, len(levels))
    order, agreement = coarse_order(bank, sizes[0], seed=args.seed)
    coarse_labels = f["fine_to_coarse"][f["bank_labels"]]
    purities = {}
    for lv, x in zip(levels, bank):
        _, a = kmeans(x, sizes[0], args.seed)
        purities[lv] = {"coarse": purity(a, coarse_labels), "fine": purity(a, f["bank_labels"])}
    row = {"run": str(run), "model_id": f["model_id"][:12], "bank": n, "queries": len(qv[0]), "tune": len(tv[0]),
           "sizes": sizes, "whitened": any(w is not None for w in ws),
           "agreement": dict(zip(levels, agreement)), "purity": purities, "coarse": levels[order[0]], "methods": {}}
    deep = {lv: cosine_top_k(qv[i], bank[i], DEPTH)[1] for i, lv in enumerate(levels)}
    per_level = {lv: ids[:, :K] for lv, ids in deep.items()}
    for lv, ids in per_level.items():
        row["methods"][f"level {lv}"] = {**measure(ids, f, per_level), **tree_measures(deep[lv], f)}
    trees = {}
    for label, o in (("measured", order), ("reversed", order[::-1])):
        tree = trees[label] = build_tree([bank[i] for i in o], sizes, seed=args.seed)
        for within in ("score", "groups"):
            res = gated_search([qv[i] for i in o], lambda rows, j=o[-1]: bank[j][rows], tree, K, within=within)
            name = f"hier. {'>'.join(str(levels[i]) for i in o)} ({within}{', reversed' if label == 'reversed' else ''})"
            hits = gated_search([qv[i] for i in o], lambda rows, j=o[-1]: bank[j][rows], tree, DEPTH, within=within)
            row["methods"][name] = {**measure(res["ids"], f, per_level), **tree_measures(hits["ids"], f),
                                    "gate_rows": int(np.median(res["gate_rows"]))}
    from variants_quality import MARGIN, variant_methods

    o = order  # the product's soft gate: `sjea search --margin` on the tree as stored (no boundary lists)
    name = f"hier. {'>'.join(str(levels[i]) for i in o)} (score, --margin {MARGIN})"
    got = [gated_search([qv[i] for i in o], lambda rows, j=o[-1]: bank[j][rows], trees["measured"], depth,
                        margin=MARGIN) for depth in (K, DEPTH)]
    row["methods"][name] = {**measure(got[0]["ids"], f, per_level), **tree_measures(got[1]["ids"], f),
                            "gate_rows": int(np.median(got[0]["gate_rows"]))}

    row["variants"] = variant_methods(bank, qv, tv, deep, f, levels, order, trees["measured"], row["methods"],
                                      measure, tree_measures, K, DEPTH)
    row["scores"] = score_spread(f, levels, ws)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def score_spread(f, levels, ws) -> dict:
    """Raw cosine against cosine after centring by the bank mean, and after whitening too (the
    model's matrix, for a level that has one), per level."""
    rng = np.random.default_rng(0)
    out = {}
    for lv, w in zip(levels, ws):
        for how in ("raw", "centred") + (("whitened",) if w is not None else ()):
            mu = f[f"bank{lv}"].mean(axis=0) if how != "raw" else None
            w_how = w if how == "whitened" else None
            b, q = (centre_and_normalize(f[f"{part}{lv}"], mu, w_how) for part in ("bank", "query"))
            sims, ids = cosine_top_k(q, b, K)
            same = f["bank_labels"][ids[:, 0]] == f["query_labels"]
            a, c = rng.integers(0, len(b), 5000), rng.integers(0, len(b), 5000)
            out[f"L{lv} {how}"] = {
                "fine_p10": round(100 * float((f["bank_labels"][ids] == f["query_labels"][:, None]).mean()), 2),
                "random_pair": round(float(np.median(np.einsum("ij,ij->i", b[a], b[c]))), 3),
                "top1_same_class": round(float(np.median(sims[same, 0])), 3),
                "top10": round(float(np.median(sims[:, -1])), 3)}
    return out


def tables(rows: list[dict], command: str, note: str | None = None) -> str:
    lines = [f"Written by `{command}` ({time.strftime('%Y-%m-%d')}); k = {K}, exact search on the arrays.", ""]
    if note:
        lines += [f"Note: {note}", ""]
    for r in rows:
        lines += [f"**Run {r['run']}** (model {r['model_id']}): bank {r['bank']:,} training images, "
                  f"{r['queries']:,} test queries, cluster tree sizes {r['sizes']}.", "",
                  "Which level is coarse: neighbourhood agreement (share of each row's 10 nearest neighbours in its "
                  f"own k-means cluster, {r['sizes'][0]} clusters, no labels) and, as a check, cluster purity against "
                  "the labels:", "",
                  "| level | agreement | coarse purity | fine purity |", "|---|---:|---:|---:|"]
        lines += [f"| {lv} | {r['agreement'][lv]:.4f} | {r['purity'][lv]['coarse']:.2f} | {r['purity'][lv]['fine']:.2f} |"
                  for lv in r["agreement"]]
        lv_names = [m for m in r["methods"] if m.startswith("level")]
        diff_cols = [f"differs_L{m.split()[1]}" for m in lv_names]
        lines += ["", f"Measured coarse level: **{r['coarse']}**.", "",
                  "| mode | coarse P@10 | coarse mAP@10 | fine P@10 | fine mAP@10 | "
                  + " | ".join(f"top 10 differs from {m}" for m in lv_names) + " | gate rows (median) |",
                  "|---|" + "---:|" * (5 + len(lv_names))]
        for name, m in r["methods"].items():
            lines.append(f"| {name} | {m['coarse_p10']:.2f} | {m['coarse_map10']:.2f} | {m['fine_p10']:.2f} | "
                         f"{m['fine_map10']:.2f} | " + " | ".join(f"{m[c]:.1f}%" for c in diff_cols)
                         + f" | {m.get('gate_rows', r['bank']):,} |")
        lines += ["", variants_line(r), "", verdict(r), "", hierarchy_table(r), "", "Scores: raw cosine against cosine after centring by the bank's mean, and after whitening too (medians):", "",
                  "| level, score | fine P@10 | random pair | top-1 same class | 10th neighbour |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {s['fine_p10']:.2f} | {s['random_pair']:.3f} | {s['top1_same_class']:.3f} | {s['top10']:.3f} |"
                  for name, s in r["scores"].items()]
        lines += ["", score_verdict(r), ""]
    return "\n".join(lines)


def variants_line(r: dict) -> str:
    """How the variants of benchmarks/variants_quality.py were set, and what their weights were chosen on."""
    v = r["variants"]
    tried = ", ".join(f"{w:.1f}: {s:.2f}" for w, s in v["tried_mixed"].items())
    rows = ("centred and whitened vectors (the bank's mean subtracted, times the model's whitening matrix, then unit "
            "length: as stores hold them)" if r.get("whitened") else "centred vectors (the bank's mean subtracted, then "
            "unit length)")
    return (f"All rows search {rows}. Soft gate: the coarse "
            f"clusters within {v['margin']} cosine of the query's nearest (at most {v['max_probes']}), over lists "
            f"where a row within {v['margin']} of a second centroid is listed there too ({v['list_rows']:,} entries "
            f"for {v['bank_rows']:,} rows); the row named --margin is the same gate as `sjea search --margin` makes it, "
            f"on the stored tree, without boundary rows. Mixed re-rank: the union of each level's exact top {DEPTH} ranked by "
            f"(1 - w) x fine cosine + w x coarse cosine; w chosen on {r.get('tune', 0):,} held-out training images "
            f"(not in the bank) as queries, by the mean of the four precision measures (w: score {tried}), never on "
            f"the test queries; soft gate + mixed: the same on the soft gate's top {DEPTH} (w = "
            f"{v['w_soft_mixed']:.1f}). Spread: the mixed top 10 reordered to take each sub-cluster's best hit first.")


def hierarchy_table(r: dict) -> str:
    """The hierarchy-aware measures of every mode, one row each (lower distance and severity is better)."""
    ks = "/".join(str(k) for k in TOP_K_DISTANCE)
    lines = [f"Hierarchy-aware measures (first {DEPTH} hits per query; tree: fine class < coarse group < root, "
             "distance 0 same class, 1 same group, 2 other group; H-AP relevance 1 same class, 0.5 same group; a gate "
             f"holding fewer than {DEPTH} rows pads the list, and a missing hit counts as distance 2, relevance 0):", "",
             f"| mode | H-AP@{H_AP_DEPTH} | mistake severity | top-1 error | "
             + " | ".join(f"distance top {k}" for k in TOP_K_DISTANCE) + " |",
             "|---|" + "---:|" * (3 + len(TOP_K_DISTANCE))]
    for name, m in r["methods"].items():
        dists = " | ".join(_fmt(m[f"dist{k}"], 3) for k in TOP_K_DISTANCE)
        lines.append(f"| {name} | {_fmt(m['h_ap'], 2)} | {_fmt(m['severity'], 3)} | {m['top1_error']:.2f} | {dists} |")
    best = max((m["h_ap"] or 0, name) for name, m in r["methods"].items())
    lines += ["", f"Best H-AP@{H_AP_DEPTH}: **{best[1]}** ({best[0]:.2f}); average distance of the top {ks} is "
              "lower-is-better."]
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


MEASURES = {"coarse_p10": "coarse P@10", "coarse_map10": "coarse mAP@10", "fine_p10": "fine P@10",
            "fine_map10": "fine mAP@10"}


def verdict(r: dict) -> str:
    """Sentences from the numbers: which hierarchical variants beat the best single level, on what, and
    by how much the closest one misses where none does."""
    singles = {name: v for name, v in r["methods"].items() if name.startswith("level")}
    single = {m: max(v[m] for v in singles.values()) for m in MEASURES}
    best_single = max(singles, key=lambda name: singles[name]["fine_p10"])
    wins = [f"{name} on {MEASURES[m]} ({v[m]:.2f} > {single[m]:.2f})" for name, v in r["methods"].items()
            if name.startswith("hier") for m in MEASURES if v[m] > single[m]]
    if wins:
        lv = best_single.split()[1]
        leaders = {name: v[f"fine_p10_vs_L{lv}"] for name, v in r["methods"].items()
                   if name.startswith("hier") and v["fine_p10"] > single["fine_p10"]}
        noise = "; ".join(f"{name} {d:+.2f} (95% interval {lo:+.2f} to {hi:+.2f})" for name, (d, lo, hi) in leaders.items())
        real = [name for name, (_, lo, _) in leaders.items() if lo > 0]
        return ("Hierarchical search beats the best single level: " + "; ".join(wins) + "."
                + (f" Fine P@10 against {best_single}, per query, paired bootstrap over {r['queries']:,} queries: {noise}: "
                   + ("above the draw of queries for " + ", ".join(real) if real else
                      "every interval holds 0, so no win is more than the draw of queries; the default mode stays "
                      "per-level") + "." if leaders else ""))
    same = f"differs_L{best_single.split()[1]}"  # variants whose top 10 is the best level's own set are not "close"
    hier = {name: v for name, v in r["methods"].items() if name.startswith("hier") and v.get(same, 100) > 0}
    closest = max(hier, key=lambda name: (hier[name]["fine_p10"], hier[name]["fine_map10"]))
    c = hier[closest]
    text = (f"**With this model no hierarchical variant beats the best single level on any of the four precision measures.** "
            f"The closest, {closest}, is {single['fine_p10'] - c['fine_p10']:.2f} fine P@10 below {best_single} "
            f"({c['fine_p10']:.2f} vs {single['fine_p10']:.2f}; fine mAP@10 {c['fine_map10']:.2f} vs "
            f"{single['fine_map10']:.2f}), so the default mode stays per-level.")
    h_single = max(singles, key=lambda name: singles[name]["h_ap"] or 0)
    h_hier = max(hier, key=lambda name: hier[name]["h_ap"] or 0)
    if (hier[h_hier]["h_ap"] or 0) > (singles[h_single]["h_ap"] or 0):
        text += (f" On H-AP@{H_AP_DEPTH}, a hierarchy measure, {h_hier} is above {h_single} "
                 f"({hier[h_hier]['h_ap']:.2f} vs {singles[h_single]['h_ap']:.2f}, {r['queries']:,} queries, no "
                 "interval computed): a gate keeps the hits past the first 10 inside the query's coarse region; the "
                 "default follows the four precision measures, where it is below.")
    v = r.get("variants", {})
    if v.get("w_mixed") == 0.0:
        tried = {float(w): x for w, x in v["tried_mixed"].items()}
        how = "lowered held-out precision at every weight tried" if max(x for w, x in tried.items() if w > 0) < \
            tried[0.0] else "did not raise held-out precision"
        text += (" The mixing weight chosen on the held-out split is 0: adding the coarse level's cosine " + how + ", so mixed re-rank returns the fine level's own list "
                 "(equal to it by construction, not by chance), and spreading it over sub-clusters keeps its set and only "
                 "reorders it.")
    return text


def score_verdict(r: dict) -> str:
    parts = []
    for name, s in r["scores"].items():
        parts.append(f"{name}: a random pair scores about {s['random_pair']:.2f}, a same-class top-1 neighbour "
                     f"about {s['top1_same_class']:.2f}")
    return "What a score means (medians): " + "; ".join(parts) + "."


def write_block(path: Path, block: str) -> None:
    from docblock import write_block as write_marked

    write_marked(path, BEGIN, END, f"{BEGIN}\n{block}\n{END}", "## Hierarchical search against single levels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="a trained run (repeat for more seeds)")
    p.add_argument("--bank", type=int, default=20_000, help="training images searched")
    p.add_argument("--queries", type=int, default=2_000, help="test images used as queries")
    p.add_argument("--tune", type=int, default=2_000, help="held-out training images (not in the bank) the "
                   "mixing weight is chosen on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/tmp/sjea-bench-hierarchical", help="feature cache folder")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--note", default=None, help="a line printed under the header (e.g. what the run is)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    rows = [bench_run(r, args) for r in args.run]
    command = "python benchmarks/bench_hierarchical.py " + " ".join(f"--run {r}" for r in args.run) + (
        f" --bank {args.bank} --queries {args.queries} --tune {args.tune}")
    block = tables(rows, command, args.note)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.write_docs:
        for doc in ("reproduction.md", "search.md"):
            write_block(ROOT / "docs" / doc, block)


if __name__ == "__main__":
    main()
