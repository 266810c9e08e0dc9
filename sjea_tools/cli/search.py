"""`sjea index` (FAISS index per level), `sjea clusters` (the cluster tree), `sjea search`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import console, err_console, handle_errors, print_json

KIND_HELP = "auto (chosen from rows, dimension and --memory-budget), flat (exact), hnsw, ivf-flat or ivf-pq."


@app.command()
@handle_errors
def index(
    store: Path = typer.Argument(..., help="The .h5 store written by 'sjea embed'."),
    kind: str = typer.Option("auto", "--kind", help=KIND_HELP),
    memory_budget: str = typer.Option("8G", "--memory-budget", help="Memory the index may use, e.g. 8G or 512M; "
                                      "auto picks a compressed index (ivf-pq) when the full vectors do not fit."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (ivf-flat, ivf-pq) [default: ~sqrt(rows)]."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists searched per query [default: tuned to "
                                         "recall@10 >= 0.95]."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="ivf-pq bytes per vector (must divide the dimension)."),
    hnsw_m: Optional[int] = typer.Option(None, "--hnsw-m", help="HNSW neighbours per node [default: 32]."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW search breadth [default: tuned to "
                                            "recall@10 >= 0.95]."),
    metric: str = typer.Option("cosine", "--metric", help="cosine (L2-normalised vectors, inner product) or "
                               "inner-product (raw vectors)."),
    no_clusters: bool = typer.Option(False, "--no-clusters", help="Skip building the cluster tree."),
    as_json: bool = typer.Option(False, "--json", help="Print the index description as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build one FAISS index per level beside STORE (STORE.index/), measure recall@10, build the cluster tree."""
    from ..index import build_indexes

    params = {"nlist": nlist, "nprobe": nprobe, "m": pq_m if kind == "ivf-pq" else hnsw_m, "ef_search": ef_search}
    info = build_indexes(store, kind=kind, progress=not quiet and not as_json, memory_budget=memory_budget,
                         params=params, metric=metric, clusters=not no_clusters)
    if as_json:
        print_json(info)
        return
    for level, e in info["levels"].items():
        settings = ", ".join(f"{k}={v}" for k, v in {**e["params"], **e["search_params"]}.items())
        console.print(f"level {level}: {e['kind']}{f' ({settings})' if settings else ''}, recall@10 "
                      f"{e['recall_at_10']:.3f} on {e['recall_sample']} stored vectors, built in "
                      f"{e['build_seconds']:.1f}s, {e['bytes'] / 1e6:.1f} MB", highlight=False)
    if "clusters" in info:
        console.print(f"cluster tree: {' x '.join(map(str, info['clusters']))} (list it with: sjea clusters {store})",
                      highlight=False)
    console.print(f"index written to {info['path']}", highlight=False)


@app.command()
@handle_errors
def clusters(
    store: Path = typer.Argument(..., help="The .h5 store written by 'sjea embed'."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="Clusters at level 0, then sub-clusters per cluster "
                                        "at each next level, e.g. 10,4 (rebuilds) [default: from the row count]."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build the tree again even if the store has one."),
    examples: int = typer.Option(3, "--examples", help="Example paths shown per cluster (nearest the centre)."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as JSON."),
) -> None:
    """List the cluster tree of STORE with sizes and example paths (builds it when missing)."""
    from ..clusters import cluster_tree, parse_sizes
    from ..store import open_store

    with open_store(store) as s:
        depths = len(s.levels)
    tree = cluster_tree(store, rebuild=rebuild, sizes=parse_sizes(sizes, depths), examples=examples)
    if as_json:
        print_json(tree)
        return
    from rich.tree import Tree

    root = Tree(f"{store}: {tree['n']} rows, levels {tree['levels']}, sizes {tree['sizes']}"
                f"{' (built now)' if tree['built'] else ''}")

    def add(parent, node, prefix: str) -> None:
        name = f"{prefix}{node['id']}"
        branch = parent.add(f"[bold]{name}[/] level {node['level']}: {node['size']} rows  "
                            f"[dim]{', '.join(node['examples'])}[/]")
        for child in node.get("children", []):
            add(branch, child, f"{name}.")

    for node in tree["clusters"]:
        add(root, node, "")
    console.print(root, highlight=False)


@app.command()
@handle_errors
def search(
    queries: Optional[List[Path]] = typer.Argument(None, help="Query image files and/or folders of images."),
    ids: Optional[List[int]] = typer.Option(None, "--id", help="Also search with stored row N (repeatable)."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="The store to search [default: the newest "
                                         ".h5 in this folder]."),
    k: int = typer.Option(10, "--k", "-k", help="Results per query (clipped to the store's size)."),
    level: Optional[int] = typer.Option(None, "--level", help="Search only this level (implies --mode per-level)."),
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
    from ..errors import SjeaError
    from ..search import search_store

    order_list = None
    if order is not None:
        try:
            order_list = [int(v) for v in order.split(",") if v.strip()]
        except ValueError:
            raise SjeaError(f"--order {order!r} must be comma-separated level numbers, e.g. 0,1.") from None
    if grid is not None and mode is None and level is None:
        mode = "both"  # the grid shows a row per level and the hierarchical row
    res = search_store(store, queries=[str(q) for q in queries or []], ids=ids or [], k=k, mode=mode, level=level,
                       factor=factor, order=order_list)
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
