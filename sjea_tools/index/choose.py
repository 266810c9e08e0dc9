"""Which index: the kind and parameters for n vectors within a memory budget (pure), and the
checks of the options that ask for one."""

from __future__ import annotations

import math

import numpy as np

from ..errors import SjeaError

KINDS = ("flat", "hnsw", "ivf-flat", "ivf-pq")
METRICS = ("cosine", "inner-product")
KIND_NAMES = {"flat": "Flat", "hnsw": "HNSW", "ivf-flat": "IVF", "ivf-pq": "IVF-PQ"}
# The search parameter a kind tunes (recall), and the option that sets each parameter.
SEARCH_PARAM = {"hnsw": "efSearch", "ivf-flat": "nprobe", "ivf-pq": "nprobe"}
OPTION_NAMES = {"nlist": "--nlist", "nprobe": "--nprobe", "m": "--pq-m/--hnsw-m", "nbits": "nbits",
                "ef_construction": "ef_construction", "ef_search": "--ef-search"}
GiB = 1 << 30
DEFAULT_MEMORY_BUDGET = 8 * GiB
# Exact search over 50,000 x 512 floats takes ~6 ms per query on 2 cores: fast enough, and exact.
FLAT_MAX_ROWS = 50_000
# HNSW (M=32) over 100,000 x 512 built in 27 s on 2 cores (0.995 recall@10 at efSearch 64); its
# build grows slightly faster than linearly, so 1,000,000 would take 5+ minutes: past 300,000
# rows IVF (trained on a sample) builds much faster for the same recall.
HNSW_MAX_ROWS = 300_000
HNSW_M = 32
# PQ codes only approximate the scores: search fetches this many times k and re-scores exactly.
PQ_RERANK = 4


