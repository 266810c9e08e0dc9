"""Auto-chosen FAISS index against exact Flat search: latency, recall@10, build time, size.

    .venv/bin/python benchmarks/bench_index.py                      # 100,000 and 1,000,000 x 512
    .venv/bin/python benchmarks/bench_index.py --sizes 20000 --queries 50   # a quick look

For each size, in one run on one machine: both indexes are built over the same vectors, the
auto one exactly as `sjea index` builds it (choose_index, then nprobe/efSearch tuned to recall
0.95 on 1,000 stored vectors), then measured on queries that are NOT in the index: single-query
latency p50/p99 (one query per call on one thread, as `sjea search` issues them) and recall@10 of the auto
index against the Flat results of the same queries.

The vectors are synthetic: real 512-d embeddings of a million images cannot be produced on the
2-core CI machine in reasonable time. To behave like image embeddings rather than like uniform
noise (on which no index beats brute force), they come from a two-level Gaussian mixture:
coarse categories, sub-categories inside each, points around those with a spread that varies
per point, all L2-normalised, so neighbours are local but cluster boundaries overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sjea_tools import index as ix  # noqa: E402
from sjea_tools.vectors import exact_rerank, l2_normalize  # noqa: E402


def embeddings_like(n: int, dim: int, seed: int, coarse: int = 100, fine: int = 20) -> tuple[np.ndarray, callable]:
    """n unit vectors from a two-level mixture, plus a sampler of fresh points from it."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((coarse, dim), dtype=np.float32)
    subs = (centres[:, None, :] + 0.6 * rng.standard_normal((coarse, fine, dim), dtype=np.float32)).reshape(-1, dim)

    def sample(m: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for start in range(0, m, 100_000):  # in blocks: keeps the temporary noise small
            b = min(100_000, m - start)
            which = rng.integers(0, len(subs), b)
            spread = rng.uniform(0.35, 0.6, (b, 1)).astype(np.float32)
            out[start:start + b] = subs[which] + spread * rng.standard_normal((b, dim), dtype=np.float32)
        return l2_normalize(out)

    return sample(n, rng), sample


def latencies_ms(index, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1000)
    return np.array(times)


def index_bytes(index) -> int:
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "i.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def bench_hierarchical(vectors, queries, lat_q, flat_truth, auto_found, k: int, seed: int) -> dict:
    """Cluster-gated hierarchical search (sjea_tools.hierarchy) over the same vectors: the coarse
    level is a 128-d random projection of them (a lossy, coarser view), the tree is built as
    `sjea index` builds it (default sizes), the fine level ranks inside the query's cluster.
    Recall@10 of its top 10 against Flat's and against the auto index's, same queries."""
    import faiss

    from sjea_tools.clusters import build_tree, default_sizes
    from sjea_tools.hierarchy import gated_search

    proj = np.random.default_rng(seed + 2).standard_normal((vectors.shape[1], 128), dtype=np.float32)
    coarse = np.concatenate([l2_normalize(vectors[s:s + 100_000] @ proj) for s in range(0, len(vectors), 100_000)])
    t0 = time.perf_counter()
    sizes = default_sizes(len(vectors), 2)
    tree = build_tree([coarse, vectors], sizes, seed=seed)
    build_s = time.perf_counter() - t0
    print(f"[{len(vectors):,}] hierarchical tree {sizes} built {build_s:.1f}s", flush=True)

    def search(q: np.ndarray) -> dict:
        return gated_search([l2_normalize(q @ proj), q], lambda ids: vectors[ids], tree, k)

    got = search(queries[:1000])
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    search(lat_q[:5])  # warm-up
    times = []
    for q in lat_q:
        t = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - t) * 1000)
    faiss.omp_set_num_threads(threads)
    return {"hier_sizes": sizes, "hier_build_s": round(build_s, 1),
            "hier_recall_vs_flat": round(ix.recall_at_k(got["ids"], flat_truth), 4),
            "hier_recall_vs_auto": round(ix.recall_at_k(got["ids"], auto_found[:, :k]), 4),
            "hier_rows_touched": round(float(np.mean(got["gate_rows"])) / len(vectors), 4),
            "hier_p50_ms": round(float(np.percentile(times, 50)), 3), "hier_p99_ms": round(float(np.percentile(times, 99)), 3)}


