"""Shards: which block of the images shard I of N embeds, and merging the N stores into one (as
the segments of one store, store.segments)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import SjeaError
from ..io import remove_stale_temp_files
from ..progress import ProgressFn
from .guard import StoreBusyError, disk_faults, writer_lock
from .reader import IDENTITY_ATTRS, Store, check_same_identity, open_store
from .segments import add_stores, remove_orphans


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


def merge_stores(inputs: list[str | Path], out: str | Path, progress: ProgressFn | None = None,
                 overwrite: bool = False) -> dict:
    """Combine the shards of one embedding run into the store a single run would have written.
    An existing OUT is replaced only with `overwrite`, or when it is this same merge's earlier
    result (merged from these files); when those files have not changed since, nothing is
    rewritten (status "up to date"). The shard files become OUT's segments through hard links
    (store.segments): no row is copied. progress("merging", rows added, total rows) per shard."""
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    _check_paths(inputs, out)
    with writer_lock(out), disk_faults(f"the merged store {out}"):
        remove_stale_temp_files(out)  # what a killed merge into OUT left
        stores = [open_store(p) for p in inputs]
        try:
            ordered = _shards_in_order(stores)
            rows = sum(s.n for s in ordered)
            failures = [f for s in ordered for f in s.failed]
            status = _against_existing_output(out, ordered, overwrite)
            attrs, shard_files = _merged_attrs(ordered), [s.path for s in ordered]
        finally:
            for s in stores:
                s.close()
        if status == "write":  # the shards become the segments of OUT: no row is copied
            add_stores(out, attrs, shard_files, progress=progress, task="merging")
        else:
            remove_orphans(out)  # what a merge killed after its last rename left
    return {"out": str(out), "status": "written" if status == "write" else status, "shards": len(ordered),
            "rows": rows, "failed": len(failures)}


def _check_paths(inputs: list[Path], out: Path) -> None:
    if not inputs:
        raise SjeaError("give the shard stores to merge, e.g. 'sjea merge out-*.h5 out.h5'.")
    if out.is_dir():
        raise SjeaError(f"output {out} is a folder; give a file name such as {out / 'embeddings.h5'}.")
    if out.exists() and not out.is_file():
        raise SjeaError(f"output {out} exists and is not a regular file; choose another name.")
    for p in inputs:
        same = p.resolve() == out.resolve() or (out.exists() and p.exists() and os.path.samefile(p, out))
        if same:
            raise SjeaError(f"output {out} is also one of the inputs ({p}); write the merged store to a new file.")


def _merged_attrs(ordered: list[Store]) -> dict:
    attrs = {k: v for k, v in ordered[0].attrs.items() if k not in ("shard", "run_token", "format", "fingerprint")}
    attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    attrs["merged_from"] = [str(s.path.resolve()) for s in ordered]
    attrs["merged_fingerprints"] = [str(s.fingerprint) for s in ordered]
    return attrs


def _against_existing_output(out: Path, ordered: list[Store], overwrite: bool) -> str:
    """"write", or "up to date" when OUT is already this merge of these unchanged shards; any other
    existing file is refused without --overwrite (it would be destroyed)."""
    if not out.exists() or overwrite:
        return "write"
    fix = "pass --overwrite to replace it, or write the merged store to a new file."
    try:
        with open_store(out) as old:
            merged_from, prints = old.attrs.get("merged_from"), old.attrs.get("merged_fingerprints")
    except StoreBusyError:
        raise
    except SjeaError:
        raise SjeaError(f"output {out} already exists and is not an sjea store; {fix}") from None
    if not merged_from or [str(Path(p).resolve()) for p in merged_from] != [str(s.path.resolve()) for s in ordered]:
        raise SjeaError(f"output {out} already exists (a store that is not a merge of these shards); {fix}")
    if prints == [str(s.fingerprint) for s in ordered] and None not in [s.fingerprint for s in ordered]:
        return "up to date"
    return "write"  # the earlier result of this same merge, from shards rewritten since


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
