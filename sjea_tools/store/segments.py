"""Stores that grow without copying: immutable segment files behind one small top-level file.

An `--update`, a merge and an automatic compaction never rewrite stored rows. Rows live in segment
files, each a complete single-file store, in the folder `OUT.h5.segments/`; OUT.h5 itself is then
small: its HDF5 virtual datasets (VDS) present the segments, in order, as the documented layout
(/paths, /level_K/embeddings, /labels, /failed/...), so plain h5py and h5dump read it as before.
Segment names in the VDS are relative to OUT.h5's folder: the pair moves or copies as one.

Crash safety: a segment file is written whole (temporary file + rename) or hard-linked, and never
changed; the top-level file is replaced in one rename (io.atomic_path) after every segment it names
is on disk. A kill leaves the old top-level file with its segments, or the new one with its own;
segment files no top-level file names (a killed run's) are removed by the next write
(`remove_orphans`).

Labels: a segment's /labels index its own /label_names. The top-level /label_names are the sorted
classes of all rows, as a single run gives. A segment whose class names begin those is used as it
is; for any other (shards of a sorted folder, an update that brings a class sorting before the
existing ones) its labels, renumbered, are written once to a small file beside it (8 bytes a row).

"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..io import atomic_path, atomic_write_text, fsync_dir, remove_stale_temp_files
from ..progress import ProgressFn, report
from .guard import StoreBusyError, disk_faults, writer_lock
from .reader import FORMAT, Store, h5py_module, open_store, strings_sha256
from .sources import SEGMENTS_SUFFIX
from .writer import LIBVER, RowBlocks, existing_store_id, labels_of, new_fingerprint, write_store, write_text_dataset

# In each segments folder: the id of the store it serves (docs/store-format.md, "Store id").
OWNER_FILE = ".store-id"
# Virtual datasets need the HDF5 1.10 file format (h5dump and h5py of HDF5 >= 1.10 read it).
TOP_LIBVER = ("v110", "v110")
# After an --update that leaves more segments than this, the newest small ones are compacted.
AUTO_COMPACT_SEGMENTS = 32
# Root attributes a top-level file writes itself (never copied from another store's attributes).
OWN_ATTRS = ("segments", "history_fingerprints", "history_rows", "fingerprint", "format", "normalized", "store_id")


def segments_dir(out: str | Path) -> Path:
    """The folder of the segment files of the store `out`: OUT.h5.segments/ beside it."""
    out = Path(out)
    return out.with_name(out.name + SEGMENTS_SUFFIX)


# --- the three writers: update, merge, compaction --------------------------------------------

def append_segment(out: str | Path, attrs: dict, new_paths: list[str], rows: RowBlocks,
                   failures: list[tuple[str, str]], progress: ProgressFn | None = None) -> Path:
    """`--update`: the new rows (blocks in the order of `new_paths`) and failures become one new
    segment after the rows of the store at `out`; the store's own rows are not copied (an old
    single-file store becomes the first segment through a hard link). The caller holds the
    writer lock."""
    out = Path(out)
    remove_orphans(out)
    with _orphans_removed_on_error(out):
        segs = _append(out, attrs, list(new_paths), rows, list(failures), progress)
    if len(segs) > AUTO_COMPACT_SEGMENTS:
        compact_tail(out, tail_start(segs))
    return out


def _append(out: Path, attrs: dict, new_paths: list[str], rows: RowBlocks, failures: list[tuple[str, str]],
            progress: ProgressFn | None) -> list[dict]:
    with open_store(out) as base:
        store_id = base.store_id or new_fingerprint()
        claim_folder(out, store_id)
        segs = base.segments or [link_segment(out, out, 0, base)]
        paths, failed, history = base.paths + new_paths, base.failed + failures, base.history
        old_names = _class_names(base)
    _check_unique(paths, out)
    # Classes of all rows: new loose files alone have none, beside class folders they are ROOT_LABEL.
    names = _union_of_classes([old_names, labels_of(paths)[1] if new_paths else []])
    name, fingerprint = _new_segment_name(len(segs)), new_fingerprint()
    write_store(segments_dir(out) / name, attrs, [rows], failures, progress=progress, task="writing",
                total=len(new_paths), fingerprint=fingerprint, label_names=names, store_id=store_id)
    segs.append(_entry(out, name, len(new_paths), len(failures), fingerprint))
    publish(out, attrs, segs, paths, failed, names, history, store_id, keep_labels=old_names == names)
    remove_orphans(out)
    return segs


def add_stores(out: str | Path, attrs: dict, inputs: list[str | Path], progress: ProgressFn | None = None,
               task: str = "merging") -> Path:
    """`sjea merge`: the stores `inputs`, in order, become the segments of a new store at `out`
    (hard links: no row is copied; a copy only where the file system cannot link). The caller holds
    the writer lock. progress(task, rows added, total rows) per store."""
    out = Path(out)
    remove_orphans(out)
    store_id = existing_store_id(out) or new_fingerprint()
    claim_folder(out, store_id)
    with _orphans_removed_on_error(out):
        segs, paths, failed, classes = _link_stores(out, inputs, progress, task)
        _check_unique(paths, out)
        publish(out, attrs, segs, paths, failed, _union_of_classes(classes), [], store_id)
        remove_orphans(out)
    return out


def _link_stores(out: Path, inputs: list[str | Path], progress: ProgressFn | None, task: str):
    """(segment entries, paths, failures) of the stores `inputs` linked as segments of `out`."""
    stores = [open_store(p) for p in inputs]
    try:
        total = sum(s.n for s in stores)
        segs, paths, failed, classes = [], [], [], []
        for i, s in enumerate(stores):
            segs.append(link_segment(out, s.path, i, s))
            paths += s.paths
            failed += s.failed
            classes.append(_class_names(s))
            report(progress, task, len(paths), total)
    finally:
        for s in stores:
            s.close()
    return segs, paths, failed, classes


def _class_names(s: Store) -> list[str] | None:
    """A store's class names; [] for one without rows (it constrains nothing); None when its rows
    have no classes (then neither has any store they are part of)."""
    names = s.label_names
    return names if names is not None or s.n else []


def _union_of_classes(parts: list) -> list[str] | None:
    """The sorted class names of rows made of parts with these class names (None: no labels)."""
    if any(p is None for p in parts):
        return None
    union = sorted(set().union(*parts))
    return union or None


@contextmanager
def _orphans_removed_on_error(out: Path):
    """A writer that fails (full disk, bad input) takes its new segment files with it; a kill
    leaves them to the next writer's remove_orphans."""
    try:
        yield
    except BaseException:
        with suppress(OSError, SjeaError):
            remove_orphans(out)
        raise


