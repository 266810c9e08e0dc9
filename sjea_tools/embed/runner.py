"""The whole job: plan -> decoded batches (reader) -> Embedder -> journal -> finished store (writer).

Rows are appended in scan order to the store's journal (sjea_tools.store), committed every few
seconds, so a killed run resumes exactly where it stopped; the finished store replaces OUT in one
rename (an --update writes only its new rows, as a new segment, and replaces the small top-level
file). Indexes and cluster trees are not built here: sjea_tools.pipeline chains those steps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..errors import SjeaError
from ..io import remove_stale_temp_files
from ..progress import ProgressFn, report
from ..store import (append_segment, disk_faults, format_shard, open_store, partial_path, remove_orphans,
                     shard_slice, write_store, writer_lock)
from ..store.guard import require_held
from ..store.removal import REMOVAL_ATTRS, record_file_stats, rewrite_rows
from .backends import Embedder
from .plan import Plan, plan_run
from .reader import decoded_batches, default_workers
from .request import EmbedRequest

PROGRESS_TASK = "embedding"


def embed_folder(images, out, *, progress: ProgressFn | None = None, embedder: Embedder | None = None,
                 **options) -> dict:
    """Embed every image under `images` (a folder, a text file of paths, or one image) into the HDF5
    store `out`, resuming an interrupted run of the same command. Returns a summary dict.

    The keyword form of embed_store: `options` are EmbedRequest's fields (run, onnx, levels,
    batch_size, workers, device, backend, dtype, normalize, shard, update, overwrite,
    commit_every_s, follow_symlinks, allow_outside); no index is built here whatever `index` says.
    progress("embedding", images done, total) after every batch (sjea_tools.progress).
    embedder: a model already loaded, used instead of the request's run/onnx/backend/device.
    """
    return embed_store(EmbedRequest(images, out, **options), progress, embedder)


def embed_store(request: EmbedRequest, progress: ProgressFn | None = None, embedder: Embedder | None = None) -> dict:
    """embed_held under the writer lock of request.out: the entry point of a run that is its own
    command (embed_folder, a torchrun rank's or a Ray task's shard)."""
    with writer_lock(request.out):
        return embed_held(request, progress, embedder)


def embed_held(request: EmbedRequest, progress: ProgressFn | None = None, embedder: Embedder | None = None) -> dict:
    """The embedding step of `request` (no index). The caller holds writer_lock(request.out), taken
    before the first byte (temp files, journal folder): one run per OUT at a time."""
    from ..data.datasets import find_images  # here: sjea_tools.data imports torch, a CPU query path never needs it

    t0 = time.perf_counter()
    r, out = request, request.out
    require_held(out)
    workers = _checked_target(out, r.workers)
    _check_not_an_input(out, r.images, r.run, r.onnx)
    root, scanned, refused = find_images(r.images, follow_symlinks=r.follow_symlinks, allow_outside=r.allow_outside)
    emb = embedder or _model(r)
    attrs = {**emb.store_attrs(), "dtype": r.dtype, "root": str(root), "input": str(r.images.resolve()),
             "scan_count": len(scanned), "shard": format_shard(r.shard)}
    with disk_faults(f"{out} or its unfinished run {partial_path(out)}"):
        remove_stale_temp_files(out)  # a killed final write's temporary file
        plan = plan_run(out, attrs, scanned[shard_slice(len(scanned), r.shard)], r.update, r.overwrite, root=root,
                        keep_missing=r.keep_missing)
        if plan.status != "run":
            remove_orphans(out)  # segment files of an update killed after its last rename
            if plan.sync is not None and not plan.sync.old_stats:
                _record_stats(out, plan)  # a store written before sizes and times were recorded
            with open_store(out) as s:
                return _summary(out, s.n, 0, 0, len(s.failed), 0, t0, emb, status=plan.status, sync=plan.sync)
        try:
            _stream(plan, root, emb, r.batch_size, workers, r.commit_every_s, progress, refused)
            added, failed_now = plan.journal.rows, plan.journal.failed
            _finish(out, attrs, plan)
        finally:
            plan.journal.close()  # after a failure the last commit stands; the next run resumes from it
        _record_stats(out, plan)
    with open_store(out) as s:
        return _summary(out, s.n, added, failed_now, len(s.failed), plan.resumed, t0, emb, status="written",
                        sync=plan.sync)


def _model(r: EmbedRequest) -> Embedder:
    """The request's model; for --update without --run/--onnx the model that wrote the store
    (never runs/LATEST, which a later training moves)."""
    if r.update and r.run is None and r.onnx is None and r.out.is_file():
        with open_store(r.out) as s:
            return Embedder.for_store(s, backend=r.backend, device=r.device)
    emb = Embedder.from_source(run=r.run, onnx=r.onnx, backend=r.backend, device=r.device, levels=r.levels,
                               normalize=r.normalize)
    return emb if r.whiten else emb.without_whitening()


def _record_stats(out: Path, plan: Plan) -> None:
    """Size and time of each row's file as found before it was read (kept missing rows: as recorded)."""
    old = plan.sync.old_stats if plan.sync is not None else {}
    record_file_stats(out, {**old, **plan.stats})


def _checked_target(out: Path, workers: int | None) -> int:
    """Refuse an OUT that is no file name (the request checked the values); returns the number of
    decode workers."""
    if out.is_dir():
        raise SjeaError(f"output {out} is a folder; give a file name such as {out / 'embeddings.h5'}.")
    if out.exists() and not out.is_file():
        raise SjeaError(f"output {out} exists and is not a regular file; choose another name.")
    return default_workers() if workers is None else workers


