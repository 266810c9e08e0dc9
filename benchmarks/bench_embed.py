"""Embedding throughput and memory of `sjea embed`, against a straightforward loop, in one run.

    python benchmarks/bench_embed.py speed --kind large --n 2000      # camera-size JPEGs
    python benchmarks/bench_embed.py speed --kind small --n 5000      # 28x28 PNGs
    python benchmarks/bench_embed.py memory --n 2000 20000            # peak RSS against image count

Images are real Fashion-MNIST pictures (train split): "large" ones are upscaled to camera size
(4000x3000 by default) and re-encoded as JPEG (quality 90); "small" ones are the 28x28 originals
as PNG. They sit in class sub-folders and are cached under --data (made once).

speed measures, on the same folder, model, workers and batch size:
  baseline   torchvision ImageFolder (PIL loading, Resize + CenterCrop + ToTensor + Normalize),
             DataLoader with the same workers, eager PyTorch forward_levels
  sjea       embed_folder end to end (decode workers -> backend -> HDF5 store), default backend
  Rd         decode-only rate of sjea's decoding stage (same workers, no model)
  Rm         model-only rate of sjea's backend on decoded pixels
and prints sjea/baseline and sjea / (1 / (1/Rd + 1/Rm)), the bound when both stages share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CAMERA = (4000, 3000)


# --- data -----------------------------------------------------------------------------------------

def _write_range(args):
    root, kind, start, stop, size = args
    from PIL import Image

    from sjea_tools.data import load_dataset
    from sjea_tools.data.write_folder import class_folder_name

    data = load_dataset("fashion-mnist", split="train")
    for i in range(start, stop):
        folder = Path(root) / class_folder_name(data.class_names[int(data.labels[i])])
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(data.pixels[i])
        if kind == "large":
            img.resize(size, Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
        else:
            img.save(folder / f"{i:06d}.png")


def make_folder(base: Path, kind: str, n: int, size=CAMERA) -> Path:
    """n real images in class sub-folders, made once (in parallel) and reused."""
    root = base / (f"{kind}-{n}" + (f"-{size[0]}x{size[1]}" if kind == "large" else ""))
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from multiprocessing import get_context

    procs = os.cpu_count() or 1
    step = max(1, -(-n // (procs * 4)))
    jobs = [(str(root), kind, s, min(n, s + step), size) for s in range(0, n, step)]
    t = time.perf_counter()
    with get_context("spawn").Pool(procs) as pool:
        pool.map(_write_range, jobs)
    done.write_text(str(n))
    mb = sum(p.stat().st_size for p in root.rglob("*.*")) / 1e6
    print(f"made {n} {kind} images in {root} ({mb:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
    return root


def make_bench_run(base: Path, image_size: int) -> Path:
    """The tiny preset's architecture (ResNet-18 + MLP level) at `image_size`, randomly initialised."""
    import torch

    from sjea_tools.config import resolve_config, save_config
    from sjea_tools.models import build_model
    from sjea_tools.runs import save_model

    run = base / f"run-{image_size}"
    if (run / "model.pt").is_file():
        return run
    cfg = resolve_config("tiny", overrides={"data.image_size": image_size, "name": run.name})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.json")
    save_model(run, model, cfg)
    return run


# --- the four measurements --------------------------------------------------------------------------

def baseline_rate(root: Path, run: Path, workers: int, batch: int, device: str) -> float:
    import torch
    import torchvision
    from torchvision import transforms as T

    import sjea_tools

    model = sjea_tools.load_model(run, device=device)
    tf = T.Compose([T.Resize(model.image_size), T.CenterCrop(model.image_size), T.ToTensor(),
                    T.Normalize(model.mean, model.std)])
    ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False,
                                         pin_memory=device.startswith("cuda"))
    t = time.perf_counter()
    n = 0
    outs = []
    with torch.inference_mode():
        for x, _ in loader:
            outs.append([y.cpu().numpy() for y in model.forward_levels(x.to(device))])
            n += len(x)
    return n / (time.perf_counter() - t)


