"""`sjea plot`: the paper's figures for a run (t-SNE, covariance over training, sub-clusters)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import run_option, device_option, data_dir_option, console, handle_errors, markup_safe, number_check, positive_int, print_json, rich_progress, quiet_option, json_option


@app.command("plot")
@handle_errors
def plot_command(
    run: Optional[str] = run_option("Run folder (default: the latest run)."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Class whose top-level sub-clusters to show "
                                             "(name or index; default: the first class)."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Make only this plot: tsne, covariance or "
                                             "subclusters (repeatable; default all three)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Labelled dataset for the t-SNE and sub-clusters "
                                          "(default: the run's dataset)."),
    data_dir: Optional[str] = data_dir_option("Folder holding the dataset's files."),
    max_points: int = typer.Option(2000, "--max-points", callback=positive_int, help="Test images in the t-SNE (t-SNE is slow beyond ~5k)."),
    clusters: int = typer.Option(3, "--clusters", callback=number_check(2, rule="2 or more"), help="Number of sub-clusters inside the class (the spherical "
                                 "k-means of 'sjea clusters'; at least 5 images each)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for the PNGs (default: RUN/plots)."),
    device: str = device_option("cpu", "cpu, cuda or cuda:N."),
    as_json: bool = json_option("the written paths"),
    quiet: bool = quiet_option(),
) -> None:
    """PNGs: t-SNE of each level (paper Fig. 2), covariance term over training (Fig. 4), sub-clusters of one class (Fig. 3)."""
    from .. import plots

    with rich_progress(quiet or as_json) as progress:
        paths = plots.plot_run(run, out_dir=out_dir, class_name=class_name, kinds=only, dataset=dataset,
                               data_dir=data_dir, max_points=max_points, n_clusters=clusters, device=device,
                               progress=progress)
    if as_json:
        print_json({"written": [str(p) for p in paths]})
        return
    for p in paths:
        console.print(f"wrote {markup_safe(p)}", soft_wrap=True)
