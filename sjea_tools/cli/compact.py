"""`sjea compact`: a store of several segments -> one file (sjea_tools.store.compact_store)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import console, handle_errors, json_option, plain, print_json, quiet_option, rich_progress


@app.command()
@handle_errors
def compact(
    store: Path = typer.Argument(..., help="The store to rewrite as one file (OUT.h5 of 'sjea embed --update' "
                                 "or 'sjea merge')."),
    quiet: bool = quiet_option(),
    json_out: bool = json_option("the summary"),
) -> None:
    """Rewrite a store that grew by segments as one file; rows, order and indexes stay valid."""
    from ..store import compact_store

    with rich_progress(quiet or json_out) as progress:
        summary = compact_store(store, progress=progress)
    if json_out:
        print_json(summary)
        return
    what = (f"compacted {summary['segments']} segments into" if summary["status"] == "compacted"
            else "already one file:")
    console.print(f"{what} {plain(summary['out'])}: {summary['rows']:,} rows, {summary['failed']:,} failed",
                  highlight=False, markup=False, soft_wrap=True)
