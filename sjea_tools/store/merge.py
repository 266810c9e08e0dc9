"""Shards: which block of the images shard I of N embeds, and merging the N stores into one."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import SjeaError
from ..progress import ProgressFn
from .reader import IDENTITY_ATTRS, Store, check_same_identity, open_store
from .writer import write_store


def parse_shard(spec) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N) to (I, N); None stays None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, (tuple, list)):
        i, n = (int(v) for v in spec)
    else:
        try:
            i, n = (int(v) for v in str(spec).split("/"))
        except ValueError:
            raise SjeaError(f"--shard must look like I/N, e.g. 0/4, not '{spec}'.") from None
    if n < 1 or not 0 <= i < n:
        raise SjeaError(f"--shard {i}/{n}: I must be between 0 and N-1 ({0}..{max(n - 1, 0)}) and N at least 1.")
    return i, n


def format_shard(shard: tuple[int, int] | None) -> str | None:
    """(I, N) as the 'I/N' a store records; None for a whole run."""
    return None if shard is None else f"{shard[0]}/{shard[1]}"


def shard_slice(count: int, shard: tuple[int, int] | None) -> slice:
    """The contiguous block of `count` items that shard I of N takes (sizes differ by at most one)."""
    if shard is None:
        return slice(0, count)
    i, n = shard
    return slice(i * count // n, (i + 1) * count // n)


def merge_stores(inputs: list[str | Path], out: str | Path, progress: ProgressFn | None = None) -> dict:
    """Combine the shards of one embedding run into the store a single run would have written.
    progress("merging", rows written, total rows) as the rows are copied."""
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise SjeaError("give the shard stores to merge, e.g. 'sjea merge out-*.h5 out.h5'.")
    if out.is_dir():
        raise SjeaError(f"output {out} is a folder; give a file name such as {out / 'embeddings.h5'}.")
    if any(p.resolve() == out.resolve() for p in inputs):
        raise SjeaError(f"output {out} is also one of the inputs; write the merged store to a new file.")
    stores = [open_store(p) for p in inputs]
    try:
        ordered = _shards_in_order(stores)
        attrs = {k: v for k, v in ordered[0].attrs.items() if k not in ("shard", "run_token", "format")}
        attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        attrs["merged_from"] = [str(s.path) for s in ordered]
        failures = [f for s in ordered for f in s.failed]
        rows = sum(s.n for s in ordered)
        write_store(out, attrs, [s.iter_rows() for s in ordered], failures, progress=progress, task="merging",
                    total=rows)
    finally:
        for s in stores:
            s.close()
    return {"out": str(out), "shards": len(ordered), "rows": rows, "failed": len(failures)}


def _shards_in_order(stores: list[Store]) -> list[Store]:
    """The stores sorted by shard index, after checking they are all N shards of one run."""
    by_index: dict[int, Store] = {}
    first = stores[0]
    total = None
    for s in stores:
        if not s.attrs.get("shard"):
            raise SjeaError(f"{s.path} is not a shard (it was written without --shard); merge only the files "
                            "'sjea embed --shard I/N' wrote.")
        i, n = parse_shard(s.attrs["shard"])
        # Shards may come from machines that mount the folder elsewhere: the root may differ.
        check_same_identity(first.attrs, s.attrs, str(s.path), "merge only shards of the same run.",
                            keys=[k for k in IDENTITY_ATTRS if k != "root"])
        if total is None:
            total = n
        elif n != total:
            raise SjeaError(f"{s.path} is shard {i}/{n} but {first.path} is one of {total}; merge shards of one run.")
        if s.attrs.get("scan_count") != first.attrs.get("scan_count"):
            raise SjeaError(f"{s.path} saw {s.attrs.get('scan_count')} images, {first.path} saw "
                            f"{first.attrs.get('scan_count')}: the shards scanned different folders.")
        if i in by_index:
            raise SjeaError(f"{s.path} and {by_index[i].path} are both shard {i}/{n}.")
        by_index[i] = s
    missing = sorted(set(range(total)) - set(by_index))
    if missing:
        raise SjeaError(f"shards {', '.join(f'{i}/{total}' for i in missing)} are missing; embed them with "
                        f"--shard and merge all {total}.")
    return [by_index[i] for i in range(total)]
