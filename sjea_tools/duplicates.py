"""Near-duplicate groups of a store in two stages: candidate pairs whose cosine at one level is >=
a threshold, then a pixel check of each candidate (the two files decoded at VERIFY_SIDE x
VERIFY_SIDE grey, standardised, correlation >= a pixel threshold); the pairs that pass are joined
into groups, each member a confirmed pair with the group's one file to keep (`star_groups`).

Why two stages: the embedding is trained to be invariant to crops and colour changes, so distinct
crops of one photo score like copies (level 0 alone: F1 0.67 on real copies); pixels alone miss
what resizing and re-encoding change. Candidates from the embedding, decided by pixels, is the
measured best (docs/benchmarks.md, block "bench_duplicates").

Nothing here deletes or moves a file: the result is a list a user (or `sjea duplicates --list`)
acts on.

Pure part (arrays in, arrays out): `pairs_above`, `standardised`, `pair_correlations`,
`connected_groups`, `star_groups`. Store part: `find_duplicates(store)` reads one level with the store reader,
decodes the files of candidate pairs only, and names the files.

Cost: the candidates are found exactly (faiss.IndexFlatIP.range_search of every row against all
rows, QUERY_CHUNK queries at a time), so time grows as n² x dim while memory stays at the vectors,
one chunk's range-search result and the pairs found (at most MAX_PAIRS, about 400 MB). Measured on
the project's shared 2-core machine: 20,000 rows x 128 dims in 11 s, so about 4.5 minutes for
100,000 rows and hours for 1,000,000 (n² grows 2,500 times). The pixel check decodes each file of
a candidate pair once (JPEGs draft-decoded near VERIFY_SIDE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SjeaError
from .progress import ProgressFn, report

# Both thresholds are measured, not chosen: on a folder of real colour photos (crops of the photos
# bundled with scikit-image, with JPEG re-encodes at quality 50-90, 2x down- and up-sized copies
# and <= 5 % border crops) and Fashion-MNIST images with the same kinds of copies, the pair that
# meets precision and recall >= 0.9 on the photos' re-encodes and resizes with the highest F1 on
# the whole folder; written by benchmarks/bench_duplicates.py into docs/benchmarks.md (block
# "bench_duplicates"). Scores are centred cosines of the stored vectors of the default model
# (docs/search.md, "Scores"); if their scale changes (another default model), re-measure with that
# script and put its chosen values here.
DEFAULT_THRESHOLD = 0.95
DEFAULT_PIXEL_THRESHOLD = 0.8
# A store written before centring holds raw cosines, crowded near 1 (same-class neighbours score
# 0.98-0.99): its default stays the one measured on raw cosines by the same script (commit 00f2b70).
UNCENTRED_THRESHOLD = 0.98
# A whitened store (trainers.centring) spreads every score, near-duplicates' too: its pair measured
# by the same script on the whitened default model (docs/benchmarks.md, block
# "bench_duplicates-whitened"): on the photos every cosine from 0.5 to 0.9 passes the same
# candidates (the pixel check decides there); 0.6 has the best F1 on the whole folder.
WHITENED_THRESHOLD = 0.6
WHITENED_PIXEL_THRESHOLD = 0.8
# Side of the grey thumbnails the pixel check compares: 16, 32 and 64 were measured; 32 had the
# best F1 on the photo folder (16 joins look-alikes, 64 misses re-encoded textures).
VERIFY_SIDE = 32
# Queries per range search: the pairs one chunk returns are all that is held besides the vectors.
QUERY_CHUNK = 4096
# More pairs than this means the threshold joins similar images, not copies (and the pairs would
# fill memory): refused with a fix instead.
MAX_PAIRS = 20_000_000
KEEP_RULE = "the most pixels, then the largest file, then the first path in sorted order"


def check_threshold(threshold: float, option: str = "--threshold", default: float = DEFAULT_THRESHOLD) -> float:
    threshold = float(threshold)
    if not (0.0 < threshold <= 1.0):  # also refuses nan
        raise SjeaError(f"{option} must be a number in (0, 1], e.g. {default} (got {threshold}).")
    return threshold


def default_thresholds(store_path) -> tuple[float, float]:
    """(cosine, pixel) thresholds for a store when none are given, each measured on that kind of
    row: whitened (WHITENED_*), centred (DEFAULT_*) or written before centring (UNCENTRED_THRESHOLD)."""
    from .store import open_store

    with open_store(store_path) as store:
        if store.centres is None:
            return UNCENTRED_THRESHOLD, DEFAULT_PIXEL_THRESHOLD
        if store.whitening_digests is not None:
            return WHITENED_THRESHOLD, WHITENED_PIXEL_THRESHOLD
        return DEFAULT_THRESHOLD, DEFAULT_PIXEL_THRESHOLD


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (a zero row stays zero, so it matches nothing)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def pairs_above(x: np.ndarray, threshold: float, chunk: int = QUERY_CHUNK,
                progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, score) of every pair i < j of rows of `x` with cosine >= threshold, sorted by (i, j)."""
    import faiss

    threshold = check_threshold(threshold)
    x = unit_rows(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    # range_search keeps scores strictly above its radius: search just below, then apply >= exactly.
    t32 = np.float32(threshold)
    radius = float(np.nextafter(t32, np.float32(-1)))
    found_i, found_j, found_s = [], [], []
    for start in range(0, len(x), chunk):
        lims, scores, ids = index.range_search(x[start:start + chunk], radius)
        rows = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = (ids > rows) & (scores >= t32)
        found_i.append(rows[keep])
        found_j.append(ids[keep].astype(np.int64))
        found_s.append(scores[keep])
        if sum(len(f) for f in found_i) > MAX_PAIRS:
            raise SjeaError(f"more than {MAX_PAIRS:,} pairs score >= {threshold}: at that threshold the groups would "
                            f"join similar images, not copies; raise --threshold (the defaults: docs/benchmarks.md).")
        report(progress, "comparing rows", min(len(x), start + chunk), len(x))
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def standardised(x: np.ndarray) -> np.ndarray:
    """Rows minus their mean, scaled to length 1 (a flat row stays zero, so it correlates with nothing):
    the dot product of two such rows is their Pearson correlation."""
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=1, keepdims=True)
    return unit_rows(x)


