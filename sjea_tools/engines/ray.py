"""`sjea embed --engine ray`: the shard flow of sjea_tools.pipeline as Ray tasks, on one machine or many.

    ray4 = RayOptions(partitions=4)
    embed_with_ray(EmbedRequest("photos/", "photos.h5", run="runs/tiny", engine="ray", ray=ray4))  # a local Ray
    embed_with_ray(EmbedRequest("/shared/photos", "/shared/photos.h5", engine="ray",
                                ray=RayOptions(partitions=64, address="head:6379")))
    with ray_session():                                   # one local Ray for several folders
        for name in ("a", "b"):
            embed_with_ray(EmbedRequest(name, f"{name}.h5", engine="ray", ray=RayOptions(partitions=2)))

The driver scans the images once (the order a plain run uses) to refuse bad input and size the
partitions before anything starts, checks that some node can run a task, and submits one Ray task
per partition. Task I embeds shard I/N (store.shard_slice of that same scan) into its own shard
store, pipeline.shard_path(OUT, (I, N)), with embed_store: the `--shard I/N` path, unchanged.
When every task is done the driver merges the shard stores into OUT (pipeline.merge_shards) and
indexes it as a plain run does.

Retries: Ray runs a task again when its worker process or node is lost (MAX_RETRIES). embed_store
resumes the shard's journal, so a retry redoes at most the last few seconds of work and never
writes a row twice; a shard store already finished is "complete" at once. A rerun of the whole
command resumes every partition the same way (give it the same --partitions).

Ray is imported here only, and only when a function of this module runs.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from ..embed import EmbedRequest, RayOptions
from ..errors import SjeaError
from ..pipeline import merge_shards, shard_path
from ..progress import ProgressFn, report
from ..store import StoreBusyError, format_shard, open_store, shard_slice, writer_lock

INSTALL_HINT = "pip install 'sjea-tools[ray]'"
PROGRESS_TASK = "partitions"
# A task whose worker process or node dies is run again this often; each retry resumes the journal.
MAX_RETRIES = 3
# Only task summaries (a few hundred bytes) pass through Ray's object store: the smallest store Ray
# accepts (75 MiB) leaves /dev/shm to the decode workers and whatever else runs on the machine.
LOCAL_OBJECT_STORE_BYTES = 80 << 20
# A cluster address that does not answer within this is refused; Ray itself retries for minutes.
CONNECT_TIMEOUT_S = 10.0


def import_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SjeaError(f"--engine ray needs Ray, which is not installed here; {INSTALL_HINT}") from None
    return ray


def embed_with_ray(request: EmbedRequest, progress: ProgressFn | None = None) -> dict:
    """Embed request.images into the store request.out as Ray tasks (shard stores beside OUT),
    merge them into OUT and index it unless request.index is False: the same store a plain run
    writes. OUT's writer lock is held from the first check to the index.

    request.ray (RayOptions): address None starts a local Ray for this call (and stops it after);
    "HOST:PORT" or "auto" joins an existing cluster, whose every node must see IMAGES, OUT's folder
    and the model at the same paths and have sjea-tools installed. A Ray already initialised in this
    process (ray_session, ray.init) is used as it is. partitions: default, as many tasks as the
    cluster runs at once. cpus_per_task: default 1. gpus_per_task: default 1 when the cluster has a
    GPU, else 0. request.workers: decode processes per task, default the task's CPUs minus one (its
    own process runs the model); device "auto" is the GPU Ray gives the task, else the CPU. The
    other fields are a plain run's; overwrite replaces the shard stores too (everything is embedded
    again). progress("partitions", finished, N) as tasks finish, then the merge and index steps' own.
    """
    if request.engine != "ray":
        raise ValueError("embed_with_ray runs a request whose engine is 'ray'")  # engines.run_embed chooses
    with writer_lock(request.out):
        return _embed_held(request, request.ray or RayOptions(), progress)


def _embed_held(request: EmbedRequest, opts: RayOptions, progress: ProgressFn | None) -> dict:
    t0 = time.perf_counter()
    cpus = float(opts.cpus_per_task or 1.0)
    gpus = None if opts.gpus_per_task is None else float(opts.gpus_per_task)
    ray = import_ray()
    images, out = request.images.resolve(), request.out.absolute()
    run, onnx = _model_paths(request.run, request.onnx)
    count = _scan_count(images, request.follow_symlinks, request.allow_outside)
    partitions = opts.partitions
    if partitions is not None and (not isinstance(partitions, int) or not 1 <= partitions <= count):
        raise SjeaError(f"--partitions must be a whole number from 1 to the {count} images found "
                        f"(got {partitions}).")
    _check_out(out, request.overwrite)
    with ray_session(opts.address, num_cpus=_local_cpus(cpus, partitions)) as where:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        gpus = gpus if gpus is not None else (1.0 if any(r.get("GPU", 0) >= 1 for r in nodes) else 0.0)
        _check_feasible(nodes, cpus, gpus)
        n = partitions or max(1, min(count, _task_slots(nodes, cpus, gpus)))
        # Each task runs the plain --shard I/N path: absolute paths (a worker's working folder is
        # not the driver's), "auto" as the GPU Ray gives the task (CUDA_VISIBLE_DEVICES) else the CPU.
        part = replace(request, images=images, out=out, run=run, onnx=onnx, engine="local", ray=None,
                       device=("cuda" if gpus > 0 else "cpu") if request.device == "auto" else request.device,
                       workers=max(0, int(cpus) - 1) if request.workers is None else request.workers)
        task = ray.remote(_embed_partition).options(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES,
                                                    retry_exceptions=False)
        parts = _run_tasks(ray, task, part, n, progress)
    merged = merge_shards(out, n, index=request.index, progress=progress, overwrite=request.overwrite)
    return _summary(out, merged, parts, n, count, where, cpus, gpus, t0)


def _embed_partition(request: EmbedRequest, shard: tuple[int, int]) -> dict:
    """One Ray task: shard I/N of the images into its own shard store, resuming its journal."""
    from ..embed import embed_store

    t0 = time.perf_counter()
    summary = embed_store(replace(request, out=shard_path(request.out, shard), shard=shard))
    return {**summary, "shard": format_shard(shard), "host": socket.gethostname(),
            "task_seconds": round(time.perf_counter() - t0, 3)}


def _model_paths(run, onnx):
    """Absolute paths for the tasks (a worker's working folder is not the driver's); the run folder
    is found here, so a missing model is one line before Ray starts."""
    if onnx is not None:
        return run, Path(onnx).resolve()
    from ..runs import find_run

    return find_run(run).resolve(), None


def _scan_count(images: Path, follow_symlinks: bool, allow_outside: bool) -> int:
    """How many images a plain run would embed (the scan every task repeats)."""
    from ..data.datasets import find_images  # imports torch: only once the engine is used

    return len(find_images(images, follow_symlinks=follow_symlinks, allow_outside=allow_outside)[1])


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an OUT the final merge would refuse: a folder, or an existing file
    that is not an earlier merge of shards (this command run before, killed while indexing, say)."""
    if out.is_dir():
        raise SjeaError(f"output {out} is a folder; give a file name such as {out / 'embeddings.h5'}.")
    if overwrite or not out.exists():
        return
    fix = "pass --overwrite to replace it, or write to another file."
    try:
        with open_store(out) as s:
            merged = bool(s.attrs.get("merged_from"))
    except StoreBusyError:
        raise
    except SjeaError:
        raise SjeaError(f"output {out} already exists and is not an sjea store; {fix}") from None
    if not merged:
        raise SjeaError(f"output {out} already exists; {fix} (--update, adding images, runs without --engine ray.)")


