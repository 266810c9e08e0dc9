"""`sjea merge`: the shards of one embedding run -> one store, then search indexes
(sjea_tools.pipeline.merge_and_index)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from . import app
from .common import overwrite_option, no_index_option, console, handle_errors, plain, print_json, rich_progress, quiet_option, json_option
from .embed import print_index_line


@app.command()
@handle_errors
def merge(
    paths: List[Path] = typer.Argument(..., help="The shard stores written with --shard I/N, then the output "
                                       "store last: sjea merge out-*.h5 out.h5."),
    overwrite: bool = overwrite_option("Replace an existing output file (without it, only "
                                   "this same merge's earlier result is replaced)."),
    no_index: bool = no_index_option(),
    quiet: bool = quiet_option(),
    json_out: bool = json_option("the summary"),
) -> None:
    """Combine the shards of one embedding run into one store, identical to a single run's."""
    from ..errors import SjeaError
    from ..pipeline import merge_and_index

    if len(paths) < 2:
        raise SjeaError("give the shard stores and then the output: sjea merge out-*.h5 out.h5.")
    *inputs, out = paths
    with rich_progress(quiet or json_out) as progress:
        summary = merge_and_index(inputs, out, index=not no_index, progress=progress, overwrite=overwrite)
    if json_out:
        print_json(summary)
        return
    what = "merged" if summary["status"] == "written" else f"{summary['status']}:"
    console.print(f"{what} {summary['shards']} shards into {plain(summary['out'])}: {summary['rows']:,} rows, "
                  f"{summary['failed']:,} failed", highlight=False, markup=False, soft_wrap=True)
    print_index_line(summary)
