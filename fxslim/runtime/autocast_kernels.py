"""What fxslim's ops do under ``torch.autocast("cpu")``: their AutocastCPU kernels, in one library.

An op without one runs its kernel with autocast still on, so the convs and matmuls inside it run
in the autocast dtype. HASTE's conv casts its inputs as ``conv2d`` does and then runs without
autocast (``fxslim.runtime.haste``); PROM's integer ops run as if autocast were off
(``exclude_autocast``): they sum integer codes in float32, exact only there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["autocast_off", "register_autocast", "exclude_autocast"]

_LIB = torch.library.Library("fxslim", "FRAGMENT")


def autocast_off() -> Any:
    """A context in which the ops called run without the AutocastCPU dispatch key."""
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def register_autocast(name: str, kernel: Callable[..., Any]) -> None:
    """``kernel(keyset, *args, **kwargs)`` as the AutocastCPU kernel of ``fxslim::<name>``."""
    _LIB.impl(name, kernel, "AutocastCPU", with_keyset=True)


def exclude_autocast(*names: str) -> None:
    """Give each op ``fxslim::<name>`` an AutocastCPU kernel running it as if autocast were off."""
    for name in names:
        op = getattr(torch.ops.fxslim, name).default

        def kernel(_keyset: Any, *args: Any, op: Any = op, **kwargs: Any) -> Any:
            with autocast_off():
                return op(*args, **kwargs)

        register_autocast(name, kernel)
