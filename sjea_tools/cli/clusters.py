"""`sjea clusters`: the cluster tree of a store, with sizes and example paths."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import json_option, console, handle_errors, markup_safe, positive_int, print_json


@app.command()
@handle_errors
def clusters(
    store: Path = typer.Argument(..., help="The .h5 store written by 'sjea embed'."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="Clusters at the coarse level, then sub-clusters per "
                                        "cluster at each next level, e.g. 10,4 (rebuilds) \\[default: from the row count]."),
    order: Optional[str] = typer.Option(None, "--order", help="Levels coarse first, e.g. 0,1 (rebuilds) \\[default: "
                                        "measured: the level whose clusters keep neighbourhoods best is coarse]."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build the tree again even if the store has one."),
    examples: int = typer.Option(3, "--examples", callback=positive_int, help="Example paths shown per cluster (nearest the centre)."),
    as_json: bool = json_option("the tree"),
) -> None:
    """List the cluster tree of STORE with sizes and example paths (builds it when missing)."""
    from ..clusters import cluster_tree

    tree = cluster_tree(store, rebuild=rebuild, sizes=sizes, examples=examples, order=order)
    if as_json:
        print_json(tree)
        return
    print_tree(store, tree)


def print_tree(store: Path, tree: dict) -> None:
    from rich.tree import Tree

    measured = ("" if tree.get("agreement") is None else
                f", coarse first as measured (neighbourhood agreement {tree['agreement']})")
    root = Tree(markup_safe(f"{store}: {tree['n']} rows, levels {tree['levels']}{measured}, sizes {tree['sizes']}"
                            f"{' (built now)' if tree['built'] else ''}"))

    def add(parent, node, prefix: str) -> None:
        name = f"{prefix}{node['id']}"
        branch = parent.add(f"[bold]{name}[/] level {node['level']}: {node['size']} rows  "
                            f"[dim]{', '.join(markup_safe(e) for e in node['examples'])}[/]")
        for child in node.get("children", []):
            add(branch, child, f"{name}.")

    for node in tree["clusters"]:
        add(root, node, "")
    console.print(root, highlight=False)
