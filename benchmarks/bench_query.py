"""What one query costs in the server's loaded store, beside what FAISS alone costs on the same index.

For each --rows (the Fashion-MNIST stores of bench_serve.py, built once in --work and reused), in
one process, the server's own `LoadedStore` (StoreHolder.current(), no HTTP), --queries random
stored ids, alternating per id:
  floor        the raw FAISS search of that row's vector, k, at every level a per-level search visits
               (the index alone: no re-scoring, no result dicts)
  per-level    LoadedStore.search(ids=[i], mode="per-level") (all levels, exact scores, result dicts)
  hierarchical LoadedStore.search(ids=[i], mode="hierarchical")
then searches by an uploaded image (a stored PNG, per-level and hierarchical) beside embedding
that image alone, a batch of 100 ids in one call (time per query), and the per-level search again
with the vectors memory-mapped (StoreHolder(in_memory_max=0)). On the largest store it also times
`sjea search FOLDER --store STORE --json` on --folder-images stored PNGs (a warm-up, then the median of
FOLDER_REPEAT alternating runs of each) against `sjea embed` of
the same folder (each a fresh process) and the raw FAISS search of those queries in one call.

With --synthetic-rows 1000000 it also serves a store of that many random unit vectors (the
largest store's model and dims, a flat index) and states the server's RSS: memory, not speed.

    python benchmarks/bench_query.py --run RUN [--work DIR] [--rows 3000,100000] [--queries 300] \\
        [--synthetic-rows 1000000] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import build_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_query:begin -->", "<!-- bench_query:end -->"
CLI = [sys.executable, "-c", "import sys; from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())"]


def ms(values: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(values, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 3), "n": len(values)}


FOLDER_REPEAT = 3


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def per_query(loaded, queries: int, k: int, seed: int) -> dict:
    """Interleaved per id: the FAISS floor, per-level and hierarchical searches of the loaded store."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, loaded.n, queries + 20)
    indexes = [loaded.indexes.loaded[lv] for lv in loaded.levels]
    times: dict[str, list[float]] = {"floor": [], "floor_one_level": [], "per-level": [], "hierarchical": []}
    for n, i in enumerate(ids):
        i = int(i)
        qs = [np.ascontiguousarray(loaded.vectors.arrays[j][i:i + 1]) for j in range(len(indexes))]
        floors = [timed(lambda ix=ix, q=q: ix.search(q, k)) for ix, q in zip(indexes, qs)]
        got = {"floor": sum(floors), "floor_one_level": floors[0],
               "per-level": timed(lambda: loaded.search(ids=[i], k=k, mode="per-level")),
               "hierarchical": timed(lambda: loaded.search(ids=[i], k=k, mode="hierarchical"))}
        if n >= 20:  # the first 20: warm-up
            for key, v in got.items():
                times[key].append(v)
    return {key: ms(v) for key, v in times.items()}


def by_upload(loaded, images: list[Path], k: int) -> dict:
    times: dict[str, list[float]] = {"embed_alone": [], "per-level": [], "hierarchical": []}
    for p in images:
        times["embed_alone"].append(timed(lambda: loaded.embedder.embed_files([p])))
        times["per-level"].append(timed(lambda: loaded.search(files=[str(p)], k=k, mode="per-level")))
        times["hierarchical"].append(timed(lambda: loaded.search(files=[str(p)], k=k, mode="hierarchical")))
    return {key: ms(v) for key, v in times.items()}


def batch(loaded, k: int, size: int = 100, repeats: int = 5) -> dict:
    rng = np.random.default_rng(7)
    out = {}
    for mode in ("per-level", "hierarchical"):
        ts = [timed(lambda: loaded.search(ids=[int(i) for i in rng.integers(0, loaded.n, size)], k=k, mode=mode))
              for _ in range(repeats)]
        out[mode] = {"queries": size, "per_query_ms": round(float(np.median(ts)) / size * 1e3, 3)}
    return out


