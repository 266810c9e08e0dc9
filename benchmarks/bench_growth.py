"""What adding images costs: `--update` of 1,000 real Fashion-MNIST images into stores of 10,000 and
of 200,000 rows, search indexes included, against the same update by the code of an earlier commit.

    nice -n 15 python benchmarks/bench_growth.py --write-docs            # baseline: --commit c63fb9d

Images: the first 11,000 Fashion-MNIST training images written as PNG files (the Debian files in
/usr/share/datasets/fashion-mnist, through sjea_tools/data/write_folder.py); the folder holds the
first 10,000 when the stores are made, then the other 1,000 are added. The model: a tiny run with
random weights (what is measured does not depend on them). The 10,000-row store is embedded; the
200,000-row one is built synthetically (embedding 200,000 images takes hours on 2 cores): the
10,000 embedded rows 20 times, the copies under distinct names in the same class folders, written
by the store writer. Both stores are indexed (sjea_tools.pipeline.index_store, no cluster tree)
before timing starts.

Timed, each in a fresh process on a fresh copy of the store and its index folder: the update as
`sjea embed DIR OUT --update` runs it without its cluster tree: pipeline.embed_and_index(...,
update=True, index=False), then pipeline.index_store(OUT, clusters=False): the growing store and
indexes where they are in place, today's copy-everything path in the code of --commit (a `git
archive` of it run through PYTHONPATH). Bytes written: /proc/self/io write_bytes of that process,
and the sizes of the files it created or changed (a hard link is not a new file), store and
index apart. The cluster tree (k-means over every row) is left out: it is not an index and is
rebuilt after any update. The machine's load (os.getloadavg) is recorded: other jobs share the
2 cores; run it under `nice -n 15`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_growth:begin -->", "<!-- bench_growth:end -->"
BASE, ADD, COPIES = 10_000, 1_000, 20


# --- the timed child: one update, in its own process --------------------------------------------

def child(images: str, store: str, run: str) -> None:
    """Run in a fresh process (PYTHONPATH picks the code): the update and its indexes, then print
    time and bytes as JSON."""
    from sjea_tools.pipeline import embed_and_index, index_store

    before = _write_bytes()
    t0 = time.perf_counter()
    from dataclasses import fields

    from sjea_tools.embed import EmbedRequest

    # The synthetic store's copies have no files: keep their rows (an --update now removes rows of
    # vanished files); the baseline's code predates the option.
    keep = {"keep_missing": True} if "keep_missing" in {f.name for f in fields(EmbedRequest)} else {}
    summary = embed_and_index(images, store, run=run, backend="torch", workers=1, update=True, index=False, **keep)
    t1 = time.perf_counter()
    sidecar = index_store(store, clusters=False)
    t2 = time.perf_counter()
    levels = sidecar.get("levels", {})
    levels = levels if isinstance(levels, dict) else {str(e.get("level")): e for e in levels}
    print(json.dumps({"store_s": round(t1 - t0, 2), "index_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
                      "write_bytes": _write_bytes() - before, "rows": summary["rows"], "added": summary["added"],
                      "index_kinds": {k: e.get("kind") for k, e in levels.items()},
                      "index_actions": {k: e.get("action", "built") for k, e in levels.items()}}))


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return -1


# --- preparing images, model and stores ---------------------------------------------------------

def make_images(work: Path) -> tuple[Path, list[Path]]:
    """(folder with the first BASE images, the ADD files to add later, kept aside)."""
    from sjea_tools.data.write_folder import write_image_folder

    every = work / "all"
    write_image_folder("fashion-mnist", every, split="train", limit=BASE + ADD)
    files = sorted(every.rglob("*.png"), key=lambda p: p.name)  # names are the image index
    grow = work / "G"
    if grow.exists():
        shutil.rmtree(grow)
    for p in files[:BASE]:
        _link(p, grow / p.relative_to(every))
    return grow, [p.relative_to(every) for p in files[BASE:]]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)


def make_run(work: Path) -> Path:
    """A tiny run with random weights (as tests/conftest.py make_run): what `sjea train` leaves."""
    import torch

    from sjea_tools.config import resolve_config, save_config
    from sjea_tools.models import build_model
    from sjea_tools.runs import save_model

    run = work / "runs" / "tiny"
    if (run / "config.json").is_file():
        return run
    cfg = resolve_config("tiny", overrides={"model.levels": 2, "model.encoder": "mlp", "name": "tiny"})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.forward_train(torch.randn(32, 3, cfg.image_size, cfg.image_size))
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.json")
    save_model(run, model, cfg)
    return run


def make_stores(work: Path, grow: Path, run: Path) -> dict[int, Path]:
    """The indexed base stores: BASE rows embedded, BASE * COPIES synthetic."""
    from sjea_tools.pipeline import embed_and_index, index_store
    from sjea_tools.store import open_store, write_store

    small, large = work / f"base-{BASE}.h5", work / f"base-{BASE * COPIES}.h5"
    if not small.exists():
        embed_and_index(grow, small, run=run, backend="torch", workers=1, index=False)
        index_store(small, clusters=False)
    if not large.exists():
        with open_store(small) as s:
            attrs = {k: v for k, v in s.attrs.items() if k not in ("fingerprint", "format", "run_token")}
            blocks = list(s.iter_rows())
            failed = s.failed
        write_store(large, attrs, [_renamed(blocks, c) for c in range(COPIES)], failed, total=BASE * COPIES)
        index_store(large, clusters=False)
    return {BASE: small, BASE * COPIES: large}


def _renamed(blocks, copy: int):
    """The rows of `blocks`, copy 0 as they are, others as CLASS/cNN-NAME (same class, new name)."""
    for paths, rows in blocks:
        if copy:
            paths = [f"{p.split('/', 1)[0]}/c{copy:02d}-{p.split('/', 1)[1]}" for p in paths]
        yield paths, rows


# --- measuring ----------------------------------------------------------------------------------

def snapshot(paths: list[Path]) -> dict[str, tuple]:
    """(inode, size, mtime) of every file under these paths."""
    out = {}
    for top in paths:
        for p in ([top] if top.is_file() else top.rglob("*") if top.is_dir() else []):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def changed_bytes(before: dict, after: dict, index_folder: Path) -> dict:
    """Sizes of files created or changed (a new inode or size or time), store and index apart;
    a hard link of a file that existed before is not a new file."""
    old_inodes = {v[0] for v in before.values()}
    store = index = 0
    for path, (ino, size, mtime) in after.items():
        if before.get(path) == (ino, size, mtime) or (path not in before and ino in old_inodes):
            continue
        if path.startswith(str(index_folder)):
            index += size
        else:
            store += size
    return {"store_files_bytes": store, "index_files_bytes": index}


def measure(work: Path, grow: Path, run: Path, base: Path, label: str, pythonpath: str | None) -> dict:
    out = work / f"{label}-{base.stem}.h5"
    index_folder = out.with_name(out.name + ".index")
    for p in (out, index_folder, out.with_name(out.name + ".segments")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.copy(base, out)
    shutil.copytree(base.with_name(base.name + ".index"), index_folder)
    before = snapshot([out, index_folder, out.with_name(out.name + ".segments")])
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(grow), str(out), str(run)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} update of {base} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    after = snapshot([out, index_folder, out.with_name(out.name + ".segments")])
    result.update(changed_bytes(before, after, index_folder), process_wall_s=round(wall, 2))
    print(f"{label:8s} {base.stem}: {result}", flush=True)
    return result


def baseline_code(commit: str, work: Path) -> str:
    """The code of `commit` unpacked in a temporary folder (git archive), for PYTHONPATH."""
    folder = work / f"code-{commit}"
    if not (folder / "sjea_tools").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "sjea_tools"], check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
            tar.extractall(folder)
    return str(folder)


# --- the doc block ------------------------------------------------------------------------------

def _kinds(r: dict) -> str:
    """'level: kind (action)' for each level, e.g. '0: hnsw (grown)'."""
    return ", ".join(f"{k}: {kind} ({r['index_actions'].get(k)})" for k, kind in sorted(r["index_kinds"].items()))


def block(data: dict) -> str:
    rows = []
    for size in (str(BASE), str(BASE * COPIES)):
        for label in ("growing", "baseline"):
            r = data["results"][label][size]
            rows.append(f"| {int(size):,} | {label} | {r['total_s']:.1f} | {r['store_s']:.1f} | {r['index_s']:.1f} | "
                        f"{r['write_bytes'] / 1e6:.1f} | {r['store_files_bytes'] / 1e6:.1f} | "
                        f"{r['index_files_bytes'] / 1e6:.1f} | {_kinds(r)} |")
    g, b = data["results"]["growing"], data["results"]["baseline"]
    small, large = str(BASE), str(BASE * COPIES)
    ratio = g[large]["total_s"] / g[small]["total_s"]
    lines = [
        BEGIN,
        f"Adding {ADD:,} real Fashion-MNIST images (`--update`, search indexes included, no cluster tree) to stores "
        f"of {BASE:,} and {BASE * COPIES:,} rows; `growing` is this code (commit {data['commit']}), `baseline` "
        f"the code of {data['baseline_commit']} (every stored row copied into a new file, indexes rebuilt), in "
        f"the same run. The {BASE * COPIES:,}-row store is the {BASE:,} embedded rows {COPIES} times under "
        "distinct names (embedding 200,000 images would take hours here). Written by "
        "`benchmarks/bench_growth.py`.",
        "",
        "| stored rows | code | total s | store s | indexes s | MB written (/proc write_bytes) | "
        "MB of new/changed store files | MB of new/changed index files | index per level |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *rows,
        "",
        f"Growing: the {BASE * COPIES:,}-row update took {ratio:.2f}x the time of the {BASE:,}-row one (done "
        f"when within 1.5x; the store part alone {g[large]['store_s'] / g[small]['store_s']:.2f}x, the indexes "
        f"{g[large]['index_s'] / g[small]['index_s']:.2f}x); the baseline "
        f"{b[large]['total_s'] / b[small]['total_s']:.2f}x. "
        f"Machine: {data['cpus']} CPUs, load average {data['load_before']} before and "
        f"{data['load_after']} after (1, 5, 15 min); run under `{data['command']}`; Python {data['python']}.",
        "",
        f"Bytes: the growing store wrote {g[small]['store_files_bytes'] / 1e6:.1f} MB of store files at {BASE:,} "
        f"rows and {g[large]['store_files_bytes'] / 1e6:.1f} MB at {BASE * COPIES:,} (the new segment and the small "
        f"top-level file: proportional to the {ADD:,} rows added); the baseline "
        f"{b[small]['store_files_bytes'] / 1e6:.1f} and {b[large]['store_files_bytes'] / 1e6:.1f} MB (every row). "
        f"Index files: {g[small]['index_files_bytes'] / 1e6:.1f} and {g[large]['index_files_bytes'] / 1e6:.1f} MB "
        "grown against "
        f"{b[small]['index_files_bytes'] / 1e6:.1f} and {b[large]['index_files_bytes'] / 1e6:.1f} MB rebuilt"
        + (": the added rows went into a small delta part per level beside the untouched base index (with the "
           "recall probe rewritten), so index bytes follow the rows added; the parts are folded into the base "
           "once they pass 10 % of it (sjea_tools/index.py)."
           if g[large]["index_files_bytes"] < 2 * g[small]["index_files_bytes"] else
           ": a grown FAISS index is saved as a whole new file, so its bytes, and part of its time, follow the "
           "stored rows (sjea_tools/index.py)."),
        f"<!-- bench_growth:data {json.dumps(data, sort_keys=True)} -->",
        END,
    ]
    return "\n".join(lines)


def redo_docs() -> None:
    """The block again from the data saved in it (after a change of wording, not of numbers)."""
    global ADD
    from docblock import write_block

    text = DOCS.read_text()
    data = json.loads(text.split("<!-- bench_growth:data ", 1)[1].split(" -->", 1)[0])
    ADD = data["added"]
    write_block(DOCS, BEGIN, END, block(data), "## Adding images to a store (bench_growth)")


def main() -> None:
    global BASE, ADD, COPIES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-growth")
    ap.add_argument("--commit", default="c63fb9d", help="the baseline code (copies every row on --update)")
    ap.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
    ap.add_argument("--base", type=int, default=BASE, help="images embedded into the small store")
    ap.add_argument("--add", type=int, default=ADD, help="images the update adds")
    ap.add_argument("--copies", type=int, default=COPIES, help="the large store is the small one this many times")
    ap.add_argument("--redo-docs", action="store_true", help="rewrite the doc block from the data it holds")
    ap.add_argument("--child", nargs=3, metavar=("IMAGES", "STORE", "RUN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    BASE, ADD, COPIES = args.base, args.add, args.copies
    if args.redo_docs:
        return redo_docs()
    sys.path.insert(0, str(ROOT))
    load_before = [round(v, 2) for v in os.getloadavg()]
    args.work.mkdir(parents=True, exist_ok=True)
    grow, new_files = make_images(args.work)
    run = make_run(args.work)
    bases = make_stores(args.work, grow, run)
    for rel in new_files:  # the images the update finds
        _link(args.work / "all" / rel, grow / rel)
    old = baseline_code(args.commit, args.work)
    results = {"growing": {}, "baseline": {}}
    for size, base in bases.items():
        results["growing"][str(size)] = measure(args.work, grow, run, base, "growing", None)
        results["baseline"][str(size)] = measure(args.work, grow, run, base, "baseline", old)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    data = {"results": results, "commit": commit, "baseline_commit": args.commit, "added": ADD,
            "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "command": "python benchmarks/bench_growth.py " + " ".join(sys.argv[1:])}
    print(json.dumps(data, indent=1))
    if args.write_docs:
        from docblock import write_block

        write_block(DOCS, BEGIN, END, block(data), "## Adding images to a store (bench_growth)")


if __name__ == "__main__":
    main()
