"""`sjea search`: the stored images nearest to query images, per level or hierarchically."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from ..search_request import SearchRequest
from .common import (json_option, any_finite, non_negative_int, console, err_console, handle_errors, literal, markup_safe, positive_int,
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
    within: str = typer.Option("score", "--within", help="Hierarchical: order inside the coarse cluster: score "
                               "(fine-level cosine) or groups (sub-cluster by sub-cluster, the query's own first)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", callback=any_finite, help="Leave out hits "
                                              "scoring below this cosine (-1 to 1; ranges in docs/search.md)."),
    factor: Optional[float] = typer.Option(None, "--factor", hidden=True, help="Removed (the old funnel)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a PNG: the query and its neighbours, one "
                                        "row per level and one for the hierarchical result."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Let --grid replace an existing file."),
    as_json: bool = json_option("the results"),
) -> None:
    """Find the stored images nearest to QUERY images (or --id N), at each level or hierarchically."""
    from ..errors import SjeaError

    if factor is not None:
        raise SjeaError("--factor is gone: hierarchical search now answers from the query's coarse cluster; "
                        "widen it with --probes N.")
    level = level or None  # typer gives [] when --level is absent
    if grid is not None:
        from ..grid import check_grid_target

        check_grid_target(grid, store, queries or [], overwrite)
        if mode is None and level is None:
            mode = "both"  # the grid shows a row per level and the hierarchical row
    res = run_search(SearchRequest(store, tuple(queries or ()), tuple(ids or ()), k=k, mode=mode, level=level,
                                   order=order, probes=probes, within=within, min_score=min_score))
    if grid is not None:
        from ..grid import search_grid

        search_grid(res, grid)
    if as_json:
        print_json(res)
        return
    for note in res["notes"]:
        err_console.print(f"note: {markup_safe(note)}", highlight=False)
    print_tables(res)
    if grid is not None:
        console.print(f"grid written to {markup_safe(grid)}", highlight=False)


def run_search(request: SearchRequest) -> dict:
    """The one place a SearchRequest meets search.search_store's current keyword signature (until
    search_store takes the request itself)."""
    from ..search import DEFAULT_WITHIN, search_store

    r = request
    return search_store(r.store, queries=list(r.queries), ids=list(r.ids), k=r.k, mode=r.mode, level=r.level,
                        order=r.order, probes=r.probes, within=r.within or DEFAULT_WITHIN, min_score=r.min_score)


def group_name(levels: list[int], nodes: list[int]) -> str:
    """A hit's (or query's) place in the cluster tree: 'L1:3 > L0:12' (level:node, coarse first)."""
    return " > ".join(f"L{lv}:{c}" for lv, c in zip(levels, nodes))


def print_tables(res: dict) -> None:
    from rich.table import Table

    for r in res["results"]:
        query = markup_safe(r["query"])
        for lv, hits in r.get("per_level", {}).items():
            t = Table(title=f"{query}: level {lv}", title_justify="left")
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