def sjea_rate(root: Path, emb, workers: int, batch: int, out: Path) -> tuple[float, dict]:
    from sjea_tools.embed import embed_folder

    for p in (out, out.with_name(out.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t = time.perf_counter()
    summary = embed_folder(root, out, embedder=emb, workers=workers, batch_size=batch)
    return (summary["added"] + summary["failed"]) / (time.perf_counter() - t), summary


def decode_rate(root: Path, image_size: int, workers: int, batch: int) -> float:
    from sjea_tools.embed import collect_images, decoded_batches

    root, paths = collect_images(root)
    t = time.perf_counter()
    n = sum(len(idx) for idx, _, _ in decoded_batches(root, paths, image_size, batch, workers))
    return n / (time.perf_counter() - t)


def model_rate(emb, root: Path, n: int, batch: int) -> float:
    from sjea_tools.embed import collect_images, load_pixels

    root, paths = collect_images(root)
    px = np.stack([load_pixels(root / p, emb.image_size) for p in paths[:batch]])
    emb.embed_pixels(px)  # warm-up (allocations, kernel choice)
    t = time.perf_counter()
    done = 0
    while done < n:
        emb.embed_pixels(px)
        done += len(px)
    return done / (time.perf_counter() - t)


def speed(args) -> dict:
    from sjea_tools.embed import Embedder, default_workers

    base = Path(args.data)
    size = tuple(int(v) for v in args.camera.split("x"))
    root = make_folder(base, args.kind, args.n, size)
    run = make_bench_run(base, args.image_size)
    workers = args.workers if args.workers is not None else default_workers()
    emb = Embedder.from_source(run=run, backend=args.backend, device=args.device)
    res = {"kind": args.kind, "n": args.n, "camera": args.camera if args.kind == "large" else "28x28",
           "image_size": args.image_size, "workers": workers, "batch_size": args.batch_size,
           "backend": emb.backend, "device": emb.device, "cpus": os.cpu_count()}
    print(json.dumps(res), flush=True)
    res["sjea"], summary = sjea_rate(root, emb, workers, args.batch_size, base / "bench-out.h5")
    print(f"sjea end to end   {res['sjea']:8.1f} images/s ({summary['rows']} rows)", flush=True)
    res["baseline"] = baseline_rate(root, run, workers, args.batch_size, emb.device)
    print(f"baseline loop     {res['baseline']:8.1f} images/s", flush=True)
    res["Rd"] = decode_rate(root, emb.image_size, workers, args.batch_size)
    print(f"decode only (Rd)  {res['Rd']:8.1f} images/s", flush=True)
    res["Rm"] = model_rate(emb, root, min(args.n, 4096), args.batch_size)
    print(f"model only (Rm)   {res['Rm']:8.1f} images/s", flush=True)
    res["bound"] = 1.0 / (1.0 / res["Rd"] + 1.0 / res["Rm"])
    res["speedup_vs_baseline"] = res["sjea"] / res["baseline"]
    res["fraction_of_bound"] = res["sjea"] / res["bound"]
    print(f"shared-core bound {res['bound']:8.1f} images/s = 1/(1/Rd + 1/Rm)")
    print(f"RATIO sjea/baseline = {res['speedup_vs_baseline']:.2f}x   sjea/bound = {res['fraction_of_bound']:.2f}",
          flush=True)
    return res


# --- memory ---------------------------------------------------------------------------------------

def _child_embed(folder: str, out: str, run: str, workers: int, batch: int, backend: str) -> None:
    """Runs in a fresh interpreter: embed, then report peak RSS of this process and of its workers."""
    from sjea_tools.embed import embed_folder

    summary = embed_folder(folder, out, run=run, backend=backend, device="cpu", workers=workers, batch_size=batch)
    print(json.dumps({"rows": summary["rows"], "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def memory(args) -> dict:
    base = Path(args.data)
    run = make_bench_run(base, args.image_size)
    workers = args.workers if args.workers is not None else 2
    out = {}
    for n in args.n_list:
        folder = make_folder(base, "small", n)
        store = base / f"mem-{n}.h5"
        store.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "_child", str(folder), str(store), str(run), str(workers),
               str(args.batch_size), args.backend]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        out[n] = res
        print(f"{n:>7} images: {res['rows']} rows, peak RSS main {res['main_mb']:.0f} MB, largest worker "
              f"{res['workers_mb']:.0f} MB", flush=True)
    a, b = out[min(out)], out[max(out)]
    growth = b["main_mb"] - a["main_mb"]
    print(f"RATIO peak RSS growth from {min(out)} to {max(out)} images: {growth:+.0f} MB (main), "
          f"{b['workers_mb'] - a['workers_mb']:+.0f} MB (workers); criterion < 100 MB", flush=True)
    return {"runs": out, "growth_mb": growth}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        folder, out, run, workers, batch, backend = sys.argv[2:8]
        _child_embed(folder, out, run, int(workers), int(batch), backend)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "memory"])
    p.add_argument("--kind", choices=["large", "small"], default="large")
    p.add_argument("--n", type=int, nargs="+", default=None, help="images (memory: several counts)")
    p.add_argument("--camera", default=f"{CAMERA[0]}x{CAMERA[1]}", help="size of the large JPEGs, WxH")
    p.add_argument("--image-size", type=int, default=64, help="model input size")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    p.add_argument("--data", default="/tmp/sjea-bench-embed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what == "speed":
        args.n = (args.n or [2000])[0]
        res = speed(args)
    else:
        args.n_list = args.n or [2000, 20000]
        res = memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