def folder_search(store: Path, run: Path, images: list[Path], work: Path, k: int, loaded) -> dict:
    """`sjea search FOLDER` and `sjea embed FOLDER` on the same images, fresh processes, + FAISS alone."""
    folder = work / f"queries{len(images)}"
    if not folder.is_dir() or len(list(folder.iterdir())) != len(images):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for n, p in enumerate(images):
            shutil.copyfile(p, folder / f"{n:05d}{p.suffix}")
    out = work / "folder-embed.h5"

    def embed() -> None:
        shutil.rmtree(out.with_name(out.name + ".index"), ignore_errors=True)
        out.unlink(missing_ok=True)
        subprocess.run([*CLI, "embed", str(folder), str(out), "--run", str(run)], check=True, capture_output=True)

    def search() -> None:
        subprocess.run([*CLI, "search", str(folder), "--store", str(store), "--json", "--k", str(k)], check=True,
                       capture_output=True)

    # One warm-up each (file cache, cached ONNX graph), then FOLDER_REPEAT alternating runs: medians.
    embed(), search()
    runs = [(timed(embed), timed(search)) for _ in range(FOLDER_REPEAT)]
    embed_s, search_s = (float(np.median([r[i] for r in runs])) for i in (0, 1))
    q = [loaded.vectors.arrays[j][:len(images)] for j in range(len(loaded.levels))]
    faiss_s = sum(timed(lambda ix=loaded.indexes.loaded[lv], x=np.ascontiguousarray(q[j]): ix.search(x, k))
                  for j, lv in enumerate(loaded.levels))
    return {"images": len(images), "embed_s": round(embed_s, 2), "search_s": round(search_s, 2),
            "faiss_s": round(faiss_s, 4), "search_per_s": round(len(images) / search_s, 1),
            "embed_plus_faiss_per_s": round(len(images) / (embed_s + faiss_s), 1),
            "ratio": round((embed_s + faiss_s) / search_s, 2)}


def synthetic_store(like: Path, out: Path, rows: int) -> Path:
    """A store of `rows` random unit vectors with `like`'s attributes (no image files behind them),
    indexed flat without a cluster tree: what the server's memory does at that size, not its speed."""
    from sjea_tools.store import open_store
    from sjea_tools.store.writer import write_store

    if out.is_file() and (out.with_name(out.name + ".index") / "index.json").is_file():
        return out
    with open_store(like) as s:
        attrs = {k: v for k, v in s.attrs.items() if k not in ("fingerprint", "store_id", "format")}
        levels, dims = s.levels, s.dims
    rng = np.random.default_rng(0)

    def blocks():
        for start in range(0, rows, 16384):
            m = min(16384, rows - start)
            vecs = {lv: rng.standard_normal((m, d), dtype=np.float32) for lv, d in zip(levels, dims)}
            yield ([f"syn/{i // 1000:04d}/{i:07d}.png" for i in range(start, start + m)],
                   {lv: v / np.linalg.norm(v, axis=1, keepdims=True) for lv, v in vecs.items()})

    write_store(out, attrs, [blocks()], [], total=rows)
    subprocess.run([*CLI, "index", str(out), "--kind", "flat", "--no-clusters", "-q"], check=True)
    return out


