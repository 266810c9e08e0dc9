"""ONNX Runtime against PyTorch eager, per level, images/s at batch 1 and 64, in one run.

    .venv/bin/python benchmarks/bench_onnx.py --run runs/tiny            # CPU
    .venv/bin/python benchmarks/bench_onnx.py --run runs/tiny --device cuda   # GPU: CUDA EP, IO binding

Both sides get the same real Fashion-MNIST test images, already preprocessed, the same threads,
and are timed in alternating rounds (median of rounds), so machine noise hits both alike. Level k
means "images -> Y[k]" (its lower levels included); "all" is every level in one pass.
Then the settings that make ONNX Runtime fast are measured one at a time on the all-levels graph:
graph optimisation level, intra-op threads, and on CUDA IO binding (device tensors in and out).
Without --run, a randomly initialised 2-level tiny model is used (speed does not depend on weights).
On a shared machine use --threads 1: PyTorch's OpenMP threads collapse when cores are
oversubscribed (measured here: 69 img/s with 1 thread, 9 img/s with 2 at load 8 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def images_per_second(fn, batch: int, min_seconds: float) -> float:
    """Calls fn repeatedly for at least min_seconds (after one warm-up call); images per second."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and n >= 3:
            return n * batch / elapsed


def alternate(fns: dict, batch: int, rounds: int, seconds: float) -> dict:
    """Median images/s of each function, measured in alternating rounds."""
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(images_per_second(fn, batch, seconds))
    return {name: statistics.median(v) for name, v in results.items()}


def make_model(run: str | None, levels: int, encoder: str, workdir: Path):
    from sjea_tools import load_model

    if run is not None:
        return load_model(run)
    from sjea_tools.config import resolve_config
    from sjea_tools.models import build_model
    from sjea_tools.runs import save_model

    cfg = resolve_config("tiny", overrides={"model.levels": levels, "model.encoder": encoder})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():  # real BatchNorm running statistics
        for _ in range(3):
            model.forward_train(torch.randn(32, 3, cfg.image_size, cfg.image_size))
    save_model(workdir, model, cfg)
    return load_model(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="Run folder (default: a random-init tiny model).")
    parser.add_argument("--levels", type=int, default=2, help="Levels of the random-init model.")
    parser.add_argument("--encoder", default="mlp", help="Higher-level encoder of the random-init model.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch device; the ORT provider follows).")
    parser.add_argument("--provider", default=None, help="Force an ONNX Runtime provider (cpu, cuda, tensorrt).")
    parser.add_argument("--batches", default="1,64", help="Batch sizes, comma-separated.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all cores).")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds per measurement.")
    parser.add_argument("--seconds", type=float, default=1.0, help="Minimum seconds per round.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON too.")
    args = parser.parse_args()

    import onnxruntime as ort

    from sjea_tools.exports.onnx import export_levels
    from sjea_tools.exports.runtime import CUDA, OnnxModel, cpu_threads, session_options
    from sjea_tools.data import load_dataset, normalize_pixels

    threads = args.threads or cpu_threads()
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    provider = args.provider or ("cuda" if device.type == "cuda" else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    model = make_model(args.run, args.levels, args.encoder, workdir)
    levels = list(range(model.num_levels))
    pixels = load_dataset("fashion-mnist", split="test").pixels[:max(batches)]
    x_all = normalize_pixels(np.array(pixels), model.mean, model.std)

    t0 = time.perf_counter()
    paths = {k: export_levels(model, workdir / f"level{k}.onnx", [k]) for k in levels}
    paths["all"] = export_levels(model, workdir / "all_levels.onnx", levels)
    print(f"exported {len(paths)} graphs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    model = model.to(device)
    sessions = {key: OnnxModel(path, provider=provider, threads=threads) for key, path in paths.items()}
    used = sessions["all"].provider
    print(f"device {device}, ONNX Runtime {ort.__version__} provider {used}, torch {torch.__version__}, "
          f"{threads} threads, batches {batches}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    if used == CUDA:
        # IO binding must give what the plain path gives: a wrong binding would be fast and wrong.
        xb = x_all[:8].contiguous()
        bound = [t.cpu().numpy() for t in sessions["all"].run_torch(xb.to(device))]
        plain = sessions["all"].run(xb.numpy())
        diff = max(float(np.abs(a - b).max()) for a, b in zip(bound, plain))
        print(f"IO binding vs plain run on CUDA: max abs diff {diff:.2e}")
        assert diff < 1e-3, "IO-bound outputs differ from the plain run"

    rows = []
    print(f"\n{'level':>6} {'batch':>6} {'torch img/s':>12} {'ORT img/s':>12} {'ORT/torch':>10}")
    for key in [*levels, "all"]:
        want = levels if key == "all" else [key]
        for b in batches:
            xb_cpu = x_all[:b].contiguous()
            xb_np = xb_cpu.numpy()
            xb_dev = xb_cpu.to(device)
            sess = sessions[key]

            def run_torch(xb_dev=xb_dev, want=want):
                with torch.inference_mode():
                    ys = model.forward_levels(xb_dev, want)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return ys

            if used == CUDA:
                def run_ort(sess=sess, xb_dev=xb_dev):
                    return sess.run_torch(xb_dev)  # IO binding: device tensors in and out
            else:
                def run_ort(sess=sess, xb_np=xb_np):
                    return sess.run(xb_np)

            speed = alternate({"torch": run_torch, "ort": run_ort}, b, args.rounds, args.seconds)
            ratio = speed["ort"] / speed["torch"]
            rows.append({"level": key, "batch": b, "torch_ips": speed["torch"], "ort_ips": speed["ort"], "ratio": ratio})
            print(f"{key!s:>6} {b:>6} {speed['torch']:>12.0f} {speed['ort']:>12.0f} {ratio:>9.2f}x")

    # What each ONNX Runtime setting gains, on the all-levels graph at the largest batch.
    b = max(batches)
    xb_np = x_all[:b].numpy()
    path = str(paths["all"])
    providers = sessions["all"].session.get_providers()

    def plain_session(level, n_threads, spinning=False):
        so = session_options(n_threads, spinning)
        so.graph_optimization_level = level
        return ort.InferenceSession(path, so, providers=providers)

    G = ort.GraphOptimizationLevel
    variants = {
        "no graph optimisation": plain_session(G.ORT_DISABLE_ALL, threads),
        "basic optimisation": plain_session(G.ORT_ENABLE_BASIC, threads),
        "all optimisations, 1 thread": plain_session(G.ORT_ENABLE_ALL, 1),
        "all optimisations, spinning threads": plain_session(G.ORT_ENABLE_ALL, threads, spinning=True),
        f"all optimisations, {threads} sleeping threads (used)": plain_session(G.ORT_ENABLE_ALL, threads),
    }
    fns = {name: (lambda s=s: s.run(None, {"images": xb_np})) for name, s in variants.items()}
    if used == CUDA:
        xb_dev = x_all[:b].to(device)
        fns["CUDA, IO binding (used)"] = lambda: sessions["all"].run_torch(xb_dev)
    settings = alternate(fns, b, args.rounds, args.seconds)
    base = settings["no graph optimisation"]
    print(f"\nONNX Runtime settings, all levels, batch {b} ({used}):")
    for name, ips in settings.items():
        print(f"  {name:<44} {ips:>8.0f} img/s  {ips / base:>5.2f}x of no optimisation")

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps({"device": str(device), "provider": used, "threads": threads, "torch": torch.__version__,
                          "onnxruntime": ort.__version__, "rows": rows, "settings": settings}, indent=2))


if __name__ == "__main__":
    main()
