"""`sjea eval`: linear probe, k-NN, collapse checks and coarse/fine retrieval, per level."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import (run_option, device_option, data_dir_option, quiet_option, json_option, console, err_console, handle_errors, markup_safe, non_negative_int, positive_float,
                     positive_int, print_json, rich_progress)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HIERARCHY_COLUMNS = ("H-AP", "mistake severity")


def hierarchy_cells(measures: dict | None) -> list[str]:
    """H-AP (percent) and mistake severity (tree distance, 1-2) of one row; '-' where not measured."""
    if not measures:
        return ["-", "-"]
    return [_num(measures["h_ap"]), _num(measures["mistake_severity"], 3)]


def eval_tables(result: dict):
    """The per-level table (labels), the hierarchical-search table when there is one, the pixel
    floors, and a store's label-free table."""
    tables = labelled_tables(result) if "levels" in result else []
    if result.get("label_free"):
        tables += label_free_tables(result["label_free"])
    return tables


def labelled_tables(result: dict):
    from rich.table import Table

    hier = "hierarchy" in result["levels"][0]
    source = markup_safe(result.get('dataset') or Path(result.get('store', '')).name)
    title = (f"{result.get('weights', 'stored')} features, {source}: "
             f"{result['n_train']} bank/probe-train, {result['n_test']} queries")
    table = Table(title=title)
    for col in ("level", "dim", "probe top-1", "probe top-5", "k-NN top-1", "RankMe", "mean std"):
        table.add_column(col, justify="right")
    measured = hier and "measures" in result["levels"][0]["hierarchy"]
    if hier:
        for col in ("coarse k-NN", "coarse P@10", "fine P@10") + (HIERARCHY_COLUMNS if measured else ()):
            table.add_column(col, justify="right")
    if measured:
        table.caption = hierarchy_caption(result)
    for row in result["levels"]:
        cells = [str(row["level"]), str(row["dim"]), _pct(row["linear_top1"]), _pct(row["linear_top5"]),
                 _pct(row["knn_top1"]), f"{row['effective_rank']:.1f}", f"{row['mean_std']:.4f}"]
        if hier:
            h = row["hierarchy"]
            cells += [_pct(h["coarse"]["knn_top1"]), _pct(h["coarse"]["precision_at_10"]), _pct(h["fine"]["precision_at_10"])]
            cells += hierarchy_cells(h.get("measures")) if measured else []
        table.add_row(*cells)
    tables = [table]
    if result.get("hierarchical_search"):
        search = Table(title="hierarchical search (hits from the query's cluster at the first level, ranked by the last)")
        for col in ("order", "coarse k-NN", "coarse P@10", "fine k-NN", "fine P@10") + HIERARCHY_COLUMNS:
            search.add_column(col, justify="right")
        for row in result["hierarchical_search"]:
            search.add_row(" -> ".join(map(str, row["order"])), _pct(row["coarse"]["knn_top1"]),
                           _pct(row["coarse"]["precision_at_10"]), _pct(row["fine"]["knn_top1"]),
                           _pct(row["fine"]["precision_at_10"]), *hierarchy_cells(row.get("measures")))
        tables.append(search)
    if result.get("baselines"):
        tables.append(baseline_table(result))
    return tables


def baseline_table(result: dict):
    """The model's levels beside the pixel floors, under the same k-NN (as is and centred) and probe."""
    from rich.table import Table

    b = result["baselines"]
    caption = (f"k-NN: cosine, k={result['settings']['knn_k']}, T=0.1; centred: the bank's mean subtracted from bank and queries first. "
               f"Probe: the cheap protocol: one linear layer on frozen, standardised features, "
               f"{result['settings']['probe_epochs']} epochs, no augmentation (not the standard augmented "
               "100-epoch probe)." + (f" {b['note']}." if b.get("note") else ""))
    table = Table(title="beside the floors (same protocol)", caption=caption)
    measured = any("hierarchy" in row for row in b["pixels"])
    for col in ("features", "dim", "k-NN top-1", "k-NN centred", "probe top-1") + (HIERARCHY_COLUMNS if measured else ()):
        table.add_column(col, justify="right")
    centred = {row["level"]: row["knn_top1_centred"] for row in b["model"]}
    for row in result["levels"]:
        extra = hierarchy_cells(row.get("hierarchy", {}).get("measures")) if measured else []
        table.add_row(f"level {row['level']} ({result.get('weights', 'stored')})", str(row["dim"]),
                      _pct(row["knn_top1"]), _pct(centred.get(row["level"])), _pct(row["linear_top1"]), *extra)
    for row in b["pixels"]:
        extra = hierarchy_cells(row.get("hierarchy")) if measured else []
        table.add_row(row["features"], str(row["dim"]), _pct(row["knn_top1"]), _pct(row["knn_top1_centred"]),
                      _pct(row["linear_top1"]), *extra)
    return table


