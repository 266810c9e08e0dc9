"""`sjea images`: a dataset as image files, e.g. real test images to embed and search."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import data_dir_option, json_option, console, handle_errors, markup_safe, positive_int, print_json


@app.command()
@handle_errors
def images(
    dataset: str = typer.Argument(..., help="fashion-mnist, cifar10, cifar100 or stl10."),
    out: Path = typer.Argument(..., help="Folder to write; images go to OUT/<class>/<index>.<format>."),
    split: str = typer.Option("test", "--split", help="train or test."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", callback=positive_int, help="Write the first N images only."),
    fmt: str = typer.Option("png", "--format", help="png, jpg, webp or bmp."),
    data_dir: Optional[Path] = data_dir_option("Local dataset files."),
    json_out: bool = json_option("the summary"),
) -> None:
    """Write a dataset's images as files in class sub-folders (existing files are kept)."""
    from ..data.write_folder import write_image_folder

    summary = write_image_folder(dataset, out, split, limit, fmt, str(data_dir) if data_dir else None)
    if json_out:
        print_json(summary)
    else:
        console.print(f"{summary['images']} images in {markup_safe(summary['folder'])} ({summary['written']} written now)")
