"""`sjea index`: one FAISS index per level beside a store, then its cluster tree (pipeline.index_store)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import json_option, console, handle_errors, plain, positive_int, print_json, rich_progress, quiet_option

KIND_HELP = "auto (chosen from rows, dimension and --memory-budget), flat (exact), hnsw, ivf-flat or ivf-pq."


@app.command()
@handle_errors
def index(
    store: Path = typer.Argument(..., help="The .h5 store written by 'sjea embed'."),
    kind: str = typer.Option("auto", "--kind", help=KIND_HELP),
    memory_budget: str = typer.Option("8G", "--memory-budget", help="Memory the index may use, e.g. 8G or 512M; "
                                      "auto picks a compressed index (ivf-pq) when the full vectors do not fit."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (ivf-flat, ivf-pq) \\[default: ~sqrt(rows)].",
                                        callback=positive_int),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists searched per query \\[default: tuned to "
                                         "recall@10 >= 0.95].", callback=positive_int),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="ivf-pq bytes per vector (must divide the dimension).",
                                       callback=positive_int),
    hnsw_m: Optional[int] = typer.Option(None, "--hnsw-m", help="HNSW neighbours per node \\[default: 32].",
                                         callback=positive_int),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW search breadth \\[default: tuned to "
                                            "recall@10 >= 0.95].", callback=positive_int),
    metric: str = typer.Option("cosine", "--metric", help="cosine (L2-normalised vectors, inner product) or "
                               "inner-product (raw vectors)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build every level from scratch, even where the existing "
                                 "index could grow by the added rows or is up to date."),
    no_clusters: bool = typer.Option(False, "--no-clusters", help="Skip building the cluster tree."),
    as_json: bool = json_option("the index description"),
    quiet: bool = quiet_option(),
) -> None:
    """Build one FAISS index per level beside STORE (STORE.index/), or grow it by the rows added since, measure
    recall@10, build the cluster tree."""
    from ..pipeline import index_store

    params = {"nlist": nlist, "nprobe": nprobe, "m": pq_m if kind == "ivf-pq" else hnsw_m, "ef_search": ef_search}
    with rich_progress(quiet or as_json) as progress:
        info = index_store(store, progress, clusters=not no_clusters, kind=kind, memory_budget=memory_budget,
                           params=params, metric=metric, rebuild=rebuild)
    if as_json:
        print_json(info)
        return
    for level, e in info["levels"].items():
        console.print(f"level {level}: {e.get('status', 'up to date')}: {describe(e)}", highlight=False, markup=False)
    if "clusters" in info:
        console.print(f"cluster tree: {' x '.join(map(str, info['clusters']))} (list it with: sjea clusters "
                      f"{plain(store)})", highlight=False, markup=False)
    kept = all(e.get("action") == "up to date" for e in info["levels"].values())
    console.print(f"index {'kept as it was' if kept else 'written'} in {plain(info['path'])}", highlight=False,
                  markup=False)


def describe(e: dict) -> str:
    """One level's index in words: kind, settings, measured recall, time of this run's work, size."""
    settings = ", ".join(f"{k}={v}" for k, v in {**e["params"], **e["search_params"]}.items())
    work = "" if e.get("action") == "up to date" else f", {e['build_seconds']:.1f}s"
    return (f"{e['kind']}{f' ({settings})' if settings else ''}, recall@10 {e['recall_at_10']:.3f} on "
            f"{e['recall_sample']} stored vectors{work}, {e['bytes'] / 1e6:.1f} MB")