def compact_store(out: str | Path, progress: ProgressFn | None = None) -> dict:
    """`sjea compact`: rewrite a store of several segments as one single file (its rows, order,
    fingerprint and derived groups such as the cluster tree unchanged, so its indexes stay
    current), then remove the segment files. progress("compacting", rows written, total)."""
    out = Path(out)
    with writer_lock(out), disk_faults(f"the compacted store {out}"):
        remove_stale_temp_files(out)
        with open_store(out) as s:
            segs, n, failed, store_id = s.segments, s.n, s.failed, s.store_id
            if segs:
                attrs = {k: v for k, v in s.attrs.items() if k not in ("segments", "fingerprint", "format")}
                write_store(out, attrs, [s.iter_rows()], failed, progress=progress, task="compacting", total=n,
                            fingerprint=s.fingerprint, keep_groups=s.derived_groups())
        removed = remove_orphans(out)
        for folder in {(out.parent / g["file"]).parent for g in segs or []} - {segments_dir(out)}:
            removed += _remove_unused(folder, store_id, set())  # a store renamed since its last write
    return {"out": str(out), "status": "compacted" if segs else "already one file", "segments": len(segs or [1]),
            "rows": n, "failed": len(failed), "removed_files": removed}


def compact_tail(out: Path, start: int) -> None:
    """Rewrite segments start.. of the store into one new segment (the automatic compaction of
    --update); the rows, their order and the fingerprint stay, the earlier segments are kept."""
    with open_store(out) as s:
        segs, history = s.segments, s.history
        first = sum(live_count(int(g["rows"]), g.get("live")) for g in segs[:start])
        first_failed = sum(live_count(int(g["failed"]), g.get("failed_live")) for g in segs[:start])
        paths, failed, names, fingerprint = s.paths, s.failed, s.label_names, s.fingerprint
        # `normalized` is one of OWN_ATTRS (publish writes it itself): carried, or the tail loses it.
        attrs = {**{k: v for k, v in s.attrs.items() if k not in OWN_ATTRS}, "normalized": s.normalized}
        name, seg_print, store_id = _new_segment_name(start), new_fingerprint(), s.store_id or new_fingerprint()
        claim_folder(out, store_id)
        write_store(segments_dir(out) / name, attrs, [s.iter_rows(first=first)], failed[first_failed:],
                    total=len(paths) - first, fingerprint=seg_print, label_names=names, store_id=store_id)
    segs = segs[:start] + [_entry(out, name, len(paths) - first, len(failed) - first_failed, seg_print)]
    publish(out, attrs, segs, paths, failed, names, history, store_id, fingerprint=fingerprint, keep_labels=True)
    remove_orphans(out)


