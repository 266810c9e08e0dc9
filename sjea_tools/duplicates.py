"""Near-duplicate groups of a store: every pair of rows whose cosine at one level is >= a threshold,
joined into groups (connected components), each with one file to keep and the rest to review.

Nothing here deletes or moves a file: the result is a list a user (or `sjea duplicates --list`)
acts on.

Pure part (arrays in, arrays out): `pairs_above`, `connected_groups`.
Store part: `find_duplicates(store)` reads one level with the store reader and names the files.

Cost: the pairs are found exactly (faiss.IndexFlatIP.range_search of every row against all rows,
QUERY_CHUNK queries at a time), so time grows as n² x dim while memory stays at the vectors, one
chunk's range-search result and the pairs found (at most MAX_PAIRS, about 400 MB). Measured on the project's shared 2-core machine: 20,000 rows x 128 dims in 11 s,
so about 4.5 minutes for 100,000 rows and hours for 1,000,000 (n² grows 2,500 times).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SjeaError
from .progress import ProgressFn, report

# The cosine at or above which two rows are reported as copies of each other. Measured, not
# chosen: the threshold with the highest F1 of found vs true copy pairs (JPEG re-encodes at quality
# 50-90, 2x down- and up-sized copies, <= 5 % border crops of real photos and Fashion-MNIST images)
# in docs/benchmarks.md, block "bench_duplicates". Scores are raw cosines of the stored vectors
# today; if their scale changes (centred scores, another default model), re-measure with
# benchmarks/bench_duplicates.py and put its chosen value here. Measured with the default run (the
# `sjea train` defaults): F1 0.67 (re-encodes and resizes: precision 0.70, recall 0.72), below the
# >= 0.9 the tool aims for and below the pixel floor (centred 32 x 32 pixels: F1 0.79, precision
# 0.92 / recall 0.90 without crops): the augmentation-invariant embedding puts distinct crops of
# one photo close together. Until a verification stage is added, raise --threshold for precision.
DEFAULT_THRESHOLD = 0.995
# Queries per range search: the pairs one chunk returns are all that is held besides the vectors.
QUERY_CHUNK = 4096
# More pairs than this means the threshold joins similar images, not copies (and the pairs would
# fill memory): refused with a fix instead.
MAX_PAIRS = 20_000_000
KEEP_RULE = "the most pixels, then the largest file, then the first path in sorted order"


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (0.0 < threshold <= 1.0):  # also refuses nan
        raise SjeaError(f"--threshold must be a cosine in (0, 1], e.g. {DEFAULT_THRESHOLD} (got {threshold}).")
    return threshold


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
                            f"join similar images, not copies; raise --threshold (default {DEFAULT_THRESHOLD}).")
        report(progress, "comparing rows", min(len(x), start + chunk), len(x))
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


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


def find_duplicates(store_path, level: int | str = 0, threshold: float | None = None, *, grid=None,
                    keep_list=None, overwrite: bool = False, progress: ProgressFn | None = None) -> dict:
    """Near-duplicate groups of a store at one level (all pairs with cosine >= threshold, default
    DEFAULT_THRESHOLD, joined transitively). Each member's score is its cosine to the group's kept
    file (KEEP_RULE); the others are removal candidates. Writes only what is asked: `keep_list` (the
CSV of write_list) and `grid` (draw_groups' PNG), an existing one replaced only with `overwrite`.

    Cost (exact all-pairs search, the module docstring): n² x dim multiply-adds, minutes for
    100,000 rows on 2 cores; memory is the level's vectors (n x dim x 4 bytes) plus the pairs."""
    from .levels import parse_levels
    from .store import open_store

    threshold = DEFAULT_THRESHOLD if threshold is None else check_threshold(threshold)
    with open_store(store_path) as store:
        level = parse_levels(level, store.levels, option="--level")
        if len(level) != 1:
            raise SjeaError(f"--level takes one level (levels here: {', '.join(map(str, store.levels))}).")
        level = level[0]
        x = unit_rows(store.read_embeddings(level))
        paths, root = store.paths, Path(store.root)
    check_outputs(store_path, {"--grid": grid, "--list": keep_list}, overwrite)
    i, j, _ = pairs_above(x, threshold, progress=progress)
    groups = describe_groups(x, connected_groups(len(x), i, j), paths, root)
    result = {"store": str(store_path), "root": str(root), "level": level, "threshold": threshold, "rows": len(x),
              "pairs": int(len(i)), "groups": groups, "to_remove": sum(g["size"] - 1 for g in groups),
              "keep_rule": KEEP_RULE}
    if keep_list is not None:
        result["list"] = str(write_list(result, keep_list))
    if grid is not None:
        result["grid"] = str(draw_groups(result, grid))
    return result


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
    draw.text((PAD, 2), f"{shown} groups at cosine >= {result['threshold']} (level {result['level']}); "
              "framed: keep", fill="black", font=f)
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
