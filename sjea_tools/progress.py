"""The one progress protocol of the library.

Library functions that take time accept `progress: ProgressFn | None = None` and stay silent when
it is None. They report with `progress(task, done, total)`: `task` names the stage ("decoding",
"level 0 index"), `done` is the cumulative count of finished units in that stage, `total` the
expected count (None when unknown). The CLI turns these calls into rich progress bars
(cli/common.py: `rich_progress`); a notebook or a server can pass any callable of that shape.
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, task: str, done: int, total: int | None = None) -> None: ...


def report(progress: ProgressFn | None, task: str, done: int, total: int | None = None) -> None:
    """Call `progress` if there is one: lets library code report without an if at every step."""
    if progress is not None:
        progress(task, done, total)


class Counter:
    """Cumulative counting for code that learns about work in increments (`advance(n)`)."""

    def __init__(self, progress: ProgressFn | None, task: str, total: int | None = None):
        self.progress, self.task, self.total, self.done = progress, task, total, 0
        report(progress, task, 0, total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        report(self.progress, self.task, self.done, self.total)
