"""The cluster tree: k-means on the coarse level, then k-means inside each cluster on the next level, ...

Which level is coarse is measured when the tree is built (`coarse_order`, stored in the
attrs "levels" and "agreement"); `order` forces it.

Pure part (arrays in, arrays out): `default_sizes`, `build_tree`, `query_paths`.
Store part: `build_cluster_tree(store)` writes group "clusters" into the store; `cluster_tree(store)`
lists it (sizes, example paths) for `sjea clusters`.

The tree as arrays, for depth d (0 = the first level clustered):
    centroids_d (m_d, dim)  unit-length centroids (spherical k-means: clusters by cosine)
    parent_d    (m_d,)      the depth d-1 node each node sits in (-1 at depth 0)
    size_d      (m_d,)      rows in the node
    examples_d  (m_d, E)    rows nearest the centroid (-1 pads small nodes)
    assign      (n, depths) node id of every row at each depth
"""

from __future__ import annotations

import numpy as np

from .errors import SjeaError
from .vectors import l2_normalize

GROUP = "clusters"
MIN_POINTS_PER_CLUSTER = 5
EXAMPLES = 3
AGREEMENT_ROWS = 20_000  # rows the coarse-level measurement samples: cost stays flat for any store
AGREEMENT_K = 10


def default_sizes(n: int, depths: int) -> list[int]:
    """Clusters at depth 0, then sub-clusters per parent: about the cube root of the rows to split.

    10,000 rows -> 22 clusters of ~450 -> 8 sub-clusters each; 1,000,000 -> 64 -> 16.
    """
    sizes, rows = [], max(1, n)
    for d in range(depths):
        k = int(np.clip(round(rows ** (1 / 3)), 2, 64 if d == 0 else 16))
        sizes.append(k)
        rows = max(1, rows // k)
    return sizes


def parse_sizes(text, depths: int) -> list[int] | None:
    """--sizes: '10,4' or a list of ints -> one count per level (1 to `depths` of them); None stays None."""
    if text is None:
        return None
    try:
        sizes = [int(s) for s in (str(text).split(",") if isinstance(text, str) else text) if str(s).strip()]
    except ValueError:
        raise SjeaError(f"--sizes {text!r} must be comma-separated whole numbers, e.g. 10,4.") from None
    if not sizes or any(s < 1 for s in sizes) or len(sizes) > depths:
        raise SjeaError(f"--sizes {text!r} needs 1 to {depths} positive numbers (one per level), e.g. 10,4.")
    return sizes


def nearest(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> np.ndarray:
    """Index of the highest-cosine centroid for each row (rows and centroids unit length)."""
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), block):
        out[s:s + block] = np.argmax(x[s:s + block] @ centroids.T, axis=1)
    return out


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator, sample: int = 20_000) -> np.ndarray:
    """k-means++ seeds (cosine distance) from a sample: FAISS seeds at random, which often puts
    two seeds in one true cluster and none in another, a minimum that k-means never leaves."""
    xs = x[rng.choice(len(x), min(len(x), sample), replace=False)]
    seeds = [xs[rng.integers(len(xs))]]
    dist = np.maximum(0.0, 1.0 - xs @ seeds[0])
    for _ in range(1, k):
        p = dist / dist.sum() if dist.sum() > 0 else None
        seeds.append(xs[rng.choice(len(xs), p=p)])
        dist = np.minimum(dist, np.maximum(0.0, 1.0 - xs @ seeds[-1]))
    return np.stack(seeds).astype(np.float32)


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical FAISS k-means of unit rows x: (unit centroids (k', d), assignment (n,)); k' <= k
    for few rows (at least MIN_POINTS_PER_CLUSTER each) or when a centroid attracts no row.

    The project's one k-means: the cluster tree (`sjea clusters`) and the sub-clusters of
    `sjea plot` both call it, so the two agree on the same vectors and seed.
    """
    import faiss

    k = max(1, min(k, len(x) // MIN_POINTS_PER_CLUSTER))
    if k == 1:
        return l2_normalize(x.mean(axis=0, keepdims=True)), np.zeros(len(x), np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=MIN_POINTS_PER_CLUSTER, max_points_per_centroid=256)
    km.train(x, init_centroids=kmeans_pp_init(x, k, np.random.default_rng(seed)))
    centroids = l2_normalize(km.centroids)
    assign = nearest(x, centroids)
    used = np.unique(assign)  # drop centroids no row chose, keep ids dense
    remap = np.full(k, -1, np.int64)
    remap[used] = np.arange(len(used))
    return centroids[used], remap[assign]


def examples_of(x: np.ndarray, members: np.ndarray, centroid: np.ndarray, count: int) -> np.ndarray:
    """The `count` member rows nearest the centroid by cosine, most typical first (-1 pads)."""
    out = np.full(count, -1, np.int64)
    best = members[np.argsort(-(x[members] @ centroid), kind="stable")[:count]]
    out[:len(best)] = best
    return out


def neighbourhood_agreement(x: np.ndarray, assign: np.ndarray, k: int = AGREEMENT_K) -> float:
    """Mean fraction of each row's k nearest neighbours (cosine, excluding itself) in its own cluster."""
    import faiss  # exact inner-product search on the sample (unit rows: cosine)

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(np.ascontiguousarray(x, dtype=np.float32))
    _, ids = flat.search(np.ascontiguousarray(x, dtype=np.float32), k + 1)
    return float((assign[ids[:, 1:]] == assign[:, None]).mean())


def coarse_order(vectors: list[np.ndarray], clusters: int, seed: int = 0,
                 sample: int = AGREEMENT_ROWS) -> tuple[list[int], list[float]]:
    """(positions of `vectors` ordered coarse first, agreement of each position) on a seeded sample
    of rows, each level split into `clusters` k-means clusters. Ties keep the given order."""
    n = len(vectors[0])
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))
    agreement = []
    for x in vectors:
        unit = l2_normalize(np.asarray(x)[rows])
        _, assign = kmeans(unit, clusters, seed)
        agreement.append(round(neighbourhood_agreement(unit, assign), 4))
    order = sorted(range(len(vectors)), key=lambda i: -agreement[i])
    return order, agreement