def pair_correlations(signatures: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Correlation of the standardised rows i[k] and j[k] of `signatures`, for every k."""
    return np.einsum("kd,kd->k", signatures[i], signatures[j])


def pixel_signatures(files: list[Path], progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(standardised VERIFY_SIDE² grey pixels per file, readable mask): the files are decoded the way
    the model sees them (short side resized, centre cropped: data.preprocess.file_pixels); a file
    that cannot be read gets a zero row and False."""
    from .data.preprocess import file_pixels

    rows = np.zeros((len(files), VERIFY_SIDE * VERIFY_SIDE), np.float32)
    readable = np.zeros(len(files), bool)
    for k, path in enumerate(files):
        try:
            rows[k] = file_pixels(path, VERIFY_SIDE).astype(np.float32).mean(axis=2).ravel()
            readable[k] = True
        except (OSError, ValueError, MemoryError):
            pass
        report(progress, "checking pixels", k + 1, len(files))
    return standardised(rows), readable


def verify_pairs(i: np.ndarray, j: np.ndarray, files: list[Path], pixel_threshold: float,
                 progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mask of the candidate pairs whose pixels correlate >= pixel_threshold, their correlations,
    the number of candidate files that could not be read): only the files in some pair are decoded."""
    rows, local = np.unique(np.concatenate([i, j]), return_inverse=True)
    signatures, readable = pixel_signatures([files[r] for r in rows], progress)
    li, lj = local[:len(i)], local[len(i):]
    corr = pair_correlations(signatures, li, lj)
    keep = readable[li] & readable[lj] & (corr >= np.float32(pixel_threshold))
    return keep, corr, int((~readable).sum())


def connected_groups(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Rows joined by the pairs (i, j), as groups of 2 or more rows (union-find), each sorted, the
    groups ordered by their first row."""
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression: later finds are short
            parent[a], a = root, parent[a]
        return root

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(n)], dtype=np.int64) if n else np.zeros(0, np.int64)
    order = np.argsort(roots, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(roots[order])) + 1) if n else []
    return sorted((g for g in groups if len(g) > 1), key=lambda g: int(g[0]))


