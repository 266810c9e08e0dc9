"""The threshold of `sjea duplicates`, measured on real copies: precision and recall per threshold.

    python benchmarks/bench_duplicates.py --run RUN --work /tmp/bench-dups --write-docs

The folder (made from a seed, no downloads): distinct originals are crops of the real photos
bundled with scikit-image (skimage.data; each crop overlaps any other crop of its photo by IoU
< 0.3, and near-blank patches, pixel std < 25, are left out) and real Fashion-MNIST test images (/usr/share/datasets/fashion-mnist); for 60 % of the
originals, two copies of different kinds: a JPEG re-encode at quality 50-90, the image 2x smaller,
the image 2x larger (Lanczos), a crop trimming 1-5 % of each border. All files are shuffled under
neutral names in one folder. Ground truth: a file and its copies are all copies of each other;
every other pair is distinct.

The folder is embedded with RUN (`sjea embed` without indexes); for every level and threshold,
the pairs `sjea duplicates` reports (two files in the same group: sjea_tools.duplicates, the
command's own functions) are scored against the true copy pairs: precision, recall, F1, and the
recall of each copy kind. The default threshold is the one with the highest F1 at level 0 (the
command's default level) on the first seed; the other seeds are new folders (other crops, other
copies) that check it. The floor: the same protocol on pixels (each file decoded and resized to
32 x 32 RGB, raw and centred on the folder's mean).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docblock import write_block  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_duplicates:begin -->", "<!-- bench_duplicates:end -->"
HEADING = "## Near-duplicate threshold (`benchmarks/bench_duplicates.py`)"
# Real photos bundled with scikit-image (chelsea and cat are the same photo: one kept; the right
# motorcycle of the stereo pair is nearly the left: left only).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "page", "text", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel", "clock", "stereo_motorcycle", "cell")
CROPS_PER_PHOTO = 14
FMNIST = 150
COPIED = 0.6
KINDS = ("jpeg", "half", "double", "crop")
THRESHOLDS = (0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999,
              0.9995, 0.9999)
PIXEL_SIDE = 32
MIN_STD = 25.0  # pixel standard deviation (0-255) below which a crop is a near-blank patch


# --- the folder ---------------------------------------------------------------------------------

def photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def distinct_crops(img: np.ndarray, count: int, rng) -> list[np.ndarray]:
    """Up to `count` crops of 25-60 % of the short side, pairwise IoU < 0.3, none near-blank."""
    h, w = img.shape[:2]
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(4000):
        if len(boxes) == count:
            break
        side = int(rng.uniform(0.25, 0.6) * min(h, w))
        bw, bh = side, int(np.clip(side * rng.uniform(0.75, 1.33), 16, h))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        crop = img[box[1]:box[3], box[0]:box[2]]
        # a near-blank patch (moon's sky, a page's margin) is no distinct photo: two of them are copies to any eye
        if crop.std() >= MIN_STD and all(iou(box, b) < 0.3 for b in boxes):
            boxes.append(box)
    return [img[b[1]:b[3], b[0]:b[2]] for b in boxes]


def originals(seed: int) -> list[np.ndarray]:
    from sjea_tools.data import load_dataset

    rng = np.random.default_rng(seed)
    out = [c for name in PHOTOS for c in distinct_crops(photo(name), CROPS_PER_PHOTO, rng)]
    fm = load_dataset("fashion-mnist", split="test")
    out += [np.asarray(fm.pixels[i]) for i in rng.choice(len(fm.pixels), FMNIST, replace=False)]
    return out


def copy_of(img, kind: str, rng):
    """(PIL image, file suffix, save options) of one copy of `img`."""
    from PIL import Image

    im = Image.fromarray(img)
    w, h = im.size
    if kind == "jpeg":
        return im, ".jpg", {"quality": int(rng.integers(50, 91))}
    if kind == "half":
        return im.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS), ".png", {}
    if kind == "double":
        return im.resize((w * 2, h * 2), Image.LANCZOS), ".png", {}
    trim = [int(round(rng.uniform(0.01, 0.05) * s)) for s in (w, h, w, h)]
    return im.crop((trim[0], trim[1], w - trim[2], h - trim[3])), ".png", {}


def make_folder(folder: Path, seed: int) -> dict[str, tuple[int, str]]:
    """Write the folder; {file name: (original id, kind)} with kind "original" or a copy kind."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []  # (PIL image, suffix, options, source, kind)
    for k, img in enumerate(originals(seed)):
        items.append((Image.fromarray(img), ".png", {}, k, "original"))
        if rng.random() < COPIED:
            for kind in rng.choice(KINDS, 2, replace=False):
                items.append((*copy_of(img, str(kind), rng), k, str(kind)))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    truth = {}
    for n, pos in enumerate(rng.permutation(len(items))):
        im, suffix, options, source, kind = items[pos]
        name = f"{n:05d}{suffix}"
        im.save(folder / name, **options)
        truth[name] = (source, kind)
    return truth


