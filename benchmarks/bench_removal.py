"""What removing rows costs (`sjea embed --update` after files were deleted or changed), against
adding the same number, on synthetic stores of 10,000 and 100,000 rows (one level, 512-d, unit
vectors; the cost does not depend on the values), indexed as `sjea index` does (auto kind).

    nice -n 15 python benchmarks/bench_removal.py [--sizes 10000 100000] [--change 100]

Timed per size, each on a fresh copy of the indexed store: (a) removal of CHANGE rows spread over
the store (store.removal.rewrite_rows: the top-level file is rewritten with live ranges, no vector
copied), then the indexes (index.build_indexes: each level keeps its files and records the removed
ids as tombstones, index.tombstones), and for reference the full rebuild the same removal cost
before tombstones (`sjea index --rebuild` on that store: "rebuild_s"); (b) appending CHANGE rows
(store.append_segment) and growing the indexes. Bytes: the sizes of the store files created or
changed. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 512


def attrs() -> dict:
    return {"model_id": "bench-removal", "model_source": "/none", "backend": "onnx", "levels": [0], "dims": [DIM],
            "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "colour_mode": "RGB",
            "normalized": True, "dtype": "float32", "root": "/bench", "input": "/bench", "scan_count": 0,
            "created": "2026-01-01T00:00:00+0000"}


def rows(n: int, start: int, seed: int):
    rng = np.random.default_rng(seed)
    for a in range(0, n, 10_000):
        m = min(10_000, n - a)
        x = rng.standard_normal((m, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield [f"c{(start + a + i) % 10}/img{start + a + i:07d}.png" for i in range(m)], {0: x}


def files(out: Path) -> dict:
    seg = out.with_name(out.name + ".segments")
    found = [out, *(seg.iterdir() if seg.is_dir() else [])]
    return {str(p): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in found}


def new_bytes(before: dict, after: dict) -> int:
    inodes = {v[0] for v in before.values()}
    return sum(v[1] for p, v in after.items() if before.get(p) != v and not (p not in before and v[0] in inodes))


def one(work: Path, n: int, change: int) -> dict:
    from sjea_tools.index import build_indexes
    from sjea_tools.store import append_segment, open_store, write_store
    from sjea_tools.store.removal import rewrite_rows

    base = work / f"base-{n}.h5"
    if not base.with_name(base.name + ".index").is_dir():  # kept between runs with the same --work
        write_store(base, attrs(), [rows(n, 0, 0)], [], total=n)
        build_indexes(base)
    result = {"rows": n, "changed_rows": change}
    for case in ("remove", "add"):
        out = work / f"{case}-{n}.h5"
        shutil.copy(base, out)
        shutil.copytree(base.with_name(base.name + ".index"), out.with_name(out.name + ".index"))
        with open_store(out) as s:
            paths = s.paths  # a property that reads every path: once
        drop = {paths[i] for i in np.linspace(0, n - 1, change).astype(int)}
        before = files(out)
        t0 = time.perf_counter()
        if case == "remove":
            rewrite_rows(out, drop, set(), None)
        else:
            append_segment(out, attrs(), [p for b, _ in rows(change, n, 1) for p in b], rows(change, n, 1), [])
        t1 = time.perf_counter()
        sidecar = build_indexes(out)
        t2 = time.perf_counter()
        entry = sidecar["levels"]["0"]
        result[case] = {"store_s": round(t1 - t0, 3), "index_s": round(t2 - t1, 3),
                        "store_bytes_written": new_bytes(before, files(out)),
                        "index": f"{entry['kind']} ({entry['action']})"}
        if case == "remove":
            t0 = time.perf_counter()
            build_indexes(out, rebuild=True)
            result[case]["rebuild_s"] = round(time.perf_counter() - t0, 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--change", type=int, default=100)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-removal-"))
    work.mkdir(parents=True, exist_ok=True)
    for n in a.sizes:
        print(json.dumps({**one(work, n, a.change), "load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
