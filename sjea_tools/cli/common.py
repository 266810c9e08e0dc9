"""What every command shares: consoles, the one-line error handler, JSON output, progress bars."""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..errors import SjeaError
from ..io import writing_error

if TYPE_CHECKING:
    from rich.progress import Progress

# Output to a file or pipe gets room for the wide tables (rich assumes 80 columns there) and never
# breaks a printed path across lines.
_PIPE_WIDTH = None if sys.stdout.isatty() else 160
console = Console(soft_wrap=True, width=_PIPE_WIDTH)
err_console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def _fail(e: SjeaError):
    # plain(): a message quoting a file name with a newline or odd bytes stays one printable line.
    # A terminal narrower than the message gets it wrapped between words (the terminal itself would
    # cut mid-word); a pipe or log keeps it on one line.
    err_console.print(f"[bold red]error:[/] {escape(plain(str(e)))}", highlight=False,
                      soft_wrap=not err_console.is_terminal)
    return typer.Exit(e.exit_code)


def handle_errors(fn):
    """Turn SjeaError (and Ctrl-C, and a write refused by a full, read-only or forbidden disk, see
    io.writing_error) into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SjeaError as e:
            raise _fail(e) from None
        except OSError as e:
            disk = writing_error(e)
            if disk is None:
                raise  # not the disk: a bug, keep its traceback
            raise _fail(disk) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing half-written was kept; run the same command to resume.")
            raise typer.Exit(130) from None

    return wrapper


def plain(value) -> str:
    """User-provided text (a path, a file name, a class name) as one printable line: a newline or
    another control character becomes its escape (so a table keeps one row per result) and a byte
    that was not UTF-8 (surrogate-escaped by the OS layer) becomes \\xNN instead of crashing the print."""
    out = []
    for ch in str(value):
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def literal(value) -> Text:
    """User-provided text for a rich table cell or print: shown as written, never read as markup."""
    return Text(plain(value))


def markup_safe(value) -> str:
    """User-provided text to embed in a markup string (f"wrote {markup_safe(path)}")."""
    return escape(plain(value))


# Number options. Each is a Typer option callback (callback=positive_int): nan, inf and values that
# mean nothing (zero images, negative epochs) stop at parsing as one line and exit 2, before any work.
class _BadNumber(typer.BadParameter):
    """Shown as written ("--levels must be 1 or more (got 0)."), without click's "Invalid value" prefix."""

    def format_message(self) -> str:
        return self.message


def number_check(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
                 rule: str | None = None):
    """A callback refusing non-finite values and values < minimum, <= above or > maximum; None (an
    option not given) and each item of a repeatable option are checked. `rule` completes
    "--option must be ..." (default: from the bounds)."""
    if rule is None:
        parts = ([f"above {above:g}"] if above is not None else []) + ([f"{minimum:g} or more"] if minimum is not None else [])
        parts += [f"at most {maximum:g}"] if maximum is not None else []
        rule = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(ctx, param, value):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            bad = (not math.isfinite(item) or (minimum is not None and item < minimum)
                   or (above is not None and item <= above) or (maximum is not None and item > maximum))
            if bad:
                name = next((o for o in param.opts if o.startswith("--")), param.opts[0]) if param else "value"
                raise _BadNumber(f"{name} must be {rule} (got {item}).", ctx=ctx, param=param)
        return value

    return check


def finite_float(minimum: float | None = None, maximum: float | None = None):
    return number_check(minimum, maximum)


positive_int = number_check(1, rule="1 or more")
non_negative_int = number_check(0, rule="0 or more")
positive_float = number_check(above=0, rule="a finite number above 0")
non_negative_float = number_check(0, rule="a finite number, 0 or more")
probability = number_check(0, 1, rule="a number from 0 to 1")
any_finite = number_check()


def print_json(data) -> None:
    """Machine-readable output on stdout, nothing else on it: indented for a person at a terminal,
    one line for a program (only unindented JSON gets the C encoder: 1,000 queries' hits took 0.58 s
    indented, measured, against an embed of them in 1.1 s)."""
    sys.stdout.write(json.dumps(data, indent=2 if sys.stdout.isatty() else None, default=str) + "\n")
    sys.stdout.flush()


def progress_bar(quiet: bool = False, *extra_columns) -> Progress:
    """A rich progress bar with count, rate (via extra columns), elapsed time and ETA."""
    # Imported here: a command without a bar (search) need not pay for it (0.06 s).
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

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


def quiet_option():
    """The --quiet/-q option every command with a progress bar shares."""
    return typer.Option(False, "--quiet", "-q", help="No progress bar.")


def json_option(what: str = "the result"):
    """The --json option every command shares: machine-readable output on stdout, nothing else there."""
    return typer.Option(False, "--json", help=f"Print {what} as JSON on stdout.")


def run_option(what: str = "Run folder (default: the latest run, runs/LATEST)."):
    """--run/-r: the run folder whose model a command uses."""
    return typer.Option(None, "--run", "-r", help=what)


def overwrite_option(what: str):
    """--overwrite: without it no command replaces a file it did not write in this call."""
    return typer.Option(False, "--overwrite", help=what)


def device_option(default: Optional[str], what: str):
    """--device: where the model runs."""
    return typer.Option(default, "--device", help=what)


def data_dir_option(what: str = "Folder holding the dataset's files."):
    """--data-dir: local dataset files (nothing is downloaded at run time)."""
    return typer.Option(None, "--data-dir", help=what)


def grid_option(what: str):
    """--grid: a PNG picture of what the command found."""
    return typer.Option(None, "--grid", help=what)


def no_index_option():
    """--no-index of the commands that write a store (embed, merge)."""
    return typer.Option(False, "--no-index", help="Do not build the FAISS search indexes and cluster tree afterwards.")
