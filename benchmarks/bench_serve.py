"""Load benchmark of `sjea serve`: C concurrent clients for S seconds against a store of R rows.

The store: real Fashion-MNIST images (the 60,000 training and 10,000 test images), then horizontally
flipped copies of training images until there are --rows (100,000 by default), embedded with --run and
indexed by `sjea embed` (auto index kind: HNSW at this size; cluster tree included). Built once in
--work and reused.

The load: `sjea serve STORE --port 0` in its own process; C client threads (httpx) send, for S
seconds, a mix of searches by stored id (default mode, k=10) and, every --upload-every-th request,
a search by an uploaded image (a stored PNG's bytes), recording each latency and status. The
server's RSS is sampled every second from /proc. The same request mix is then run in this process
by calling the library directly, one call after another: `search_store` (which opens the store and
its indexes on every call) and, for the cost of HTTP alone, the server's own loaded store object.

    python benchmarks/bench_serve.py --run RUN [--work DIR] [--rows 100000] [--clients 8] [--seconds 60] \\
        [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_serve:begin -->", "<!-- bench_serve:end -->"
SERVE = [sys.executable, "-c", "import sys; from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())",
         "serve"]


def write_images(folder: Path, rows: int) -> int:
    """Fashion-MNIST train + test as PNG files, then flipped training copies up to `rows` files."""
    from PIL import Image

    from sjea_tools.data import load_dataset

    done = folder / ".complete"
    if done.is_file() and int(done.read_text()) == rows:
        return rows
    count = 0
    for split in ("train", "test"):
        data = load_dataset("fashion-mnist", split=split)
        for i in range(len(data.pixels)):
            if count == rows:
                break
            write_png(folder / split / f"{i // 1000:03d}" / f"{i:05d}.png", data.pixels[i])
            count += 1
    train = load_dataset("fashion-mnist", split="train")
    i = 0
    while count < rows:
        write_png(folder / "flipped" / f"{i // 1000:03d}" / f"{i:05d}.png", np.ascontiguousarray(train.pixels[i][:, ::-1]))
        count, i = count + 1, i + 1
    done.write_text(str(rows))
    return count


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


def build_store(work: Path, run: Path, rows: int) -> tuple[Path, float]:
    """The indexed store of `rows` images (reused when it is already there); seconds spent building."""
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.store import open_store

    out = work / f"fmnist{rows}.h5"
    t = time.perf_counter()
    if out.is_file():
        with open_store(out) as s:
            if s.n == rows:
                return out, 0.0
    write_images(work / "imgs", rows)
    embed_and_index(work / "imgs", out, run=run, overwrite=out.exists())
    return out, time.perf_counter() - t


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*SERVE, str(store), "--port", "0"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"http://[\d.]+:\d+/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, m.group(0)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Requests:
    """The request mix: mostly ids, every `upload_every`-th request an uploaded stored image."""

    def __init__(self, n: int, root: Path, paths: list[str], upload_every: int, seed: int, camera: bytes | None = None):
        self.n, self.root, self.paths, self.upload_every, self.camera = n, root, paths, upload_every, camera
        self.rng = random.Random(seed)

    def next(self, count: int) -> tuple[str, int | bytes]:
        if self.camera is not None:
            return "image", self.camera
        if self.upload_every and count % self.upload_every == 0:
            return "image", (self.root / self.paths[self.rng.randrange(self.n)]).read_bytes()
        return "id", self.rng.randrange(self.n)


CAMERA_SIZE = (4032, 3024)  # a 12-megapixel phone camera's photo


def camera_jpeg() -> bytes:
    """A real photo (scikit-image's astronaut) at a camera's size, JPEG quality 90: what a user uploads."""
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize(CAMERA_SIZE, Image.LANCZOS).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_test(url: str, pid: int, mix: dict, clients: int, seconds: float, k: int) -> dict:
    import httpx

    stop_at = time.perf_counter() + seconds
    lat: dict[str, list[float]] = {"id": [], "image": []}
    failures: list[str] = []
    rss: list[tuple[float, float]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        req = Requests(**mix, seed=c)
        with httpx.Client(base_url=url, timeout=60) as h:
            count = 0
            while time.perf_counter() < stop_at:
                kind, what = req.next(count)
                t = time.perf_counter()
                if kind == "id":
                    r = h.get("/api/search", params={"id": what, "k": k})
                else:
                    name, kind_ = ("q.jpg", "image/jpeg") if what[:3] == b"\xff\xd8\xff" else ("q.png", "image/png")
                    r = h.post("/api/search/image", files={"file": (name, what, kind_)}, data={"k": str(k)})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        lat[kind].append(dt)
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                count += 1

    def sample() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() < stop_at:
            rss.append((time.perf_counter() - t0, rss_mb(pid)))
            time.sleep(1.0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)] + [threading.Thread(target=sample)]
    t0, server0, clients0 = time.perf_counter(), cpu_s(pid), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = max(1, len(lat["id"]) + len(lat["image"]))
    cpu = {"server_ms_per_request": round((cpu_s(pid) - server0) / done * 1e3, 2),
           "clients_ms_per_request": round((time.process_time() - clients0) / done * 1e3, 2)}
    return {**summary(lat, wall), "failed": len(failures), "failures": failures[:5], "rss": rss, "cpu": cpu}


def library_test(store: Path, mix: dict, seconds: float, k: int, loaded=None) -> dict:
    """The same mix in this process, one call after another: search_store, or a loaded store's search."""
    import tempfile

    from sjea_tools.search import search_store

    req = Requests(**mix, seed=99)
    lat: dict[str, list[float]] = {"id": [], "image": []}
    stop_at, count = time.perf_counter() + seconds, 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        query = Path(tmp) / "q.png"
        while time.perf_counter() < stop_at:
            kind, what = req.next(count)
            t = time.perf_counter()
            if kind == "image":
                query.write_bytes(what)  # search_store takes files; the server writes the upload the same way
            if loaded is None:
                search_store(store, **({"ids": [what]} if kind == "id" else {"queries": [str(query)]}), k=k)
            else:
                loaded.search(**({"ids": [what]} if kind == "id" else {"files": [str(query)]}), k=k)
            lat[kind].append(time.perf_counter() - t)
            count += 1
    return summary(lat, time.perf_counter() - t0)


def summary(lat: dict[str, list[float]], wall: float) -> dict:
    every = lat["id"] + lat["image"]
    out = {"requests": len(every), "seconds": round(wall, 1), "per_s": round(len(every) / wall, 1)}
    for kind, values in (("all", every), *lat.items()):
        if values:
            out[kind] = {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
                         "p99_ms": round(float(np.percentile(values, 99)) * 1000, 1)}
    return out


def rss_flat(rss: list[tuple[float, float]]) -> dict:
    """RSS after the first 10 s (warm-up: thread pool, caches) against the last 10 s."""
    values = [v for _, v in rss]
    first, last = np.mean(values[10:20] or values[:1]), np.mean(values[-10:])
    return {"start_mb": round(float(values[0]), 1), "after_10s_mb": round(float(first), 1),
            "end_mb": round(float(last), 1), "max_mb": round(float(max(values)), 1),
            "growth_after_warmup_pct": round(float((last - first) / first * 100), 1)}


def measure(args) -> dict:
    from sjea_tools.serve.state import StoreHolder
    from sjea_tools.store import open_store

    store, build_s = build_store(args.work, args.run, args.rows)
    with open_store(store) as s:
        n, paths, root = s.n, s.paths, Path(s.root)
    mix = {"n": n, "root": root, "paths": paths, "upload_every": args.upload_every}
    proc, url = start_server(store)
    load_before = [round(v, 2) for v in os.getloadavg()]
    try:
        served = load_test(url, proc.pid, mix, args.clients, args.seconds, args.k)
        camera = None
        if args.camera_seconds:
            photo = camera_jpeg()
            camera = load_test(url, proc.pid, {**mix, "camera": photo}, args.clients, args.camera_seconds, args.k)
            camera.pop("rss")
            camera["bytes"] = len(photo)
    finally:
        proc.terminate()
        proc.wait(30)
    loaded = StoreHolder(store).current()
    direct_loaded = library_test(store, mix, args.library_seconds, args.k, loaded=loaded)
    direct = library_test(store, mix, args.library_seconds, args.k)
    rss = served.pop("rss")
    with open_store(store) as s, open((args.work / "info.json"), "w") as f:
        json.dump({"levels": s.levels, "dims": s.dims}, f)
    trained = (args.run / "metrics.jsonl").is_file()
    return {"rows": n, "run": f"{args.run.name} ({'trained' if trained else 'untrained weights: latency does not depend on them'})",
            "clients": args.clients, "k": args.k, "upload_every": args.upload_every,
            "index_kinds": loaded.info()["index_kinds"], "store_build_s": round(build_s, 1), "served": served,
            "camera": camera,
            "rss": rss_flat(rss), "library_search_store": direct, "library_loaded_store": direct_loaded,
            "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
            "cpus": os.cpu_count(), "python": platform.python_version()}


def render(res: dict, command: str, commit: str) -> str:
    s, d, dl, rss = res["served"], res["library_search_store"], res["library_loaded_store"], res["rss"]

    def row(name, r, concurrency):
        cells = [name, concurrency, f"{r['requests']:,} in {r['seconds']} s", f"{r['per_s']}"]
        for kind in ("id", "image"):
            cells.append(f"{r[kind]['p50_ms']} / {r[kind]['p99_ms']}" if kind in r else "-")
        return "| " + " | ".join(cells) + " |"

    return "\n".join([
        BEGIN,
        f"**sjea serve under load** ({res['rows']:,}-row store of real Fashion-MNIST images and flipped copies, "
        f"model: run {res.get('run', '?')}, index per level "
        f"{', '.join(f'{lv}: {kind}' for lv, kind in res['index_kinds'].items())}, k={res['k']}, default mode; "
        f"{mix_text(res['upload_every'])}; {res['cpus']} CPU cores shared by server, clients and other work; "
        f"commit {commit}):",
        "",
        "| what | concurrency | requests | per s | by id p50 / p99 ms | by upload p50 / p99 ms |",
        "|---|---|---|---|---|---|",
        row("`sjea serve` over HTTP", s, f"{res['clients']} clients"),
        *([row(f"`sjea serve` over HTTP, every request a {CAMERA_SIZE[0]} x {CAMERA_SIZE[1]} camera JPEG "
               f"({res['camera']['bytes'] / 2**20:.1f} MiB)", res["camera"], f"{res['clients']} clients")]
          if res.get("camera") else []),
        row("library: `search_store` per call (opens store + indexes)", d, "1, in-process"),
        row("library: the server's loaded store, no HTTP", dl, "1, in-process"),
        "",
        f"Failed requests: {s['failed']} of {s['requests'] + s['failed']:,}. Server RSS: {rss['start_mb']} MB at "
        f"start, {rss['after_10s_mb']} MB after 10 s, {rss['end_mb']} MB in the last 10 s (max {rss['max_mb']} MB; "
        f"{rss['growth_after_warmup_pct']:+}% after warm-up).",
        *([f"CPU per HTTP request: server {s['cpu']['server_ms_per_request']} ms, the {res['clients']} client threads "
           f"{s['cpu']['clients_ms_per_request']} ms (server and clients a process each, on the same cores). Load average "
           f"{res['load_before']} before, {res['load_after']} after (1, 5, 15 min)."] if "cpu" in s else []),
        *([camera_bound(res["camera"], res["cpus"])] if res.get("camera") else []),
        "",
        f"Command: `{command}`",
        f"<!-- bench_serve:data {json.dumps(res, sort_keys=True)} -->",
        END,
    ])


def camera_bound(c: dict, cpus: int) -> str:
    """What bounds the camera uploads, from the numbers: the server's CPU per upload (receiving,
    draft-decoding the JPEG, resizing, embedding) on the cores it has."""
    ms = c["cpu"]["server_ms_per_request"]
    return (f"Camera uploads: {c['per_s']} per s, failed {c['failed']}; the server spent {ms} ms of CPU per upload "
            f"(the clients {c['cpu']['clients_ms_per_request']} ms), so {cpus} cores bound it at about "
            f"{cpus * 1000 / ms:.0f} per s: the decode and embedding of each upload, not the search.")


def mix_text(upload_every: int) -> str:
    if not upload_every:
        return "every request searches by a random stored id"
    return f"one request in {upload_every} uploads a stored PNG, the rest search by id"


def write_docs(block: str) -> None:
    from docblock import write_block

    write_block(DOCS, BEGIN, END, block, "## sjea serve")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained run folder (sjea train --out RUN)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sjea-bench-serve"))
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--library-seconds", type=float, default=30)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--upload-every", type=int, default=10, help="every Nth request uploads an image (0: none)")
    ap.add_argument("--camera-seconds", type=float, default=20, help="then every request uploads a camera JPEG "
                    "for this long (0: skip)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--rewrite-docs", action="store_true", help="write the block again from WORK/result.json (the "
                    "last measurement) without measuring: docs/benchmarks.md has several writers")
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.run = args.run.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "result.json"
    if args.rewrite_docs:
        write_docs(render(**json.loads(saved.read_text())))
        print(f"written to {DOCS} from {saved}")
        return
    res = measure(args)
    print(json.dumps(res, indent=2))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    command = " ".join(["python benchmarks/bench_serve.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    saved.write_text(json.dumps({"res": res, "command": command, "commit": commit}))
    if args.write_docs:
        write_docs(render(res, command, commit))
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
