"""`sjea search`: the stored images nearest to query images, per level or hierarchically."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from ..search_request import SearchRequest
from .common import (grid_option, number_check, overwrite_option, json_option, any_finite, non_negative_int, console, err_console, handle_errors, literal, markup_safe, positive_int,
                     print_json)


@app.command()
@handle_errors
def search(
    queries: Optional[List[Path]] = typer.Argument(None, help="Query image files and/or folders of images."),
    ids: Optional[List[int]] = typer.Option(None, "--id", help="Also search with stored row N (repeatable).",
                                        callback=non_negative_int),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="The store to search \\[default: the newest "
                                         ".h5 in this folder]."),
    k: int = typer.Option(10, "--k", "-k", callback=positive_int, help="Results per query (clipped to the store's size)."),
    level: Optional[List[str]] = typer.Option(None, "--level", help="Search only these levels, each on its own "
                                              "(implies --mode per-level): repeatable, or 0,1, or all."),
    mode: Optional[str] = typer.Option(None, "--mode", help="per-level, hierarchical or both \\[default: "
                                       "per-level, the mode that measured best: docs/search.md]."),
    order: Optional[str] = typer.Option(None, "--order", help="Hierarchical: the levels coarse first, e.g. 1,0; "
                                        "must match the store's cluster tree \\[default: the tree's, measured]."),
    probes: int = typer.Option(1, "--probes", callback=positive_int, help="Hierarchical: coarse clusters the "
                               "answer may come from (nearest first; widened until they hold k rows)."),
    margin: float = typer.Option(0.0, "--margin", callback=number_check(0, 2, rule="a cosine difference from 0 to 2"), help="Hierarchical: also search every "
                                 "coarse cluster whose centroid cosine is within this of the nearest's (soft gate; "
                                 "0 to 2) \\[default: 0, the hard gate]."),
    within: str = typer.Option("score", "--within", help="Hierarchical: order inside the coarse cluster: score "
                               "(fine-level cosine) or groups (sub-cluster by sub-cluster, the query's own first)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", callback=any_finite, help="Leave out hits "
                                              "scoring below this cosine (-1 to 1; ranges in docs/search.md)."),
    where: Optional[List[str]] = typer.Option(None, "--where", help="Only hits where folder=F (F and below), "
                                              "label=NAME or path=GLOB (fnmatch on the stored path); "
                                              "repeatable, all must hold."),
    exclude_same_folder: bool = typer.Option(False, "--exclude-same-folder", help="Leave out hits in the "
                                             "query's own folder."),
    fmt: Optional[str] = typer.Option(None, "--format", help="What stdout shows: table, json, jsonl or csv (one "
                                      "line per hit) \\[default: table]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results to FILE: .csv, .jsonl (one "
                                       "line per hit) or .json."),
    overwrite: bool = overwrite_option("Let --grid and --out replace an existing file."),
    copy_to: Optional[Path] = typer.Option(None, "--copy-to", help="Copy the hit files into this folder (one "
                                           "sub-folder per query when several); never over an existing file."),
    link: bool = typer.Option(False, "--link", help="With --copy-to: symbolic links instead of copies."),
    grid: Optional[Path] = grid_option("Also write a PNG: the query and its neighbours, one "
                                        "row per level and one for the hierarchical result."),
    as_json: bool = json_option("the results (= --format json)"),
) -> None:
    """Find the stored images nearest to QUERY images (or --id N), at each level or hierarchically."""
    fmt = output_format(fmt, as_json)
    out_fmt = check_outputs(out, overwrite, copy_to, link)
    level = level or None  # typer gives [] when --level is absent
    if grid is not None:
        from ..grid import check_grid_target

        check_grid_target(grid, store, queries or [], overwrite)
        if mode is None and level is None:
            mode = "both"  # the grid shows a row per level and the hierarchical row
    request = SearchRequest(store, tuple(queries or ()), tuple(ids or ()), k=k, mode=mode, level=level,
                            order=order, probes=probes, margin=margin, within=within, min_score=min_score,
                            where=tuple(where or ()), exclude_same_folder=exclude_same_folder)
    request.row_filter()  # bad --where syntax: refused before the store is opened
    res = run_search(request)
    if grid is not None:
        from ..grid import search_grid

        search_grid(res, grid)
    written = write_outputs(res, out, out_fmt, copy_to, link)
    show(res, fmt)
    # where the outputs went: on stdout after a table, on stderr when stdout is machine-readable
    said = console if fmt == "table" else err_console
    for line in ([f"grid written to {grid}"] if grid is not None else []) + written:
        said.print(markup_safe(line), highlight=False)


FORMATS = ("table", "json", "jsonl", "csv")
OUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}


def output_format(fmt: str | None, as_json: bool) -> str:
    from ..errors import SjeaError

    if fmt is not None and fmt not in FORMATS:
        raise SjeaError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    if as_json and fmt not in (None, "json"):
        raise SjeaError(f"--json is --format json; pass one of them, not --json with --format {fmt}.")
    return "json" if as_json else fmt or "table"


def check_outputs(out: Path | None, overwrite: bool, copy_to: Path | None, link: bool) -> str | None:
    """The --out file's format (None without --out); refused before searching when it cannot be written."""
    from ..errors import SjeaError

    if link and copy_to is None:
        raise SjeaError("--link makes --copy-to write symbolic links; pass --copy-to DIR too.")
    if copy_to is not None and copy_to.exists() and not copy_to.is_dir():
        raise SjeaError(f"--copy-to {copy_to} is a file; pass a folder (it is created if missing).")
    if out is None:
        return None
    out_fmt = OUT_SUFFIXES.get(out.suffix.lower())
    if out_fmt is None:
        raise SjeaError(f"--out {out}: name a .csv, .jsonl or .json file (the suffix picks the format).")
    if out.is_dir() or (out.exists() and not overwrite):
        raise SjeaError(f"--out {out} already exists; choose another name or pass --overwrite.")
    if out.suffix.lower() in (".h5", ".hdf5"):
        raise SjeaError(f"--out {out} would replace a store; choose another name.")
    return out_fmt