def star_groups(n: int, i: np.ndarray, j: np.ndarray, rank: Callable[[int], tuple]) -> list[np.ndarray]:
    """Groups in which every member is itself a pair with the group's kept row (the lowest `rank`):
    each connected component's kept row takes its direct partners, and the rest are grouped again
    the same way. Why: joined transitively, a chain of look-alikes (a~b, b~c, a and c unlike) made
    one 28-file group of distinct Fashion-MNIST items in the benchmark folder."""
    partners: dict[int, set[int]] = {}
    for a, b in zip(i.tolist(), j.tolist()):
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    stars, pending = [], connected_groups(n, i, j)
    while pending:
        component = pending.pop().tolist()
        keep = min(component, key=rank)
        star = {keep} | (partners[keep] & set(component))
        stars.append(np.array(sorted(star), dtype=np.int64))
        rest = [r for r in component if r not in star]
        inner = [(a, b) for a in rest for b in partners[a] if b in set(rest) and a < b]
        if inner:
            sub_i, sub_j = np.array([p[0] for p in inner]), np.array([p[1] for p in inner])
            pending.extend(connected_groups(n, sub_i, sub_j))
    return sorted(stars, key=lambda g: int(g[0]))


def image_size_of(path: Path) -> tuple[int, int]:
    """(pixels, bytes) of a file from its header alone; (0, 0) when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            pixels = img.size[0] * img.size[1]
        return pixels, path.stat().st_size
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0, 0


def keep_index(paths: list[str], sizes: list[tuple[int, int]]) -> int:
    """Which member to keep: KEEP_RULE (a copy is rarely bigger than its original, and a tie is
    settled the same way on every run)."""
    return min(range(len(paths)), key=lambda k: (-sizes[k][0], -sizes[k][1], paths[k]))


def describe_groups(x: np.ndarray, groups: list[np.ndarray], paths: list[str], root: Path) -> list[dict]:
    """Each group with its kept file first, then the others by cosine to it (highest first)."""
    out = []
    for members in groups:
        names = [paths[r] for r in members]
        keep = keep_index(names, [image_size_of(root / p) for p in names])
        scores = x[members] @ x[members[keep]]
        order = [keep] + sorted((k for k in range(len(members)) if k != keep), key=lambda k: (-scores[k], names[k]))
        out.append({"size": len(members), "members": [
            {"row": int(members[k]), "path": names[k], "score": round(float(scores[k]), 6),
             "action": "keep" if k == keep else "remove"} for k in order]})
    out.sort(key=lambda g: (-g["size"], g["members"][0]["path"]))
    for gid, g in enumerate(out):
        g["group"] = gid
    return out


def find_duplicates(store_path, level: int | str = 0, threshold: float | None = None, *,
                    pixel_threshold: float | None = None, verify: bool = True, grid=None, keep_list=None,
                    overwrite: bool = False, progress: ProgressFn | None = None) -> dict:
    """Near-duplicate groups of a store at one level: candidate pairs with cosine >= threshold
    (default: default_thresholds of the store) whose files' pixels correlate >= pixel_threshold (default:
    the store's, from the same; `verify=False` skips this check), joined transitively. Each member's
    score is its cosine to the group's kept file (KEEP_RULE); the others are removal candidates.
    Writes only what is asked: `keep_list` (the CSV of write_list) and `grid` (draw_groups' PNG), an
    existing one replaced only with `overwrite`.

    Cost (exact all-pairs search, the module docstring): n² x dim multiply-adds, minutes for
    100,000 rows on 2 cores; memory is the level's vectors (n x dim x 4 bytes) plus the pairs."""
    defaults = default_thresholds(store_path)
    threshold = defaults[0] if threshold is None else check_threshold(threshold)
    pixel_threshold = (defaults[1] if pixel_threshold is None
                       else check_threshold(pixel_threshold, "--pixel-threshold", DEFAULT_PIXEL_THRESHOLD))
    level, x, paths, root = read_level(store_path, level)
    check_outputs(store_path, {"--grid": grid, "--list": keep_list}, overwrite)
    i, j, _ = pairs_above(x, threshold, progress=progress)
    candidates, unreadable = len(i), 0
    if verify and len(i):
        keep, _, unreadable = verify_pairs(i, j, [root / p for p in paths], pixel_threshold, progress)
        i, j = i[keep], j[keep]
    sizes: dict[int, tuple[int, int]] = {}

    def rank(row: int) -> tuple:  # KEEP_RULE, the file headers read once
        if row not in sizes:
            sizes[row] = image_size_of(root / paths[row])
        return -sizes[row][0], -sizes[row][1], paths[row]

    groups = describe_groups(x, star_groups(len(x), i, j, rank), paths, root)
    result = {"store": str(store_path), "root": str(root), "level": level, "threshold": threshold,
              "pixel_threshold": pixel_threshold if verify else None, "rows": len(x), "candidates": candidates,
              "unreadable": unreadable, "pairs": int(len(i)), "groups": groups,
              "to_remove": sum(g["size"] - 1 for g in groups), "keep_rule": KEEP_RULE}
    if keep_list is not None:
        result["list"] = str(write_list(result, keep_list))
    if grid is not None:
        result["grid"] = str(draw_groups(result, grid))
    return result


def read_level(store_path, level: int | str) -> tuple[int, np.ndarray, list[str], Path]:
    """(level, unit rows of that level, stored paths, the store's image root)."""
    from .levels import parse_levels
    from .store import open_store

    with open_store(store_path) as store:
        levels = parse_levels(level, store.levels, option="--level")
        if len(levels) != 1:
            raise SjeaError(f"--level takes one level (levels here: {', '.join(map(str, store.levels))}).")
        return levels[0], unit_rows(store.read_embeddings(levels[0])), store.paths, Path(store.root)


def criteria(result: dict) -> str:
    """How a result's pairs were decided, in words."""
    text = f"level {result['level']} cosine >= {result['threshold']}"
    if result.get("pixel_threshold") is not None:
        text += f" and pixel correlation >= {result['pixel_threshold']}"
    return text


def keep_remove_rows(result: dict) -> list[tuple[int, str, str, float]]:
    """(group, path, action, score) for every member of every group: the rows of the --list CSV."""
    return [(g["group"], m["path"], m["action"], m["score"]) for g in result["groups"] for m in g["members"]]


def write_list(result: dict, out) -> Path:
    """The keep/remove list as CSV (group, path, action, score), written atomically."""
    import csv
    import io

    from .io import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "path", "action", "score"])
    writer.writerows(keep_remove_rows(result))
    atomic_write_text(out, buf.getvalue())
    return Path(out)


