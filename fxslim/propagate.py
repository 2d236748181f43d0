"""Shapes on every node: ``meta['val']`` written by one propagation, whatever the values are.

Every part of fxslim that needs shapes calls ``propagate``:

- capture, on the real example: fake tensors first (no compute), and when a fake run cannot go
  through (a leaf whose output size depends on input values, ``int(positions.max()) + 1`` rows)
  one run on the real values, keeping a fake copy of each result (``real_fallback``);
- capture of an exported graph whose sizes stayed data-dependent: the real values (``real=True``);
- PROM convert, on the prepared graph's input shapes;
- the cost model: under its own FakeTensorMode with symbolic sizes (``mode=``, inputs already
  fake), or on meta tensors (``mode=None`` with ``fake=False``), recording each node's aten ops
  through ``around_node``.

Plain Python results (``x.device``, ``x.dtype``) are kept in ``meta['val']`` too, so that
``propagate_node``, the single-node replay after a rewrite inserts a node, can rebuild every argument.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import numbers
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_map_only

from fxslim import generators
from fxslim.export_parts import buffers_kept, short_reason
from fxslim.hooks import hooks_silenced
from fxslim.ir import attribute, meta_val

__all__ = ["propagate", "propagate_node"]

_log = logging.getLogger(__name__)
_PLAIN = (torch.device, torch.dtype, str, type(None))

AroundNode = Callable[[fx.Node], ContextManager[Any]]


def propagate(gm: fx.GraphModule, args: Sequence[Any], *, mode: FakeTensorMode | None = None, fake: bool = True,
              real: bool = False, real_fallback: bool = False, around_node: AroundNode | None = None) -> None:
    """Write ``meta['val']`` on every node of ``gm`` by running it on ``args``.

    ``fake`` (default): under ``mode`` (a fresh one if None; real ``args`` are converted, fake ones
    used as they are). ``fake=False``: on ``args`` as they are (meta tensors). ``real``: on the
    real ``args``, storing fake copies. ``real_fallback``: fake first, real if the fake run fails
    (the fake run's error is raised if both fail). ``around_node(node)``: a context entered around
    each node's run (the cost model records aten ops in it).
    """
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(names) and not any(str(t).startswith("*") for t in names):  # else silently dropped
        raise ValueError(f"example_inputs: the model takes {len(names)} input(s) {names}, got {len(args)}")
    with torch.no_grad(), _module_state_kept(gm), hooks_silenced(gm), _fake_tensor_log_quiet():
        if real:
            _real_run(gm, args, mode or FakeTensorMode(allow_non_fake_inputs=True), around_node)
        elif not fake:
            _PlainProp(gm, around_node).run(*args)
        elif not real_fallback:
            _fake_run(gm, args, mode, around_node)
        else:
            try:
                with _module_state_kept(gm):  # what the failed run left in the modules, the real one must not read
                    _fake_run(gm, args, mode, around_node)
            except Exception as fake_error:  # e.g. DataDependentOutputException inside a leaf
                _log.info("fake shape propagation failed (%s); propagating real values", short_reason(fake_error))
                try:
                    _real_run(gm, args, FakeTensorMode(allow_non_fake_inputs=True), around_node)
                except Exception:
                    raise fake_error from None


def _real_run(gm: fx.GraphModule, args: Sequence[Any], mode: FakeTensorMode, around_node: AroundNode | None) -> None:
    """``_RealProp`` on copies of the caller's tensors (an in-place op of the model, ``x.mul_(2)``,
    would write into the example), its draws put back (dropout in the graph moved the caller's stream)."""
    copies = tree_map_only(torch.Tensor, torch.Tensor.clone, tuple(args))
    with generators.kept(gm):
        _RealProp(gm, mode, around_node).run(*copies)


@contextlib.contextmanager
def _fake_tensor_log_quiet() -> Iterator[None]:
    """FakeTensorMode logs the traceback of every op that fails (an example of the wrong shape: 18
    lines on stderr) before raising it; the error reaches the caller anyway, named by its node."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))  # _parameters, _buffers, _modules, hook dicts, training
_GRAPH_MODULE_INTERNALS = _MODULE_INTERNALS | frozenset(vars(fx.GraphModule(torch.nn.Module(), fx.Graph())))  # meta


def _internals(target: Any) -> frozenset[str]:
    """The attributes torch keeps on a module for itself (a GraphModule's graph, code and ``meta``)."""
    if isinstance(target, fx.GraphModule):
        return _GRAPH_MODULE_INTERNALS
    return _MODULE_INTERNALS if isinstance(target, torch.nn.Module) else frozenset()
_FROZEN = (torch.fx.immutable_collections.immutable_dict, torch.fx.immutable_collections.immutable_list)
_NOT_STATE = (torch.nn.Module, torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType,
              types.BuiltinFunctionType, functools.partial, str, bytes, numbers.Number, enum.Enum, *_FROZEN)
_MISSING = object()


class _Saved:
    """What one object held before a run, and how to put it back: a dict's, list's or set's items
    (also a subclass's, through the base type's own methods), or an object's attributes (its
    ``__dict__`` and ``__slots__``; for a module, not nn.Module's own bookkeeping)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.base = next((t for t in (dict, list, set) if isinstance(target, t)), None)
        if self.base is not None:
            self.items = self.base(target)
            return
        internal = _internals(target)
        self.attrs = {k: v for k, v in vars(target).items() if k not in internal} if hasattr(target, "__dict__") else None
        self.slots = {name: getattr(target, name, _MISSING) for name in _slot_names(type(target))}

    def values(self) -> list[Any]:
        if self.base is dict:
            return list(self.items.values())
        if self.base is not None:
            return list(self.items)
        return [*(self.attrs or {}).values(), *(v for v in self.slots.values() if v is not _MISSING)]

    def restore(self) -> None:
        target = self.target
        if self.base is not None:
            self.base.clear(target)
            (list.extend if self.base is list else self.base.update)(target, self.items)
            return
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


def _slot_names(cls: type) -> list[str]:
    return [name for c in cls.__mro__ for name in getattr(c, "__slots__", ()) if name not in ("__dict__", "__weakref__")]


def _mutable_state(gm: fx.GraphModule) -> list[_Saved]:
    """What a run may change in place: each module's own attributes, the dicts, lists and sets among
    them, and the Python objects they hold (VGGT's ``PositionGetter`` keeps its cache in a dict), also
    inside tuples, two levels deep."""
    found: list[_Saved] = []
    seen: set[int] = set()

    def visit(value: Any, depth: int) -> None:
        if id(value) in seen or depth < 0 or isinstance(value, _NOT_STATE):
            return
        seen.add(id(value))
        if isinstance(value, tuple):
            for item in value:
                visit(item, depth)
            return
        if isinstance(value, (dict, list, set)) or hasattr(value, "__dict__") or _slot_names(type(value)):
            found.append(_Saved(value))
            for item in found[-1].values():
                visit(item, depth - 1)

    for m in gm.modules():
        found.append(_Saved(m))
        for value in found[-1].values():
            visit(value, 2)
    return found


@contextlib.contextmanager
def _module_state_kept(gm: fx.GraphModule):
    """Put back ``gm``'s buffers and what a run changed in its modules (``_mutable_state``): attribute
    values, container contents, attributes added. A train-mode BN counts the run in
    ``num_batches_tracked`` (a momentum=None BN then averages its statistics over one batch too
    many); a leaf's forward pre-hook sets an attribute on each call (spectral_norm's ``weight``); a
    cache is filled on the first call. Under fake tensors each would be left holding a FakeTensor,
    which the model reads on its next call (a data-dependent op on it fails) or ``torch.save`` fails on."""
    state = _mutable_state(gm)
    try:
        with buffers_kept(gm):
            yield
    finally:
        for saved in state:
            saved.restore()


def _fake_run(gm: fx.GraphModule, args: Sequence[Any], mode: FakeTensorMode | None, around_node: AroundNode | None) -> None:
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeProp(gm, mode, around_node)
    if all(not isinstance(a, torch.Tensor) or mode.is_our_fake(a) for a in args):
        prop.propagate_dont_convert_inputs(*args)
    else:
        prop.propagate(*args)


def _around(around_node: AroundNode | None, n: fx.Node) -> ContextManager[Any]:
    return around_node(n) if around_node is not None else contextlib.nullcontext()


class _FakeProp(FakeTensorProp):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, around_node: AroundNode | None) -> None:
        super().__init__(gm, mode)
        self.around_node = around_node

    def run_node(self, n: fx.Node) -> Any:
        with _around(self.around_node, n):
            result = super().run_node(n)
        if "val" not in n.meta and isinstance(result, _PLAIN):
            n.meta["val"] = result
        return result


class _RealProp(fx.Interpreter):
    """Runs on real values and keeps a fake copy of each result in ``meta['val']``."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, around_node: AroundNode | None) -> None:
        super().__init__(gm)
        self.mode = mode
        self.around_node = around_node

    def run_node(self, n: fx.Node) -> Any:
        with _around(self.around_node, n):
            result = super().run_node(n)
        if n.op != "output":
            n.meta["val"] = fx.node.map_aggregate(
                result, lambda v: self.mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
        return result


class _PlainProp(fx.Interpreter):
    """Runs on the given values (meta tensors) and stores each result as it is."""

    def __init__(self, gm: fx.GraphModule, around_node: AroundNode | None) -> None:
        super().__init__(gm)
        self.around_node = around_node

    def run_node(self, n: fx.Node) -> Any:
        with _around(self.around_node, n):
            result = super().run_node(n)
        n.meta["val"] = result
        return result


# ----------------------------------------------------------------------------------------------
# One node, after a rewrite


def _fake_of(value: Any, mode: FakeTensorMode) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return mode.from_tensor(value)
    return value


def propagate_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """``node.meta['val']`` of one node a rewrite inserted, from the values already on its inputs:
    its target runs on their fake values (the rest of the graph is not run again)."""
    def value(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return attribute(gm, arg.target) if arg.op == "get_attr" else meta_val(arg)
        return arg

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    vals = [v for v in _flatten((args, kwargs)) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
    args = fx.node.map_aggregate(args, lambda a: _fake_of(a, mode))
    kwargs = fx.node.map_aggregate(kwargs, lambda a: _fake_of(a, mode))
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # modules called by call_module nodes hold real parameters
    try:
        out = _run_fake(gm, node, args, kwargs, mode)
    finally:
        mode.allow_non_fake_inputs = allow
    if out is not None:
        node.meta["val"] = out


def _run_fake(gm: fx.GraphModule, node: fx.Node, args: Any, kwargs: Any, mode: FakeTensorMode) -> Any:
    with mode, torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return None


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [x for item in obj for x in _flatten(item)]
    if isinstance(obj, dict):
        return [x for item in obj.values() for x in _flatten(item)]
    return [obj]