# --- scoring ------------------------------------------------------------------------------------

def same_group_pairs(groups: list[np.ndarray]) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for g in groups for k, a in enumerate(g) for b in g[k + 1:]}


def score_curve(x: np.ndarray, source: np.ndarray, kinds: np.ndarray) -> list[dict]:
    """Precision, recall, F1 of the same-group pairs at every threshold, and recall per copy kind."""
    from sjea_tools.duplicates import connected_groups, pairs_above

    i, j, s = pairs_above(x, min(THRESHOLDS))
    true = {(a, b) for a in range(len(x)) for b in range(a + 1, len(x)) if source[a] == source[b]}
    by_kind = {k: {(a, b) for a, b in true if {kinds[a], kinds[b]} == {"original", k}} for k in KINDS}
    uncropped = lambda pairs: {(a, b) for a, b in pairs if kinds[a] != "crop" and kinds[b] != "crop"}  # noqa: E731
    rows = []
    for t in THRESHOLDS:
        keep = s >= np.float32(t)
        found = same_group_pairs(connected_groups(len(x), i[keep], j[keep]))
        p, r = precision_recall(found, true)
        # The bar: re-encodes and resizes only (the files cropped out of both sides).
        p_nc, r_nc = precision_recall(uncropped(found), uncropped(true))
        rows.append({"threshold": t, "found": len(found), "precision": round(p, 4), "recall": round(r, 4),
                     "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
                     "precision_no_crops": round(p_nc, 4), "recall_no_crops": round(r_nc, 4),
                     "recall_by_kind": {k: round(len(found & v) / len(v), 4) for k, v in by_kind.items() if v}})
    return rows


def precision_recall(found: set, true: set) -> tuple[float, float]:
    hit = len(found & true)
    return (hit / len(found) if found else 1.0), hit / len(true)


def best(curve: list[dict]) -> dict:
    """The highest F1; among equals, the lowest threshold."""
    return max(curve, key=lambda r: (r["f1"], -r["threshold"]))


