"""The random generators, put back after fxslim's own traces and runs of a model's copy, and the
draws that code makes.

Torch's default (CPU) generator, Python's ``random``, NumPy's legacy ``np.random`` (when NumPy is
loaded), and the ``torch.Generator`` and ``numpy.random.Generator`` objects a module keeps as
attributes: a trace or an example run of code that draws from them (dropout or stochastic depth in
train mode, ``random.random()`` in forward) must not move the caller's streams, so that code seeded
before ``fxslim.optimize`` draws the same numbers after it.

The global generators are shared by every thread of the process: their state cannot tell whose
draws moved it, and putting it back replays another thread's numbers. Torch's, the one drawn from
most (a loader's augmentations), is watched on this thread only: ops tagged
``nondeterministic_seeded`` seen below the dispatcher (a mode is per thread), and put back only when
one ran, or when its seed changed (``torch.manual_seed`` in forward draws nothing). Python's
and NumPy's are compared by state: another thread drawing from them at the same moment counts as a
draw (the module then stays eager) and is put back.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["kept"]


@contextlib.contextmanager
def kept(module: nn.Module | None = None) -> Iterator[Callable[[], bool]]:
    """Watch the draws inside; on exit put back each global generator drawn from and each generator
    object an attribute of ``module`` or of its submodules holds. Yields a function that tells
    whether the code inside drew so far."""
    numpy = sys.modules.get("numpy")
    compared = [_of(g) for g in _attribute_generators(module, numpy)]
    compared.append(_Saved(random.getstate, random.setstate, _equal))
    if numpy is not None:
        compared.append(_Saved(numpy.random.get_state, numpy.random.set_state, _equal))
    torch_state, seed, ops = torch.random.get_rng_state(), torch.initial_seed(), _SeededOps()

    def reseeded() -> bool:  # torch.manual_seed in forward: no draw, but the caller's stream starts over
        return torch.initial_seed() != seed

    def moved() -> bool:
        return ops.seen or reseeded() or any(s.moved() for s in compared)

    try:
        with ops:
            yield moved
    finally:
        for s in compared:
            if s.moved():
                s.restore()
        if ops.seen or reseeded():
            torch.random.set_rng_state(torch_state)


class _SeededOps(TorchDispatchMode):
    """Notes whether a torch op that draws from a generator ran (on this thread: modes are per thread)."""

    supports_higher_order_operators = True  # torch.cond in a model: run it (without this, no rule: an error)

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))  # its branches' own draws go unwatched
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = True
        return func(*args, **(kwargs or {}))


class _Saved:
    def __init__(self, get: Callable[[], Any], set_: Callable[[Any], None], equal: Callable[[Any, Any], bool]) -> None:
        self.get, self.set, self.equal, self.state = get, set_, equal, get()

    def moved(self) -> bool:
        return not self.equal(self.get(), self.state)

    def restore(self) -> None:
        self.set(self.state)


def _of(generator: Any) -> _Saved:
    if isinstance(generator, torch.Generator):
        return _Saved(generator.get_state, generator.set_state, torch.equal)
    bits = generator.bit_generator  # numpy.random.Generator
    return _Saved(lambda: bits.state, lambda state: setattr(bits, "state", state), _equal)


def _attribute_generators(module: nn.Module | None, numpy: Any) -> list[Any]:
    """The distinct generator objects held by plain attributes of ``module`` and its submodules."""
    if module is None:
        return []
    kinds = (torch.Generator,) + ((numpy.random.Generator,) if numpy is not None else ())
    found = {id(v): v for m in module.modules() for v in vars(m).values() if isinstance(v, kinds)}
    return list(found.values())


def _equal(a: Any, b: Any) -> bool:
    """Equality of generator states that may hold NumPy arrays (its legacy ``get_state()`` tuple)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if hasattr(a, "shape") and hasattr(b, "shape"):
        return a.shape == b.shape and bool((a == b).all())
    return a == b