def _machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _local_cpus(cpus: float, partitions: int | None) -> int:
    """CPUs of a local Ray: what the partitions can use at once, at most this machine's (Ray starts
    one worker process per CPU up front, so fewer is a quicker start)."""
    want = _machine_cpus() if partitions is None else math.ceil(partitions * cpus)
    return max(1, min(_machine_cpus(), want))


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                num_gpus: int | None = None) -> Iterator[str]:
    """Ray ready for tasks: the one already initialised in this process (left running), the cluster
    at `address` ("HOST:PORT" or "auto"), or else a quiet local Ray of num_cpus CPUs (default: all
    of this machine's; num_gpus: default, the GPUs Ray finds) stopped on the way out. Yields where
    tasks run, in words. Hold one around several embed_with_ray calls to start Ray once."""
    ray = import_ray()
    if ray.is_initialized():
        yield "the Ray already running in this process"
        return
    if address:
        _check_reachable(address)
        kwargs = {"address": address}
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report to Ray's servers unless asked for
        num_cpus = num_cpus or _machine_cpus()
        kwargs = {"num_cpus": num_cpus, "num_gpus": num_gpus, "include_dashboard": False,
                  "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    try:
        ray.init(log_to_driver=False, logging_level=logging.ERROR, **kwargs)
    except (Exception, SystemExit) as e:  # Ray exits the process on some start failures: one line instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        raise SjeaError(f"could not {where} ({first}); check that Ray runs here ('ray start --head' on the "
                        "head node for a cluster), or embed without --engine ray.") from None
    try:
        yield address or f"local Ray, {num_cpus} CPUs"
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """One line at once when the head node does not answer, instead of Ray's minutes of retries."""
    if address == "auto":
        return  # Ray finds a cluster started on this machine, or fails at once
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SjeaError(f"--ray-address must be HOST:PORT of the Ray head node (e.g. 10.0.0.5:6379) or 'auto', "
                        f"not '{address}'.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SjeaError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); check the address "
                        "('ray start --head' prints it) and that this machine can reach the head node.") from None