def tail_start(segs: list[dict]) -> int:
    """The first segment of the newest run of small ones: the shortest suffix (of at least two)
    whose rows add up to at most the segment before it, so a compaction rewrites few rows."""
    rows = [int(g["rows"]) + int(g["failed"]) for g in segs]
    for start in range(1, len(rows) - 1):
        if sum(rows[start:]) <= rows[start - 1]:
            return start
    return len(rows) - 2


def remove_orphans(out: str | Path) -> int:
    """Delete the files in OUT.h5.segments/ that the store at OUT does not name (what a killed
    update, merge or compaction left); nothing when OUT cannot be read (never guess), and nothing
    of a folder that serves another store (OUT renamed with `mv`, a new store written under the
    old name: the folder's owner file says so). Returns how many were removed."""
    out = Path(out)
    folder = segments_dir(out)
    if not folder.is_dir():
        return 0
    keep = _named_files(out)
    if keep is None:
        return 0
    return _remove_unused(folder, existing_store_id(out), keep, named_by_store=bool(keep))


def _remove_unused(folder: Path, store_id: str | None, keep: set[str], named_by_store: bool = False) -> int:
    """Delete the files of `folder` outside `keep` (and the folder when nothing is kept), only when
    the folder serves the store `store_id` (or, written before owner files, the store naming files
    in it), and never a file another store beside it names."""
    if not folder.is_dir():
        return 0
    owner = folder_owner(folder)
    if not (owner == store_id if owner is not None else named_by_store or store_id is None):
        return 0
    doomed = [p for p in folder.iterdir() if p.name not in keep and p.name != OWNER_FILE
              and (p.is_file() or p.is_symlink())]
    if doomed:  # read the neighbours only when something would go
        keep = keep | _named_by_neighbours(folder)
    removed = 0
    for p in doomed:
        if p.name not in keep:
            p.unlink()
            removed += 1
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(folder.parent)
    return removed


def folder_owner(folder: Path) -> str | None:
    """The store id a segments folder records (None: no owner file, written before there were)."""
    try:
        return (folder / OWNER_FILE).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def claim_folder(out: Path, store_id: str) -> None:
    """Make OUT.h5.segments/ the folder of the store `store_id`, or refuse (one line, nothing
    written) when it serves another store: OUT was renamed with `mv` and its top-level file, under
    its new name, still reads from this folder."""
    folder = segments_dir(out)
    if not folder.is_dir():
        folder.mkdir()
        fsync_dir(folder.parent)
    owner = folder_owner(folder)
    if owner == store_id:
        return
    users = [p for p in _neighbours(folder) if p.resolve() != out.resolve()
             and ((owner and existing_store_id(p) == owner) or _named_by_neighbours(folder, [p]))]
    if not users:  # a killed run's, or written before owner files: adopted
        atomic_write_text(folder / OWNER_FILE, store_id + "\n")
        return
    user = users[0]
    raise SjeaError(f"{folder} holds the segments of another store, {user} (renamed from {out.name}?), not of "
                    f"{out}: writing here would lose its rows. Run 'sjea compact {user}' first (then it needs no "
                    f"folder), or write {out.name} under another name.")


def _neighbours(folder: Path) -> list[Path]:
    return [p for p in folder.parent.glob("*.h5") if p.is_file()]


