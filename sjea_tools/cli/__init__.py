"""The `sjea` command line: a thin Typer layer; each command calls one library function.

`sjea NAME ...` imports only the module of command NAME (each module registers its command on the
app when imported); `sjea --help`, and any code that reads `sjea_tools.cli.app`, get them all.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

# Typer (>= 0.26) vendors click and exports, of click's usage errors, only BadParameter; every usage
# error (unknown option, bad value, missing argument, no such command) is of BadParameter's base.
UsageError = typer.BadParameter.__base__


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) as one line on stderr with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # how Typer itself tells it apart (rich_utils)
                print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
                sys.exit(2)
            command = e.ctx.command_path if e.ctx else "sjea"
            print(f"error: {e.format_message()} (see '{command} --help')", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("aborted", file=sys.stderr)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


# --- commands ------------------------------------------------------------------------------------
_app = typer.Typer(
    cls=OneLineErrors,
    name="sjea",
    help="S-JEA tools: train stacked joint-embedding encoders, export them to ONNX, embed image "
         "folders into HDF5, and search them level by level.",
    no_args_is_help=True,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each command lives in the module named after it and registers itself on `app` when imported; the
# order here is the order of `sjea --help`.
COMMAND_MODULES = ("train", "export", "images", "embed", "merge", "index", "clusters", "search", "duplicates",
                   "serve", "verify", "compact", "eval", "plot")
_imported: set[str] = set()
_registering = False


def _register_commands(only: str | None = None) -> None:
    """Import the command modules (all, or the one named `only`), keeping the --help order."""
    global _registering
    import importlib

    _registering = True
    try:
        for name in COMMAND_MODULES if only is None else (only,):
            if name not in _imported:
                _imported.add(name)
                importlib.import_module(f".{name}", __name__)
    finally:
        _registering = False
    rank = {name: i for i, name in enumerate(COMMAND_MODULES)}
    _app.registered_commands.sort(
        key=lambda c: rank.get(getattr(c.callback, "__module__", "").rpartition(".")[2], len(rank)))


def __getattr__(name: str):
    if name == "app":  # the app with every command: imported here on first use
        if not _registering:
            _register_commands()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@_app.callback()
def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from .. import __version__

        typer.echo(f"sjea-tools {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


def main() -> None:
    """`sjea`: a command named first on the line needs only its own module; anything else (help, no
    command, a misspelt one that gets suggestions) gets every command."""
    first = sys.argv[1] if len(sys.argv) > 1 else ""
    _register_commands(first if first in COMMAND_MODULES else None)
    _app()
