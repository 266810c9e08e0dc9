"""Every number option of every command refuses nan, inf, negatives and (where it means nothing) zero
as one line on stderr with exit 2, before any work: the options are walked from Typer's click command
objects, so a new command or option is checked without editing this file."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sjea_tools.cli import app

runner = CliRunner()

# (command, option) where 0 is a meaningful value; everywhere else 0 must be refused.
ZERO_ALLOWED = {
    ("train", "--workers"), ("train", "--seed"), ("train", "--weight-decay"),  # in-process loading, seed 0, no decay
    ("eval", "--seed"), ("eval", "--limit"),  # eval --limit 0 = every labelled row
    ("embed", "--workers"), ("embed", "--commit-every"),  # decode in-process; commit after every batch
    ("embed", "--ray-gpus"),  # Ray tasks on CPUs of a cluster that has GPUs
    ("search", "--id"), ("clusters", "--examples"),  # row 0 is a row; no example images
    ("serve", "--port"),  # port 0: the system picks a free one
    ("search", "--min-score"),
    ("search", "--margin"),  # margin 0: the hard gate
}
# (command, option) where negative values are meaningful too.
NEGATIVE_ALLOWED = {("search", "--min-score")}  # a cosine threshold, from -1 to 1


def _number_type(param) -> type | None:
    """int or float for a number option (Optional[...] and List[...] unwrapped), else None."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:  # click-based typer: the click type names it
        return {"integer": int, "float": float}.get(getattr(param.type, "name", ""))
    annotation = descriptor.annotation
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float) else None


def number_options() -> list[tuple[str, str, type]]:
    root = typer.main.get_command(app)
    found = []
    for name, command in sorted(root.commands.items()):
        for param in command.params:
            kind = _number_type(param)
            if kind is not None and param.opts[0].startswith("-"):
                found.append((name, param.opts[0], kind))
    return found


def bad_values(command: str, option: str) -> list[str]:
    values = ["nan", "inf", "-inf"]
    values += [] if (command, option) in NEGATIVE_ALLOWED else ["-1"]
    return values if (command, option) in ZERO_ALLOWED else values + ["0"]


CASES = [pytest.param(command, option, value, id=f"{command} {option} {value}")
         for command, option, _ in number_options() for value in bad_values(command, option)]


def test_the_walk_finds_the_number_options():
    found = {(command, option): kind for command, option, kind in number_options()}
    # A few known ones of each type: an empty or broken walk must not pass the test below vacuously.
    assert found[("train", "--epochs")] is float and found[("train", "--levels")] is int
    assert found[("eval", "--probe-lr")] is float and found[("plot", "--clusters")] is int
    assert found[("export", "--opset")] is int and found[("images", "--limit")] is int
    assert len(CASES) >= 5 * len(found) - len(ZERO_ALLOWED) - len(NEGATIVE_ALLOWED)


@pytest.mark.parametrize("command,option,value", CASES)
def test_bad_number_is_one_line_and_exit_2(command, option, value):
    # The option comes first: parse-time validation must refuse it before any argument is looked at.
    result = runner.invoke(app, [command, f"{option}={value}"])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert option in lines[0], lines[0]  # names the option, not some argument checked before it
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("args", [
    ["train", "--dry-run", "--epochs", "0.5", "--levels", "1", "--seed", "0", "--workers", "0", "--json"],
])
def test_good_numbers_pass_the_same_checks(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"levels": 1' in result.stdout and '"epochs": 0.5' in result.stdout


@pytest.mark.parametrize("args,want", [
    (["search", "--zzzz"], "error: No such option: --zzzz (see 'sjea search --help')"),
    (["serch"], "error: No such command 'serch'. Did you mean 'search', 'serve'? (see 'sjea --help')"),
    (["index"], "error: Missing argument 'store'. (see 'sjea index --help')"),
])
def test_usage_errors_are_one_line_and_exit_2(args, want):
    """Typer's usage errors are caught through public names only (typer.BadParameter's base class):
    a Typer that moved them would fail here, not fall back to its multi-line panel."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.strip() == want


def test_ghost_command_names_are_gone():
    from sjea_tools import cli

    on_disk = {p.stem for p in Path(cli.__file__).parent.glob("*.py")} - {"__init__", "common"}
    assert set(cli.COMMAND_MODULES) == on_disk
