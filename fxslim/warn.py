"""Warnings that point at the user's line, not at fxslim's or torch's internals.

A warning raised deep in a pass or the cost model (``stacklevel=2`` names the fxslim function
that called it) is attributed to the first frame outside the fxslim and torch packages, so the
user sees which of their calls it concerns. Python 3.12's ``skip_file_prefixes`` does this; 3.11
has no such argument.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_user"]

_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the innermost caller outside fxslim and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
