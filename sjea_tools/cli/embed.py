"""`sjea embed`: folder -> HDF5 store (resumable), then search indexes: an EmbedRequest run by
sjea_tools.engines.run_embed (this process, torchrun ranks, or Ray tasks with --engine ray)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import ProgressColumn
from rich.text import Text

from . import app
from .common import (run_option, overwrite_option, device_option, no_index_option, quiet_option, json_option, console, handle_errors, non_negative_float, non_negative_int, plain, positive_float,
                     positive_int, print_json, rich_progress)

EMBED_TASK = "embedding"  # sjea_tools.embed.runner.PROGRESS_TASK, the task this column rates


class RateColumn(ProgressColumn):
    """Images per second of the embedding bar (the index bars count vectors, not images)."""

    def render(self, task) -> Text:
        if task.description != EMBED_TASK:
            return Text("")
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} img/s" if speed else "-- img/s", style="dim")


def print_index_line(summary: dict) -> None:
    """The line naming the search indexes a command built (shared with `sjea merge`)."""
    if isinstance(summary.get("index"), dict) and summary["index"].get("path"):
        console.print(f"search indexes: {plain(summary['index']['path'])}", highlight=False, markup=False,
                      soft_wrap=True)


# Long only by its option declarations, one per option (Typer reads them from the signature);
# the body is 16 lines.
@app.command()
@handle_errors
def embed(
    images: Path = typer.Argument(..., help="Folder of images (scanned recursively; jpg, jpeg, png, bmp, gif, tif, "
                                  "tiff, webp), or a text file listing image paths (one per line, relative to the "
                                  "file's folder)."),
    out: Path = typer.Argument(..., help="HDF5 store to write, e.g. photos.h5. An interrupted run of the same "
                               "command resumes from OUT.h5.partial/."),
    run: Optional[Path] = run_option("Run folder of the model (default: the latest "
                                       "run, runs/LATEST)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Use an exported ONNX file instead of a run folder "
                                        "(no checkpoint needed)."),
    level: Optional[List[str]] = typer.Option(None, "--level", "-l", help="Levels to store: 'all' (default), "
                                              "K, or 0,1; repeatable (computed in one pass)."),
    levels_old: Optional[str] = typer.Option(None, "--levels", help="Same as --level (old spelling, removed in "
                                             "the next release)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per inference batch.",
                                   callback=positive_int),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Decoding processes (default: CPU cores, "
                                          "at most 8); 0 decodes in the main process.", callback=non_negative_int),
    device: str = device_option("auto", "auto (GPU if one is visible), cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime on CPU, PyTorch on GPU: the faster "
                                "one, measured), torch or onnx. A run is exported to ONNX on the fly and cached."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage type of embeddings: float32 or float16."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise rows (recorded in the "
                                   "store; search uses cosine = dot product)."),
    whiten: bool = typer.Option(True, "--whiten/--no-whiten", help="Whiten rows with the model's matrix when it "
                                "has one (spread scores, better k-NN; docs/search.md, \"Scores\"). --no-whiten "
                                "stores centred rows: crowded scores, but approximate indexes reach their recall "
                                "with fewer probes at millions of rows (docs/search.md, 1M-row block)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Embed only share I of N (0 <= I < N) of the files, "
                                        "for several machines or GPUs; combine with 'sjea merge'. Under torchrun "
                                        "(torchrun --nproc_per_node G --no-python sjea embed IMAGES OUT -r RUN) "
                                        "each rank embeds its own shard on its own GPU and rank 0 merges."),
    update: bool = typer.Option(False, "--update", help="Bring an existing OUT up to date with the folder, with "
                                "the store's own model: add new images, re-embed changed ones (size or time), "
                                "remove rows of files gone from it."),
    keep_missing: bool = typer.Option(False, "--keep-missing", help="With --update: keep the rows of files that "
                                      "are gone from the folder."),
    overwrite: bool = overwrite_option("Replace an existing OUT (it stays intact until the "
                                   "new one is complete)."),
    commit_every: float = typer.Option(2.0, "--commit-every", help="Seconds between durable checkpoints of "
                                       "the partial run (the most work a kill or power cut can cost); 0: after "
                                       "every batch.", callback=non_negative_float),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Embed files that symbolic links reach "
                                         "outside the image folder (by default they are recorded as failures, "
                                         "never read)."),
    allow_outside: bool = typer.Option(False, "--allow-outside", help="Let a list file name images outside its "
                                       "own folder (../x, absolute paths); the root becomes the folder they all "
                                       "share."),
    engine: str = typer.Option("local", "--engine", help="local: this process (under torchrun, its ranks); ray: "
                               "one Ray task per partition, each writing a shard store OUT-shardIIIofNNN.h5 "
                               "beside OUT, merged into OUT at the end (pip install 'sjea-tools\\[ray]')."),
    partitions: Optional[int] = typer.Option(None, "--partitions", help="With --engine ray: how many shards "
                                             "(tasks) to split the images into (default: as many as the cluster "
                                             "runs at once). Give the same N again to resume a killed run.",
                                             callback=positive_int),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --engine ray: join the Ray "
                                              "cluster whose head node is HOST:PORT (or 'auto'); default: start "
                                              "a local Ray for this command. IMAGES, OUT's folder and the model "
                                              "must be on storage every node and this machine see at the same "
                                              "paths, and sjea-tools installed on every node."),
    ray_cpus: Optional[float] = typer.Option(None, "--ray-cpus", help="With --engine ray: CPUs per task "
                                             "(default 1); its decode workers are this minus one unless "
                                             "--workers.", callback=positive_float),
    ray_gpus: Optional[float] = typer.Option(None, "--ray-gpus", help="With --engine ray: GPUs per task "
                                             "(default: 1 when the cluster has GPUs, else 0; 0.5 shares one GPU "
                                             "between two tasks).", callback=non_negative_float),
    no_index: bool = no_index_option(),
    quiet: bool = quiet_option(),
    json_out: bool = json_option("the summary"),
) -> None:
    """Embed a folder of images into an HDF5 store: streaming, resumable, failures recorded."""
    from ..embed import EmbedRequest, RayOptions
    from ..engines import run_embed
    from ..errors import SjeaError

    if level and levels_old is not None:
        raise SjeaError("give the levels once, with --level (--levels is its old spelling).")
    request = EmbedRequest(images, out, run=run, onnx=onnx, levels=level or levels_old, batch_size=batch_size,
                           workers=workers, device=device, backend=backend, dtype=dtype, normalize=normalize,
                           whiten=whiten, shard=shard, update=update, keep_missing=keep_missing,
                           overwrite=overwrite, commit_every_s=commit_every,
                           follow_symlinks=follow_symlinks, allow_outside=allow_outside, index=not no_index,
                           engine=engine, ray=RayOptions(partitions, ray_address, ray_cpus, ray_gpus))
    with rich_progress(quiet or json_out, RateColumn()) as progress:
        summary = run_embed(request, progress)
    if json_out:
        print_json(summary)
        return
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """The lines of a finished `sjea embed`: the store, where the work went, failures, indexes."""
    rate = f" at {summary['images_per_s']:,.0f} images/s" if summary.get("images_per_s") else ""
    where = f", {summary['partitions']} partitions on {summary['ray']}" if summary.get("engine") == "ray" else ""
    console.print(f"{summary['status']}: {plain(summary['out'])}: {summary['rows']:,} rows ({summary['added']:,} added, "
                  f"{summary['failed']:,} failed{rate}{where}, {summary['backend']} on {summary['device']}, levels "
                  f"{summary['levels']})", highlight=False, markup=False, soft_wrap=True)
    if any(summary.get(k) for k in ("changed", "removed", "kept_missing", "failures_retried", "labels_restored")):
        console.print(f"folder changes: {summary['changed']:,} changed file(s) re-embedded, {summary['removed']:,} "
                      f"row(s) of vanished files removed, {summary['kept_missing']:,} kept (--keep-missing), "
                      f"{summary['failures_retried']:,} changed failed file(s) tried again"
                      f"{', labels restored' if summary.get('labels_restored') else ''}", highlight=False,
                      markup=False, soft_wrap=True)
    if summary.get("shards"):
        console.print(f"shard stores: {plain(summary['shards'][0])} ... {plain(Path(summary['shards'][-1]).name)}",
                      highlight=False, markup=False, soft_wrap=True)
    if summary["failed_total"]:
        console.print(f"failures are listed in {plain(summary['out'])}:/failed (paths, errors)", highlight=False,
                      markup=False, soft_wrap=True)
    print_index_line(summary)
    if summary.get("merged") and summary.get("engine") != "ray":  # a torchrun rank 0; Ray's line says it above
        console.print(f"merged all shards into {plain(summary['merged']['out'])}", highlight=False, markup=False,
                      soft_wrap=True)
        print_index_line(summary["merged"])
