#!/usr/bin/env python3
"""Every `sjea` command's `--json` output on a small demo store, as one JSON file, and a compare.

A refactor that claims "behaviour unchanged" runs this on the commit before and the commit after:

    python scripts/json_snapshot.py snap --tree OLD_CHECKOUT --out before.json
    python scripts/json_snapshot.py snap --tree .            --out after.json
    python scripts/json_snapshot.py compare before.json after.json     # exit 1 on any difference

The demo is real Fashion-MNIST (Debian's dataset-fashion-mnist): a 2-level `tiny` run stopped after a
few steps (seeded, CPU), its ONNX export, 300 test images written as files, the store, its indexes,
cluster tree, searches by file and by id in every mode, verify, eval of the store, merge and compact.
What legitimately differs between two runs is masked: the temporary folder's path, wall times and
rates, and the host's thread count. Everything else (rows, scores, ids, kinds, recalls) must match.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Keys whose values are measurements of time or speed, not behaviour.
VOLATILE_KEY = re.compile(r"(seconds|_s$|^s$|elapsed|rate|per_s|time|duration|images_per_s|ms$|^when$|created|date)",
                          re.I)
# Ids that hash a creation time (a store's fingerprint, the index's row identity) differ between any
# two runs of the same commit; timestamps inside strings (index file names) likewise.
RUN_UNIQUE_KEY = re.compile(r"^(fingerprint|store_fingerprint|identity|created)$")
TIMESTAMP = re.compile(r"\d{8}T\d{6,12}|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+\-Z0-9:]*")


def steps(work: Path) -> list[tuple[str, list[str]]]:
    run, onnx, images, store = work / "run", work / "run" / "onnx", work / "images", work / "demo.h5"
    half_a, half_b = work / "a.h5", work / "b.h5"
    query = "Sneaker"
    return [
        ("train", ["train", "--out", str(run), "--max-steps", "3", "--batch-size", "32", "--limit", "512",
                   "--device", "cpu", "--seed", "0", "--quiet", "--json"]),
        ("export", ["export", "--run", str(run), "--level", "all", "--quiet", "--json"]),
        ("images", ["images", "fashion-mnist", str(images), "--split", "test", "--limit", "300", "--json"]),
        ("embed", ["embed", str(images), str(store), "--run", str(run), "--quiet", "--json"]),
        ("index", ["index", str(store), "--quiet", "--json"]),
        ("clusters", ["clusters", str(store), "--json"]),
        ("search_file_per_level", ["search", f"{images}/{query}/QUERY", "--store", str(store), "--k", "5", "--json"]),
        ("search_file_both", ["search", f"{images}/{query}/QUERY", "--store", str(store), "--k", "5", "--mode",
                              "both", "--json"]),
        ("search_id_hier", ["search", "--id", "7", "--store", str(store), "--k", "5", "--mode", "hierarchical",
                            "--json"]),
        ("verify", ["verify", str(store), "--json"]),
        ("eval_store", ["eval", str(store), "--json"]),
        ("embed_shard_a", ["embed", str(images), str(half_a), "--run", str(run), "--shard", "0/2", "--quiet",
                           "--json"]),
        ("embed_shard_b", ["embed", str(images), str(half_b), "--run", str(run), "--shard", "1/2", "--quiet",
                           "--json"]),
        ("merge", ["merge", str(half_a), str(half_b), str(work / "merged.h5"), "--json"]),
        ("compact", ["compact", str(work / "merged.h5"), "--json"]),
        ("search_bad_store", ["search", "--id", "0", "--store", str(work / "missing.h5"), "--json"]),
    ]


def mask(value, work: str):
    if isinstance(value, dict):
        return {k: ("<volatile>" if (VOLATILE_KEY.search(k) and isinstance(v, (int, float)))
                    or (RUN_UNIQUE_KEY.match(k) and isinstance(v, str)) else mask(v, work))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, work) for v in value]
    if isinstance(value, str):
        return TIMESTAMP.sub("<timestamp>", value.replace(work, "<work>"))
    return value


def snapshot(tree: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OMP_NUM_THREADS="1", SJEA_ORT_CACHE="off",
               COLUMNS="200")
    cli = [sys.executable, "-c", "import sys; from sjea_tools.cli import main; sys.argv[0] = 'sjea'; main()"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sjea-snap-") as tmp:
        work = Path(tmp)
        for name, args in steps(work):
            if any("QUERY" in a for a in args):
                first = sorted((work / "images" / "Sneaker").iterdir())[0].name
                args = [a.replace("QUERY", first) for a in args]
            done = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, cwd=work, timeout=900)
            try:
                payload = json.loads(done.stdout) if done.stdout.strip() else None
            except json.JSONDecodeError:
                payload = {"unparsed_stdout": done.stdout}
            results[name] = {"rc": done.returncode, "json": mask(payload, str(work)),
                             "stderr_last_line": mask(done.stderr.strip().splitlines()[-1:], str(work))}
            print(f"{name}: rc {done.returncode}", file=sys.stderr)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{where}/{k}: only in {'after' if k in b else 'before'}")
            else:
                found += differences(a[k], b[k], f"{where}/{k}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    snap = sub.add_parser("snap", help="run every command with --json and save the masked outputs")
    snap.add_argument("--tree", type=Path, default=Path("."), help="checkout whose sjea_tools to run")
    snap.add_argument("--out", type=Path, required=True)
    cmp = sub.add_parser("compare", help="exit 1 if two snapshots differ")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "snap":
        snapshot(args.tree, args.out)
        return 0
    found = differences(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) between {args.before} and {args.after}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
