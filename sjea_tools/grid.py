"""The search grid picture, drawn with Pillow (no matplotlib): per query, the query image and its
neighbours. Images are decoded by sjea_tools.data, so this module imports torch with it.

One row per level searched and one for the hierarchical result; each thumbnail is captioned with
its cosine score (and, in the hierarchical row, its sub-cluster; a vertical bar separates groups).
Several queries stack their blocks vertically.

`check_grid_target` runs before any search: an existing file is replaced only with --overwrite, and
never when it is one of the inputs (the store, its index folder, a query image).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .io import atomic_write_bytes

THUMB = 96
PAD = 6
CAPTION = 16
LABEL_W = 110
GROUP_BAR = (220, 40, 40)


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def thumbnail(path: Path, size: int = THUMB) -> Image.Image:
    """The image fitted into a size x size tile; a grey tile with a cross when it cannot be read."""
    from .data.images import decode_image

    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        img = decode_image(path)
    except Exception:  # noqa: BLE001 - a moved or broken file still leaves its slot visible
        d = ImageDraw.Draw(tile)
        d.line((0, 0, size, size), fill=(200, 0, 0), width=2)
        d.line((0, size, size, 0), fill=(200, 0, 0), width=2)
        return tile
    img.thumbnail((size, size), Image.NEAREST if max(img.size) < size else Image.BILINEAR)
    if max(img.size) < size:  # tiny images (28x28) are enlarged with sharp pixels
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def check_grid_target(out: str | Path, store: str | Path | None, queries, overwrite: bool) -> None:
    """Refuse a --grid path that exists (unless `overwrite`) or that is one of the command's inputs."""
    from .errors import SjeaError
    from .index import index_dir
    from .search import find_store

    out = Path(out)
    try:
        store_path = find_store(store)[0]
    except SjeaError:
        store_path = None  # the search itself reports a missing store
    inputs = [Path(q) for q in queries]
    if store_path is not None:
        inputs += [store_path, index_dir(store_path)]
    target = out.resolve()
    for p in inputs:
        p = p.resolve()
        if target == p or p in target.parents:
            raise SjeaError(f"--grid {out} is an input of this search ({p}); write the picture elsewhere, "
                            "e.g. --grid neighbours.png.")
    if out.exists() and not overwrite:
        raise SjeaError(f"--grid {out} already exists; pass --overwrite to replace it, or choose another file.")
    if out.is_dir():
        raise SjeaError(f"--grid {out} is a folder; give a .png file name.")


def grid_rows(results: dict) -> list[tuple[str, str, list[tuple[str, float, str | None]]]]:
    """(row label, query file, [(neighbour file, score, group or None)]) for every row of the picture;
    a hierarchical hit's group is its node at the finest tree level ('g3')."""
    root = Path(results["root"])
    rows = []
    for r in results["results"]:
        for lv, hits in r.get("per_level", {}).items():
            rows.append((f"level {lv}", r["query_file"], [(str(root / h["path"]), h["score"], None) for h in hits]))
        if "hierarchical" in r:
            order = results["order"]
            label = f"hier. {'>'.join(map(str, order))}\ncluster {r['cluster_path'][0]}"
            rows.append((label, r["query_file"], [(str(root / h["path"]), h["score"], f"g{h['group'][-1]}")
                                                  for h in r["hierarchical"]]))
    return rows


def search_grid(results: dict, out: str | Path, thumb: int = THUMB) -> Path:
    """Draw the grid for search_store's results and write it as a PNG (atomically); returns the path."""
    import io

    rows = grid_rows(results)
    cols = max((len(h) for _, _, h in rows), default=0)
    cell_w, cell_h = thumb + PAD, thumb + CAPTION + PAD
    width = LABEL_W + cell_w * (cols + 1) + PAD * 3
    height = max(1, len(rows)) * cell_h + PAD + CAPTION
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    f = font(12)
    draw.text((LABEL_W + PAD, 2), "query", fill="black", font=f)
    draw.text((LABEL_W + cell_w + 3 * PAD, 2), "neighbours (cosine score)", fill="black", font=f)
    cache: dict[str, Image.Image] = {}

    def tile(path: str) -> Image.Image:
        if path not in cache:
            cache[path] = thumbnail(Path(path), thumb)
        return cache[path]

    for i, (label, query, hits) in enumerate(rows):
        y = CAPTION + PAD + i * cell_h
        draw.multiline_text((PAD, y + thumb // 2 - 12), label, fill="black", font=f)
        canvas.paste(tile(query), (LABEL_W, y))
        draw.rectangle((LABEL_W - 1, y - 1, LABEL_W + thumb, y + thumb), outline=(30, 90, 200), width=2)
        for j, (path, score, group) in enumerate(hits):
            x = LABEL_W + cell_w * (j + 1) + 2 * PAD
            canvas.paste(tile(path), (x, y))
            draw.text((x + 2, y + thumb + 1), f"{score:.3f}" + (f" {group}" if group else ""), fill="black", font=f)
            if group and j and group != hits[j - 1][2]:  # a new group starts: a bar between the tiles
                draw.rectangle((x - PAD // 2 - 2, y, x - PAD // 2, y + thumb), fill=GROUP_BAR)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
