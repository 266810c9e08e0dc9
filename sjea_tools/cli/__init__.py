"""The `sjea` command line: a thin Typer layer; each command calls one library function.

`sjea NAME ...` imports only the module of command NAME (each module registers its command on the
app when imported); `sjea --help`, and any code that reads `sjea_tools.cli.app`, get them all.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path as _Path

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

    def parse_args(self, ctx, args):
        plain_coercion(self, ctx)
        return super().parse_args(ctx, args)

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            plain_coercion(command, ctx)
        return command


# --- option values without pydantic ------------------------------------------------------------
# Typer >= 0.2x converts every option value (flags aside) through a pydantic TypeAdapter built on first use:
# importing pydantic and building an adapter per option cost 0.22 s of a 1.3 s `sjea search`
# (measured, docs/benchmarks.md). Our options are plain str, int, float, bool, Path and lists of them;
# for those, a value that is unambiguous (a str option's text, a plain decimal integer or number,
# any path) is converted here to exactly what Typer's adapter returns, through Typer's own path
# checks; every other value and type (a value Typer would refuse, '1e3', a Choice, a parser...)
# goes to Typer's own conversion, so its results and its messages are Typer's.
_INT = re.compile(r"-?(0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,15})?")


def _typer_internals():
    """Typer's own converter and path checker, or None where this Typer has neither (older ones,
    on top of click, convert without pydantic anyway)."""
    try:
        from typer._coercion import build_runtime_param
        from typer._param_types import coerce_cli_path
        from typer.core import _TyperParameter
    except ImportError:  # pragma: no cover - another Typer
        return None
    if not hasattr(_TyperParameter, "get_runtime_param"):  # pragma: no cover
        return None
    return build_runtime_param, coerce_cli_path


def _leaf_converter(annotation, info, coerce_cli_path):
    """value -> converted value, or _TYPER when Typer's own conversion must decide."""
    if info.parser is not None or getattr(info, "click_type", None) is not None:
        return None
    if annotation is str:
        return lambda v, param, ctx: v if isinstance(v, str) else _TYPER
    if annotation is bool:
        return lambda v, param, ctx: v if type(v) is bool else _TYPER
    no_bounds = info.min is None and info.max is None and not info.clamp
    if annotation is int and no_bounds:
        return lambda v, param, ctx: (v if type(v) is int else int(v) if isinstance(v, str) and _INT.fullmatch(v)
                                      else _TYPER)
    if annotation is float and no_bounds:
        return lambda v, param, ctx: (v if type(v) is float else float(v) if isinstance(v, str) and _FLOAT.fullmatch(v)
                                      else _TYPER)
    if annotation is _Path and info.path_type is None:
        return lambda v, param, ctx: (coerce_cli_path(_Path(v), info, path_type=_Path, param=param, ctx=ctx)
                                      if isinstance(v, (str, _Path)) else _TYPER)
    return None


class _Typer:
    pass


_TYPER = _Typer()


class PlainCoercion:
    """Stands in for Typer's per-option converter (`_runtime_param`) on a plain option."""

    def __init__(self, param, leaf, build_runtime_param):
        self.param, self.leaf, self.build = param, leaf, build_runtime_param
        self.multi = param.multiple or param.nargs == -1
        self.typer_own = None

    def _typer(self, value, param, ctx):
        if self.typer_own is None:
            self.typer_own = self.build(self.param.type_descriptor)
        return self.typer_own.coerce(value, param=param, ctx=ctx)

    def coerce(self, value, param, ctx):
        if value is None:
            return () if self.multi else None
        if self.multi:
            if not isinstance(value, (list, tuple)):
                return self._typer(value, param, ctx)
            out = [self.leaf(v, param, ctx) for v in value]
            return self._typer(value, param, ctx) if any(o is _TYPER for o in out) else out
        out = self.leaf(value, param, ctx)
        return self._typer(value, param, ctx) if out is _TYPER else out


def plain_coercion(command, ctx) -> None:
    """Give each plain option of `command` (its --help too) the converter above, once; other
    options keep Typer's."""
    internals = _typer_internals()
    if internals is None:
        return
    build, coerce_cli_path = internals
    for param in command.get_params(ctx):
        desc = getattr(param, "type_descriptor", None)
        if desc is None or getattr(param, "_runtime_param", True) is not None or desc.file_annotation is not None:
            continue
        annotation = desc.annotation
        if desc.is_list:
            args = getattr(annotation, "__args__", ())
            annotation = args[0] if len(args) == 1 else None
        if desc.is_tuple or desc.is_choice or annotation is None:
            continue
        leaf = _leaf_converter(annotation, desc.parameter_info, coerce_cli_path)
        if leaf is not None:
            param._runtime_param = PlainCoercion(param, leaf, build)


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
COMMAND_MODULES = ("train", "export", "images", "data", "embed", "merge", "index", "clusters", "search",
                   "serve", "verify", "compact", "eval", "evaluate", "plot", "duplicates")
_imported: set[str] = set()
_registering = False


def _register_commands(only: str | None = None) -> None:
    """Import the command modules (all, or the one named `only`), keeping the --help order."""
    global _registering
    import importlib
    import importlib.util

    _registering = True
    try:
        for name in COMMAND_MODULES if only is None else (only,):
            if name not in _imported:
                _imported.add(name)
                if importlib.util.find_spec(f"{__name__}.{name}") is not None:
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
