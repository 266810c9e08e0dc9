"""A search result (search.search_store's dict) as flat rows, as CSV or JSON lines, and its hit
files copied or linked into a folder, never over an existing file.

    hit_rows(res)                    one dict per hit: query, list, level, rank, id, path, score, file
    rows_text(rows, "csv"|"jsonl")   the rows as text
    copy_hits(res, folder, link)     [(source, written)] per file; names keep the rank
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from .errors import SjeaError
from .io import atomic_write, disk_faults

ROW_FIELDS = ("query", "list", "level", "rank", "id", "path", "score", "file")
ROW_FORMATS = ("csv", "jsonl")


def hit_lists(r: dict) -> list[tuple[str, str | None, list[dict]]]:
    """(list name, level or None, hits) of one query's result, in the order they are printed."""
    out = [(f"level {lv}", lv, hits) for lv, hits in r.get("per_level", {}).items()]
    if "hierarchical" in r:
        out.append(("hierarchical", None, r["hierarchical"]))
    return out


def hit_rows(res: dict) -> list[dict]:
    root = Path(res["root"])
    return [{"query": r["query"], "list": name, "level": lv, "rank": h["rank"], "id": h["id"], "path": h["path"],
             "score": h["score"], "file": str(root / h["path"])}
            for r in res["results"] for name, lv, hits in hit_lists(r) for h in hits]


def rows_text(rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def copy_hits(res: dict, folder: str | Path, link: bool = False) -> list[tuple[str, str]]:
    """Each query's hit files (each stored file once, in printed order) into `folder`, or
    folder/<query name> for several queries, as NNN-<name> (the position in that list); an existing
    name gets -1, -2, ... before its suffix. link: symlinks to the originals instead of copies."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SjeaError(f"--copy-to {folder} is a file; pass a folder (it is created if missing).")
    root, done = Path(res["root"]), []
    several = len(res["results"]) > 1
    with disk_faults(f"the folder {folder}"):
        for r in res["results"]:
            target = unused(folder / safe_name(Path(r["query"]).name or r["query"])) if several else folder
            target.mkdir(parents=True, exist_ok=True)
            for i, rel in enumerate(unique_paths(r), 1):
                source = root / rel
                if not source.is_file():
                    raise SjeaError(f"{source} (a hit) is missing; the store is out of date with its folder: "
                                    f"sjea embed {root} {res['store']} --update")
                dest = unused(target / f"{i:03d}-{Path(rel).name}")
                place(source, dest, link)
                done.append((str(source), str(dest)))
    return done


def unique_paths(r: dict) -> list[str]:
    seen: dict[str, None] = {}
    for _, _, hits in hit_lists(r):
        for h in hits:
            seen.setdefault(h["path"], None)
    return list(seen)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "query"


def unused(path: Path) -> Path:
    """`path`, or path with -1, -2, ... before its suffix: the first name nothing holds yet."""
    candidate, i = path, 0
    while candidate.exists() or candidate.is_symlink():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return candidate


def place(source: Path, dest: Path, link: bool) -> None:
    if link:
        os.symlink(source.resolve(), dest)  # fails rather than replace a file made meanwhile
        return
    with open(source, "rb") as src:
        atomic_write(dest, lambda f: shutil.copyfileobj(src, f))
