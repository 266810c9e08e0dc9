"""The `sjea` command line: a thin Typer layer; each command calls one library function."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import NoArgsIsHelpError, UsageError


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) as one line on stderr with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:
            print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
            sys.exit(2)
        except UsageError as e:
            command = e.ctx.command_path if e.ctx else "sjea"
            print(f"error: {e.format_message()} (see '{command} --help')", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("aborted", file=sys.stderr)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
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

# Each command lives in the module named after it and registers itself on `app`; the order here is
# the order of `sjea --help`.
COMMAND_MODULES = ("train", "export", "images", "data", "embed", "merge", "index", "clusters", "search",
                   "serve", "verify", "compact", "eval", "evaluate", "plot")


def _register_commands() -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f".{name}", __name__)


_register_commands()


@app.callback()
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
    app()
