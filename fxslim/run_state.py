"""What a run of a model changes in its modules, and putting it back.

Shape propagation runs a graph on fake tensors (and, when that fails, on real values). A run
changes more than buffers: a train-mode BN counts it in ``num_batches_tracked`` (a momentum=None
BN then averages its statistics over one batch too many); a forward pre-hook sets an attribute
(spectral_norm's ``weight``); a cache is filled on the first call (VGGT's ``PositionGetter`` keeps
one in a dict, in a plain object the module holds); a submodule is built on the first call. Under
fake tensors each would be left holding a FakeTensor, which the model reads on its next call (a
data-dependent op on it fails) or ``torch.save`` fails on. ``state_kept`` puts back what the
modules of a graph and the user-defined objects they hold had before.

What is walked: each module's own attributes, and from them (two levels deep, through tuples
too) dicts, lists and sets, and objects of classes defined outside torch and the standard library
(a logger, an Event or a Queue is shared with the rest of the process: a run's change to them is
not the model's to undo). Containers of more than ``_VISIT_ITEMS`` items are put back, but their
items are not walked (a list of 300k samples would cost seconds per run).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx

from fxslim.export_parts import saved_buffers

__all__ = ["state_kept"]

_log = logging.getLogger(__name__)

_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))  # _parameters, _buffers, _modules, hook dicts, training
_GRAPH_MODULE_INTERNALS = _MODULE_INTERNALS | frozenset(vars(fx.GraphModule(torch.nn.Module(), fx.Graph())))  # meta
_REGISTERED = ("_modules", "_parameters", "_buffers")  # a module built or registered during the run is removed
_FROZEN = (fx.immutable_collections.immutable_dict, fx.immutable_collections.immutable_list)
_NOT_OURS = frozenset(sys.stdlib_module_names) | {"torch", "numpy", "sympy", "builtins"}
_VISIT_ITEMS = 1000
_MISSING = object()


def _internals(target: Any) -> frozenset[str]:
    """The attributes torch keeps on a module for itself (a GraphModule's graph, code and ``meta``)."""
    if isinstance(target, fx.GraphModule):
        return _GRAPH_MODULE_INTERNALS
    return _MODULE_INTERNALS if isinstance(target, torch.nn.Module) else frozenset()


def _slot_names(cls: type) -> list[str]:
    """Attribute names of the ``__slots__`` of ``cls`` and its bases (private ones mangled)."""
    names = []
    for c in cls.__mro__:
        slots = getattr(c, "__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            names.append(f"_{c.__name__.lstrip('_')}{name}" if name.startswith("__") and not name.endswith("__") else name)
    return names


def _walked(value: Any) -> bool:
    """Whether a run's change to ``value`` is the model's: containers, and objects of user-defined classes."""
    if isinstance(value, (*_FROZEN, torch.nn.Module, torch.Tensor, type)):
        return False
    if isinstance(value, (dict, list, set)):  # also OrderedDict, defaultdict, a user's subclass
        return True
    if type(value).__module__.split(".")[0] in _NOT_OURS:
        return False
    return hasattr(value, "__dict__") or bool(_slot_names(type(value)))


class _Saved:
    """What one object held before a run: a container's items (a subclass's through its own methods),
    and its attributes (``__dict__`` and ``__slots__``; a module's without torch's bookkeeping, but
    with the names it has registered)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.kind = next((t for t in (dict, list, set) if isinstance(target, t)), None)
        self.items = self.kind(target) if self.kind is not None else None
        internal = _internals(target)
        has_dict = isinstance(getattr(target, "__dict__", None), dict)
        self.attrs = {k: v for k, v in vars(target).items() if k not in internal} if has_dict else None
        self.slots = {name: getattr(target, name, _MISSING) for name in _slot_names(type(target))}
        self.registered = ({name: set(getattr(target, name)) for name in _REGISTERED}
                           if isinstance(target, torch.nn.Module) else {})

    def values(self) -> list[Any]:
        items = [] if self.items is None else list(self.items.values() if self.kind is dict else self.items)
        attrs = [*(self.attrs or {}).values(), *(v for v in self.slots.values() if v is not _MISSING)]
        return (items if len(items) <= _VISIT_ITEMS else []) + attrs

    def restore(self) -> None:
        target = self.target
        if self.items is not None and not _same_items(target, self.items, self.kind):
            if self.kind is list:
                target[:] = self.items
            else:
                target.clear()
                target.update(self.items)
        if self.attrs is not None:  # only what changed: a read-only object is left as it is
            internal = _internals(target)
            for name in [k for k in vars(target) if k not in internal and k not in self.attrs]:
                del target.__dict__[name]
            for name, value in self.attrs.items():
                if target.__dict__.get(name, _MISSING) is not value:
                    target.__dict__[name] = value
        for name, value in self.slots.items():
            if getattr(target, name, _MISSING) is value:
                continue
            if value is _MISSING:
                delattr(target, name)
            else:
                object.__setattr__(target, name, value)
        for name, before in self.registered.items():
            table = getattr(target, name)
            for key in [k for k in table if k not in before]:
                del table[key]


def _same_items(target: Any, items: Any, kind: type) -> bool:
    if len(target) != len(items):
        return False
    if kind is dict:
        return all(k in items and items[k] is v for k, v in target.items())
    return all(a is b for a, b in zip(target, items)) if kind is list else target == items


def _mutable_state(gm: fx.GraphModule) -> list[_Saved]:
    """``_Saved`` of every module of ``gm`` and of what they hold (module docstring), each once."""
    found: dict[int, _Saved] = {}
    depths: dict[int, int] = {}

    def visit(value: Any, depth: int) -> None:
        if depth < 0 or depths.get(id(value), -1) >= depth:
            return
        if isinstance(value, tuple):
            depths[id(value)] = depth
            for item in value[:_VISIT_ITEMS]:
                visit(item, depth)
            return
        if not _walked(value):
            return
        depths[id(value)] = depth  # reached again from nearer a module: walked deeper, saved once
        if id(value) not in found:
            found[id(value)] = _Saved(value)
        for item in found[id(value)].values():
            visit(item, depth - 1)

    for m in gm.modules():
        found[id(m)] = _Saved(m)
        for value in found[id(m)].values():
            visit(value, 2)
    return list(found.values())


@contextlib.contextmanager
def state_kept(gm: fx.GraphModule) -> Iterator[Callable[[], None]]:
    """Put back ``gm``'s buffers and what a run changed in its modules (module docstring), on leaving
    and whenever the ``put_back`` it gives is called (between a failed run and the next). A value
    that cannot be put back is logged and left: the run's own error, if any, is the one raised."""
    state, buffers = _mutable_state(gm), saved_buffers(gm)

    def put_back() -> None:
        buffers()
        for saved in state:
            try:
                saved.restore()
            except Exception as error:  # noqa: BLE001 - user objects: one that refuses must not hide the rest
                _log.info("could not put back %s after a shape run: %s", type(saved.target).__name__, error)

    try:
        yield put_back
    finally:
        put_back()