def _check_feasible(nodes: list[dict], cpus: float, gpus: float) -> None:
    """A task no node can hold would wait forever: refuse it instead."""
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU + {r.get('GPU', 0):g} GPU" for r in nodes) or "none"
    raise SjeaError(f"no Ray node can run a task of {cpus:g} CPU + {gpus:g} GPU (nodes: {have}); lower "
                    "--ray-cpus / --ray-gpus or add such a node.")


def _task_slots(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many tasks the cluster runs at once."""
    def per_node(r: dict) -> int:
        fits = [math.floor(r.get("CPU", 0) / cpus)] + ([math.floor(r.get("GPU", 0) / gpus)] if gpus else [])
        return max(0, min(fits))

    return sum(per_node(r) for r in nodes)


def _run_tasks(ray, task, request: EmbedRequest, n: int, progress: ProgressFn | None) -> list[dict]:
    """Submit the N partitions, collect their summaries in shard order as they finish. On a failure
    or Ctrl-C the other tasks are cancelled; each keeps its last journal commit for the rerun."""
    refs = {task.remote(request, (i, n)): i for i in range(n)}
    pending, done = list(refs), {}
    report(progress, PROGRESS_TASK, 0, n)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            done[i] = _result(ray, ready[0], i, n)
            report(progress, PROGRESS_TASK, len(done), n)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    return [done[i] for i in range(n)]


def _result(ray, ref, i: int, n: int) -> dict:
    """A task's summary. Its SjeaError (or disk error) is raised here as the user's one line; a
    task lost more often than Ray retries is one line saying how to resume."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (SjeaError, OSError)):
            raise cause from None
        raise  # a bug: keep the task's own traceback, which Ray's error carries
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SjeaError(f"partition {i}/{n} was lost {MAX_RETRIES + 1} times ({type(e).__name__}: {first}); run "
                        "the same command again: finished partitions are kept and the others resume.") from None


def _summary(out: Path, merged: dict, parts: list[dict], n: int, count: int, where: str, cpus: float,
             gpus: float, t0: float) -> dict:
    """A plain run's summary keys (status, rows, added, failed, ...) plus where the work went."""
    seconds = time.perf_counter() - t0
    added, failed = sum(p["added"] for p in parts), sum(p["failed"] for p in parts)
    processed = added + failed - sum(p["resumed_from"] for p in parts)
    first = parts[0]
    return {"engine": "ray", "ray": where, "partitions": n, "cpus_per_task": cpus, "gpus_per_task": gpus,
            "out": str(out), "status": merged["status"], "rows": merged["rows"], "added": added, "failed": failed,
            "failed_total": merged["failed"], "seconds": round(seconds, 3),
            "images_per_s": round(max(processed, 0) / seconds, 1) if seconds > 0 else None,
            "backend": first["backend"], "device": first["device"], "levels": first["levels"],
            "model_id": first["model_id"], "shards": [str(shard_path(out, (i, n))) for i in range(n)],
            "parts": [{"shard": p["shard"], "images": len(range(count)[shard_slice(count, (i, n))]),
                       "status": p["status"], "rows": p["rows"], "added": p["added"], "failed": p["failed"],
                       "resumed_from": p["resumed_from"], "host": p["host"], "seconds": p["task_seconds"]}
                      for i, p in enumerate(parts)],
            "merged": {k: v for k, v in merged.items() if k != "index"}, "index": merged.get("index")}
