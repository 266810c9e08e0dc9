"""What one query costs: `sjea search` of one image against its import floor, and `sjea embed`'s start-up.

    PYTHONPATH=/tmp/old-copy python benchmarks/bench_search.py --run RUN --label before   # code as it was
    python benchmarks/bench_search.py --run RUN --label after --write-docs

On the demo-size store: the first --n (3,000) real Fashion-MNIST test images, written as files by
`sjea images` and embedded by `sjea embed --run RUN` (CPU: the run's cached ONNX model). In one
run, alternating, --repeat times each (after one untimed warm-up), median wall and peak RSS of:
  floor    python -c "import onnxruntime, faiss, h5py"  (what any query must import)
  search   sjea search ONE.png --store STORE --level 0
  embed1   sjea embed of a folder of one image (the fixed start-up of every embed; its index too)
and whether the search process imported torch. Results per --label are kept in the block of
docs/benchmarks.md between the bench_search markers (with --write-docs), so a later label (after
a change) is shown beside an earlier one measured on the code before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_search:begin -->", "<!-- bench_search:end -->"
SJEA = [sys.executable, "-c", "import sys; from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())"]
TORCH_PROBE = ("import sys, atexit; atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules, "
               "file=sys.stderr)); from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())")


def timed(cmd: list[str]) -> float:
    """Wall seconds of one process; fails loudly when the command fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (rc {proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return wall


def peak_of(cmd: list[str]) -> float:
    """Peak RSS (MB) of one run of `cmd`, read by a fresh parent whose only child it is."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def prepare(work: Path, run: Path, n: int) -> tuple[Path, Path, Path]:
    """(images folder, store, one-image folder): images made once, the store made by this code."""
    images = work / "images"
    if not (images / ".complete").is_file():
        subprocess.run([*SJEA, "images", "fashion-mnist", str(images), "--limit", str(n)], check=True,
                       stdout=subprocess.DEVNULL)
        (images / ".complete").write_text("")
    store = work / "fmnist.h5"
    t0 = time.perf_counter()
    subprocess.run([*SJEA, "embed", str(images), str(store), "--run", str(run), "--overwrite", "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"store of {n} images embedded in {time.perf_counter() - t0:.1f} s (ONNX cache made if missing)")
    one = work / "one"
    one.mkdir(exist_ok=True)
    first = sorted(p for p in images.rglob("*.png"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    return images, store, one / first.name


def measure(work: Path, run: Path, n: int, repeat: int) -> dict:
    images, store, query = prepare(work, run, n)
    cmds = {
        "floor": [sys.executable, "-c", "import onnxruntime, faiss, h5py"],
        "search": [*SJEA, "search", str(query), "--store", str(store), "--level", "0"],
        "embed1": [*SJEA, "embed", str(query.parent), str(work / "one.h5"), "--run", str(run), "--overwrite",
                   "--quiet"],
    }
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    for name, cmd in cmds.items():
        timed(cmd)  # warm-up: file cache, the ONNX cache, compiled bytecode
    for _ in range(repeat):
        for name, cmd in cmds.items():
            walls[name].append(timed(cmd))
    peaks = {name: peak_of(cmd) for name, cmd in cmds.items()}
    probe = subprocess.run([sys.executable, "-c", TORCH_PROBE, *cmds["search"][3:]], capture_output=True, text=True)
    torch_imported = "TORCH_IMPORTED True" in probe.stderr
    hit = _rank1(subprocess.run(cmds["search"][:3] + cmds["search"][3:] + ["--json"], capture_output=True,
                                text=True, check=True).stdout)
    res = {name: {"median_s": round(statistics.median(w), 3), "min_s": round(min(w), 3),
                  "peak_rss_mb": round(peaks[name])} for name, w in walls.items()}
    res["search_over_floor"] = round(res["search"]["median_s"] / res["floor"]["median_s"], 2)
    res["torch_imported_by_search"] = torch_imported
    res["query_rank1"] = hit
    res["query"] = query.name
    return res


def _rank1(text: str) -> dict:
    r = json.loads(text)["results"][0]["per_level"]["0"][0]
    return {"path": r["path"], "score": round(r["score"], 6)}


def render(data: dict, command: str) -> str:
    labels = list(data["labels"])
    rows = [("import floor: onnxruntime + faiss + h5py (s)", lambda r: r["floor"]["median_s"]),
            ("`sjea search ONE.png --store fmnist.h5 --level 0` (s)", lambda r: r["search"]["median_s"]),
            ("search / floor", lambda r: f"**{r['search_over_floor']}x**"),
            ("search peak RSS (MB)", lambda r: r["search"]["peak_rss_mb"]),
            ("search imports torch", lambda r: "yes" if r["torch_imported_by_search"] else "no"),
            ("rank 1 of the query (its own file), score", lambda r: f"{r['query_rank1']['path']} {r['query_rank1']['score']}"),
            ("`sjea embed` of one image: fixed start-up (s)", lambda r: r["embed1"]["median_s"]),
            ("embed of one image, peak RSS (MB)", lambda r: r["embed1"]["peak_rss_mb"])]
    lines = [BEGIN, "## One query, and embed start-up (`benchmarks/bench_search.py`)",
             f"Demo-size store: {data['n']} real Fashion-MNIST test images (`sjea images`), embedded by "
             "`sjea embed --run RUN` with the run's cached ONNX model (CPU). Median of the repeated runs, "
             "each a fresh process, after one warm-up (file cache warm). Labels were measured on the "
             "code at the commit named, on this machine (2 CPU cores), which other jobs shared (each label's "
             "command says how), so absolute times are inflated and noisy; the floor is measured in the same "
             "run, alternating, for the ratio. RUN: a tiny-preset run (ResNet-18 level 0 + MLP level 1, 28 px; "
             "speed does not depend on the weights).", "",
             "| | " + " | ".join(f"{lab} ({data['labels'][lab]['commit']})" for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for title, get in rows:
        lines.append(f"| {title} | " + " | ".join(str(get(data["labels"][lab])) for lab in labels) + " |")
    lines += ["", "Commands:", *[f"`{data['labels'][lab]['command']}`" for lab in labels],
              f"<!-- bench_search:data {json.dumps(data, sort_keys=True)} -->", END]
    return "\n".join(lines)


def write_docs(label: str, res: dict, n: int, command: str, commit: str) -> None:
    text = DOCS.read_text()
    data = {"n": n, "labels": {}}
    m = re.search(r"<!-- bench_search:data (.*?) -->", text)
    if m:
        data = json.loads(m.group(1))
    data["n"] = n
    data["labels"][label] = {**res, "command": command, "commit": commit}
    from docblock import write_block

    write_block(DOCS, BEGIN, END, render(data, command), "## One query, and embed start-up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained run folder (sjea train --out RUN)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sjea-bench-search"))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--label", default="now")
    ap.add_argument("--commit", default=None, help="what code was measured [default: git HEAD of this checkout]")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="record the JSON this script printed earlier (with the --command that measured it) instead "
                         "of measuring again")
    ap.add_argument("--command", default=None, help="with --from-json: the command that measured it")
    args = ap.parse_args()
    if args.from_json is not None:
        text = args.from_json.read_text()
        res = json.loads(text[text.index("{"):])
        write_docs(args.label, res, args.n, args.command or str(args.from_json), args.commit or "?")
        print(f"written to {DOCS}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    run, work = args.run.resolve(), args.work.resolve()
    # Outside the checkout: `python -c` puts the current folder first on sys.path, which would
    # shadow a PYTHONPATH pointing at another copy of the code (how "before" is measured).
    os.chdir(work)
    res = measure(work, run, args.n, args.repeat)
    res["python"] = platform.python_version()
    print(json.dumps(res, indent=2))
    if args.write_docs:
        commit = args.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip()
        command = " ".join(["python benchmarks/bench_search.py", *sys.argv[1:]])
        write_docs(args.label, res, args.n, command, commit)
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
