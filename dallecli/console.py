"""The one console: progress bars, summaries and the one-line error style.

Every command reports through this module so that `--quiet` and `--debug` mean the same everywhere.
Progress and messages go to stderr; a command's final summary goes to stdout.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text



def _console(stderr: bool) -> Console:
    """Off a terminal (a log file, a pipe) rich would wrap and cut lines at 80 columns: paths in a summary
    ended in "…". There, lines are as long as they need (COLUMNS still sets a width)."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 1000
    return console


err = _console(stderr=True)
out = _console(stderr=False)


@dataclass
class Settings:
    quiet: bool = False
    debug: bool = False


settings = Settings()


class UserError(Exception):
    """A mistake the user can fix: printed as one red line (what, where, what to do), exit code 2."""

    exit_code = 2


def info(message: str) -> None:
    if not settings.quiet:
        err.print(message)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet: they say something the user should know."""
    err.print(Text("warning: ", style="yellow bold") + Text(message), soft_wrap=True)


def print_error(message: str) -> None:
    # soft_wrap: one line even in a log file (rich would hard-wrap at 80 columns off a terminal)
    err.print(Text("error: ", style="red bold") + Text(message, style="red"), soft_wrap=True)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 error", "2 errors": a count with its noun in the right number (`plural` where it is not noun + "s")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def summary(title: str, rows: dict[str, object]) -> None:
    """The closing lines of a command: what was written where. Printed to stdout even with --quiet."""
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    out.print(table)


class _RateColumn(ProgressColumn):
    """Items per second over the whole task, with the unit the caller names (img/s, tok/s)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.fields.get("rate_count", task.completed) / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.1f} {self.unit}/s", style="cyan")


class Bar:
    """A handle on one progress bar. `advance(n, rate_count=k, loss=x)` moves it."""

    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress = progress
        self._task = task_id
        self._rate_count = 0
        self.started = time.perf_counter()

    def advance(self, n: int = 1, *, rate_count: int | None = None, **fields: object) -> None:
        self._rate_count += n if rate_count is None else rate_count
        if self._progress is None:
            return
        update: dict[str, object] = {"advance": n, "rate_count": self._rate_count}
        if fields:
            update["status"] = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, **update)

    def set_total(self, total: int | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    @property
    def rate(self) -> float:
        """Items counted for the rate per second since the bar started."""
        elapsed = time.perf_counter() - self.started
        return self._rate_count / elapsed if elapsed > 0 else 0.0


@contextmanager
def progress(description: str, total: int | None, unit: str = "it", start: int = 0,
             show: bool = True) -> Iterator[Bar]:
    """A rich progress bar with count, rate, elapsed time, ETA and a free-form status (the loss).

    Silent under --quiet or when stderr is not a terminal and no total is known, and in the processes of a
    `--gpus N` launch other than the first (one bar, not one per process).
    """
    if not show or settings.quiet or (os.environ.get("DALLE_LAUNCHED") == "1" and os.environ.get("RANK", "0") != "0"):
        yield Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=err, transient=False, refresh_per_second=4) as bar:
        task_id = bar.add_task(description, total=total, completed=start, status="", rate_count=0)
        yield Bar(bar, task_id)


def run_guarded(func, *args, **kwargs):
    """Run a command body: user errors become one red line and exit code 2 (a traceback only with --debug)."""
    try:
        return func(*args, **kwargs)
    except UserError as exc:
        if settings.debug:
            raise
        print_error(str(exc))
        sys.exit(exc.exit_code)
