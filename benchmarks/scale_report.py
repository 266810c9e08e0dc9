"""The docs block of bench_hierarchical_scale.py, from its results dict (numbers only from the run)."""

from __future__ import annotations

import time

TARGET = 0.95


def whitened_text(res: dict) -> str:
    """How the block names the whitening the rows had (results from before whitening have none)."""
    levels = res.get("whitened") or []
    if not levels:
        return ""
    named = f"level{'s' if len(levels) > 1 else ''} {', '.join(map(str, levels))}"
    return f"times the model's whitening matrix ({named}; as stores hold them), "


def best_at_target(points: list[dict]) -> dict | None:
    """The fastest setting with recall@10 >= TARGET, or None."""
    ok = [p for p in points if p["recall"] >= TARGET]
    return max(ok, key=lambda p: p["qps"]) if ok else None


def block(res: dict, args) -> str:
    m = res["methods"]
    command = (f"python benchmarks/bench_hierarchical_scale.py --run {res['run']} --copies {res['copies']} "
               f"--queries {res['queries']} --hnsw-m {args.hnsw_m}" + (" --centred-only" if res.get("centred_only") else "")
               + (f" --skip {res['skip']}" if res.get("skip") else ""))
    lines = [f"Written by `{command}` ({time.strftime('%Y-%m-%d')}).", "",
             f"{res['rows']:,} rows: Fashion-MNIST's {res['originals']:,} images not used as queries and "
             f"{res['copies'] - 1} seeded augmented copies of each (flip, crop/zoom 0.85-1.0, shift up to 2 px, "
             f"brightness 0.8-1.2; benchmarks/scale_embed.py), embedded by model {res['model_id']} (every level); "
             f"{res['queries']:,} held-out test images as one batch of queries. Vectors centred by the bank's mean "
             f"per level, {whitened_text(res)}then unit length. Coarse level **{res['coarse']}** (measured: neighbourhood agreement "
             f"{res['agreement']}), fine level **{res['fine']}**. Recall@10 against exact search at the fine level; "
             f"queries per second on 2 threads (faiss.omp_set_num_threads(2), 2 cores shared with other work), "
             f"the best of {args.repeats} timed runs of the whole batch. Build: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in res.get("build_seconds", {}).items()) + ".", "",
             "Hierarchical variants (`sjea_tools/hierarchy_variants.py`) run on FAISS's list scan: the coarse "
             "level's k-means clusters (`clusters.kmeans`, the cluster tree's first split) are the inverted lists of "
             "the fine vectors, the gate is chosen on the query's coarse vector (`soft_gates`), so the only "
             "difference from IVF-Flat is which partition and which lists are scanned.", "",
             "Fastest setting at recall@10 >= 0.95:", "",
             "| method | setting | recall@10 | QPS | rows scanned per query (mean) | x IVF-Flat | x HNSW |",
             "|---|---|---:|---:|---:|---:|---:|"]
    ivf = next((best_at_target(v) for k, v in m.items() if k.startswith("IVF")), None)
    hnsw = next((best_at_target(v) for k, v in m.items() if k.startswith("HNSW")), None)
    best_hier = None
    for name, points in m.items():
        b = best_at_target(points)
        if b is None:
            top = max(points, key=lambda p: p["recall"])
            lines.append(f"| {name} | (best: {top['param']}) | {top['recall']:.4f} | {top['qps']:,.0f} | "
                         f"{top.get('rows_scanned', '-'):,} | never reaches 0.95 | |" if isinstance(
                             top.get("rows_scanned"), int) else
                         f"| {name} | (best: {top['param']}) | {top['recall']:.4f} | {top['qps']:,.0f} | - | "
                         "never reaches 0.95 | |")
            continue
        if name.startswith("hier") and (best_hier is None or b["qps"] > best_hier[1]["qps"]):
            best_hier = (name, b)
        ratio = lambda base: f"{b['qps'] / base['qps']:.2f}" if base else "-"  # noqa: E731
        scanned = f"{b['rows_scanned']:,}" if "rows_scanned" in b else ("all" if name.startswith("exact") else "-")
        lines.append(f"| {name} | {b['param']} | {b['recall']:.4f} | {b['qps']:,.0f} | {scanned} | "
                     f"{ratio(ivf)} | {ratio(hnsw)} |")
    lines += ["", verdict(best_hier, ivf, hnsw, any(k.startswith("hier") for k in m)), "", "Every setting measured:", "",
              "| method | setting | recall@10 | QPS | rows scanned per query (mean) | clusters per query (mean) |",
              "|---|---|---:|---:|---:|---:|"]
    for name, points in m.items():
        for p in points:
            lines.append(f"| {name} | {p['param']} | {p['recall']:.4f} | {p['qps']:,.0f} | "
                         f"{p['rows_scanned']:,} | " if "rows_scanned" in p else
                         f"| {name} | {p['param']} | {p['recall']:.4f} | {p['qps']:,.0f} | - | ")
            lines[-1] += f"{p['clusters']:.1f} |" if "clusters" in p else "- |"
    entries = res.get("list_entries", {})
    if entries:
        lines += ["", "List entries (a boundary row counts once per list): " + "; ".join(
            f"{k}: {v:,} ({v / res['rows']:.2f} per row)" for k, v in entries.items()) + "."]
    return "\n".join(lines)