def write_outputs(res: dict, out: Path | None, out_fmt: str | None, copy_to: Path | None, link: bool) -> list[str]:
    """--out and --copy-to written; a line saying where each went."""
    from ..io import atomic_write_text
    from ..search_export import copy_hits, hit_rows, rows_text

    lines = []
    if out is not None:
        atomic_write_text(out, json.dumps(res, indent=2, default=str) + "\n" if out_fmt == "json"
                          else rows_text(hit_rows(res), out_fmt))
        lines.append(f"results written to {out}")
    if copy_to is not None:
        placed = copy_hits(res, copy_to, link)
        lines.append(f"{len(placed)} hit file(s) {'linked' if link else 'copied'} into {copy_to}")
    return lines


def show(res: dict, fmt: str) -> None:
    from ..search_export import hit_rows, rows_text

    if fmt == "json":
        print_json(res)
        return
    if fmt in ("csv", "jsonl"):
        sys.stdout.write(rows_text(hit_rows(res), fmt))
        sys.stdout.flush()
        return
    for note in res["notes"]:
        err_console.print(f"note: {markup_safe(note)}", highlight=False)
    print_tables(res)


def run_search(request: SearchRequest) -> dict:
    """The one place a SearchRequest meets search.search_store's current keyword signature (until
    search_store takes the request itself)."""
    from ..search import DEFAULT_WITHIN, search_store

    r = request
    return search_store(r.store, queries=list(r.queries), ids=list(r.ids), k=r.k, mode=r.mode, level=r.level,
                        order=r.order, probes=r.probes, within=r.within or DEFAULT_WITHIN, min_score=r.min_score,
                        row_filter=r.row_filter(), margin=r.margin)


def group_name(levels: list[int], nodes: list[int]) -> str:
    """A hit's (or query's) place in the cluster tree: 'L1:3 > L0:12' (level:node, coarse first)."""
    return " > ".join(f"L{lv}:{c}" for lv, c in zip(levels, nodes))


def print_tables(res: dict) -> None:
    from rich.table import Table

    for r in res["results"]:
        query = markup_safe(r["query"])
        for lv, hits in r.get("per_level", {}).items():
            t = Table(title=f"{query}: level {lv}", title_justify="left", caption=f"score: {res['metric']}",
                      caption_justify="left")
            t.add_column("rank", justify="right")
            t.add_column("score", justify="right")
            t.add_column("path")
            for h in hits:
                t.add_row(str(h["rank"]), f"{h['score']:.4f}", literal(h["path"]))
            console.print(t, highlight=False)
        if "hierarchical" in r:
            print_hierarchical(res, r, query)


def print_hierarchical(res: dict, r: dict, query: str) -> None:
    """One table, a section per group (the hit's cluster and sub-cluster), in result order."""
    from rich.table import Table

    order, gate = res["order"], r["gate"]
    t = Table(title=f"{query}: hierarchical {' > '.join(map(str, order))}, query in {group_name(order, r['cluster_path'])}; "
                    f"answer from cluster(s) {', '.join(f'L{order[0]}:{c}' for c in gate['clusters'])} "
                    f"({gate['rows']} rows), ranked by {res['within']}", title_justify="left")
    t.add_column("rank", justify="right")
    t.add_column("group")
    for lv in res["levels"]:
        t.add_column(f"score L{lv}", justify="right")
    t.add_column("path")
    previous = None
    for h in r["hierarchical"]:
        if previous is not None and h["group"] != previous:
            t.add_section()
        previous = h["group"]
        t.add_row(str(h["rank"]), group_name(order, h["group"]), *(f"{h['scores'][str(lv)]:.4f}" for lv in res["levels"]),
                  literal(h["path"]))
    console.print(t, highlight=False)