def hierarchy_caption(result: dict) -> str:
    """What H-AP and mistake severity mean (the rest of the hierarchy measures are in --json)."""
    s = result.get("hierarchy_measures", {})
    return (f"H-AP@{s.get('h_ap_depth', '?')} (HAPPIER): relevance 1 same class, 0.5 same coarse group, 0 else; "
            "100 = every list ideal. Mistake severity (Making Better Mistakes): mean tree distance of the top-1 "
            "neighbour over the top-1 mistakes, 1 = same coarse group, 2 = another group. Average distance of the "
            "top 1/5/10/20 in --json.")


def label_free_tables(free: dict):
    """Trained, random init and pixels side by side on the store's own images, then the labelled
    k-NN floors on the same sample with one verdict line per comparison."""
    from rich.table import Table

    caption = (f"{free['sample']} images ({free['sample_rule']}"
               + (f"; {len(free['skipped'])} unreadable skipped" if free["skipped"] else "")
               + f"), one augmented copy each: {free['augmentation']}. Copies are retrieved among the sample's "
               "originals (cosine). Alignment: mean squared distance of unit vectors original-copy (lower is "
               "better); uniformity: log E exp(-2 d^2) over pairs (lower = more spread); pixels: centred by the "
               "sample's mean." + (f" {free['note']}." if free.get("note") else ""))
    table = Table(title="label-free, on the store's own images (same protocol for every row)", caption=caption)
    for col in ("features", "level", "dim", "copy R@1", "copy R@10", "mean rank", "alignment", "uniformity", "RankMe"):
        table.add_column(col, justify="right")
    for row in free["rows"]:
        table.add_row(row["features"], "-" if row["level"] is None else str(row["level"]), str(row["dim"]),
                      _pct(row["copy_recall_at_1"]), _pct(row["copy_recall_at_10"]), f"{row['copy_mean_rank']:.1f}",
                      f"{row['alignment']:.3f}", f"{row['uniformity']:.3f}", f"{row['effective_rank']:.1f}")
    tables = [table]
    lab = free.get("labelled")
    if lab:
        ks = sorted(set(lab["k"]))
        floors = Table(title=f"labels on the same sample: weighted k-NN top-1 over {lab['splits']} seeded splits",
                       caption=f"k = {', '.join(map(str, ks))} ({lab['k_rule']}); pixels centred by each bank's mean.")
        for col in ("features", "level", "k-NN top-1", "per split"):
            floors.add_column(col, justify="right")
        for row in lab["rows"]:
            floors.add_row(row["features"], "-" if row["level"] is None else str(row["level"]), _pct(row["knn_top1"]),
                           " / ".join(_pct(v) for v in row["knn_top1_splits"]))
        tables.append(floors)
        tables += [v["line"] + " (paired bootstrap over the pooled test queries)" for v in lab["verdicts"]]
    return tables


