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
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_map_only

from fxslim import generators
from fxslim.export_parts import short_reason
from fxslim.hooks import hooks_silenced
from fxslim.ir import attribute, meta_val
from fxslim.run_state import state_kept

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
    with torch.no_grad(), state_kept(gm) as put_back, hooks_silenced(gm), _fake_tensor_log_quiet(), \
            _autocast_cache_cleared():
        if real:
            _real_run(gm, args, mode or FakeTensorMode(allow_non_fake_inputs=True), around_node)
        elif not fake:
            _PlainProp(gm, around_node).run(*args)
        elif not real_fallback:
            _fake_run(gm, args, mode, around_node)
        else:
            try:
                _fake_run(gm, args, mode, around_node)
            except Exception as fake_error:  # e.g. DataDependentOutputException inside a leaf
                _log.info("fake shape propagation failed (%s); propagating real values", short_reason(fake_error))
                put_back()  # what the failed run left in the modules, the real one must not read
                try:
                    _real_run(gm, args, FakeTensorMode(allow_non_fake_inputs=True), around_node)
                except Exception:
                    raise fake_error from None


@contextlib.contextmanager
def _autocast_cache_cleared() -> Iterator[None]:
    """Under the caller's autocast, a fake run casts real weights and autocast caches the fake casts,
    which the caller's next real op in that region would read: the cache is emptied after it."""
    try:
        yield
    finally:
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            torch.clear_autocast_cache()


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


def _fake_run(gm: fx.GraphModule, args: Sequence[Any], mode: FakeTensorMode | None, around_node: AroundNode | None) -> None:
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeProp(gm, mode, around_node)
    if all(not isinstance(a, torch.Tensor) or mode.is_our_fake(a) for a in args):
        prop.propagate_dont_convert_inputs(*args)
    else:
        prop.propagate(*args)


def _around(around_node: AroundNode | None, n: fx.Node) -> ContextManager[Any]:
    return around_node(n) if around_node is not None else contextlib.nullcontext()


def _mutable(value: Any) -> Any:
    """``value`` with fx's immutable lists and dicts as plain ones. An Interpreter passes a node's own
    (immutable) arguments where the generated code builds fresh ones on each call, which the callee
    may edit (torchvision's swin3d: ``shift_size[i] = 0``)."""
    if isinstance(value, fx.immutable_collections.immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, fx.immutable_collections.immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class _FreshArguments:
    """Interpreter mixin: each call gets fresh mutable containers, as in the generated code."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)  # type: ignore[misc]
        return _mutable(args), _mutable(kwargs)


class _FakeProp(_FreshArguments, FakeTensorProp):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, around_node: AroundNode | None) -> None:
        super().__init__(gm, mode)
        self.around_node = around_node

    def run_node(self, n: fx.Node) -> Any:
        with _around(self.around_node, n):
            result = super().run_node(n)
        if "val" not in n.meta and isinstance(result, _PLAIN):
            n.meta["val"] = result
        return result


class _RealProp(_FreshArguments, fx.Interpreter):
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


class _PlainProp(_FreshArguments, fx.Interpreter):
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
    """A real tensor (a constant a rewrite added: HASTE's planes) as a fake one of its own sizes: under
    an exported graph's mode, whose shape env makes new sizes symbolic, the planes' size gave the
    conv's output a free symbol, and the cost model could not order the sizes."""
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return mode.from_tensor(value, static_shapes=True)
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
