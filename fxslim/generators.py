"""The global random generators, put back after fxslim's own traces and runs of a model's copy.

Torch's default (CPU) generator, Python's ``random`` and NumPy's legacy ``np.random`` (when NumPy is
loaded): a trace or an example run of code that draws from them (dropout or stochastic depth in
train mode, ``random.random()`` in forward) must not move the caller's streams, so that code seeded
before ``fxslim.optimize`` draws the same numbers after it. ``kept`` also tells whether anything
drew: a symbolic trace uses that to find draws it could not record.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator

import torch

__all__ = ["kept"]


@contextlib.contextmanager
def kept() -> Iterator[Callable[[], bool]]:
    """Put every global generator back on exit; yields a function that tells whether any of them
    has moved since entry."""
    numpy = sys.modules.get("numpy")
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None

    def moved() -> bool:
        return (not torch.equal(torch.random.get_rng_state(), torch_state) or random.getstate() != python_state
                or (numpy_state is not None and not _same_numpy_state(numpy.random.get_state(), numpy_state)))

    try:
        yield moved
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(python_state)
        if numpy_state is not None:
            numpy.random.set_state(numpy_state)


def _same_numpy_state(a: tuple, b: tuple) -> bool:
    """NumPy's legacy ``get_state()`` tuples: (name, key array, position, has_gauss, cached_gaussian)."""
    return a[0] == b[0] and bool((a[1] == b[1]).all()) and tuple(a[2:]) == tuple(b[2:])