def served_memory(store: Path, requests: int) -> dict:
    """`sjea serve` of the store in its own process: RSS (anonymous and file-backed) after start and
    after `requests` searches by id, and its peak (VmHWM)."""
    import httpx

    from bench_serve import start_server

    def status(pid: int) -> dict:
        keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
        return {line.split(":")[0]: round(int(line.split()[1]) / 1024, 1)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(keys)}

    from sjea_tools.index import index_dir
    from sjea_tools.serve.state import CACHE_PREFIX

    for old in index_dir(store).glob(f"{CACHE_PREFIX}*.npy"):  # the first start, the one that writes the cache
        old.unlink()
    t = time.perf_counter()
    proc, url = start_server(store)
    try:
        started = {"start_s": round(time.perf_counter() - t, 1), **status(proc.pid)}
        rng, lat = np.random.default_rng(0), []
        with httpx.Client(base_url=url, timeout=300) as h:
            n = int(h.get("/api/info").json()["n"])
            for i in rng.integers(0, n, requests):
                lat.append(timed(lambda: h.get("/api/search", params={"id": int(i), "k": 10}).raise_for_status()))
        return {"rows": n, "after_start": started, "after_searches": status(proc.pid), "searches": requests,
                "by_id_p50_ms": round(float(np.median(lat)) * 1e3, 1)}
    finally:
        proc.terminate()
        proc.wait(30)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_rows(rows: int, args) -> dict:
    from sjea_tools.serve.state import StoreHolder

    store, build_s = build_store(args.work / f"r{rows}", args.run, rows)
    before = rss_mb()
    t = time.perf_counter()
    loaded = StoreHolder(store).current()
    load_s = time.perf_counter() - t
    loaded_rss = rss_mb() - before
    images = [Path(loaded.root) / loaded.paths[int(i)]
              for i in np.random.default_rng(3).integers(0, loaded.n, args.uploads)]
    res = {"rows": rows, "store_build_s": round(build_s, 1), "load_s": round(load_s, 2),
           "load_rss_mb": round(loaded_rss, 1), "index_kinds": loaded.info()["index_kinds"],
           "levels": loaded.levels, "dims": loaded.dims,
           "by_id": per_query(loaded, args.queries, args.k, seed=rows), "by_upload": by_upload(loaded, images, args.k),
           "batch_of_ids": batch(loaded, args.k)}
    mapped = StoreHolder(store, in_memory_max=0).current()
    res["by_id_memory_mapped"] = per_query(mapped, max(50, args.queries // 3), args.k, seed=rows + 1)
    if rows == max(args.rows) and args.folder_images:
        paths = [Path(loaded.root) / p for p in loaded.paths[:args.folder_images]]
        res["folder"] = folder_search(store, args.run, paths, args.work, args.k, loaded)
    return res


def render(res: dict, command: str, commit: str) -> str:
    lines = [BEGIN, f"In-process, no HTTP: `sjea serve`'s own `LoadedStore` (stored vectors held in memory, the indexes "
             f"loaded once), k={res['k']}, on the Fashion-MNIST stores of bench_serve.py (model: run "
             f"{res['run']}). The floor is the raw FAISS search of the same query row, the same k, at every "
             f"level a per-level search visits (the index alone); each query's floor and searches alternate. "
             f"{res['cpus']} CPU cores shared with other work: load average {res['load_before']} before, "
             f"{res['load_after']} after (1, 5, 15 min); commit {commit}.", "",
             "| rows | index | query | p50 ms | p99 ms | FAISS floor p50 ms | p50 / floor |", "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        kinds = "/".join(sorted(set(r["index_kinds"].values())))
        floor = r["by_id"]["floor"]["p50_ms"]
        lines.append(f"| {r['rows']:,} | {kinds} | FAISS alone, {len(r['levels'])} levels (the floor) | {floor} | "
                     f"{r['by_id']['floor']['p99_ms']} | {floor} | 1 |")
        for mode in ("per-level", "hierarchical"):
            m = r["by_id"][mode]
            lines.append(f"| {r['rows']:,} | {kinds} | by id, {mode} | {m['p50_ms']} | {m['p99_ms']} | {floor} | "
                         f"{m['p50_ms'] / floor:.1f} |")
        m = r["by_id_memory_mapped"]
        lines.append(f"| {r['rows']:,} | {kinds} | by id, per-level, vectors memory-mapped | {m['per-level']['p50_ms']} | "
                     f"{m['per-level']['p99_ms']} | {m['floor']['p50_ms']} | "
                     f"{m['per-level']['p50_ms'] / m['floor']['p50_ms']:.1f} |")
        up = r["by_upload"]
        for mode in ("per-level", "hierarchical"):
            lines.append(f"| {r['rows']:,} | {kinds} | by uploaded PNG, {mode} (embedding it alone: "
                         f"{up['embed_alone']['p50_ms']} ms) | {up[mode]['p50_ms']} | {up[mode]['p99_ms']} | "
                         f"{floor} | {up[mode]['p50_ms'] / floor:.1f} |")
        for mode, b in r["batch_of_ids"].items():
            lines.append(f"| {r['rows']:,} | {kinds} | {b['queries']} ids in one call, {mode}, per query | "
                         f"{b['per_query_ms']} | - | {floor} | {b['per_query_ms'] / floor:.1f} |")
    lines.append("")
    for r in res["results"]:
        lines.append(f"Loading the {r['rows']:,}-row store (indexes, paths, tree, model, vectors) took {r['load_s']} s "
                     f"and {r['load_rss_mb']} MB of RSS.")
        if "folder" in r:
            f = r["folder"]
            lines.append(f"`sjea search FOLDER --store` ({f['images']:,} stored PNGs, {r['rows']:,}-row store, "
                         f"per-level, fresh processes: after a warm-up, the median of {FOLDER_REPEAT} alternating runs): "
                         f"{f['search_s']} s, {f['search_per_s']} images/s; `sjea embed` "
                         f"of the same folder {f['embed_s']} s, + the raw FAISS search of those {f['images']:,} "
                         f"queries {f['faiss_s']} s: {f['embed_plus_faiss_per_s']} images/s; search / (embed + "
                         f"FAISS) rate = {f['ratio']}.")
    m = res.get("synthetic")
    if m:
        a, b = m["after_start"], m["after_searches"]
        lines.append(f"`sjea serve` of {m['rows']:,} rows of synthetic random vectors (the 100,000-row store's "
                     f"model and dims, a flat index, no cluster tree; memory only, not speed): started in "
                     f"{a['start_s']} s (writing the memory-mapped vector cache), RSS {a['VmRSS']} MB "
                     f"({a['RssAnon']} MB anonymous); after {m['searches']} searches by id {b['VmRSS']} MB, of "
                     f"which {b['RssAnon']} MB anonymous and {b['RssFile']} MB mapped files (the page cache of "
                     f"the index and vectors, which the OS can drop); peak {b['VmHWM']} MB. A flat search of "
                     f"1M rows: {m['by_id_p50_ms']} ms p50 by id (auto picks IVF at this size).")
    lines += ["", f"Command: `{command}`", f"<!-- bench_query:data {json.dumps(res, sort_keys=True)} -->", END]
    return "\n".join(lines)


def write_docs(block: str) -> None:
    from docblock import write_block

    write_block(DOCS, BEGIN, END, block, "## One query in the server's loaded store, beside FAISS alone "
                                         "(`benchmarks/bench_query.py`)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run folder (sjea train --out RUN)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sjea-bench-query"))
    ap.add_argument("--rows", default="3000,100000", help="store sizes, comma-separated")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--uploads", type=int, default=30)
    ap.add_argument("--folder-images", type=int, default=1000, help="sjea search FOLDER on the largest store (0: skip)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--synthetic-rows", type=int, default=0, help="also serve a store of this many random vectors "
                    "(flat index) and state the server's RSS (e.g. 1000000; 0: skip)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    args.work, args.run = args.work.resolve(), args.run.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = [measure_rows(rows, args) for rows in args.rows]
    synthetic = None
    if args.synthetic_rows:
        like = build_store(args.work / f"r{max(args.rows)}", args.run, max(args.rows))[0]
        store = synthetic_store(like, args.work / f"synthetic{args.synthetic_rows}.h5", args.synthetic_rows)
        synthetic = served_memory(store, 30)
    trained = (args.run / "metrics.jsonl").is_file()
    res = {"synthetic": synthetic, "k": args.k, "run": f"{args.run.name} ({'trained' if trained else 'untrained weights: speed does not depend on them'})",
           "cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
           "load_after": [round(v, 2) for v in os.getloadavg()],
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "results": results}
    print(json.dumps(res, indent=2))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    command = " ".join(["python benchmarks/bench_query.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    (args.work / "query-result.json").write_text(json.dumps({"res": res, "command": command, "commit": commit}))
    if args.write_docs:
        write_docs(render(res, command, commit))
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
