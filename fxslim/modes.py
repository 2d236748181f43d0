"""Building models outside ``torch.inference_mode``.

A model copied, traced or converted inside inference mode gets inference tensors: they have no
version counter (capture reads versions to see forward's writes, kernels to see weight changes)
and cannot be saved for backward, so the result would fail later, far from the cause. fxslim's
entry points that build a model run outside inference mode, with grad mode as the caller had it
(``torch.inference_mode(False)`` alone turns grad on).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["outside_inference_mode"]

F = TypeVar("F", bound=Callable[..., Any])


def outside_inference_mode(fn: F) -> F:
    """Run ``fn`` with inference mode off and grad mode unchanged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