def _check_not_an_input(out: Path, images, run, onnx) -> None:
    """The output never replaces what the run reads: the image list, an image, the model."""
    if not out.exists():
        return
    inputs = [Path(images), *([Path(onnx)] if onnx else [])]
    if run is not None and Path(run).is_dir():
        inputs += [p for p in Path(run).iterdir() if p.is_file()]
    for p in inputs:
        if p.exists() and os.path.samefile(p, out):
            raise SjeaError(f"output {out} is also an input of this run ({p}); write the store to a new file.")


def _stream(plan: Plan, root: Path, emb: Embedder, batch_size: int, workers: int, commit_every_s: float,
            progress: ProgressFn | None, refused: dict[str, str]) -> None:
    """Decode workers -> backend -> journal, in scan order, committed every few seconds. Paths the
    scan refused (links out of the root) are recorded as failures, never read."""
    release_freed_buffers_promptly()
    journal = plan.journal
    done = plan.resumed
    report(progress, PROGRESS_TASK, done, plan.total)
    pin = emb.backend == "torch" and emb.device.startswith("cuda")
    skipped = [(p, refused[p]) for p in plan.todo if p in refused]
    todo = [p for p in plan.todo if p not in refused]
    try:
        if skipped:
            journal.append([], {}, skipped)
            done += len(skipped)
        for idx, pixels, errors in decoded_batches(root, todo, emb.image_size, batch_size, workers, pin):
            rows = dict(zip(emb.levels, emb.embed_pixels(pixels))) if idx else {}
            journal.append([todo[i] for i in idx], rows, [(todo[i], e) for i, e in errors])
            journal.commit(every_s=commit_every_s)
            done += len(idx) + len(errors)
            report(progress, PROGRESS_TASK, done, plan.total)
        journal.commit()
    except BaseException:
        journal.close()  # the last commit stands; the next run resumes from it
        raise


def _finish(out: Path, attrs: dict, plan: Plan) -> None:
    """The complete store (base rows, then the journal's) to a temporary file, renamed over OUT."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    journal = plan.journal
    if plan.base is None and journal.rows == 0:
        _refuse_empty(out, journal)
    final_attrs = {**attrs, "created": now, "run_token": journal.meta["token"]}
    if plan.base is None:
        write_store(out, final_attrs, [journal.iter_rows()], journal.failures(), total=journal.rows)
        remove_orphans(out)  # the segments of a store this run replaced (--overwrite)
    else:  # --update: only the new rows are written, as a new segment of the store (store.segments)
        with open_store(plan.base) as base:
            final_attrs.update(created=base.attrs.get("created", now), updated=now)
        if plan.sync.needed:  # first: a changed file's new row must not meet its old one
            rewrite_rows(out, plan.sync.drop, plan.sync.drop_failed,
                         plan.sync.label_names if plan.sync.relabel else None, {"updated": now})
        if journal.rows or journal.failed:
            with open_store(out) as s:  # what an index of an earlier version follows (store.removal)
                final_attrs.update({k: s.attrs[k] for k in REMOVAL_ATTRS if s.attrs.get(k) is not None})
            append_segment(out, final_attrs, journal.paths(), journal.iter_rows(), journal.failures())
    journal.remove()


def _refuse_empty(out: Path, journal) -> None:
    """No store of 0 rows: nothing could be searched or indexed; say why the images failed."""
    failures = journal.failures()
    journal.remove()
    first = f" (first: {failures[0][0]}: {failures[0][1]})" if failures else ""
    raise SjeaError(f"none of the {len(failures)} images could be embedded{first}, so {out} was not written; "
                    "check the files (empty, damaged or not images).")


def release_freed_buffers_promptly() -> None:
    """Keep RSS flat over long runs (measured: +350 MB over 8,000 images without this).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); afterwards
    the per-batch buffers (pixels, normalised inputs, outputs) come from the heap, and freed heap
    memory is rarely returned to the OS. A fixed 1 MiB threshold keeps such buffers mmapped, so
    freeing them returns the memory at once. Process-wide and harmless elsewhere; no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


def _summary(out: Path, rows: int, added: int, failed_now: int, failed_total: int, resumed: int, t0: float,
             emb: Embedder, status: str, sync=None) -> dict:
    seconds = time.perf_counter() - t0
    processed = added + failed_now - resumed
    changes = {}
    if sync is not None:  # --update: changed files re-embedded (counted in added), vanished ones removed
        changes = {"changed": len(sync.changed) if status == "written" else 0,
                   "removed": len(sync.vanished) if status == "written" else 0,
                   "removed_failed": len(sync.vanished_failed) if status == "written" else 0,
                   "failures_retried": len(sync.retried) if status == "written" else 0,
                   "kept_missing": sync.kept_missing, "labels_restored": sync.relabel and status == "written"}
    return {"out": str(out), "status": status, "rows": rows, "added": added, **changes, "failed": failed_now,
            "failed_total": failed_total, "resumed_from": resumed, "seconds": round(seconds, 3),
            "images_per_s": round(max(processed, 0) / seconds, 1) if seconds > 0 else None,
            "backend": emb.backend, "device": emb.device, "levels": emb.levels, "model_id": emb.model_id,
            "centred": emb.centred, "whitened": emb.whitenings is not None}