@app.command("eval")
@handle_errors
def eval_command(
    store: Optional[Path] = typer.Argument(None, help="An HDF5 store (from 'sjea embed'): label-free measures on a sample "
                                           "of its own images beside random init and pixels; with folder labels "
                                           "also the probe and k-NN of its stored embeddings."),
    run: Optional[str] = run_option("Run folder to evaluate (default: the latest run)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="fashion-mnist, cifar10, cifar100, stl10, or an "
                                          "image folder with class sub-folders (default: the run's dataset)."),
    data_dir: Optional[str] = data_dir_option("Folder holding the dataset's files."),
    max_train: Optional[int] = typer.Option(None, "--max-train", callback=positive_int, help="Use N random training images (k-NN bank "
                                            "and probe training set); default all."),
    max_test: Optional[int] = typer.Option(None, "--max-test", callback=positive_int, help="Use N random test images (queries); default all."),
    limit: Optional[int] = typer.Option(None, "--limit", callback=non_negative_int, help="STORE only: use N random labelled rows "
                                        "(default 100000; 0 = all)."),
    sample: Optional[int] = typer.Option(None, "--sample", callback=positive_int, help="STORE only: decode N random "
                                         "images for the label-free measures and floors (default 1000)."),
    images: bool = typer.Option(True, "--images/--no-images", help="STORE only: --no-images skips decoding the "
                                "store's images (no label-free measures or floors; a labelled store only)."),
    level: Optional[List[str]] = typer.Option(None, "--level", help="Evaluate these levels: repeatable, or 0,1, "
                                              "or all \\[default: all]."),
    probe_epochs: int = typer.Option(20, "--probe-epochs", callback=positive_int, help="Epochs of the linear probe on cached features."),
    probe_lr: float = typer.Option(0.2, "--probe-lr", callback=positive_float, help="Peak learning rate of the probe (SGD, momentum 0.9, cosine)."),
    batch_size: int = typer.Option(256, "--batch-size", callback=positive_int, help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", callback=non_negative_int, help="Seed of the subsets and the probe."),
    random_init: bool = typer.Option(False, "--random-init", help="Evaluate the run's architecture with random weights "
                                     "instead (the baseline a trained model must beat); writes eval-random-init.json."),
    save_features: bool = typer.Option(False, "--save-features", help="Also write the features and labels used "
                                       "(<eval file>.features.npz) for your own analysis."),
    baselines: Optional[bool] = typer.Option(None, "--baselines/--no-baselines", show_default=False,
                                             help="Also score pixels (and, for a STORE, the architecture at random "
                                             "init) under the same protocol [default: --baselines]."),
    device: str = device_option("cpu", "cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON here instead of beside the run or store."),
    as_json: bool = json_option("the result"),
    quiet: bool = quiet_option(),
) -> None:
    """Linear probe, weighted k-NN, effective rank and coarse/fine retrieval scores, per level; for a
    STORE also label-free measures (augmented-copy retrieval, alignment, uniformity) beside random init and pixels."""
    from .. import evaluation
    from ..errors import SjeaError

    if store is not None:
        if run is not None or dataset is not None:
            raise SjeaError("give either a STORE or --run/--dataset, not both.")
        rows = evaluation.STORE_EVAL_ROWS if limit is None else (limit or None)
        drawn = evaluation.SAMPLE_ROWS if sample is None else sample
        with rich_progress(quiet or as_json) as progress:
            result = evaluation.evaluate_store(store, max_rows=rows, probe_epochs=probe_epochs, probe_lr=probe_lr,
                                               seed=seed, levels=level or None, out=out, sample=drawn,
                                               floors=baselines is not False, images=images, device=device,
                                               progress=progress)
    else:
        if limit is not None or sample is not None or not images:
            raise SjeaError("--limit, --sample and --no-images apply to a STORE; for a run use --max-train and --max-test.")
        with rich_progress(quiet or as_json) as progress:
            result = evaluation.evaluate_run(run, dataset=dataset, data_dir=data_dir, max_train=max_train,
                                             max_test=max_test, levels=level or None, probe_epochs=probe_epochs,
                                             probe_lr=probe_lr, batch_size=batch_size, seed=seed,
                                             random_init=random_init, device=device, out=out,
                                             save_features=save_features, progress=progress,
                                             baselines=True if baselines is None else baselines)
    if as_json:
        print_json(result)
        return
    for table in eval_tables(result):
        console.print(table, soft_wrap=isinstance(table, str))
    if result.get("note"):
        err_console.print(f"note: {markup_safe(result['note'])}", soft_wrap=True)
    err_console.print(f"wrote {markup_safe(result['output'])}" + (f" and {markup_safe(result['features_file'])}" if "features_file" in result else ""),
                      soft_wrap=True)
