"""What one query costs: `sjea search` of one image against its import floor, and `sjea embed`'s start-up.

One command does everything (trains a short run with `sjea train` defaults when no --run is given,
makes the store, measures, prints the ratio):

    python benchmarks/bench_search.py                              # this checkout
    python benchmarks/bench_search.py --baseline c63fb9d           # and that commit, in the same run
    python benchmarks/bench_search.py --baseline c63fb9d --write-docs

On the demo-size store: the first --n (3,000) real Fashion-MNIST test images, written as files by
`sjea images` and embedded by `sjea embed --run RUN` (CPU: the run's cached ONNX model). In one
run, alternating, --repeat times each (after one untimed warm-up), median wall and peak RSS of:
  floor    python -c "import onnxruntime, faiss, h5py"  (what any query must import)
  search   sjea search ONE.png --store STORE --level 0
  embed1   sjea embed of a folder of one image (the fixed start-up of every embed; its index too)
and whether the search process imported torch; with --baseline REV, the same search and embed on
the code of commit REV (`git archive`, put first on PYTHONPATH) alternate with them (one floor). The load average is
recorded before and after. Commands run as an installed package would: compiled bytecode is
written and reused (PYTHONDONTWRITEBYTECODE, set in some shells, is unset for them), and the
optimised ONNX graphs go to WORK/ort-cache (made in the warm-up). Results per label are kept in
the block of docs/benchmarks.md between the bench_search markers (with --write-docs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import io
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_search:begin -->", "<!-- bench_search:end -->"
SJEA = [sys.executable, "-c", "import sys; from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())"]
TORCH_PROBE = ("import sys, atexit; atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules, "
               "file=sys.stderr)); from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())")


def child_env(work: Path, code: Path | None = None) -> dict:
    """The environment of every measured command: bytecode written and reused, the optimised
    ONNX graphs in WORK/ort-cache, and the code of `code` (a `git archive`) first on the path."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["SJEA_ORT_CACHE"] = str(work / "ort-cache")
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env


