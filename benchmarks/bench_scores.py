"""What a score means: measured cosines per level, the stored rows beside what they were before.

    python benchmarks/bench_scores.py --run RUN --work /tmp/bench-scores --write-docs

The demo's folder (`sjea images fashion-mnist DIR --split test --limit 3000`: real Fashion-MNIST
test images as PNG files) is embedded into a store (`sjea embed`, indexes built) by RUN's model as
it is (rows centred and whitened: trainers.centring) and by two copies of it made here: without its
whitening (rows centred only, as stores held before whitening) and without its means either (raw
cosines, as stores held before centring). Per level, medians over the store:

- random pair: every stored row against every other row (the median score of a query against
  all rows, and its 99th percentile);
- top-1 neighbour: each row's best other row (what the demo's table shows second, after the
  query itself), all rows and those whose neighbour has the same class;
- near-duplicates: for a seeded sample of 300 stored images, a horizontally flipped copy and a
  JPEG re-encode (quality 75) of the file, embedded as `sjea search` embeds a query file
  (`Embedder.for_store`), scored against the original's row;
- self: the same 300 files embedded as queries against their own rows (minimum shown too).

And the demo's own query (`sjea search demo/images/Sneaker/000009.png --k 5`), its five scores per
level, and for each of its neighbours whether `sjea duplicates` would call the pair a near-duplicate
(its own rule at its defaults: level-0 score >= the store's default threshold and grey pixels
correlating >= its pixel threshold): a 0.99 neighbour is only readable if it is one. The block goes
into docs/search.md ("Scores").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docblock import provenance, publish  # noqa: E402

DOC = ROOT / "docs" / "search.md"
BEGIN, END = "<!-- bench_scores:begin (written by benchmarks/bench_scores.py) -->", "<!-- bench_scores:end -->"
HEADING = "## Scores: what a cosine means (measured)"
IMAGES = 3000
COPIES = 300
JPEG_QUALITY = 75
DEMO_QUERY = Path("Sneaker") / "000009.png"


def make_copies(images: Path, copies: Path, sample: list[str]) -> None:
    """A horizontally flipped copy and a JPEG re-encode of each sampled file, outside the folder
    that is embedded, named by the file's place in `sample`."""
    from PIL import Image, ImageOps

    copies.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(sample):
        with Image.open(images / name) as im:
            im = im.convert("RGB")
            ImageOps.mirror(im).save(copies / f"{k:04d}-flip.png")
            im.save(copies / f"{k:04d}-jpeg.jpg", quality=JPEG_QUALITY)


def median(x) -> float:
    return round(float(np.median(x)), 3)


def without(run: Path, out: Path, means: bool) -> Path:
    """A copy of `run` whose model drops its whitening (means=True keeps the means) or both."""
    import shutil

    from sjea_tools.runs import CONFIG_FILE, load_model, save_model

    model = load_model(run)
    model.set_centres(model.centres if means else None)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(Path(run) / CONFIG_FILE, out / CONFIG_FILE)
    save_model(out, model, model.cfg)
    return out


def measure(run: str, images: Path, copies: Path, store: Path, sample: list[str]) -> dict:
    from sjea_tools.embed import Embedder
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.search import search_store
    from sjea_tools.store import open_store
    from sjea_tools.vectors import exact_top_k

    embed_and_index(images, store, run=run, backend="torch", workers=0, overwrite=True)
    out: dict = {"run": run, "levels": {}}
    with open_store(store) as s:
        emb = Embedder.for_store(s, backend="torch")
        out["centred"] = s.centres is not None
        out["whitened"] = s.whitening_digests is not None
        names, labels = s.paths, s.labels
        row_of = {n: i for i, n in enumerate(names)}
        rows = np.array([row_of[n] for n in sample])
        queries = {kind: emb.embed_files([copies / f"{k:04d}-{kind}.{ext}" for k in range(len(sample))])
                   for kind, ext in (("flip", "png"), ("jpeg", "jpg"))}
        queries["self"] = emb.embed_files([images / n for n in sample])
        for j, lv in enumerate(s.levels):
            y = s.read_embeddings(lv)
            sims = y @ y.T
            off = ~np.eye(len(y), dtype=bool)
            scores, ids = exact_top_k(y, y, 2)
            # The best other row (a row's own is first, unless an exact twin ties with it).
            other = np.where(ids[:, 0] == np.arange(len(y)), ids[:, 1], ids[:, 0])
            top1 = np.where(ids[:, 0] == np.arange(len(y)), scores[:, 1], scores[:, 0])
            same = labels[other] == labels
            own = lambda q: (q[j] * y[rows]).sum(1)  # noqa: E731 - each copy against its original's row
            out["levels"][lv] = {
                "random_pair": median(sims[off]), "random_pair_p99": round(float(np.percentile(sims[off], 99)), 3),
                "top1": median(top1), "top1_same_class": median(top1[same]),
                "top1_same_class_share": round(float(same.mean()), 3), "flipped": median(own(queries["flip"])),
                "jpeg": median(own(queries["jpeg"])), "self": median(own(queries["self"])),
                "self_min": round(float(own(queries["self"]).min()), 5)}
    demo = search_store(store, queries=[images / DEMO_QUERY], k=5, mode="per-level")
    out["demo"] = {int(lv): [round(h["score"], 3) for h in hits] for lv, hits in demo["results"][0]["per_level"].items()}
    out["metric"] = demo["metric"]
    out["demo_pairs"] = demo_pairs(store, demo["results"][0]["per_level"])
    return out


