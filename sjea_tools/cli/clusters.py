"""`sjea clusters`: the cluster tree of a store, with sizes and example paths."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import console, handle_errors, print_json


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
    from ..clusters import cluster_tree

    tree = cluster_tree(store, rebuild=rebuild, sizes=sizes, examples=examples)
    if as_json:
        print_json(tree)
        return
    print_tree(store, tree)


def print_tree(store: Path, tree: dict) -> None:
    from rich.markup import escape
    from rich.tree import Tree

    root = Tree(escape(f"{store}: {tree['n']} rows, levels {tree['levels']}, sizes {tree['sizes']}"
                       f"{' (built now)' if tree['built'] else ''}"))

    def add(parent, node, prefix: str) -> None:
        name = f"{prefix}{node['id']}"
        branch = parent.add(f"[bold]{name}[/] level {node['level']}: {node['size']} rows  "
                            f"[dim]{escape(', '.join(node['examples']))}[/]")
        for child in node.get("children", []):
            add(branch, child, f"{name}.")

    for node in tree["clusters"]:
        add(root, node, "")
    console.print(root, highlight=False)