def _named_by_neighbours(folder: Path, stores: list[Path] | None = None) -> set[str]:
    """Names in `folder` that any store file beside it (or of `stores`) names (a store renamed with
    `mv` keeps reading its segments under the old folder name): never orphans, whoever's folder."""
    names: set[str] = set()
    for p in _neighbours(folder) if stores is None else stores:
        try:
            with h5py_module().File(p, "r") as f:
                text = f.attrs.get("segments")
        except (OSError, KeyError, ValueError):
            continue
        try:
            segs = json.loads(text) if text else []
        except (TypeError, ValueError):
            continue
        names |= {Path(n).name for g in segs for n in (g.get("file"), g.get("labels"))
                  if n and Path(n).parent.name == folder.name}
    return names


# --- segments ---------------------------------------------------------------------------------

def _new_segment_name(index: int) -> str:
    # The number keeps `ls` in row order; the random part keeps a killed run's leftover from
    # ever being taken for a live segment.
    return f"{index:05d}-{uuid.uuid4().hex[:8]}.h5"


def _entry(out: Path, name: str, rows: int, failed: int, fingerprint: str, labels: str | None = None) -> dict:
    return {"file": f"{out.name}{SEGMENTS_SUFFIX}/{name}", "rows": int(rows), "failed": int(failed),
            "fingerprint": str(fingerprint), "labels": labels}


def link_segment(out: Path, source: Path, index: int, store: Store) -> dict:
    """The single-file store `source` as a new segment of `out`, hard-linked (its bytes are not
    copied; a later replacement of `source` by rename leaves the segment as it was)."""
    if store.segments:
        raise SjeaError(f"{source} is itself a store of several segments; compact it first "
                        f"(sjea compact {source}), then merge.")
    folder = segments_dir(out)
    name = _new_segment_name(index)
    try:
        os.link(source, folder / name)
    except OSError:  # a file system without hard links: a copy, written atomically
        with atomic_path(folder / name) as tmp:
            shutil.copyfile(source, tmp)
    fsync_dir(folder)
    return _entry(out, name, store.n, len(store.failed), store.fingerprint or new_fingerprint())


def _named_files(out: Path) -> set[str] | None:
    """Names (inside the segments folder) of the files the store at `out` uses; an empty set
    when there is no store; None when it cannot be read."""
    if not out.is_file():
        return set()
    try:
        with open_store(out) as s:
            segs = s.segments or []
    except StoreBusyError:
        raise
    except SjeaError:
        return None
    return {Path(name).name for g in segs for name in (g["file"], g.get("labels")) if name}


def _check_unique(paths: list[str], out: Path) -> None:
    if len(set(paths)) != len(paths):
        raise SjeaError(f"the rows for {out} name some images twice; the inputs overlap (merge each shard once).")


# --- the top-level file -----------------------------------------------------------------------

def publish(out: Path, attrs: dict, segs: list[dict], paths: list[str], failed: list[tuple[str, str]],
             names: list[str] | None, history: list[tuple[str, int]], store_id: str, fingerprint: str | None = None,
             keep_labels: bool = False) -> None:
    """Write the top-level file naming `segs` (whose rows are `paths`, `failed`) and rename it
    over `out`. history: the earlier versions whose rows these begin with (Store.history)."""
    fingerprint = fingerprint or new_fingerprint()
    if names is not None:
        _label_sources(out, segs, names, keep_labels)
    history = [h for h in history if h[0] != fingerprint] + [(fingerprint, len(paths))]
    h5py = h5py_module()
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w", libver=TOP_LIBVER) as f:
            _virtual_layout(f, attrs, segs, paths, failed, names is not None)
            if names is not None:
                write_text_dataset(f, "label_names", names)
            _root_attrs(f, attrs, segs, fingerprint, history)
            f.attrs["store_id"] = store_id