def verdict(best_hier, ivf, hnsw, measured: bool = True) -> str:
    if not measured:
        return "Hierarchical variants were not measured in this block (--skip hier)."
    if best_hier is None or ivf is None:
        return "**No hierarchical variant reached recall@10 >= 0.95 in the settings swept.**"
    name, b = best_hier
    ratio = b["qps"] / ivf["qps"]
    goal = "meets" if ratio >= 1.5 else "misses"
    text = (f"**Best hierarchical variant at recall@10 >= 0.95: {name} {b['param']}, {b['qps']:,.0f} QPS = "
            f"{ratio:.2f}x IVF-Flat's {ivf['qps']:,.0f}**" + (f" and {b['qps'] / hnsw['qps']:.2f}x HNSW's "
                                                               f"{hnsw['qps']:,.0f}" if hnsw else "")
            + f"; the goal of 1.5x IVF-Flat {goal}.")
    if ratio < 1.5 and "rows_scanned" in b and "rows_scanned" in ivf and b["rows_scanned"] <= ivf["rows_scanned"]:
        text += (f" It scans {b['rows_scanned']:,} rows per query against IVF-Flat's {ivf['rows_scanned']:,}, so what "
                 "it loses is per-query work outside the scan (the gate chosen per query, duplicates dropped).")
    elif ratio < 1.5 and "rows_scanned" in b and "rows_scanned" in ivf:
        scan = b["rows_scanned"] / ivf["rows_scanned"]
        text += (f" Why: to find 95% of the fine level's true top 10 it scans {b['rows_scanned']:,} rows per query "
                 f"against IVF-Flat's {ivf['rows_scanned']:,} ({scan:.2f}x); the rest of the gap "
                 f"({1 / ratio / scan:.2f}x) is not explained by rows scanned: part is the gate, chosen per query in numpy "
                 "outside FAISS; the rest was not profiled. Both scan lists with the same FAISS loop; the hierarchy's lists are clusters of the coarse level, a partition made "
                 "for another space, and a fine-level neighbourhood falls across more of them than across the fine "
                 "level's own k-means lists. A gate on the coarse level can only match IVF when the coarse "
                 "clusters are also the fine level's best partition; listing boundary rows twice (SPANN) buys recall "
                 "per list at the cost of longer lists.")
    if hnsw and ivf:
        text += (f" HNSW, a graph on the fine level with no partition at all, is {hnsw['qps'] / ivf['qps']:.1f}x "
                 "IVF-Flat here: at this size the fastest index for the fine level is not a partition, coarse or fine.")
    return text
