"""In-place ops in graphs: never dead, and their results stand for the tensor they wrote.

``torch.fx.Graph.eliminate_dead_code`` only knows side effects of aten ops with a mutable schema
and a fixed list of functions. A symbolic or dynamo graph of ordinary model code says "in place"
in other ways — ``y.relu_()`` (call_method), ``torch.relu_(y)``, ``F.relu(y, inplace=True)``,
``nn.ReLU(inplace=True)`` (call_module), ``operator.iadd`` (dynamo's ``y += 1``), a buffer's
``add_`` — and its result is often unused, so plain dead-code elimination deletes it and changes
what the model computes. Every pass cleans its graph with ``remove_dead_code`` instead.

Matchers follow data flow, so ``y = conv(x); y.relu_(); out = other(y)`` looks like a conv
feeding ``other`` with a dangling ReLU. ``make_inplace_explicit`` makes every later reader of ``y``
read the in-place op's result instead: that result *is* ``y`` (PyTorch's in-place ops return the
tensor they wrote), so nothing changes at run time, and the graph now says conv -> ReLU -> other.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Collection
from typing import Any

import torch.fx as fx

__all__ = ["mutates_input", "make_inplace_explicit", "remove_dead_code", "unused_calls"]

_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
})


def _inplace_name(name: str) -> bool:
    """PyTorch's naming rule: ``relu_``, ``add_`` write into their first argument; ``__dunder__`` do not."""
    return name.endswith("_") and not name.endswith("__")


@functools.lru_cache(maxsize=None)
def _signature(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def _inplace_argument(target: Any, args: tuple, kwargs: dict) -> bool:
    """True when a call passes ``inplace=True``, by keyword or by position (``F.relu(y, True)``)."""
    if kwargs.get("inplace") is True:
        return True
    signature = _signature(target)
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def mutates_input(node: fx.Node) -> bool:
    """True when running ``node`` writes into one of its inputs (or any state the graph reads)."""
    if node.op == "call_method":
        return _inplace_name(str(node.target))
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS or _inplace_name(getattr(target, "__name__", "")):
            return True
        return _inplace_argument(target, node.args, node.kwargs)
    if node.op == "call_module":
        owner = node.graph.owning_module
        module = owner.get_submodule(str(node.target)) if owner is not None else None
        return getattr(module, "inplace", False) is True
    return False


def _returns_what_it_wrote(node: fx.Node) -> bool:
    """In-place methods and functions return their first argument; so do torch.nn's modules with
    ``inplace=True`` (activations, dropout). Other modules' outputs are not assumed to alias."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(str(node.target))
        return type(module).__module__.startswith("torch.nn.")
    return True


def make_inplace_explicit(gm: fx.GraphModule) -> bool:
    """Redirect readers of a tensor that come after an in-place write to it to the write's result.
    Returns True when the graph changed."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = False
    for node in list(gm.graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node) or not mutates_input(node):
            continue
        if not _returns_what_it_wrote(node):
            continue
        written = node.args[0]
        for user in list(written.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(written, node)
                changed = True
    return changed


def unused_calls(gm: fx.GraphModule) -> set[fx.Node]:
    """The calls whose results nothing reads: what the model ran for its effect alone (a check that
    raises, a log, ``torch.mul(y, 2, out=buf)``), which a rewrite must keep as the model had it."""
    return {n for n in gm.graph.nodes if not n.users and n.op.startswith("call_")}


def remove_dead_code(gm: fx.GraphModule, keep: Collection[fx.Node] = ()) -> bool:
    """Erase nodes whose results are unused and that neither mutate nor have other side effects;
    ``keep``: nodes to keep all the same (``unused_calls`` before a rewrite: only what the rewrite
    left unused goes). A call with an ``out=`` tensor writes it, so it is never dead."""
    def impure(n: fx.Node) -> bool:
        return n.is_impure() or mutates_input(n) or n in keep or n.kwargs.get("out") is not None
    return gm.graph.eliminate_dead_code(is_impure_node=impure)
