"""The `sjea` command line: a thin Typer layer; each command calls one library function."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sjea",
    help="S-JEA tools: train stacked joint-embedding encoders, export them to ONNX, embed image "
         "folders into HDF5, and search them level by level.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module registers its commands on `app`.
from . import train  # noqa: E402,F401
from . import export  # noqa: E402,F401
from . import embed  # noqa: E402,F401
from . import search  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)) -> None:
    if version:
        from .. import __version__

        typer.echo(f"sjea-tools {__version__}")
        raise typer.Exit()


def main() -> None:
    app()