def timed(cmd: list[str], env: dict) -> float:
    """Wall seconds of one process; fails loudly when the command fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (rc {proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return wall


def peak_of(cmd: list[str], env: dict) -> float:
    """Peak RSS (MB) of one run of `cmd`, read by a fresh parent whose only child it is."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip())


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str, work: Path) -> tuple[Path, str]:
    """(folder holding the code of commit `rev`, its short hash), from `git archive`."""
    short = git("rev-parse", "--short", rev)
    folder = work / f"code-{short}"
    if not (folder / ".complete").is_file():
        data = subprocess.run(["git", "-C", str(ROOT), "archive", short], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            try:
                tar.extractall(folder, filter="data")
            except TypeError:  # Python without extraction filters (before 3.11.4); our own archive
                tar.extractall(folder)
        (folder / ".complete").write_text("")
    return folder, short


def train_run(work: Path, steps: int, settings: list[str]) -> Path:
    """A short run of `sjea train` defaults (+ --set settings), reused while the defaults match."""
    run = work / "run"
    args = ["train", "--max-steps", str(steps), "--out", str(run), "--quiet", "--overwrite"]
    args += [a for s in settings for a in ("--set", s)]
    planned = json.loads(subprocess.run([*SJEA, *args, "--dry-run", "--json"], check=True, capture_output=True,
                                        text=True).stdout)["config"]["model"]
    config = run / "config.json"
    if (run / "model.pt").is_file() and config.is_file() and json.loads(config.read_text())["model"] == planned:
        return run
    print(f"training {steps} steps of sjea train defaults{' with ' + ', '.join(settings) if settings else ''} "
          f"in {run} ...", flush=True)
    subprocess.run([*SJEA, *args], check=True, stdout=subprocess.DEVNULL)
    return run


def describe_run(run: Path) -> str:
    c = json.loads((run / "config.json").read_text())
    m = c["model"]
    size = c.get("data", {}).get("image_size") or "28"
    levels = int(m.get("levels", 1))
    upper = f" + {m.get('encoder')} level{'s' if levels > 2 else ''} {', '.join(map(str, range(1, levels)))}"
    return f"{m['backbone']} ({m.get('stem', 'auto')} stem) level 0{upper if levels > 1 else ''}, {size} px"


def prepare(work: Path, run: Path, n: int) -> tuple[Path, Path, Path]:
    """(images folder, store, one-image file): images made once, the store made by this code."""
    images = work / "images"
    env = child_env(work)
    if not (images / ".complete").is_file():
        subprocess.run([*SJEA, "images", "fashion-mnist", str(images), "--limit", str(n)], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        (images / ".complete").write_text("")
    store = work / "fmnist.h5"
    t0 = time.perf_counter()
    subprocess.run([*SJEA, "embed", str(images), str(store), "--run", str(run), "--overwrite", "--quiet"],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    print(f"store of {n} images embedded in {time.perf_counter() - t0:.1f} s (ONNX cache made if missing)")
    one = work / "one"
    one.mkdir(exist_ok=True)
    first = sorted(p for p in images.rglob("*.png"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    return images, store, one / first.name


def measure(work: Path, run: Path, n: int, repeat: int, codes: dict[str, Path | None]) -> dict[str, dict]:
    """{label: result} for each code (None: this checkout), all measured alternating in one run."""
    images, store, query = prepare(work, run, n)
    floor_cmd = [sys.executable, "-c", "import onnxruntime, faiss, h5py"]
    # One floor, measured in every round, for every label: the same command whatever the code.
    cmds: dict[tuple[str, str], tuple[list[str], dict]] = {("", "floor"): (floor_cmd, child_env(work))}
    for label, code in codes.items():
        env = child_env(work, code)
        cmds[label, "search"] = [*SJEA, "search", str(query), "--store", str(store), "--level", "0"], env
        cmds[label, "embed1"] = [*SJEA, "embed", str(query.parent), str(work / f"one-{label}.h5"), "--run", str(run),
                                 "--overwrite", "--quiet"], env
    walls: dict[tuple[str, str], list[float]] = {k: [] for k in cmds}
    for cmd, env in cmds.values():
        timed(cmd, env)  # warm-up: file cache, the ONNX caches, compiled bytecode
    load_before = load()
    for _ in range(repeat):
        for key, (cmd, env) in cmds.items():
            walls[key].append(timed(cmd, env))
    load_after = load()
    out = {}
    for label in codes:
        res: dict = {}
        for what in ("floor", "search", "embed1"):
            key = ("", what) if what == "floor" else (label, what)
            cmd, env = cmds[key]
            w = walls[key]
            res[what] = {"median_s": round(statistics.median(w), 3), "min_s": round(min(w), 3),
                         "peak_rss_mb": round(peak_of(cmd, env))}
        cmd, env = cmds[label, "search"]
        probe = subprocess.run([sys.executable, "-c", TORCH_PROBE, *cmd[3:]], capture_output=True, text=True, env=env)
        res["torch_imported_by_search"] = "TORCH_IMPORTED True" in probe.stderr
        res["query_rank1"] = _rank1(subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True,
                                                   env=env).stdout)
        res["search_over_floor"] = round(res["search"]["median_s"] / res["floor"]["median_s"], 2)
        res["query"] = query.name
        res["load"] = {"before": load_before, "after": load_after}
        res["run"] = describe_run(run)
        res["python"] = platform.python_version()
        out[label] = res
    return out


def _rank1(text: str) -> dict:
    r = json.loads(text)["results"][0]["per_level"]["0"][0]
    return {"path": r["path"], "score": round(r["score"], 6)}


def _load_text(r: dict) -> str:
    ld = r.get("load")
    return f"{ld['before'][0]} -> {ld['after'][0]}" if ld else "?"


def render(data: dict) -> str:
    labels = list(data["labels"])
    rows = [("import floor: onnxruntime + faiss + h5py (s)", lambda r: r["floor"]["median_s"]),
            ("`sjea search ONE.png --store fmnist.h5 --level 0` (s)", lambda r: r["search"]["median_s"]),
            ("search / floor", lambda r: f"**{r['search_over_floor']}x**"),
            ("search peak RSS (MB)", lambda r: r["search"]["peak_rss_mb"]),
            ("search imports torch", lambda r: "yes" if r["torch_imported_by_search"] else "no"),
            ("rank 1 of the query (its own file), score", lambda r: f"{r['query_rank1']['path']} {r['query_rank1']['score']}"),
            ("`sjea embed` of one image: fixed start-up (s)", lambda r: r["embed1"]["median_s"]),
            ("embed of one image, peak RSS (MB)", lambda r: r["embed1"]["peak_rss_mb"]),
            ("load average (1 min) before -> after the timed runs", _load_text),
            ("RUN (the store's model)", lambda r: r.get("run", "tiny preset: resnet18 level 0 + mlp level 1, 28 px"))]
    lines = [BEGIN, "## One query, and embed start-up (`benchmarks/bench_search.py`)",
             f"Demo-size store: {data['n']} real Fashion-MNIST test images (`sjea images`), embedded by "
             "`sjea embed --run RUN` with the run's cached ONNX model (CPU); RUN is a short run of `sjea train` "
             "defaults unless the label's command says otherwise (speed does not depend on the weights). "
             "Median of the repeated runs, each a fresh process, after one warm-up (file cache warm; compiled "
             "bytecode and optimised ONNX graphs cached, as for an installed package after its first use). "
             "Labels were measured on the code at the commit named, on this machine (2 CPU cores), which other "
             "jobs shared (the load average says how much), so absolute times are inflated and noisy; the floor "
             "is measured in the same run, alternating, for the ratio, and labels measured in one command "
             "alternate with each other.", "",
             "| | " + " | ".join(f"{lab} ({data['labels'][lab]['commit']})" for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for title, get in rows:
        lines.append(f"| {title} | " + " | ".join(str(get(data["labels"][lab])) for lab in labels) + " |")
    commands = list(dict.fromkeys(data["labels"][lab]["command"] for lab in labels))
    lines += ["", "Commands:", *[f"`{c}`" for c in commands],
              f"<!-- bench_search:data {json.dumps(data, sort_keys=True)} -->", END]
    return "\n".join(lines)


def write_docs(results: dict[str, dict], n: int, drop: list[str]) -> None:
    """Put each label's result (with its "command" and "commit") in the block; others are kept
    unless named in `drop`."""
    text = DOCS.read_text()
    data = {"n": n, "labels": {}}
    m = re.search(r"<!-- bench_search:data (.*?) -->", text)
    if m:
        data = json.loads(m.group(1))
    data["n"] = n
    for label in drop:
        data["labels"].pop(label, None)
    data["labels"].update(results)
    from docblock import write_block

    write_block(DOCS, BEGIN, END, render(data), "## One query, and embed start-up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None,
                    help="a trained run folder [default: train one: sjea train defaults, --train-steps steps]")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for that training (sjea train --set), repeatable")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sjea-bench-search"))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--label", default="now", help="label of this checkout's results")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also measure the code of commit REV (git archive), alternating with this checkout")
    ap.add_argument("--baseline-label", default=None, help="[default: 'baseline']")
    ap.add_argument("--commit", default=None, help="what code this checkout is [default: git HEAD, + if modified]")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--drop", action="append", default=[], metavar="LABEL",
                    help="with --write-docs: remove this older label from the block, repeatable")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="record the JSON this script printed earlier (with the --command that measured it) instead "
                         "of measuring again")
    ap.add_argument("--command", default=None, help="with --from-json: the command that measured it")
    args = ap.parse_args()
    if args.from_json is not None:
        text = args.from_json.read_text()
        res = json.loads(text[text.index("{"):])
        results = res if all(isinstance(v, dict) and "search" in v for v in res.values()) else {args.label: res}
        for r in results.values():
            r.setdefault("command", args.command or str(args.from_json))
            r.setdefault("commit", args.commit or "?")
        write_docs(results, args.n, args.drop)
        print(f"written to {DOCS}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve()
    commit = args.commit or (git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--",
                                                                               "sjea_tools", "exports", "trainers") else ""))
    codes: dict[str, Path | None] = {args.label: None}
    commits = {args.label: commit}
    if args.baseline:
        folder, short = checkout(args.baseline, work)
        label = args.baseline_label or "baseline"
        codes[label], commits[label] = folder, short
    run = args.run.resolve() if args.run else train_run(work, args.train_steps, args.train_set)
    # Outside the checkout: `python -c` puts the current folder first on sys.path, which would
    # shadow the PYTHONPATH of a baseline's code.
    os.chdir(work)
    results = measure(work, run, args.n, args.repeat, codes)
    command = shlex.join(["python", "benchmarks/bench_search.py", *sys.argv[1:]])
    for label, r in results.items():
        r["command"], r["commit"] = command, commits[label]
    print(json.dumps(results, indent=2))
    for label, r in results.items():
        print(f"{label} ({r['commit']}): search {r['search']['median_s']} s / floor {r['floor']['median_s']} s = "
              f"{r['search_over_floor']}x; torch imported: {r['torch_imported_by_search']}; load "
              f"{_load_text(r)}")
    if args.write_docs:
        write_docs(results, args.n, args.drop)
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