def build_tree(levels: list[np.ndarray], sizes: list[int], seed: int = 0, examples: int = EXAMPLES) -> dict:
    """The tree over rows whose vectors at each depth are levels[d] (n, dim_d); sizes[d] per parent."""
    n = len(levels[0])
    tree: dict = {"assign": np.zeros((n, len(sizes)), np.int64)}
    parent_rows = [np.arange(n)]  # depth -1: one node holding everything
    for d, k in enumerate(sizes):
        x = l2_normalize(levels[d])
        cents, parent_ids, node_sizes, node_examples, children_rows = [], [], [], [], []
        for p, rows in enumerate(parent_rows):
            c, a = kmeans(x[rows], k, seed + d * 7919 + p)
            for j in range(len(c)):
                members = rows[a == j]
                tree["assign"][members, d] = len(cents)
                cents.append(c[j])
                parent_ids.append(p if d > 0 else -1)
                node_sizes.append(len(members))
                node_examples.append(examples_of(x, members, c[j], examples))
                children_rows.append(members)
        tree[f"centroids_{d}"] = np.stack(cents).astype(np.float32)
        tree[f"parent_{d}"] = np.array(parent_ids, np.int64)
        tree[f"size_{d}"] = np.array(node_sizes, np.int64)
        tree[f"examples_{d}"] = np.stack(node_examples)
        parent_rows = children_rows
    return tree


def query_paths(tree: dict, queries: list[np.ndarray]) -> np.ndarray:
    """(q, depths) node ids: nearest centroid at depth 0, then nearest among that node's children."""
    depths = tree["assign"].shape[1]
    q = len(queries[0])
    out = np.zeros((q, depths), np.int64)
    for d in range(depths):
        x = l2_normalize(queries[d])
        cents, parents = tree[f"centroids_{d}"], tree[f"parent_{d}"]
        for i in range(q):
            allowed = np.arange(len(cents)) if d == 0 else np.flatnonzero(parents == out[i, d - 1])
            out[i, d] = allowed[np.argmax(cents[allowed] @ x[i])]
    return out


# --------------------------------------------------------------------------------------------
# In the store


