"""`sjea serve`: a search page and JSON API over one store (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import run_option, err_console, handle_errors, markup_safe, number_check, positive_float

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@app.command()
@handle_errors
def serve(
    store: Path = typer.Argument(..., help="The .h5 store written by 'sjea embed' (with its index from 'sjea index')."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default accepts only this "
                             "machine; 0.0.0.0 exposes the page and API, which have no login, to your network."),
    port: int = typer.Option(8000, "--port", "-p", callback=number_check(0, 65535, rule="a port from 0 to 65535"),
                             help="TCP port (0 picks a free one; the URL is printed)."),
    run: Optional[Path] = run_option("Embed uploaded images with this run folder's model "
                                       "(default: the model that wrote the store); its model id must match the store's."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Embed uploaded images with this exported ONNX file "
                                        "instead; its model id must match the store's."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", callback=positive_float,
                                        help="Largest upload accepted, in MiB; larger ones get HTTP 413."),
    max_megapixels: float = typer.Option(50.0, "--max-megapixels", callback=positive_float,
                                         help="Largest image accepted (uploads and thumbnails), in millions of "
                                              "pixels, read from the header before decoding: bombs get HTTP 400."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="Also answer requests for this host "
                                                   "name (repeatable; e.g. the name users type with --host 0.0.0.0). "
                                                   "Others get HTTP 400 (DNS rebinding)."),
    log_level: str = typer.Option("warning", "--log-level", help=f"Server log detail: {', '.join(LOG_LEVELS)} "
                                  "(info logs every request)."),
) -> None:
    """Serve a search page and JSON API for STORE: upload an image or open /?id=N, see its neighbours per
    level and hierarchically, browse the cluster tree. The API is described at /docs and /openapi.json.
    The store is loaded once and reloaded when 'sjea embed --update' or 'sjea index' replaces it."""
    from ..errors import SjeaError
    from ..serve import serve as run_server

    if run is not None and onnx is not None:
        raise SjeaError("pass either --run or --onnx, not both.")
    if log_level not in LOG_LEVELS:
        raise SjeaError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not '{log_level}'.")

    def ready(url: str) -> None:
        err_console.print(f"serving {markup_safe(store)} at [bold]{url}[/] (API: {url}docs); Ctrl-C stops",
                          highlight=False)
        if host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(f"note: listening on {markup_safe(host)}: anyone who can reach this machine can "
                              "search the store and see its images (there is no login); it answers host names given "
                              "with --allow-host.", highlight=False)

    run_server(store, host=host, port=port, run=run, onnx=onnx, max_upload_bytes=int(max_upload_mb * 2**20),
               max_pixels=int(max_megapixels * 1e6), log_level=log_level, on_ready=ready,
               allow_hosts=allow_host or ())
