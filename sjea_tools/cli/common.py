"""What every command shares: consoles, the one-line error handler, JSON output, progress bars."""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from ..errors import SjeaError

# Output to a file or pipe gets room for the wide tables (rich assumes 80 columns there) and never
# breaks a printed path across lines.
_PIPE_WIDTH = None if sys.stdout.isatty() else 160
console = Console(soft_wrap=True, width=_PIPE_WIDTH)
err_console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def handle_errors(fn):
    """Turn SjeaError (and Ctrl-C) into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SjeaError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing half-written was kept; run the same command to resume.")
            raise typer.Exit(130) from None

    return wrapper


def print_json(data) -> None:
    """Machine-readable output on stdout, nothing else on it."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress_bar(quiet: bool = False, *extra_columns) -> Progress:
    """A rich progress bar with count, rate (via extra columns), elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        *extra_columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, disable=quiet, transient=False,
    )


class RichProgress:
    """The CLI's implementation of the library's progress protocol (sjea_tools.progress): one rich
    task per stage name, created on its first report. Use as a context manager."""

    def __init__(self, quiet: bool = False, *extra_columns):
        self.bar = progress_bar(quiet, *extra_columns)
        self.tasks: dict[str, object] = {}

    def __enter__(self) -> "RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int | None = None) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(escape(task), total=total)
        self.bar.update(self.tasks[task], completed=done, total=total)


def rich_progress(quiet: bool = False, *extra_columns) -> RichProgress:
    return RichProgress(quiet, *extra_columns)
