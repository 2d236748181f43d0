"""A progress bar for library work that is usually quick and sometimes is not.

``fxslim.estimate(..., symbolic=...)`` walks a graph in seconds on most models, but PyTorch's
symbolic shape reasoning can slow down node by node (maxvit_t's padded windows: 100 nodes in 11 s,
the next 200 in 150 s). A bar drawn on every call would clutter scripts; none at all leaves a user
wondering whether anything happens. So ``DelayedProgress`` draws one only once the work has taken
``delay`` seconds, only on a terminal (never into a pipe or a log file), and removes it when done.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["DelayedProgress"]


class DelayedProgress:
    """``with DelayedProgress(total, "what") as bar: ... bar.advance()``: a transient bar on stderr,
    shown from the first ``advance`` after ``delay`` seconds when stderr is a terminal."""

    def __init__(self, total: int, description: str, *, delay: float = 2.0, console: Console | None = None) -> None:
        self.total, self.description, self.delay = total, description, delay
        self.console = console if console is not None else Console(stderr=True)
        self.done = 0
        self._start = time.monotonic()
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> "DelayedProgress":
        self._start = time.monotonic()
        return self

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._bar is None:
            if not self.console.is_terminal or time.monotonic() - self._start < self.delay:
                return
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        self._bar.update(self._task, completed=self.done)

    @property
    def shown(self) -> bool:
        """Whether the bar has been drawn."""
        return self._bar is not None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
