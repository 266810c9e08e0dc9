"""`sjea duplicates`: near-duplicate groups of a store, a file to keep in each, never deleting."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..duplicates import DEFAULT_THRESHOLD, UNCENTRED_THRESHOLD, WHITENED_THRESHOLD
from . import app
from .common import grid_option, overwrite_option, console, handle_errors, number_check, json_option, literal, markup_safe, print_json, quiet_option, rich_progress

_SHOWN = 20  # groups printed; --json and --list hold them all
_UNIT = number_check(above=0, maximum=1, rule="a number above 0 and at most 1")


@app.command()
@handle_errors
def duplicates(
    store: Path = typer.Argument(..., help="The .h5 store written by 'sjea embed'."),
    level: str = typer.Option("0", "--level", help="The level whose cosine decides (one level of the store)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", callback=_UNIT, help="Cosine at or above which "
                                              "two files are candidate copies, in (0, 1] \\[default: measured on "
                                              f"real copies per kind of store: {WHITENED_THRESHOLD} whitened, "
                                              f"{DEFAULT_THRESHOLD} centred only, {UNCENTRED_THRESHOLD} written before "
                                              "centring; docs/benchmarks.md]."),
    pixel_threshold: Optional[float] = typer.Option(None, "--pixel-threshold", callback=_UNIT, help="A candidate "
                                                    "pair is a copy when its files' 32 x 32 grey pixels correlate "
                                                    "at least this much, in (0, 1] \\[default: measured with "
                                                    "--threshold]."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check candidate pairs on their pixels (the "
                                "files must be readable); --no-verify trusts the cosine alone (raise --threshold)."),
    grid: Optional[Path] = grid_option("Also draw the groups (the largest 40) into this PNG."),
    keep_list: Optional[Path] = typer.Option(None, "--list", help="Also write a CSV: group, path, action "
                                             "(keep/remove), score (cosine to the kept file)."),
    overwrite: bool = overwrite_option("Replace an existing --grid or --list file."),
    quiet: bool = quiet_option(),
    as_json: bool = json_option("the groups"),
) -> None:
    """Find groups of near-duplicate images in STORE (re-encodes, resizes, small crops). In each group
    one file is suggested to keep (the most pixels, then the largest file); nothing is deleted."""
    from ..duplicates import find_duplicates

    with rich_progress(quiet or as_json) as progress:
        result = find_duplicates(store, level, threshold, pixel_threshold=pixel_threshold, verify=verify, grid=grid,
                                 keep_list=keep_list, overwrite=overwrite, progress=progress)
    if as_json:
        print_json(result)
        return
    print_groups(result)


def print_groups(result: dict) -> None:
    from ..duplicates import criteria

    groups = result["groups"]
    console.print(f"{markup_safe(result['store'])}: {len(groups)} group(s) of near-duplicates among {result['rows']:,} "
                  f"rows ({criteria(result)}); {result['to_remove']} file(s) could be removed. Nothing was deleted.",
                  highlight=False)
    if result["unreadable"]:
        console.print(f"[yellow]{result['unreadable']} file(s) of candidate pairs could not be read, so their pairs "
                      "were left out; run 'sjea embed ... --update' if files moved, or pass --no-verify.[/]",
                      highlight=False)
    for g in groups[:_SHOWN]:
        console.print(f"[bold]group {g['group']}[/] ({g['size']} files)", highlight=False)
        for m in g["members"]:
            line = literal(f"  {'keep  ' if m['action'] == 'keep' else 'remove'} {m['score']:.4f}  {m['path']}")
            console.print(line, highlight=False)
    if len(groups) > _SHOWN:
        console.print(f"... {len(groups) - _SHOWN} more group(s): see --json or --list", highlight=False)
    for key, what in (("list", "keep/remove list"), ("grid", "picture")):
        if key in result:
            console.print(f"wrote the {what} {markup_safe(result[key])}", highlight=False)