def check_outputs(store_path, outputs: dict[str, str | Path | None], overwrite: bool) -> None:
    """Refuse an output (--grid, --list) that exists (unless `overwrite`), is a folder, or is the store."""
    store = Path(store_path).resolve()
    for option, out in outputs.items():
        if out is None:
            continue
        out = Path(out)
        if out.resolve() == store:
            raise SjeaError(f"{option} {out} is the store itself; write the output elsewhere.")
        if out.is_dir():
            raise SjeaError(f"{option} {out} is a folder; give a file name.")
        if out.exists() and not overwrite:
            raise SjeaError(f"{option} {out} already exists; pass --overwrite to replace it, or choose another file.")


GRID_GROUPS = 40  # groups drawn in --grid (the largest first); the list and JSON hold them all
GRID_MEMBERS = 10  # files drawn per group


def draw_groups(result: dict, out, thumb: int | None = None) -> Path:
    """One row per group (the largest GRID_GROUPS): the kept file framed in blue, then the others,
    each captioned with its cosine to the kept file; a PNG written atomically."""
    import io

    from PIL import Image, ImageDraw

    from .grid import CAPTION, PAD, THUMB, font, thumbnail
    from .io import atomic_write_bytes

    thumb = thumb or THUMB
    groups = result["groups"][:GRID_GROUPS]
    label_w, cell_w, cell_h = 70, thumb + PAD, thumb + CAPTION + PAD
    cols = max((min(GRID_MEMBERS, g["size"]) for g in groups), default=1)
    canvas = Image.new("RGB", (label_w + cell_w * cols + PAD, CAPTION + PAD + max(1, len(groups)) * cell_h), "white")
    draw, f = ImageDraw.Draw(canvas), font(12)
    shown = f"{len(groups)} of {len(result['groups'])}" if len(result["groups"]) > len(groups) else f"{len(groups)}"
    draw.text((PAD, 2), f"{shown} groups, {criteria(result)}; framed: keep", fill="black", font=f)
    root = Path(result["root"])
    for row, g in enumerate(groups):
        y = CAPTION + PAD + row * cell_h
        draw.multiline_text((PAD, y + thumb // 2 - 12), f"group {g['group']}\n{g['size']} files", fill="black", font=f)
        for col, m in enumerate(g["members"][:GRID_MEMBERS]):
            x = label_w + col * cell_w
            canvas.paste(thumbnail(root / m["path"], thumb), (x, y))
            if m["action"] == "keep":
                draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(30, 90, 200), width=2)
            draw.text((x + 2, y + thumb + 1), "keep" if m["action"] == "keep" else f"{m['score']:.4f}",
                      fill="black", font=f)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)