def distinct_cosines(x: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Cosines of the pairs of different originals: where the raw scores of unrelated images sit."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    c = x @ x.T
    return c[np.triu(source[:, None] != source[None, :], 1)]


def pixel_vectors(folder: Path, names: list[str]) -> np.ndarray:
    from PIL import Image

    from sjea_tools.data.images import decode_image

    return np.stack([np.asarray(decode_image(folder / n).resize((PIXEL_SIDE, PIXEL_SIDE), Image.BILINEAR),
                                dtype=np.float32).ravel() / 255.0 for n in names])


def measure(run: str, work: Path, seed: int) -> dict:
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.store import open_store

    folder, store = work / f"images-{seed}", work / f"store-{seed}.h5"
    truth = make_folder(folder, seed)
    for p in work.glob(f"store-{seed}.h5*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    t0 = time.perf_counter()
    embed_and_index(folder, store, run=run, backend="torch", workers=0, index=False)
    embed_s = time.perf_counter() - t0
    with open_store(store) as s:
        names = s.paths
        vectors = {lv: s.read_embeddings(lv) for lv in s.levels}
        failed = len(s.failed)
    source = np.array([truth[n][0] for n in names])
    kinds = np.array([truth[n][1] for n in names])
    pixels = pixel_vectors(folder, names)
    curves = {f"level {lv}": score_curve(v, source, kinds) for lv, v in vectors.items()}
    # What centred scores would give (the scale change the hierarchy issue plans): each level minus its mean.
    curves.update({f"level {lv}, centred": score_curve(v - v.mean(axis=0, keepdims=True), source, kinds)
                   for lv, v in vectors.items()})
    curves["raw pixels"] = score_curve(pixels, source, kinds)
    curves["centred pixels"] = score_curve(pixels - pixels.mean(axis=0, keepdims=True), source, kinds)
    counts = {k: int((kinds == k).sum()) for k in ("original", *KINDS)}
    (work / f"truth-{seed}.json").write_text(json.dumps(truth))
    return {"seed": seed, "files": len(names), "distinct_median": {
                f"level {lv}": round(float(np.median(distinct_cosines(v, source))), 4) for lv, v in vectors.items()}, "failed": failed, "counts": counts, "embed_s": round(embed_s, 1),
            "true_pairs": int(sum(c * (c - 1) // 2 for c in np.unique(source, return_counts=True)[1])),
            "curves": curves}


# --- the block ----------------------------------------------------------------------------------

def table(curve: list[dict], chosen: float) -> list[str]:
    lines = ["| threshold | pairs found | precision | recall | F1 | recall: " + " / ".join(KINDS) + " | precision / "
             "recall without crops |", "|---|---|---|---|---|---|---|"]
    for r in curve:
        mark = " **(default)**" if r["threshold"] == chosen else ""
        kinds = " / ".join(f"{r['recall_by_kind'].get(k, 0):.3f}" for k in KINDS)
        lines.append(f"| {r['threshold']}{mark} | {r['found']} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['f1']:.3f} | {kinds} | {r['precision_no_crops']:.3f} / {r['recall_no_crops']:.3f} |")
    return lines


def at(curve: list[dict], t: float) -> dict:
    return next(r for r in curve if r["threshold"] == t)


def bar(r: dict) -> str:
    """The issue's bar, stated from the numbers: precision and recall >= 0.9 on re-encodes and resizes."""
    p, rec = r["precision_no_crops"], r["recall_no_crops"]
    verdict = "met" if min(p, rec) >= 0.9 else "NOT met"
    return (f"Re-encodes and 2x resizes at the default: precision {p:.3f}, recall {rec:.3f}; the bar of >= 0.9 "
            f"for both is {verdict} with this run.")


def block(data: dict) -> str:
    first, chosen = data["seeds"][0], data["chosen"]
    c = first["counts"]
    lines = [BEGIN, HEADING, "",
             f"Written by `{data['command']}` (commit {data['commit']}, {data['date']}). Run: {data['run']}.",
             f"Folder (seed {first['seed']}): {first['files']} files, {c['original']} distinct originals "
             f"({len(PHOTOS)} scikit-image photos x up to {CROPS_PER_PHOTO} non-overlapping crops, {FMNIST} "
             f"Fashion-MNIST test images) and copies: {c['jpeg']} JPEG q50-90, {c['half']} 2x smaller, "
             f"{c['double']} 2x larger, {c['crop']} cropped 1-5 % per border; {first['true_pairs']} true copy "
             "pairs. A pair is found when both files land in the same `sjea duplicates` group.", "",
             f"**Default threshold: {chosen}** (`DEFAULT_THRESHOLD` in sjea_tools/duplicates.py): the highest F1 "
             "at level 0 on this folder. Scores are raw cosines; if their scale changes, re-measure with this "
             "script.", "", bar(at(first["curves"]["level 0"], chosen)), ""]
    medians = ", ".join(f"{k} {v}" for k, v in first["distinct_median"].items())
    lines += [f"Median cosine of two different originals (raw scores): {medians}.", ""]
    for name, curve in first["curves"].items():
        if name.startswith("level") and "centred" not in name:
            lines += [f"{name.capitalize()} of the run:", "", *table(curve, chosen if name == "level 0" else -1), ""]
    lines += ["Best F1 of each curve; the centred rows are the run's vectors minus the folder's mean (not what "
              "the command scores today); the pixel rows are the floor, the same protocol on pixels (32 x 32 RGB):", "",
              "| features | best threshold | precision | recall | F1 | precision / recall without crops |",
              "|---|---|---|---|---|---|"]
    for name in [n for n in first["curves"] if n.startswith("level")] + ["raw pixels", "centred pixels"]:
        b = best(first["curves"][name])
        lines.append(f"| {name} | {b['threshold']} | {b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} | "
                     f"{b['precision_no_crops']:.3f} / {b['recall_no_crops']:.3f} |")
    lines += ["", f"Check on new folders (other crops and copies) at the default {chosen}, level 0:", "",
              "| seed | files | true pairs | precision | recall | F1 | recall: " + " / ".join(KINDS) + " | precision / "
              "recall without crops |", "|---|---|---|---|---|---|---|---|"]
    for s in data["seeds"]:
        r = at(s["curves"]["level 0"], chosen)
        kinds = " / ".join(f"{r['recall_by_kind'].get(k, 0):.3f}" for k in KINDS)
        lines.append(f"| {s['seed']} | {s['files']} | {s['true_pairs']} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['f1']:.3f} | {kinds} | {r['precision_no_crops']:.3f} / {r['recall_no_crops']:.3f} |")
    lines += ["", f"<!-- bench_duplicates:data {json.dumps(data, sort_keys=True)} -->", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="Run folder whose model embeds the folder (the default model).")
    parser.add_argument("--run-label", default=None, help="How the block names the run [default: its path].")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-duplicates"), help="Scratch folder.")
    parser.add_argument("--seeds", default="0,1", help="Folders to make; the first chooses, the others check.")
    parser.add_argument("--write-docs", action="store_true", help=f"Write the block into {DOC.relative_to(ROOT)}.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [measure(args.run, args.work, int(s)) for s in args.seeds.split(",")]
    chosen = best(seeds[0]["curves"]["level 0"])["threshold"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    data = {"command": "python benchmarks/bench_duplicates.py " + " ".join(sys.argv[1:]), "commit": commit.strip(),
            "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "run": args.run_label or args.run, "chosen": chosen, "seeds": seeds}
    (args.work / "result.json").write_text(json.dumps(data, indent=1))
    text = block(data)
    print(text.rsplit("<!-- bench_duplicates:data", 1)[0])
    if args.write_docs:
        write_block(DOC, BEGIN, END, text, heading="")


if __name__ == "__main__":
    main()