def bench_size(n: int, dim: int, n_queries: int, k: int, seed: int, budget: int, hierarchical: bool = False) -> dict:
    import faiss

    t0 = time.perf_counter()
    vectors, sample = embeddings_like(n, dim, seed)
    queries = sample(max(n_queries, 1000), np.random.default_rng(seed + 1))
    print(f"[{n:,}] data {time.perf_counter() - t0:.1f}s", flush=True)

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    flat_build = time.perf_counter() - t0

    spec = ix.choose_index(n, dim, budget)
    t0 = time.perf_counter()
    auto = ix.build_index(vectors, spec)
    auto_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuning = ix.tune_and_measure(auto, vectors, spec)
    tune_s = time.perf_counter() - t0
    print(f"[{n:,}] {spec['kind']} {spec['params']} built {auto_build:.1f}s, tuned {spec['search_params']} "
          f"in {tune_s:.1f}s (stored-vector recall {tuning['recall_at_k']:.4f})", flush=True)

    # Recall on 1,000 held-out queries: the auto index against Flat, same queries, same run.
    _, truth = flat.search(queries[:1000], k)
    fetch = k * spec.get("rerank", 1)
    _, found = auto.search(queries[:1000], fetch)
    if fetch > k:
        _, found = exact_rerank(queries[:1000], found, lambda ids: vectors[ids], k)
    recall = ix.recall_at_k(found, truth)

    # One thread per query: a single query gains little from a second core and, on a shared
    # machine, OpenMP's barrier waits make two threads slower and noisier than one.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    lat_q = queries[:n_queries]
    latencies_ms(flat, lat_q[:5], k), latencies_ms(auto, lat_q[:5], k)  # warm-up
    flat_ms = latencies_ms(flat, lat_q, k)
    auto_ms = latencies_ms(auto, lat_q, k)
    faiss.omp_set_num_threads(threads)
    row = {
        "n": n, "dim": dim, "kind": spec["kind"], "params": spec["params"], "search_params": spec["search_params"],
        "recall_at_10": round(recall, 4), "tuning": tuning["tried"],
        "flat_p50_ms": round(float(np.percentile(flat_ms, 50)), 3), "flat_p99_ms": round(float(np.percentile(flat_ms, 99)), 3),
        "auto_p50_ms": round(float(np.percentile(auto_ms, 50)), 3), "auto_p99_ms": round(float(np.percentile(auto_ms, 99)), 3),
        "flat_build_s": round(flat_build, 2), "auto_build_s": round(auto_build, 2), "auto_tune_s": round(tune_s, 2),
        "flat_bytes": index_bytes(flat), "auto_bytes": index_bytes(auto),
    }
    row["p50_speedup"] = round(row["flat_p50_ms"] / row["auto_p50_ms"], 1)
    if hierarchical:
        row.update(bench_hierarchical(vectors, queries, lat_q, truth, found, k, seed))
    print(f"[{n:,}] p50 flat {row['flat_p50_ms']} ms, {spec['kind']} {row['auto_p50_ms']} ms "
          f"-> {row['p50_speedup']}x; recall@10 {row['recall_at_10']}", flush=True)
    return row


HIER_BEGIN = "<!-- hierarchical:begin (written by benchmarks/bench_index.py --hierarchical) -->"
HIER_END = "<!-- hierarchical:end -->"


def hierarchical_block(rows: list[dict], args) -> str:
    """The hierarchical rows as the markdown table docs/benchmarks.md carries, with their command."""
    sizes = ",".join(str(r["n"]) for r in rows)
    lines = [f"`.venv/bin/python benchmarks/bench_index.py --sizes {sizes} --queries {args.queries} --hierarchical "
             f"--out rows.json` (then `--rows rows.json --write-docs`); synthetic clustered vectors (see the script), "
             f"dimension {rows[0]['dim']}, coarse level a 128-d random projection of them; recall on 1,000 held-out "
             "queries, latency one query per call on one thread.", "",
             "| vectors | hierarchical tree | rows touched | recall@10 vs Flat | recall@10 vs auto | p50 / p99 Flat (ms) "
             "| p50 / p99 auto (ms) | p50 / p99 hierarchical (ms) | tree build (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['hier_sizes']} | {100 * r['hier_rows_touched']:.1f}% | "
                     f"{r['hier_recall_vs_flat']:.3f} | {r['hier_recall_vs_auto']:.3f} | {r['flat_p50_ms']:.2f} / "
                     f"{r['flat_p99_ms']:.2f} | {r['kind']} {r['auto_p50_ms']:.2f} / {r['auto_p99_ms']:.2f} | "
                     f"{r['hier_p50_ms']:.2f} / {r['hier_p99_ms']:.2f} | {r['hier_build_s']:.1f} |")
    return "\n".join(lines)


def write_docs_block(block: str) -> None:
    from docblock import write_block

    path = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    write_block(path, HIER_BEGIN, HIER_END, f"{HIER_BEGIN}\n{block}\n{HIER_END}",
                "## Hierarchical search at 1,000,000 x 512")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200, help="single queries timed per index")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-budget", default="8G", help="what choose_index may use (as sjea index)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--hierarchical", action="store_true", help="also measure cluster-gated hierarchical search")
    p.add_argument("--rows", default=None, help="print (and --write-docs) rows saved by --out instead of measuring")
    p.add_argument("--write-docs", action="store_true", help="write the hierarchical table into docs/benchmarks.md")
    args = p.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cpus", flush=True)
    if args.rows:  # render rows measured earlier (--out of a --hierarchical run)
        rows = json.loads(Path(args.rows).read_text())
    else:
        rows = [bench_size(int(s), args.dim, args.queries, args.k, args.seed, ix.parse_memory(args.memory_budget),
                           args.hierarchical) for s in args.sizes.split(",")]
    print("\n| vectors | auto index | recall@10 vs Flat | p50 / p99 Flat (ms) | p50 / p99 auto (ms) | p50 speed-up "
          "| build Flat / auto (s) | size Flat / auto (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in {**r["params"], **r["search_params"]}.items())
        print(f"| {r['n']:,} | {r['kind']} ({params}) | {r['recall_at_10']:.3f} | {r['flat_p50_ms']:.2f} / "
              f"{r['flat_p99_ms']:.2f} | {r['auto_p50_ms']:.2f} / {r['auto_p99_ms']:.2f} | {r['p50_speedup']}x | "
              f"{r['flat_build_s']:.1f} / {r['auto_build_s'] + r['auto_tune_s']:.1f} | "
              f"{r['flat_bytes'] / 1e6:.0f} / {r['auto_bytes'] / 1e6:.0f} |")
    if args.hierarchical or args.rows:
        block = hierarchical_block(rows, args)
        print("\n" + block)
        if args.write_docs:
            write_docs_block(block)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
