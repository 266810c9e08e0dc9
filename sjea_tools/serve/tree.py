"""The cluster tree as the page browses it: nodes by (depth, id) with example and member ids."""

from __future__ import annotations

import numpy as np

from ..errors import SjeaError


class NoTree(SjeaError):
    """The store has no (current) cluster tree (HTTP 404)."""


def tree_levels(tree: dict) -> list[int]:
    return [int(v) for v in np.atleast_1d(tree["attrs"]["levels"])]


def node_summary(tree: dict, depth: int, node: int) -> dict:
    depths = tree["assign"].shape[1]
    children = int(np.count_nonzero(tree[f"parent_{depth + 1}"] == node)) if depth + 1 < depths else 0
    return {"depth": depth, "id": node, "level": tree_levels(tree)[depth], "size": int(tree[f"size_{depth}"][node]),
            "examples": [int(r) for r in tree[f"examples_{depth}"][node] if r >= 0], "children": children}


def check_tree(tree: dict | None, note: str | None) -> dict:
    if tree is None:
        raise NoTree(note or "the store has no cluster tree")
    return tree


def cluster_roots(tree: dict | None, note: str | None) -> dict:
    """The depth-0 clusters, largest first."""
    tree = check_tree(tree, note)
    roots = [node_summary(tree, 0, i) for i in range(len(tree["size_0"]))]
    return {"levels": tree_levels(tree), "sizes": [int(s) for s in np.atleast_1d(tree["attrs"]["sizes"])],
            "clusters": sorted(roots, key=lambda r: -r["size"])}


def cluster_node(tree: dict | None, note: str | None, depth: int, node: int, offset: int, limit: int) -> dict:
    """One node: its parent, sub-clusters (largest first) and members[offset:offset+limit] (row order)."""
    tree = check_tree(tree, note)
    depths = tree["assign"].shape[1]
    if not 0 <= depth < depths:
        raise NoTree(f"the cluster tree has depths 0..{depths - 1}, not {depth}.")
    count = len(tree[f"size_{depth}"])
    if not 0 <= node < count:
        raise NoTree(f"depth {depth} of the cluster tree has clusters 0..{count - 1}, not {node}.")
    parent = int(tree[f"parent_{depth}"][node])
    kids = np.flatnonzero(tree[f"parent_{depth + 1}"] == node) if depth + 1 < depths else []
    members = np.flatnonzero(tree["assign"][:, depth] == node)
    path = [node]
    for d in range(depth, 0, -1):
        path.insert(0, int(tree[f"parent_{d}"][path[0]]))
    return {**node_summary(tree, depth, node), "parent": None if parent < 0 else parent, "path": path,
            "sub_clusters": sorted((node_summary(tree, depth + 1, int(j)) for j in kids), key=lambda r: -r["size"]),
            "members": [int(r) for r in members[offset:offset + limit]], "offset": offset, "total": len(members)}


TOP_LEVEL = "(top level)"


def top_folder(rel: str) -> str:
    """The first sub-folder of a stored path: what folder labels use as the class (a loose file at
    the root has none)."""
    head, sep, _ = rel.replace("\\", "/").partition("/")
    return head if sep else TOP_LEVEL


def cluster_names(tree: dict | None, note: str | None, paths: list[str]) -> dict:
    """Each node named by the folder most of its rows come from: {"depths": [[{"name", "count",
    "size"} per node] per depth]}, e.g. "cat" with count 12 of size 14."""
    tree = check_tree(tree, note)
    folders, codes = np.unique([top_folder(p) for p in paths], return_inverse=True)
    depths = []
    for d in range(tree["assign"].shape[1]):
        nodes = len(tree[f"size_{d}"])
        counts = np.bincount(tree["assign"][:, d] * len(folders) + codes,
                             minlength=nodes * len(folders)).reshape(nodes, len(folders))
        best = counts.argmax(axis=1)
        depths.append([{"name": str(folders[b]), "count": int(counts[i, b]), "size": int(counts[i].sum())}
                       for i, b in enumerate(best)])
    return {"depths": depths}
