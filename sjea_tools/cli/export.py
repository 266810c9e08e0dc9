"""`sjea export`: levels of a run -> verified ONNX files (sjea_tools.exports.onnx.export_run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import json_option, run_option, overwrite_option, console, err_console, handle_errors, literal, markup_safe, positive_int, print_json, rich_progress, quiet_option


def _print_report(report: dict, to_stderr: bool = False) -> None:
    from rich.table import Table

    out = err_console if to_stderr else console
    table = Table(title=f"parity of ONNX Runtime against PyTorch ({report['tolerance']})", title_justify="left")
    for name in ("file", "level", "dim", "max abs diff", "min cosine", "parity"):
        table.add_column(name, justify="left" if name in ("file", "parity") else "right")
    for f in report["files"]:
        v = f["verification"]
        if v["checker"] != "passed":
            table.add_row(literal(Path(f["path"]).name), "", "", "", "", f"[red]onnx.checker {markup_safe(v['checker'])}[/]")
            continue
        for row, dim in zip(v["levels"], f["dims"]):
            ok = "[green]pass[/]" if row["passed"] else "[red]FAIL[/]"
            table.add_row(literal(Path(f["path"]).name), str(row["level"]), str(dim), f"{row['max_abs_diff']:.2e}",
                          f"{row['min_cosine']:.8f}", ok)
    out.print(table)
    out.print(f"verified on {markup_safe(report['images'])}, batch sizes {report['files'][0]['verification']['batch_sizes']}, "
              f"provider {report['provider']}", highlight=False)
    if report["passed"]:
        out.print(f"opset {report['opset']}, {report['precision']}, output {report['output']}"
                  f"{', uint8 pixels in (normalisation inside)' if report['with_preprocessing'] else ''}; "
                  f"checkpoint sha256 {report['model_sha256'][:12]}", highlight=False)
        for f in report["files"]:
            out.print(f"wrote {markup_safe(f['path'])}", highlight=False, soft_wrap=True)


@app.command("export")
@handle_errors
def export(
    level: str = typer.Option("all", "--level", "-l", help="Levels to export: 'all' (one file per level plus "
                              "all_levels.onnx computing every level in one pass), a level K, or levels "
                              "like 0,1 (one file each)."),
    run: Optional[Path] = run_option("Run folder (default: the latest run, "
                                       "runs/LATEST)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the .onnx files (default: RUN/onnx), or a FILE.onnx for one level (with --level K)."),
    output: str = typer.Option("representation", "--output", help="What each level gives: representation "
                               "(Y_k, what embed stores) or embedding (Z_k, the projector output)."),
    with_preprocessing: bool = typer.Option(False, "--with-preprocessing", help="Put normalisation inside the "
                                            "graph: it then takes uint8 RGB pixels (N, H, W, 3) at the model's "
                                            "size (resizing stays with the client)."),
    overwrite: bool = overwrite_option("Replace existing .onnx files."),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision graph (float32 in and out); verified with "
                              "max abs diff <= 1e-2 x max|Y| and cosine >= 0.999."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images to verify on (default: the "
                                          "run's dataset, test split)."),
    quiet: bool = quiet_option(),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX Runtime provider for verification: "
                                           "cpu, cuda or tensorrt (default: cuda when it really starts, else cpu)."),
    opset: int = typer.Option(18, "--opset", callback=positive_int, help="ONNX opset (17 or newer; 17 uses the TorchScript exporter, "
                              "for ONNX Runtime older than 1.14)."),
    json_out: bool = json_option("the report (files, metadata, parity numbers)"),
) -> None:
    """Export level K (or several, or all levels) of a run to ONNX and verify each file against PyTorch on real
    images. Exits 1 when parity fails (fp32: max abs diff > 1e-4 or cosine < 0.99999); nothing is
    written then."""
    from sjea_tools.exports.onnx import VerificationError, export_run

    try:
        with rich_progress(quiet) as progress:
            report = export_run(run=run, level=level, out=out, output=output, with_preprocessing=with_preprocessing,
                                fp16=fp16, provider=provider, images=images, overwrite=overwrite, opset=opset,
                                progress=progress)
    except VerificationError as e:
        if json_out:
            print_json(e.report)
        else:
            _print_report(e.report, to_stderr=True)
        raise
    if json_out:
        print_json(report)
    else:
        _print_report(report)
