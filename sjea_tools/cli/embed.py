"""`sjea embed` (folder -> HDF5 store, resumable) and `sjea merge` (shards -> one store)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import ProgressColumn
from rich.text import Text

from . import app
from .common import console, handle_errors, print_json, progress_bar


class RateColumn(ProgressColumn):
    """Images per second and failures so far."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        rate = f"{speed:,.0f} img/s" if speed else "-- img/s"
        failed = task.fields.get("failed", 0)
        return Text(f"{rate}  {failed} failed", style="red" if failed else "dim")


def _torchrun_shard() -> Optional[str]:
    """Under torchrun (WORLD_SIZE > 1) each rank embeds one shard: RANK/WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"{int(os.environ.get('RANK', '0'))}/{world}" if world > 1 else None


def _shard_file(out: Path, shard: str) -> Path:
    i, n = shard.split("/")
    return out.with_name(f"{out.stem}-shard{int(i):03d}of{int(n):03d}{out.suffix or '.h5'}")


@app.command()
@handle_errors
def embed(
    images: Path = typer.Argument(..., help="Folder of images (scanned recursively; jpg, jpeg, png, bmp, gif, tif, "
                                  "tiff, webp), or a text file listing image paths (one per line, relative to the "
                                  "file's folder)."),
    out: Path = typer.Argument(..., help="HDF5 store to write, e.g. photos.h5. An interrupted run of the same "
                               "command resumes from OUT.h5.partial/."),
    run: Optional[Path] = typer.Option(None, "--run", "-r", help="Run folder of the model (default: the latest "
                                       "run, runs/LATEST)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Use an exported ONNX file instead of a run folder "
                                        "(no checkpoint needed)."),
    levels: str = typer.Option("all", "--levels", "-l", help="Levels to store, e.g. 0,1 (computed in one pass)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per inference batch."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Decoding processes (default: CPU cores, "
                                          "at most 8); 0 decodes in the main process."),
    device: str = typer.Option("auto", "--device", help="auto (GPU if one is visible), cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime on CPU, PyTorch on GPU: the faster "
                                "one, measured), torch or onnx. A run is exported to ONNX on the fly and cached."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage type of embeddings: float32 or float16."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise rows (recorded in the "
                                   "store; search uses cosine = dot product)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Embed only share I of N (0 <= I < N) of the files, "
                                        "for several machines or GPUs; combine with 'sjea merge'. Under torchrun "
                                        "(torchrun --nproc_per_node G --no-python sjea embed IMAGES OUT -r RUN) "
                                        "each rank embeds its own shard on its own GPU and rank 0 merges."),
    update: bool = typer.Option(False, "--update", help="Add the images not yet in an existing OUT (same model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (it stays intact until the "
                                   "new one is complete)."),
    commit_every: float = typer.Option(2.0, "--commit-every", help="Seconds between durable checkpoints of "
                                       "the partial run (the most work a kill or power cut can cost)."),
    no_index: bool = typer.Option(False, "--no-index", help="Do not build the FAISS search indexes afterwards."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Embed a folder of images into an HDF5 store: streaming, resumable, failures recorded."""
    from ..embed import embed_folder

    torchrun = shard is None and _torchrun_shard() is not None
    final_out = out
    if torchrun:
        shard = _torchrun_shard()
        out = _shard_file(out, shard)
        if device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():  # one GPU per rank
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    with progress_bar(quiet or json_out, RateColumn()) as bar:
        tasks = []  # the bar appears once work starts, not before a one-line error

        def on_progress(done: int, total: int, failed: int) -> None:
            if not tasks:
                tasks.append(bar.add_task("embedding", total=total, completed=done, failed=failed))
            bar.update(tasks[0], completed=done, total=total, failed=failed)

        summary = embed_folder(images, out, run=run, onnx=onnx, levels=levels, batch_size=batch_size,
                               workers=workers, device=device, backend=backend, dtype=dtype, normalize=normalize,
                               shard=shard, update=update, overwrite=overwrite, index=not no_index and not torchrun,
                               progress=None if quiet or json_out else on_progress, commit_every_s=commit_every)
    if torchrun:
        summary["merged"] = _merge_ranks(final_out, shard, index=not no_index)
    if json_out:
        print_json(summary)
        return
    rate = f" at {summary['images_per_s']:,.0f} images/s" if summary.get("images_per_s") else ""
    console.print(f"{summary['status']}: {summary['out']}: {summary['rows']:,} rows ({summary['added']:,} added, "
                  f"{summary['failed']:,} failed{rate}, {summary['backend']} on {summary['device']}, levels "
                  f"{summary['levels']})", highlight=False, soft_wrap=True)
    if summary["failed_total"]:
        console.print(f"failures are listed in {summary['out']}:/failed (paths, errors)", highlight=False, soft_wrap=True)
    if isinstance(summary.get("index"), dict) and summary["index"].get("path"):
        console.print(f"search indexes: {summary['index']['path']}", highlight=False, soft_wrap=True)
    if summary.get("merged"):
        console.print(f"merged all shards into {summary['merged']['out']}", highlight=False, soft_wrap=True)


def _merge_ranks(out: Path, shard: str, index: bool) -> Optional[dict]:
    """torchrun: wait for every rank's shard, then rank 0 merges them into OUT."""
    import torch.distributed as dist

    from ..embed import build_index
    from ..store import merge_stores

    i, n = (int(v) for v in shard.split("/"))
    if not dist.is_initialized():
        import datetime

        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()
    result = None
    if i == 0:
        result = merge_stores([_shard_file(out, f"{r}/{n}") for r in range(n)], out)
        if index:
            result["index"] = build_index(out, progress=True)
    dist.barrier()
    dist.destroy_process_group()
    return result


@app.command()
@handle_errors
def merge(
    paths: List[Path] = typer.Argument(..., help="The shard stores written with --shard I/N, then the output "
                                       "store last: sjea merge out-*.h5 out.h5."),
    no_index: bool = typer.Option(False, "--no-index", help="Do not build the FAISS search indexes afterwards."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Combine the shards of one embedding run into one store, identical to a single run's."""
    from ..embed import build_index
    from ..errors import SjeaError
    from ..store import merge_stores

    if len(paths) < 2:
        raise SjeaError("give the shard stores and then the output: sjea merge out-*.h5 out.h5.")
    *inputs, out = paths
    summary = merge_stores(inputs, out)
    if not no_index:
        summary["index"] = build_index(Path(out), progress=not json_out)
    if json_out:
        print_json(summary)
        return
    console.print(f"merged {summary['shards']} shards into {summary['out']}: {summary['rows']:,} rows, "
                  f"{summary['failed']:,} failed", highlight=False, soft_wrap=True)
    if isinstance(summary.get("index"), dict) and summary["index"].get("path"):
        console.print(f"search indexes: {summary['index']['path']}", highlight=False, soft_wrap=True)