def build_cluster_tree(store_path, sizes: list[int] | None = None, seed: int = 0, order=None) -> dict:
    """Build the tree from the store's levels, coarse level first, and write it as group "clusters".

    `order` ('1,0' or [1, 0]) forces the levels' order; by default it is measured
    (`coarse_order`) and the measurement is stored with the tree (attrs "agreement").
    """
    from .levels import parse_levels
    from .store import open_store

    with open_store(store_path) as store:
        levels, n, model_id, fingerprint = store.levels, store.n, store.model_id, store.fingerprint
        if n == 0:
            raise SjeaError(f"{store_path} holds no embeddings yet; run sjea embed first.")
        vectors = {lv: store.read_embeddings(lv) for lv in levels}
    if order is not None:
        levels = parse_levels(order, levels, option="--order", ordered=True)
    sizes = sizes or default_sizes(n, len(levels))
    agreement = None
    if order is None and len(levels) > 1:
        pos, agreement = coarse_order([vectors[lv] for lv in levels], sizes[0], seed=seed)
        levels = [levels[p] for p in pos]
        agreement = [agreement[p] for p in pos]
    tree = build_tree([vectors[lv] for lv in levels[:len(sizes)]], sizes, seed=seed)
    attrs = {"sizes": sizes, "levels": levels[:len(sizes)], "n": n, "model_id": model_id, "seed": seed,
             "order": "measured" if agreement is not None else "given"}
    if fingerprint is not None:  # a rewrite with the same row count still makes this tree stale
        attrs["store_fingerprint"] = fingerprint
    if agreement is not None:
        attrs["agreement"] = agreement[:len(sizes)]
    with open_store(store_path, mode="a") as store:
        store.write_group(GROUP, tree, attrs)
    return {"sizes": sizes, "levels": attrs["levels"], "nodes": [len(tree[f"size_{d}"]) for d in range(len(sizes))],
            "agreement": attrs.get("agreement")}


def read_tree(store) -> tuple[dict | None, str | None]:
    """(tree arrays with attrs under "attrs", None) or (None, why not) for an open store."""
    got = store.read_group(GROUP)
    if got is None:
        return None, f"no cluster tree; build it with: sjea clusters {store.path} --rebuild"
    arrays, attrs = got
    if int(attrs.get("n", -1)) != store.n or attrs.get("model_id") != store.model_id:
        return None, (f"the cluster tree is stale (built for {attrs.get('n')} rows, the store has {store.n}); "
                      f"rebuild it with: sjea clusters {store.path} --rebuild")
    if store.fingerprint is not None and attrs.get("store_fingerprint", store.fingerprint) != store.fingerprint:
        return None, (f"the cluster tree is stale (built before the store's last write); rebuild it with: "
                      f"sjea clusters {store.path} --rebuild")
    arrays["attrs"] = attrs
    return arrays, None


def cluster_tree(store_path, rebuild: bool = False, sizes=None, examples: int = EXAMPLES, order=None) -> dict:
    """The tree as nested nodes with sizes and example paths; built first when missing, stale, asked
    for (`rebuild`) or given `sizes` ('10,4' or [10, 4]: clusters at the coarse level, sub-clusters
    per cluster) or `order` (levels coarse first, '0,1'; default measured)."""
    from .store import open_store

    with open_store(store_path) as store:
        tree, why = read_tree(store)
        sizes = parse_sizes(sizes, len(store.levels))
    built = False
    if rebuild or sizes is not None or order is not None or tree is None:
        build_cluster_tree(store_path, sizes=sizes, order=order)
        built = True
    with open_store(store_path) as store:
        tree, why = read_tree(store)
        if tree is None:
            raise SjeaError(why)
        paths = store.paths
        attrs = tree["attrs"]
        depths = len(attrs["sizes"]) if np.ndim(attrs["sizes"]) else 1
        levels = [int(v) for v in np.atleast_1d(attrs["levels"])]

        def node(d: int, i: int) -> dict:
            ex = [paths[r] for r in tree[f"examples_{d}"][i][:examples] if r >= 0]
            out = {"id": i, "level": levels[d], "size": int(tree[f"size_{d}"][i]), "examples": ex}
            if d + 1 < depths:
                kids = np.flatnonzero(tree[f"parent_{d + 1}"] == i)
                out["children"] = [node(d + 1, int(j)) for j in kids]
            return out

        roots = [node(0, i) for i in range(len(tree["size_0"]))]
        agreement = attrs.get("agreement")
        return {"store": str(store_path), "n": store.n, "levels": levels,
                "sizes": [int(s) for s in np.atleast_1d(attrs["sizes"])], "built": built,
                "order": str(attrs.get("order", "given")),
                "agreement": None if agreement is None else [float(a) for a in np.atleast_1d(agreement)],
                "clusters": roots}
