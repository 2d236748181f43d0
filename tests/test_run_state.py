"""What a shape run leaves in a model's modules: put back (fxslim.run_state), for the containers and
objects research code keeps caches in, without touching what the process shares."""

from __future__ import annotations

import collections
import logging

import torch
from torch import nn

from fxslim.capture import trace
from fxslim.propagate import propagate


class _Slotted:
    __slots__ = "__cache"

    def __init__(self) -> None:
        self.__cache = None

    def fill(self, value):
        self.__cache = value

    def read(self):
        return self.__cache


class _Caches(dict):
    """A dict subclass with an attribute of its own."""


class _Lazy(nn.Module):
    """Fills caches of every kind on a call, and builds a submodule on its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.ordered, self.caches, self.slotted = collections.OrderedDict(), _Caches(), _Slotted()
        self.caches.last = None
        self.log = logging.getLogger("fxslim.tests.run_state")
        self.samples = [(i, i) for i in range(5000)]

    def forward(self, x):
        self.ordered[tuple(x.shape)] = x
        self.caches[tuple(x.shape)] = x
        self.caches.last = x
        self.slotted.fill(x)
        self.log.addHandler(logging.NullHandler())  # the process's logger: not the model's to undo
        if not hasattr(self, "proj"):
            self.proj = nn.Linear(x.shape[-1], 2)
        return self.proj(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lazy = _Lazy()

    def forward(self, x):
        return self.lazy(x) * 2


def test_a_shape_run_leaves_no_fake_tensor_in_caches_and_keeps_what_the_process_shares():
    """An OrderedDict cleared through dict's own methods lost its order list (KeyError on items());
    a dict subclass's attribute, a private ``__slots__`` entry and a submodule built during the run
    kept the fake run's tensors. A logger (shared with the process) is left as the run left it."""
    gm = trace(_Net(), leaf_modules=[_Lazy])
    lazy = gm.lazy
    lazy.ordered[(1,)] = torch.zeros(1)
    handlers = len(lazy.log.handlers)
    propagate(gm, (torch.randn(3, 4),))
    assert [key for key, _ in lazy.ordered.items()] == [(1,)]
    assert dict(lazy.caches) == {} and lazy.caches.last is None and lazy.slotted.read() is None
    assert not hasattr(lazy, "proj") and "proj" not in dict(lazy.named_children())
    assert len(lazy.samples) == 5000
    assert len(lazy.log.handlers) == handlers + 1
