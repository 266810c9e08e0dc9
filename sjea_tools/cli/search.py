"""`sjea search`: the stored images nearest to query images, per level or hierarchically."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import console, err_console, handle_errors, print_json


@app.command()
@handle_errors
def search(
    queries: Optional[List[Path]] = typer.Argument(None, help="Query image files and/or folders of images."),
    ids: Optional[List[int]] = typer.Option(None, "--id", help="Also search with stored row N (repeatable)."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="The store to search [default: the newest "
                                         ".h5 in this folder]."),
    k: int = typer.Option(10, "--k", "-k", help="Results per query (clipped to the store's size)."),
    level: Optional[List[str]] = typer.Option(None, "--level", help="Search only these levels, each on its own "
                                              "(implies --mode per-level): repeatable, or 0,1, or all."),
    mode: Optional[str] = typer.Option(None, "--mode", help="per-level, hierarchical or both [default: "
                                       "hierarchical for 2+ levels]."),
    factor: float = typer.Option(10.0, "--factor", help="Hierarchical: candidates taken from the first level, "
                                 "as a multiple of k."),
    order: Optional[str] = typer.Option(None, "--order", help="Hierarchical: levels in the order they rank, "
                                        "e.g. 1,0 (candidates from 1, re-ranked by 0) [default: top level first, ..., 1,0: "
                                        "measured best on Fashion-MNIST, see docs/reproduction.md]."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a PNG: the query and its neighbours, one "
                                        "row per level and one for the hierarchical result."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Find the stored images nearest to QUERY images (or --id N), at each level or hierarchically."""
    from ..search import search_store

    level = level or None  # typer gives [] when --level is absent
    if grid is not None and mode is None and level is None:
        mode = "both"  # the grid shows a row per level and the hierarchical row
    res = search_store(store, queries=[str(q) for q in queries or []], ids=ids or [], k=k, mode=mode, level=level,
                       factor=factor, order=order)
    if grid is not None:
        from ..grid import search_grid

        search_grid(res, grid)
    if as_json:
        print_json(res)
        return
    for note in res["notes"]:
        err_console.print(f"note: {note}", highlight=False)
    print_tables(res)
    if grid is not None:
        console.print(f"grid written to {grid}", highlight=False)


def print_tables(res: dict) -> None:
    from rich.table import Table

    for r in res["results"]:
        for lv, hits in r.get("per_level", {}).items():
            t = Table(title=f"{r['query']}: level {lv}", title_justify="left")
            t.add_column("rank", justify="right")
            t.add_column("score", justify="right")
            t.add_column("path")
            for h in hits:
                t.add_row(str(h["rank"]), f"{h['score']:.4f}", h["path"])
            console.print(t)
        if "hierarchical" in r:
            cp = r.get("cluster_path")
            where = "" if cp is None else "  cluster path " + " > ".join(
                f"L{lv}:{c}" for lv, c in zip(res["levels"], cp))
            t = Table(title=f"{r['query']}: hierarchical {' > '.join(map(str, res['order']))} "
                            f"(x{res['factor']:g} candidates){where}", title_justify="left")
            t.add_column("rank", justify="right")
            for lv in res["levels"]:
                t.add_column(f"score L{lv}", justify="right")
            t.add_column("path")
            for h in r["hierarchical"]:
                t.add_row(str(h["rank"]), *(f"{h['scores'][str(lv)]:.4f}" for lv in res["levels"]), h["path"])
            console.print(t)
