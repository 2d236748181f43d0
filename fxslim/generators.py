"""The random generators, put back after fxslim's own traces and runs of a model's copy.

Torch's default (CPU) generator, Python's ``random``, NumPy's legacy ``np.random`` (when NumPy is
loaded), and the ``torch.Generator`` and ``numpy.random.Generator`` objects a module keeps as
attributes: a trace or an example run of code that draws from them (dropout or stochastic depth in
train mode, ``random.random()`` in forward) must not move the caller's streams, so that code seeded
before ``fxslim.optimize`` draws the same numbers after it. ``kept`` also tells whether anything
drew: a symbolic trace uses that to find draws it could not record.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["kept"]


@contextlib.contextmanager
def kept(module: nn.Module | None = None) -> Iterator[Callable[[], bool]]:
    """Put every global generator, and each generator object an attribute of ``module`` or of its
    submodules holds, back on exit; yields a function that tells whether any has moved since entry."""
    numpy = sys.modules.get("numpy")
    saved = [_Saved(torch.random.get_rng_state, torch.random.set_rng_state, torch.equal),
             _Saved(random.getstate, random.setstate, _equal)]
    if numpy is not None:
        saved.append(_Saved(numpy.random.get_state, numpy.random.set_state, _equal))
    saved += [_of(g) for g in _attribute_generators(module, numpy)]

    def moved() -> bool:
        return any(s.moved() for s in saved)

    try:
        yield moved
    finally:
        for s in saved:
            s.restore()


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