def _virtual_layout(f, attrs: dict, segs: list[dict], paths: list[str], failed: list[tuple[str, str]],
                    with_labels: bool) -> None:
    text = h5py_module().string_dtype("utf-8")
    rows = [(g["file"], int(g["rows"]), g.get("live")) for g in segs]
    ds = _virtual(f, "paths", [(file, "paths", n, live) for file, n, live in rows], (), text, None)
    ds.attrs["sha256"] = strings_sha256(paths)
    dtype = np.dtype(attrs["dtype"])
    for k, d in zip((int(k) for k in attrs["levels"]), (int(d) for d in attrs["dims"])):
        # NaN where a source cannot be read (HDF5 does not fail): `sjea verify` finds it.
        ds = _virtual(f, f"level_{k}/embeddings", [(file, f"level_{k}/embeddings", n, live) for file, n, live in rows],
                      (d,), dtype, np.nan)
        ds.attrs["level"] = k
    if with_labels:
        _virtual(f, "labels", [(g.get("labels") or g["file"], "labels", int(g["rows"]), g.get("live")) for g in segs],
                 (), np.int64, -1)
    f.create_group("failed")
    for key, values in (("paths", [p for p, _ in failed]), ("errors", [e for _, e in failed])):
        ds = _virtual(f, f"failed/{key}", [(g["file"], f"failed/{key}", int(g["failed"]), g.get("failed_live"))
                                           for g in segs], (), text, None)
        ds.attrs["sha256"] = strings_sha256(values)


def live_count(n: int, live: list | None) -> int:
    """Rows of a segment the store shows: its `n` rows, or those of its live ranges (store.removal)."""
    return n if live is None else sum(int(b) - int(a) for a, b in live)


def _virtual(f, name: str, sources: list[tuple[str, str, int, list | None]], tail: tuple, dtype, fill):
    """A virtual dataset: the datasets `sources` (file, dataset, rows, live ranges or None for all)
    one after another; a segment with rows removed is mapped range by range (store.removal)."""
    h5py = h5py_module()
    layout = h5py.VirtualLayout(shape=(sum(live_count(n, live) for _, _, n, live in sources), *tail), dtype=dtype)
    at = 0
    for file, dataset, n, live in sources:
        if not n:
            continue
        source = h5py.VirtualSource(file, dataset, shape=(n, *tail), dtype=dtype)
        for a, b in ([(0, n)] if live is None else live):
            layout[at:at + b - a] = source[a:b]
            at += b - a
    return f.create_virtual_dataset(name, layout, fillvalue=fill)


def _root_attrs(f, attrs: dict, segs: list[dict], fingerprint: str, history: list[tuple[str, int]]) -> None:
    for key, value in attrs.items():
        if value is not None and key not in OWN_ATTRS:
            f.attrs[key] = value
    f.attrs["normalized"] = np.uint8(bool(attrs.get("normalized")))  # as writer.write_store: no HDF5 enum
    f.attrs["segments"] = json.dumps(segs)
    f.attrs["history_fingerprints"] = [p for p, _ in history]
    f.attrs["history_rows"] = np.asarray([r for _, r in history], dtype=np.int64)
    f.attrs["fingerprint"] = fingerprint
    f.attrs["format"] = FORMAT


def _label_sources(out: Path, segs: list[dict], names: list[str], keep: bool) -> None:
    """Point each segment's entry at labels that index `names`: its own /labels when its class
    names begin `names`, else a small file of its labels renumbered (kept when `keep`: the names
    have not changed since it was written). Reads class names, never paths: cheap at any size."""
    index = {c: i for i, c in enumerate(names)}
    for g in segs:
        if not int(g["rows"]) or (keep and g.get("labels")):
            continue
        with h5py_module().File(out.parent / g["file"], "r") as f:
            given_later = "label_names" not in f and g.get("labels")  # by store.removal, names beside them
        with h5py_module().File(out.parent / (g["labels"] if given_later else g["file"]), "r") as f:
            own = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in f["label_names"][:]]
            if own == names[:len(own)] and not given_later:
                g["labels"] = None
            else:
                renumber = np.asarray([index[c] for c in own], dtype=np.int64)
                g["labels"] = write_labels_file(out, g, renumber[f["labels"][:]])


def write_labels_file(out: Path, seg: dict, labels: np.ndarray) -> str:
    name = f"{Path(seg['file']).stem}.labels-{uuid.uuid4().hex[:8]}.h5"
    with atomic_path(segments_dir(out) / name) as tmp, h5py_module().File(tmp, "w", libver=LIBVER) as f:
        f.create_dataset("labels", data=labels, chunks=(max(1, min(len(labels), 65536)),), fletcher32=True)
        f.attrs["segment_fingerprint"] = seg["fingerprint"]  # binds it to its segment (store.sources)
    return f"{out.name}{SEGMENTS_SUFFIX}/{name}"
