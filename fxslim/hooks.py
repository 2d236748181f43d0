"""Module hooks across a capture: which modules have them, moving them, and not firing them.

A symbolic trace inlines a module's forward, so hooks on a module traced through would never run
again (feature extraction, Grad-CAM, pruning); capture keeps such modules as graph nodes and
gives a GraphModule traced from one the hooks of its source. fxslim's own runs of a copy (shape
propagation, recording calls) run with the copy's hooks silenced: they would see Proxies, fake
tensors or an extra call of the example.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch.fx as fx
from torch import nn

__all__ = ["HookedGraphModule", "copy_hooks", "has_hooks", "hooked_modules", "hooks_silenced"]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_KEPT = (*_HOOKS, *_HOOK_FLAGS, "_is_full_backward_hook")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks of its own."""
    return any(getattr(module, name, None) for name in _HOOKS)


def hooked_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``module`` (itself at "") that have hooks, by path."""
    return {path: m for path, m in module.named_modules() if has_hooks(m)}


def copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the hooks of ``source`` (the same hook functions, in the same order), and
    whether its backward hooks are full ones (torch runs none while that flag is unset)."""
    for name in _HOOKS + _HOOK_FLAGS:
        value = getattr(source, name, None)
        if value:
            setattr(target, name, copy.copy(value))
    if source._backward_hooks:
        target._is_full_backward_hook = source._is_full_backward_hook


@contextlib.contextmanager
def hooks_silenced(module: nn.Module) -> Iterator[None]:
    """Run ``module`` (one fxslim owns: a copy) without the hooks of it and its submodules."""
    saved = [(m, name, getattr(m, name)) for m in module.modules() if has_hooks(m)
             for name in _HOOKS + _HOOK_FLAGS if hasattr(m, name)]
    try:
        for m, name, value in saved:
            setattr(m, name, type(value)())
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


class HookedGraphModule(fx.GraphModule):
    """A GraphModule traced from a module with hooks, which it runs (``copy_hooks``) and keeps through
    ``copy.deepcopy`` and ``torch.save``/pickle: fx rebuilds a GraphModule and drops forward hooks."""

    def __reduce__(self) -> tuple:
        rebuild, args = super().__reduce__()
        return _with_hooks, (rebuild, args)

    def __deepcopy__(self, memo: dict) -> fx.GraphModule:
        copied = super().__deepcopy__(memo)
        for name in _KEPT:
            if name in self.__dict__:
                setattr(copied, name, copy.deepcopy(self.__dict__[name], memo))
        return copied


def _with_hooks(rebuild: object, args: tuple) -> fx.GraphModule:
    """Unpickle: fx's rebuilt GraphModule made a ``HookedGraphModule`` again, with the pickled hooks."""
    gm = rebuild(*args)  # type: ignore[operator]
    hooked = HookedGraphModule.__new__(HookedGraphModule)  # fx's own per-instance class, as deepcopy expects
    type(hooked).__name__ = type(gm).__name__
    hooked.__dict__ = gm.__dict__
    hooked.recompile()  # the generated forward lives on the class
    body = args[0]
    for name in _KEPT:
        if name in body:
            setattr(hooked, name, body[name])
    return hooked
