"""The command line a benchmark ran with, for its results file (so a reader can run it again)."""

from __future__ import annotations

import sys

__all__ = ["command_line"]


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m <module>`` and its arguments: ``argv`` when main() was given it, else the process's."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])