def choose_index(n: int, dim: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """The index kind and parameters for n vectors of dimension dim within a memory budget.

    Returns {"kind", "params", "search_params", "estimated_bytes", "reason"}. Pure.
    """
    if n <= 0 or dim <= 0:
        raise SjeaError(f"cannot index {n} vectors of dimension {dim}; embed some images first.")
    raw = n * dim * 4
    if n <= FLAT_MAX_ROWS and raw <= memory_budget_bytes:
        return {"kind": "flat", "params": {}, "search_params": {}, "estimated_bytes": raw,
                "reason": f"{n} rows <= {FLAT_MAX_ROWS}: exact search is fast enough"}
    hnsw_bytes = raw + n * HNSW_M * 2 * 4 * 1.1  # base layer: 2M neighbour ids per vector
    if n <= HNSW_MAX_ROWS and hnsw_bytes <= memory_budget_bytes:
        return {"kind": "hnsw", "params": {"m": HNSW_M, "ef_construction": 40},
                "search_params": {"efSearch": 64}, "estimated_bytes": int(hnsw_bytes),
                "reason": f"{n} rows <= {HNSW_MAX_ROWS}: HNSW builds in about a minute on 2 cores"}
    nlist = ivf_lists(n)
    search = {"nprobe": max(1, nlist // 64)}
    ivf_bytes = raw + n * 8 + nlist * dim * 4  # vectors, their ids, the centroids
    if ivf_bytes <= memory_budget_bytes:
        why = "rows > HNSW limit" if n > HNSW_MAX_ROWS else "HNSW graph exceeds the memory budget"
        return {"kind": "ivf-flat", "params": {"nlist": nlist}, "search_params": search,
                "estimated_bytes": ivf_bytes, "reason": f"{why}; the full vectors fit the budget"}
    for m in pq_subquantizers(dim):
        pq_bytes = n * (m + 8) + nlist * dim * 4 + 256 * dim * 4
        if pq_bytes <= memory_budget_bytes:
            return {"kind": "ivf-pq", "params": {"nlist": nlist, "m": m, "nbits": 8 if n >= 256 * 39 else 4},
                    "search_params": search, "estimated_bytes": pq_bytes, "rerank": PQ_RERANK,
                    "reason": f"full vectors ({raw / GiB:.1f} GiB) exceed the memory budget "
                              f"({memory_budget_bytes / GiB:.1f} GiB): compressed to {m} bytes each"}
    raise SjeaError(f"{n} vectors of dimension {dim} do not fit a memory budget of "
                    f"{memory_budget_bytes / GiB:.2f} GiB even compressed; raise --memory-budget.")


def ivf_lists(n: int) -> int:
    """Number of IVF lists: the power of two nearest sqrt(n), with >= 39 training points each."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(nlist, n // 39)))


def pq_subquantizers(dim: int) -> list[int]:
    """PQ code sizes in bytes, largest first: dim/4 (best recall) down to dim/32, dividing dim."""
    return [m for m in (dim // 4, dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0]


def explicit_spec(kind: str, n: int, dim: int, **params) -> dict:
    """A spec for a forced kind; unset parameters get the same defaults choose_index uses."""
    if kind not in KINDS:
        raise SjeaError(f"unknown index kind {kind!r}; choose one of auto, {', '.join(KINDS)}.")
    params = {k: v for k, v in params.items() if v is not None}
    search: dict = {}
    if kind == "hnsw":
        ef_search = params.pop("ef_search", 64)
        params = {"m": params.get("m", HNSW_M), "ef_construction": params.get("ef_construction", 40)}
        search = {"efSearch": ef_search}
    elif kind in ("ivf-flat", "ivf-pq"):
        nlist = int(params.get("nlist", ivf_lists(n)))
        if nlist < 1 or nlist > n:
            raise SjeaError(f"--nlist {nlist} must be between 1 and the number of rows ({n}).")
        search = {"nprobe": int(params.get("nprobe", max(1, nlist // 64)))}
        out = {"nlist": nlist}
        if kind == "ivf-pq":
            m = int(params.get("m", pq_subquantizers(dim)[0]))
            if dim % m:
                raise SjeaError(f"--pq-m {m} must divide the dimension {dim}.")
            out.update(m=m, nbits=int(params.get("nbits", 8 if n >= 256 * 39 else 4)))
        params = out
    else:
        params = {}
    return {"kind": kind, "params": params, "search_params": search, "estimated_bytes": None,
            "reason": "forced with --kind", "rerank": PQ_RERANK if kind == "ivf-pq" else 1}


def factory_string(spec: dict) -> str:
    """The spec as a faiss.index_factory string."""
    p = spec["params"]
    return {"flat": lambda: "Flat",
            "hnsw": lambda: f"HNSW{p['m']}",
            "ivf-flat": lambda: f"IVF{p['nlist']},Flat",
            "ivf-pq": lambda: f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}"}[spec["kind"]]()


def parse_memory(text: str | int | None) -> int:
    """'8G', '512M', '2.5GiB' or a byte count -> bytes."""
    if text is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(text, int):
        if text <= 0:
            raise SjeaError(f"memory budget {text} must be positive.")
        return text
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:] if s else "", 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise SjeaError(f"memory budget {text!r} is not a size; write e.g. 8G or 512M.") from None
    if not math.isfinite(value):
        raise SjeaError(f"memory budget {text!r} is not a finite size; write e.g. 8G or 512M.")
    if value <= 0:
        raise SjeaError(f"memory budget {text!r} must be positive.")
    return int(value)


def check_build_options(kind: str, metric: str, params: dict | None, sample: int) -> None:
    """Refuse unknown kinds and metrics, and index parameters that are not whole numbers >= 1."""
    if metric not in METRICS:
        raise SjeaError(f"unknown metric {metric!r}; choose cosine or inner-product.")
    if kind != "auto" and kind not in KINDS:
        raise SjeaError(f"unknown index kind {kind!r}; choose one of auto, {', '.join(KINDS)}.")
    for key, value in {**(params or {}), "sample": sample}.items():
        if value is None:
            continue
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
        if not ok:
            raise SjeaError(f"{OPTION_NAMES.get(key, key)} must be a whole number >= 1, not {value!r}.")


def wanted_spec(n: int, dim: int, request: dict) -> dict:
    if request["kind"] == "auto":
        return choose_index(n, dim, request["budget"])
    return explicit_spec(request["kind"], n, dim, **request["params"])

