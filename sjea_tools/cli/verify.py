"""`sjea verify`: read a whole store and check every checksum (sjea_tools.store.verify_store)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import console, handle_errors, plain, print_json, rich_progress, quiet_option, json_option


@app.command()
@handle_errors
def verify(
    store: Path = typer.Argument(..., help="The .h5 store to check."),
    quiet: bool = quiet_option(),
    json_out: bool = json_option("the result"),
) -> None:
    """Check a store end to end: HDF5 metadata and chunk checksums, string checksums, shapes, finite
    (and unit, when normalised) rows. Exit 0 when intact, 2 with one line naming the damage."""
    from ..store import verify_store

    with rich_progress(quiet or json_out) as progress:
        result = verify_store(store, progress=progress)
    if json_out:
        print_json(result)
        return
    console.print(f"ok: {plain(result['path'])}: {result['rows']:,} rows, levels {result['levels']}, "
                  f"{result['failed']:,} failed images; every checksum matches"
                  f"{_rows_text(result)}",
                  highlight=False, markup=False,
                  soft_wrap=True)


def _rows_text(result: dict) -> str:
    """What the stored rows are, when they are normalised: whitened, centred only, or neither."""
    if not result["normalized"]:
        return ""
    if not result["centred"]:
        return "; rows not centred (written before centring)"
    return "; rows centred and whitened" if result.get("whitened") else "; rows centred (not whitened)"