def demo_pairs(store: Path, per_level: dict) -> dict:
    """For each level's demo neighbours (after the query itself): the pair's level-0 score, its pixel
    correlation and whether `sjea duplicates`' rule at its defaults joins it with the query."""
    from sjea_tools.duplicates import default_thresholds, read_level, verify_pairs

    threshold, pixel_threshold = default_thresholds(store)
    _, x, paths, root = read_level(store, 0)
    query = paths.index(str(DEMO_QUERY))
    out = {}
    for lv, hits in per_level.items():
        rows = np.array([h["id"] for h in hits if h["id"] != query])
        pixels_pass, corr, _ = verify_pairs(np.full(len(rows), query), rows, [root / p for p in paths],
                                            pixel_threshold)
        level0 = x[rows] @ x[query]
        out[int(lv)] = [{"path": paths[r], "level0": round(float(s), 3), "pixels": round(float(c), 3),
                         "near_duplicate": bool(s >= threshold and ok)}
                        for r, s, c, ok in zip(rows, level0, corr, pixels_pass)]
    return {"threshold": threshold, "pixel_threshold": pixel_threshold, "levels": out}


KINDS = {"whitened": "the model as it is (rows centred and whitened, as stores hold them)",
         "centred": "without its whitening (centred only, as stores held before whitening)",
         "raw": "without its means either (as stores held before centring)"}


def block(data: dict) -> str:
    kinds = [k for k in KINDS if k in data]
    first = data[kinds[0]]
    lines = [BEGIN, "", f"Written by `{data['command']}` (commit {data['commit']}, {data['date']}). Model: "
             f"{data['run_label']}; " + "; ".join(f"{k}: {KINDS[k]}" for k in kinds) + f". {IMAGES:,} Fashion-MNIST "
             f"test images (the demo's folder) embedded by each; medians, copies and self over {COPIES} sampled files.",
             "", "| level, rows | random pair (99th pct) | top-1 neighbour | top-1, same class | flipped copy | JPEG q75 copy "
             "| self (min) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in first["levels"]:
        for name in kinds:
            r = data[name]["levels"][lv]
            lines.append(f"| L{lv} {name} | {r['random_pair']:.3f} ({r['random_pair_p99']:.3f}) | {r['top1']:.3f} | {r['top1_same_class']:.3f} "
                         f"({r['top1_same_class_share']:.0%} of rows) | {r['flipped']:.3f} | {r['jpeg']:.3f} | "
                         f"{r['self']:.3f} ({r['self_min']:.5f}) |")
    lines += ["", "The demo's query (`sjea search demo/images/Sneaker/000009.png --k 5`), its five scores "
              "(the first is the image itself):", "", "| level | " + " | ".join(kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for lv in first["demo"]:
        lines.append(f"| L{lv} | " + " | ".join(', '.join(f'{v:.3f}' for v in data[k]['demo'][lv]) for k in kinds) + " |")
    pairs = first["demo_pairs"]
    lines += ["", f"Are the demo's neighbours ({kinds[0]} store) near-duplicates of the query? `sjea duplicates`' rule "
              f"at that store's defaults: level-0 score >= {pairs['threshold']} and pixel correlation >= "
              f"{pairs['pixel_threshold']}.", "",
              "| level | neighbour | file | level-0 score | pixel correlation | near-duplicate |", "|---|---:|---|---:|---:|---|"]
    for lv, hits in pairs["levels"].items():
        for rank, h in enumerate(hits, start=2):
            lines.append(f"| L{lv} | {rank} | {h['path']} | {h['level0']:.3f} | {h['pixels']:.3f} | "
                         f"{'yes' if h['near_duplicate'] else 'no'} |")
    lines += ["", "<!-- bench_scores:data " + json.dumps(data, sort_keys=True) + " -->", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="Run whose model carries centring means and whitening (the default "
                        "model); its copies without them are made here.")
    parser.add_argument("--run-label", default=None, help="How the block names the run [default: its path].")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scores"), help="Scratch folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled copies.")
    parser.add_argument("--write-docs", action="store_true", help=f"Write the block into {DOC.relative_to(ROOT)}.")
    args = parser.parse_args()
    from sjea_tools.data.write_folder import write_image_folder

    images = args.work / "images"
    args.work.mkdir(parents=True, exist_ok=True)
    write_image_folder("fashion-mnist", images, "test", IMAGES, "png", None)
    names = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    sample = [names[i] for i in sorted(np.random.default_rng(args.seed).choice(len(names), COPIES, replace=False))]
    make_copies(images, args.work / "copies", sample)
    from sjea_tools.runs import load_model

    runs = {"centred": without(Path(args.run), args.work / "run-centred", means=True),
            "raw": without(Path(args.run), args.work / "run-raw", means=False)}
    if load_model(args.run).whitenings is not None:
        runs = {"whitened": Path(args.run), **runs}
    results = {name: measure(str(run), images, args.work / "copies", args.work / f"{name}.h5", sample)
               for name, run in runs.items()}
    data = {**provenance(sys.argv), "run_label": args.run_label or args.run, **results}
    publish(data, block(data), args.work, DOC if args.write_docs else None, BEGIN, END, HEADING)


if __name__ == "__main__":
    main()
