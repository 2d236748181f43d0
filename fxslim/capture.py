"""Getting graphs out of models, in every IR fxslim reads, with shapes on every node.

- ``nn.Module`` → symbolic trace of a *copy* (never the user's instance; a fresh copy per ``trace``
  call: some models cache Proxies on themselves during a trace), traced a second time in the other
  ``.train()``/``.eval()`` mode to find where the graph reads ``self.training``. Leaves: torch.nn modules,
  modules whose class sets ``fxslim_leaf = True``, and the ``leaf_modules`` the caller names;
  timm's no-trace functions stay opaque when timm is loaded. A model that does not trace whole has its largest traceable
  submodules traced instead, each with the arguments the example always leaves at their default
  (``attn_mask=None``) traced as constants; ``Captured.untraced`` says which modules stayed eager and why.
- ``nn.Module`` with ``method="export"`` → ``torch.export`` of a copy, else of its largest
  exportable submodules (``fxslim.export_parts``); an ``ExportedProgram`` → ``ep.module()`` (aten
  ops, weights as ``get_attr``), copied so the rewrite never shares tensors with the caller's program.
- A dynamo graph (what a ``torch.compile`` backend receives) → used as is: parameters are
  placeholders whose real values come from ``example_inputs``; SymInt inputs are allowed.

Shapes come from node meta (``example_value`` / ``val``) or from propagation under FakeTensorMode.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import inspect
import logging
import operator
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.node import has_side_effect

from fxslim import generators
from fxslim.export_parts import (
    call_with, example_call, export_parts, record_calls, run_example, scratch_copy, short_reason, specs,
)
from fxslim.ir import (
    IR, META_CALL_SHAPES, META_FROZEN_MODE, META_PLACEHOLDER_FQNS, META_PREFIX, OrderedDictOutput, attribute, copy_attributes, detect_ir, meta_val, set_submodule,
)
from fxslim.hooks import HookedGraphModule, copy_hooks, has_hooks, hooked_modules, hooks_silenced
from fxslim.propagate import propagate
from fxslim.tensor_attributes import ExampleNeeded, KnownAttributes, TypedProxy, autocasts_inert
from fxslim.warn import warn_user

__all__ = ["Graph", "Captured", "CaptureError", "UnfaithfulTrace", "capture", "capture_dynamo", "trace", "placeholder_fqns", "batch_of",
           "is_input_guard", "is_mode_check"]

_log = logging.getLogger(__name__)
# a module's first call: (args, kwargs) as ``specs``, and what a submodule gave by its path under the module
Example = Callable[[], "tuple[tuple, dict, Callable[[str], Any]] | None"]


class CaptureError(RuntimeError):
    """No part of the model could be turned into a graph."""


@dataclass
class Graph:
    """One graph inside a captured model.

    ``path`` is where the GraphModule sits in ``Captured.module`` ("" = it is the whole model);
    ``placeholder_values`` maps placeholder names to real tensors (dynamo graphs: the parameters);
    ``called``: False for a submodule traced apart that the example never calls (no shapes).
    """

    path: str
    gm: fx.GraphModule
    ir: IR
    placeholder_values: dict[str, Any] = field(default_factory=dict)
    called: bool = True


@dataclass
class Captured:
    """A copy of the user's model whose traced parts are GraphModules."""

    module: nn.Module
    graphs: list[Graph]
    untraced: list[tuple[str, str]]
    method: str
    batch_size: Any = None

    @property
    def whole(self) -> bool:
        """True when the model traced as one graph."""
        return len(self.graphs) == 1 and self.graphs[0].path == ""


# ----------------------------------------------------------------------------------------------
# Symbolic tracing with a leaf policy


class _LeafTracer(fx.Tracer):
    """A Tracer whose leaves are torch.nn modules, ``fxslim_leaf`` classes and the caller's
    ``leaf_modules``."""

    def __init__(self, leaf_modules: Sequence[type] = (), example: Example | None = None) -> None:
        super().__init__(autowrap_functions=_timm_notrace_functions(), param_shapes_constant=True)
        self._leaf_types = tuple(leaf_modules)
        self._depth, self.last_type = 0, None  # last_type: of the last whole argument, the output once traced
        self.known = None if example is None else KnownAttributes(self, example)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return TypedProxy(node, self)  # a tensor's dtype and device, from the example (``tensor_attributes``)

    def create_arg(self, a: Any) -> Any:
        self._depth += 1
        try:
            return super().create_arg(a)
        finally:
            self._depth -= 1
            if not self._depth:
                self.last_type = type(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str, hooks: bool = True) -> bool:
        if getattr(type(m), "fxslim_leaf", False) or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if hooks and m is not getattr(self, "root", None) and has_hooks(m):
            return True  # traced through, its hooks would never run again (``_trace_inside_hooked``)
        return super().is_leaf_module(m, module_qualified_name)


def _timm_notrace_functions() -> tuple[Any, ...]:
    """timm's functions that must stay opaque (data-dependent Python), if timm is in use.

    timm's no-trace *modules* are not made leaves: that would hide the convs and attention inside
    them; a module that does not trace is instead split into its traceable children.
    """
    if "timm" not in sys.modules:
        return ()
    from timm.layers import get_notrace_functions

    return tuple(get_notrace_functions())


def trace(module: nn.Module, leaf_modules: Sequence[type] = (), concrete_args: dict[str, Any] | None = None,
          example: Example | None = None) -> fx.GraphModule:
    """Symbolic trace of a deep copy of ``module`` (the argument is never traced itself).

    Raises ``UnfaithfulTrace`` when forward writes into a parameter or buffer outside any leaf
    (``self.calls.add_(1)``): the write runs once on the real tensor while tracing and is not in
    the graph, so the traced module would silently stop doing it. The module then stays eager.
    The GraphModule keeps every parameter and buffer of ``module``, used or not, so its
    state_dict has the same keys. ``concrete_args``: forward arguments traced at a fixed value
    (the defaults the example does not give, so ``if mask is not None`` takes the example's branch),
    each guarded in the graph and keeping its name (``_guard_concrete_args``). ``example``: gives
    the (args, kwargs) of the module's example call (``specs``), for the dtype and device of
    traced tensors (``fxslim.tensor_attributes``); where a comparison needs it before it has run, it
    runs (outside the trace) and the module is traced again.
    Where forward passes ``self.training`` on as an argument (dropout), the GraphModule follows its
    own ``.train()``/``.eval()``; other branches on it are traced in the current mode, which
    ``gm.meta[META_FROZEN_MODE]`` then names ("train" or "eval"; ``_follow_training``).
    """
    try:
        return _trace(module, leaf_modules, concrete_args, example)
    except ExampleNeeded as need:
        need.prepare()
        return _trace(module, leaf_modules, concrete_args, example)


def _trace(module: nn.Module, leaf_modules: Sequence[type], concrete_args: dict[str, Any] | None,
           example: Example | None) -> fx.GraphModule:
    """One trace (``trace``); raises ``ExampleNeeded`` where a comparison needs the example first."""
    root = copy.deepcopy(module)
    versions, attributes, values = _tensor_versions(root), _attribute_ids(root), _attribute_values(root)
    # a draw no Proxy reaches (torch.rand(()), random.random()) runs once, now: a branch on it would
    # take the same way forever (stochastic depth written ``if self.training and torch.rand(()) < p``)
    tracer = _LeafTracer(leaf_modules, example)
    with _TRACING, generators.kept(root) as moved, _autocast_entries() as autocasts:
        graph = tracer.trace(root, concrete_args=concrete_args or None)
        drew = moved()
    if autocasts and not (example and autocasts_inert(autocasts, example)):
        raise UnfaithfulTrace(f"{type(module).__name__}.forward enters torch.autocast, which a symbolic trace does "
                              "not record (the graph would run in the caller's precision); it stays eager")
    if autocasts:  # for another device than the example's: the graph holds for the example's device only
        tracer.known.guard_devices(graph)
    if tracer.last_type is collections.OrderedDict:
        graph.set_codegen(OrderedDictOutput())  # fx returns a plain dict
    if drew:
        raise UnfaithfulTrace(f"{type(module).__name__}.forward draws random numbers a trace cannot record "
                              "(torch.rand(()), random.random(): no tensor argument), it would keep one draw; it stays eager")
    written = [name for name, version in _tensor_versions(root).items() if versions.get(name) != version]
    if written:
        raise UnfaithfulTrace(
            f"forward updates {', '.join(repr(w) for w in written)} in place, which a symbolic trace cannot "
            "record (use capture='export' or the torch.compile backend to rewrite this module)"
        )
    _check_output_computed(graph, type(module).__name__)
    _assert_messages_without_proxies(graph)
    stored = _stored_attributes(root, attributes, graph)
    if stored:
        warn_user(f"{type(module).__name__}.forward stores {', '.join(map(repr, stored[:3]))}"
                  f"{' and more' if len(stored) > 3 else ''} on the module, which its traced graph does not do: "
                  "after the rewrite they keep the value they had before (return them from forward, or read them "
                  "from the original model)")
        _put_back(root, values, stored)  # they hold this graph's Proxies: a second trace would read them
    frozen = _follow_training(module, root, graph, leaf_modules, concrete_args, example)
    if frozen is not None:
        _check_mode_at_run_time(graph, frozen, type(module).__name__)
    gm = (HookedGraphModule if has_hooks(root) else fx.GraphModule)(root, graph, type(module).__name__)
    copy_hooks(root, gm)  # fx.GraphModule copies no hooks
    copy_attributes(module, gm)  # nor attributes its graph does not read (the module's: root's may hold Proxies now)
    if frozen is not None:
        gm.meta[META_FROZEN_MODE] = frozen
    _keep_unused_state(root, gm)
    if concrete_args:
        _guard_concrete_args(gm, module, concrete_args)
    return gm


# one symbolic trace at a time: fx patches nn.Module's methods for the whole process while it traces,
# and two traces at once put back each other's patches (module calls then stayed broken)
_TRACING = threading.RLock()
_AUTOCAST_WATCH = threading.Lock()
_AUTOCAST_WATCHERS: dict[int, list[list[Any]]] = {}  # thread id -> the lists of its watches, innermost last
_AUTOCAST_ENTER = torch.amp.autocast_mode.autocast.__enter__  # autocast's own; what the patch calls


def _counted_autocast_enter(self: Any) -> Any:
    for entered in _AUTOCAST_WATCHERS.get(threading.get_ident(), ()):
        entered.append(self)
    return _AUTOCAST_ENTER(self)


@contextlib.contextmanager
def _autocast_entries() -> Iterator[list[Any]]:
    """The ``torch.autocast`` contexts (also as decorators, ``torch.cpu.amp.autocast``) this thread
    enters inside; another thread's are not counted. ``autocast.__enter__`` is patched while any
    thread watches, and put back when the last one stops."""
    entered: list[Any] = []
    me = threading.get_ident()
    with _AUTOCAST_WATCH:
        if not _AUTOCAST_WATCHERS:
            torch.amp.autocast_mode.autocast.__enter__ = _counted_autocast_enter
        _AUTOCAST_WATCHERS.setdefault(me, []).append(entered)
    try:
        yield entered
    finally:
        with _AUTOCAST_WATCH:
            mine = _AUTOCAST_WATCHERS[me]
            del mine[next(i for i, watch in enumerate(mine) if watch is entered)]  # by identity: [] == []
            if not mine:
                del _AUTOCAST_WATCHERS[me]
            if not _AUTOCAST_WATCHERS:
                torch.amp.autocast_mode.autocast.__enter__ = _AUTOCAST_ENTER


def _follow_training(module: nn.Module, root: nn.Module, graph: fx.Graph, leaf_modules: Sequence[type],
                     concrete_args: dict[str, Any] | None, example: Example | None = None) -> str | None:
    """Make ``graph`` (of ``root``, the copy of ``module``, traced in its current mode) follow
    ``.train()``/``.eval()`` of the GraphModule built from it; returns the mode it stays frozen in
    ("train" or "eval") where it cannot, else None.

    Why: Python reads of ``self.training`` run once, while tracing, so a trace is frozen in the mode
    the model had then (efficientnet prepared for QAT in train mode kept dropping residual branches
    after ``.eval()``). What: ``root`` is traced again in the other mode. Constants that are True
    in one graph and False in the other (``F.dropout(x, p, self.training)``, torchvision's
    ``stochastic_depth``) become a read of the GraphModule's ``training`` flag (``not`` it for
    ``not self.training``). A graph that differs otherwise (``if self.training: x = self.extra(x)``),
    or that fails to trace, draws random numbers or writes into a parameter or buffer in the other
    mode, stays in the mode traced. ``root``'s training flags and tensors end as they were.
    """
    mode = root.training
    flags = {m: m.training for m in root.modules()}
    versions, attributes, values = _tensor_versions(root), _attribute_ids(root), _attribute_values(root)
    for m in flags:  # each module in its other mode: a block in eval inside a model in train flips too
        m.training = not flags[m]
    try:
        with _TRACING, generators.kept(root) as moved, _autocast_entries() as autocasts:
            other = _LeafTracer(leaf_modules, example).trace(root, concrete_args=concrete_args or None)
            if moved() or (autocasts and not (example and autocasts_inert(autocasts, example))):
                other = None  # a draw decided while tracing (stochastic depth in train mode): one way forever;
                # an autocast context for the example's device, which the graph would not enter
    except Exception:  # tracing runs arbitrary user code: the other mode does not trace
        other = None
    finally:
        for m, flag in flags.items():
            m.training = flag
    _put_back(root, values, _stored_attributes(root, attributes, other or fx.Graph()))
    written = [name for name, version in _tensor_versions(root).items() if versions.get(name) != version]
    if written:  # undo them from the untouched original
        copies, originals = _tensors(root), _tensors(module)
        with torch.no_grad():
            for name in written:
                copies[name].copy_(originals[name])
    updates = None if other is None or written else _flipped_constants(root, graph, other)
    if updates is None:
        return "train" if mode else "eval"
    if not updates:
        return None
    reads: dict[tuple[str, bool], fx.Node] = {}

    def flag(path: str, train: bool) -> fx.Node:
        """The node reading the training flag of the module at ``path`` (``not`` it unless ``train``)."""
        if (path, train) not in reads:
            with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
                reads[path, train] = (graph.get_attr(f"{path}.training" if path else "training") if train else
                                      graph.call_function(operator.not_, (flag(path, True),)))
        return reads[path, train]

    for node, (args, kwargs) in updates.items():
        # the flag of the module whose forward made the call (``F.dropout(x, p, self.training)`` in a
        # block): a block put in eval mode inside a model in train mode (or the other way round) follows
        # it; the constant is that flag where it equals the module's flag at capture, else ``not`` it
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        captured = flags[root.get_submodule(path)]  # "" is the root itself
        node.args, node.kwargs = fx.node.map_aggregate(
            (args, kwargs), lambda v, path=path, captured=captured: flag(path, v.captured == captured)
            if isinstance(v, _Flag) else v)
    return None


@dataclass(frozen=True)
class _Flag:
    """Where a bool constant stands that is ``captured`` in the graph traced and the other in the graph
    traced with every module's mode flipped."""

    captured: bool


def _flipped_constants(root: nn.Module, graph: fx.Graph, other: fx.Graph) -> dict[fx.Node, tuple] | None:
    """``(args, kwargs)`` of the nodes of ``graph`` (traced with each module in its own mode) that
    have bool constants flipped in ``other`` (traced with every module's mode flipped), with
    ``_Flag``s in their place; None when the graphs differ in anything else."""
    nodes, others = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(others):
        return None
    same: dict[fx.Node, fx.Node] = {}  # node of other -> node of graph
    flipped: list[bool] = []

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(b, fx.Node) and same.get(b) is a):
                raise _Differs
            return a
        if type(a) is bool and type(b) is bool and a != b:
            flipped.append(a)
            return _Flag(captured=a)
        if type(a) is not type(b):
            raise _Differs
        if isinstance(a, dict):
            if a.keys() != b.keys():
                raise _Differs
            return {k: merge(a[k], b[k]) for k in a}
        if isinstance(a, (tuple, list)):
            if len(a) != len(b):
                raise _Differs
            items = [merge(x, y) for x, y in zip(a, b)]
            return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
        if isinstance(a, slice):
            return slice(merge(a.start, b.start), merge(a.stop, b.stop), merge(a.step, b.step))
        if not _same_constant(a, b):
            raise _Differs
        return a

    updates = {}
    try:
        for a, b in zip(nodes, others):
            if a.op != b.op or (a.target != b.target and not (
                    a.op == "get_attr" and _same_constant(attribute(root, a.target), attribute(root, b.target)))):
                return None
            same[b] = a
            before = len(flipped)
            merged = merge((a.args, a.kwargs), (b.args, b.kwargs))
            if len(flipped) > before:
                updates[a] = merged
    except _Differs:
        return None
    return updates


class _Differs(Exception):
    """The graphs of the two modes differ in more than flipped bool constants."""


def _same_constant(a: Any, b: Any) -> bool:
    """Whether two constants, one from each mode's trace, are the same value (tensors: same contents)."""
    try:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                              and a.shape == b.shape and torch.equal(a, b))
        return a is b or bool(a == b)
    except Exception:  # a comparison that does not give one bool
        return False


@has_side_effect  # a guard: dead-code elimination must keep it
def check_traced_default(value: Any, name: str, default: Any) -> Any:
    """Raise when an argument the graph was traced without (at its default) is given another value.

    Traced again (``torch.load`` rebuilds a GraphModule by tracing its code, where ``torch.fx.wrap``
    does not reach), it records itself as a call rather than compare a Proxy.
    """
    if isinstance(value, fx.Proxy):
        return value.tracer.create_proxy("call_function", check_traced_default, (value, name, default), {})
    tensors = isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor)
    if value is not default and (tensors or value != default):
        raise ValueError(
            f"{name}: the model was captured with {name}={default!r} (its default, or the example's value), so "
            f"the rewritten graph has no code for other values, got {type(value).__name__}. "
            f"Pass {name} in example_inputs, or an example that makes the model pass it, to optimize for it."
        )


torch.fx.wrap("check_traced_default")


@has_side_effect  # a guard: dead-code elimination must keep it
def check_given(value: Any, name: str) -> Any:
    """Raise when an argument the example gave (traced with a value) is left at its None default."""
    if isinstance(value, fx.Proxy):
        return value.tracer.create_proxy("call_function", check_given, (value, name), {})
    if value is None:
        raise ValueError(
            f"{name}: the model was captured with {name} given, so the rewritten graph has no code for "
            f"{name}=None (the branch its forward takes without it). Pass {name}, or optimize with an example "
            f"that leaves it out to get a graph for that call."
        )


torch.fx.wrap("check_given")


@has_side_effect  # a check: dead-code elimination must keep it
def warn_frozen_mode(training: Any, frozen: str, name: str) -> None:
    """Warn when a graph frozen in ``frozen`` mode runs with its flag in the other mode.

    An inference rewrite of an eval model warns about nothing when it is made, but a later
    ``.train()`` (fine-tuning, BN re-estimation, a training loop around it) would otherwise get
    eval behaviour where the model's own code branches on ``self.training``. Traced again (as
    ``torch.load`` does), it records itself as a call.
    """
    if isinstance(training, fx.Proxy):
        return training.tracer.create_proxy("call_function", warn_frozen_mode, (training, frozen, name), {})
    if bool(training) != (frozen == "train"):
        warn_user(f"{name}: its forward branches on self.training in a way its traced graph cannot follow, and it "
                  f"was traced in {frozen} mode, so it computes {frozen}-mode code now that it runs in "
                  f"{'train' if training else 'eval'} mode; modules it calls (BatchNorm, Dropout) do follow the "
                  f"mode. Call .train() or .eval() on the model before fxslim.prepare/optimize so that it is "
                  f"traced in the mode it will run in.")
    return None


torch.fx.wrap("warn_frozen_mode")


def _check_mode_at_run_time(graph: fx.Graph, frozen: str, name: str) -> None:
    """A ``warn_frozen_mode`` call on the GraphModule's own training flag at the start of ``graph``."""
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        graph.call_function(warn_frozen_mode, (graph.get_attr("training"), frozen, name))


def is_mode_check(node: fx.Node) -> bool:
    """Whether ``node`` is a ``warn_frozen_mode`` call."""
    return node.op == "call_function" and node.target is warn_frozen_mode


def is_input_guard(node: fx.Node) -> bool:
    """Whether ``node`` checks a forward argument (``check_given``, ``check_traced_default``)."""
    return node.op == "call_function" and node.target in (check_given, check_traced_default)


def _guard_given_optionals(gm: fx.GraphModule, module: nn.Module, values: Sequence[Any]) -> None:
    """After the placeholder of each forward argument with a None default that the call recorded in
    ``values`` gave (``forward(x, mask=None)`` called with a mask), a ``check_given`` call, unless the
    graph called with None for it gives what ``module`` gives (the argument goes straight into an op
    that takes None, such as an attention mask): the graph holds only the branch for a given value,
    and a later call without it passed None into that branch."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    guarded = False
    for index, (node, value) in enumerate(zip(placeholders, values)):
        if str(node.target).startswith("*"):
            break  # *args: positions no longer name parameters
        if node.args and node.args[0] is None and value is not None and _none_differs(gm, module, values, index):
            with gm.graph.inserting_after(node):
                gm.graph.call_function(check_given, (node, str(node.target)))
            guarded = True
    if guarded:
        gm.recompile()


def _none_differs(gm: fx.GraphModule, module: nn.Module, values: Sequence[Any], index: int) -> bool:
    """Whether ``gm`` with None at input ``index`` fails or differs from ``module`` (a copy of it)
    with None there, with their weights and with random ones: a weight that makes the two agree by
    chance (``shift = self.shift if shift is None``, zero at init) must not decide it. Both run as the
    example does (``run_example``: the same RNG state, buffers put back), with their hooks silent."""
    inputs = list(values)
    inputs[index] = None
    if _outputs_differ(gm, module, inputs, None):
        return True
    generator = torch.Generator().manual_seed(0)  # random weights only where the real ones agree
    random = {name: torch.rand(t.shape, generator=generator, dtype=t.dtype) for name, t in module.state_dict().items()
              if t.is_floating_point() and not t.is_meta}
    return _outputs_differ(gm, module, inputs, random)


def _outputs_differ(gm: fx.GraphModule, module: nn.Module, inputs: list[Any], state: dict[str, Any] | None) -> bool:
    """``_none_differs`` with the weights in ``state`` loaded into copies of both (None: as they are)."""
    try:
        runner, graph = copy.deepcopy(module), gm
        if state is not None:
            graph = copy.deepcopy(gm)
            for copied in (runner, graph):
                copied.load_state_dict(state, strict=False)
        # quiet: a GraphModule call that raises prints its failing line (fx), here an expected failure
        with contextlib.redirect_stderr(io.StringIO()):
            with hooks_silenced(runner):
                expected = run_example(runner, [], inputs)
            with hooks_silenced(graph):
                got = run_example(graph, [], inputs)
    except Exception:  # noqa: BLE001 - either one failing: the graph has no code for None
        return True
    flat_expected, flat_got = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    return len(flat_expected) != len(flat_got) or not all(
        a.shape == b.shape and torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        else type(a) is type(b) and a == b for a, b in zip(flat_expected, flat_got))


def _guard_concrete_args(gm: fx.GraphModule, module: nn.Module, concrete_args: dict[str, Any]) -> None:
    """Right after the placeholder of each argument traced at its default, a
    ``check_traced_default`` call; and that placeholder named as the argument again.

    Why the name: fx calls it ``attn_mask_1``, so a parent module passing ``attn_mask=None`` by
    keyword could not call the GraphModule. Why this guard instead of fx's own ``_assert_is_none``
    (removed here): fx's raises a bare AssertionError, dead-code elimination may drop it, and a
    graph that keeps it (PROM's converted parts) could not be loaded by ``torch.load``.
    """
    names = list(inspect.signature(module.forward).parameters)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(names) != len(placeholders):
        return
    for name, node in zip(names, placeholders):
        if name in concrete_args and not isinstance(concrete_args[name], torch.Tensor):
            node.target = name
            with gm.graph.inserting_after(node):
                gm.graph.call_function(check_traced_default, (node, name, concrete_args[name]))
    for node in gm.graph.find_nodes(op="call_function", target=torch.fx._symbolic_trace._assert_is_none):
        gm.graph.erase_node(node)
    gm.recompile()


class UnfaithfulTrace(RuntimeError):
    """A symbolic trace that would not do what the module's forward does."""


def _check_output_computed(graph: fx.Graph, name: str) -> None:
    """Raise ``UnfaithfulTrace`` when the graph computes something but returns none of it: forward
    returned what it found elsewhere at trace time, such as outputs its modules' hooks collect
    (timm's FeatureHookNet), so the graph would return that trace-time value (an empty list) forever."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    computes = any(n.op in ("call_module", "call_function", "call_method") for n in graph.nodes)
    if computes and not any(isinstance(v, fx.Node) for v in pytree.tree_leaves(output.args[0])):
        raise UnfaithfulTrace(f"{name}.forward returns values its graph does not compute (e.g. collected by hooks); "
                              "it stays eager, its submodules are rewritten")


_PROXY_TEXT = re.compile(r"Proxy\([A-Za-z_][A-Za-z0-9_]*\)")


def _assert_messages_without_proxies(graph: fx.Graph) -> None:
    """Reword the messages of ``torch._assert`` nodes that name a traced value: the f-string ran at
    trace time, so timm's "Input height ({H}) doesn't match model" reads "Input height
    (Proxy(getitem_2))" when the check fails. The value is named as unknown instead."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch._assert and len(node.args) == 2:
            message = node.args[1]
            if isinstance(message, str) and _PROXY_TEXT.search(message):
                node.args = (node.args[0], _PROXY_TEXT.sub("?", message)
                             + " [?: a size or value of this call's inputs, which the traced check does not print]")


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _attribute_ids(root: nn.Module) -> dict[str, tuple]:
    """Identity of every plain attribute of ``root`` and its submodules, by qualified name, with the
    identities of a list's, tuple's or dict's items (``self.history.append(y)`` keeps the list)."""
    def state(value: Any) -> tuple:
        if isinstance(value, dict):
            return id(value), tuple((k, id(v)) for k, v in value.items())
        return (id(value), tuple(map(id, value))) if isinstance(value, (list, tuple)) else (id(value),)

    return {f"{path}.{name}" if path else name: state(value) for path, module in root.named_modules()
            for name, value in vars(module).items() if name not in _MODULE_INTERNALS}


def _attribute_values(root: nn.Module) -> dict[str, Any]:
    """Every plain attribute of ``root`` and its submodules by qualified name, a list or dict as a
    shallow copy (forward may append to it in place): what ``_put_back`` restores."""
    def kept(value: Any) -> Any:
        return type(value)(value) if type(value) in (list, dict) else value

    return {f"{path}.{name}" if path else name: kept(value) for path, module in root.named_modules()
            for name, value in vars(module).items() if name not in _MODULE_INTERNALS}


def _put_back(root: nn.Module, values: dict[str, Any], names: Sequence[str]) -> None:
    """Give the attributes ``names`` of ``root`` the values ``_attribute_values`` took (deleting
    those forward created): a trace leaves Proxies of its graph in what forward stored
    (torchvision's ``MultiScaleRoIAlign`` sets ``self.scales`` on its first call), which a later
    trace of ``root`` would read as values of a graph not its own."""
    for name in names:
        path, _, attr = name.rpartition(".")
        owner = root.get_submodule(path)
        if name in values:
            object.__setattr__(owner, attr, values[name])
        else:
            object.__delattr__(owner, attr)


def _stored_attributes(root: nn.Module, before: dict[str, tuple], graph: fx.Graph) -> list[str]:
    """The plain attributes forward assigned while it was traced (``self.attn_map = attn``, a cache):
    the graph does not record an assignment, so after the rewrite they stop changing. Not the
    constants the tracer itself stores for the graph to read (``_tensor_constant0``)."""
    read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    return [name for name, ident in _attribute_ids(root).items() if before.get(name) != ident and name not in read]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (shared ones under each of their names)."""
    return dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))


def _tensor_versions(module: nn.Module) -> dict[str, int]:
    """In-place write counters of every parameter and buffer (a write bumps ``_version``)."""
    return {name: tensor._version for name, tensor in _tensors(module).items()}


def _keep_unused_state(root: nn.Module, gm: fx.GraphModule) -> None:
    """Copy onto ``gm`` the parameters and buffers the graph never reads, at their own paths."""
    present = set(gm.state_dict(keep_vars=True))
    for name, tensor in list(root.named_parameters()) + list(root.named_buffers()):
        if name in present:
            continue
        path, _, leaf = name.rpartition(".")
        owner = _ensure_path(gm, path)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(leaf, tensor)
        else:
            persistent = leaf not in root.get_submodule(path)._non_persistent_buffers_set
            owner.register_buffer(leaf, tensor, persistent=persistent)


def _ensure_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``, creating empty containers for missing parts."""
    module = root
    for part in path.split(".") if path else ():
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _constant_arguments(module: nn.Module, example_inputs: Sequence[Any]) -> dict[str, Any]:
    """Forward parameters to trace at a fixed value: those after the example's positional inputs
    that have a default value, and those the example gives as None.

    Why the Nones: traced as an input, ``forward(x, prev=None)`` given ``(x, None)`` took the
    ``if prev is not None`` branch, so the graph always ran the code for a given ``prev``; traced at
    None, a later call with a tensor for it raises (``check_traced_default``)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_POSITIONAL for p in params[: len(example_inputs)]):
        return {}
    given = {p.name: None for p, value in zip(params, example_inputs)  # keyword-only ones last (``example_call``)
             if value is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return given | {p.name: p.default for p in params[len(example_inputs):]
                    if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _is_leaf(module: nn.Module, leaf_modules: Sequence[type]) -> bool:
    return _LeafTracer(leaf_modules).is_leaf_module(module, "")


@dataclass
class _Blockers:
    """What one capture learns about tracing, shared by every level of the recursion so no module
    is traced twice to learn it: ``found``, the classes whose own code does not trace even with the
    failing classes below them as leaves (with why); ``traced``, the ids of modules that did trace
    (more leaves never make a traceable module untraceable); ``defaults``, the arguments of each
    submodule (by path) to trace as constants (``defaults_in_both_modes``; the example is only run
    once a submodule is to be traced apart)."""

    defaults: Callable[[], SubmoduleCalls]
    root_example: Example | None = None
    found: dict[type, str] = field(default_factory=dict)
    traced: set[int] = field(default_factory=set)

    def example(self, path: str) -> Example:
        """The example call of the module at ``path`` (the root's is the caller's example): its
        (args, kwargs), and what each submodule it calls gave (by path under it)."""
        def call() -> tuple[tuple, dict, Callable[[str], Any]] | None:
            if getattr(self.defaults, "cache_info", None) and not self.defaults.cache_info().currsize:
                raise ExampleNeeded(self.defaults)  # it runs the model: not inside a trace
            found = self.root_example() if not path else self.defaults().inputs.get(path)
            if found is None:
                return None
            outputs = self.defaults().outputs
            return (*found, lambda target: outputs.get(f"{path}.{target}" if path else target))
        return call


def _traced_constants(state: _Blockers, path: str) -> dict[str, Any]:
    """The forward arguments of the submodule at ``path`` to trace as constants: those at their
    (None or scalar) default in every call the example makes to it.

    Why: traced as inputs, the ``attn_mask=None`` and ``is_causal=False`` a timm block passes on to
    attention reach ``scaled_dot_product_attention`` as graph inputs, and HTTM skips the attention
    as masked or causal although no mask is ever given. ``trace`` guards them: a later call with
    a mask raises.
    """
    return state.defaults().constants.get(path, {})


def defaults_in_both_modes(model: nn.Module, example_inputs: Sequence[Any]) -> SubmoduleCalls:
    """``SubmoduleCalls`` of the example's calls: for each submodule path, the forward arguments at
    their default in every call the example makes, run on a copy in train mode and in eval mode
    (``constants``), and those given in one call and None in another (``both_ways``). Why the
    constants: a flag the parent passes on as ``training=self.training`` is at its default in one
    mode only, and traced as a constant it would make the other mode raise (QAT after an eval-mode
    prepare). Where the model does not run in the other mode, only None defaults
    (``attn_mask=None``) count."""
    runner = copy.deepcopy(model)
    with hooks_silenced(runner):
        calls = record_calls(runner, example_inputs)
        first = {path: c.default_args for path, c in calls.items()}
        both_ways = {path: tuple(sorted(c.both_ways)) for path, c in calls.items() if c.both_ways}
        inputs = {path: specs((c.args, c.kwargs)) for path, c in calls.items()}
        outputs = {path: c.outputs for path, c in calls.items()}
        try:
            with warnings.catch_warnings():  # a module's own train() may warn: this flip is fxslim's, on a copy
                warnings.simplefilter("ignore")
                runner.train(not model.training)
            second = record_calls(runner, example_inputs)
        except Exception:  # noqa: BLE001 - the model's own code, in the mode the caller did not pick
            return SubmoduleCalls({path: {k: v for k, v in args.items() if v is None} for path, args in first.items()},
                                  both_ways, inputs, outputs)
    return SubmoduleCalls({path: {k: v for k, v in args.items() if path not in second or k in second[path].default_args}
                           for path, args in first.items()}, both_ways, inputs, outputs)


class SubmoduleCalls(NamedTuple):
    """What the example's calls of each submodule (by path) say about tracing it: ``constants``, the
    arguments at their default in every call (``defaults_in_both_modes``); ``both_ways``, the
    arguments with a None default that are None in one call and given in another (``block(x)`` and
    ``block(x, skip=y)``): a trace takes ``if skip is not None`` one way, so such a module stays eager."""

    constants: dict[str, dict[str, Any]]
    both_ways: dict[str, tuple[str, ...]]
    inputs: dict[str, tuple[tuple, dict]]  # the first call's (args, kwargs), as ``specs``
    outputs: dict[str, dict[str, Any]]  # by ``call_signature``, the first output (``specs``) of such calls


def _trace_apart(module: nn.Module, leaf_modules: tuple[type, ...], concrete_args: dict[str, Any],
                 both_ways: tuple[str, ...] = (), example: Example | None = None) -> fx.GraphModule:
    """``trace`` with ``concrete_args``, else without them: fx cannot write some signatures with a
    constant (a keyword-only argument after ``*args`` gets a default before one without). A module
    the example calls with and without an optional argument (``both_ways``) is refused."""
    if both_ways:
        raise UnfaithfulTrace(f"called with and without {', '.join(map(repr, both_ways))}: a trace would take "
                              "'is None' one way for every call")
    try:
        return trace(module, leaf_modules, concrete_args, example)
    except Exception:  # tracing runs arbitrary user code: retry without the constants, else fail as it does
        if not concrete_args:
            raise
        return trace(module, leaf_modules, example=example)


def _find_blockers(module: nn.Module, path: str, leaf_modules: tuple[type, ...], state: _Blockers) -> None:
    """Add to ``state`` what the modules under ``module`` (at ``path``) show (bottom up)."""
    for name, child in module.named_children():
        if type(child) in state.found or id(child) in state.traced or _is_leaf(child, leaf_modules + tuple(state.found)):
            continue
        child_path = f"{path}.{name}" if path else name
        _find_blockers(child, child_path, leaf_modules, state)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            continue  # containers are never called; their items are
        try:
            _trace_apart(child, leaf_modules + tuple(state.found), _traced_constants(state, child_path),
                         state.defaults().both_ways.get(child_path, ()), state.example(child_path))
            state.traced.add(id(child))
        except Exception as exc:  # tracing runs arbitrary user code: any failure means "not traceable"
            state.found[type(child)] = short_reason(exc)


def _trace_largest(
    module: nn.Module, path: str, leaf_modules: Sequence[type],
    traced: list[tuple[str, fx.GraphModule]], untraced: list[tuple[str, str]],
    concrete_args: dict[str, Any], state: _Blockers,
) -> None:
    """Trace ``module`` (at ``path``, with ``concrete_args``) whole; else whole with the classes
    that do not trace (a RoPE with a data-dependent table, a patch embedding with an assert) as
    leaves, whose insides are then traced apart; else recurse into its children (largest traceable
    parts win). Submodules are traced with their ``_traced_constants`` fixed."""
    leaf_modules = tuple(leaf_modules)
    try:
        # the root is called once, by the caller (and a submodule's calls are only run for once it is traced apart)
        gm = _trace_apart(module, leaf_modules, concrete_args, state.defaults().both_ways.get(path, ()) if path else (),
                          state.example(path))
        traced.append((path, gm))
        _trace_inside_hooked(module, gm, path, leaf_modules, traced, untraced, state)
        return
    except Exception as exc:  # tracing runs arbitrary user code: any failure means "not whole"
        reason = short_reason(exc)
    _find_blockers(module, path, leaf_modules, state)
    blockers = state.found
    if blockers and type(module) not in blockers:
        try:
            gm = trace(module, leaf_modules + tuple(blockers), concrete_args, state.example(path))
        except Exception:  # the module's own code does not trace either
            gm = None
        if gm is not None:
            traced.append((path, gm))
            _trace_inside_hooked(module, gm, path, leaf_modules, traced, untraced, state)
            for name, leaf in module.named_modules():
                if name and type(leaf) in blockers and _called_in(gm, name):
                    full = f"{path}.{name}" if path else name
                    untraced.append((full, f"traced as a leaf: {blockers[type(leaf)]}"))
                    for child_name, child in leaf.named_children():
                        child_path = f"{full}.{child_name}"
                        _trace_largest(child, child_path, leaf_modules, traced, untraced,
                                       _traced_constants(state, child_path), state)
            return
    untraced.append((path, reason))
    _log.info("module %r does not trace whole (%s); tracing its children", path or type(module).__name__, reason)
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        _trace_largest(child, child_path, leaf_modules, traced, untraced, _traced_constants(state, child_path), state)


def _trace_inside_hooked(
    module: nn.Module, gm: fx.GraphModule, path: str, leaf_modules: tuple[type, ...],
    traced: list[tuple[str, fx.GraphModule]], untraced: list[tuple[str, str]], state: _Blockers,
) -> None:
    """A module with hooks that ``gm`` (traced from ``module``) calls as a leaf is traced apart:
    its GraphModule takes over its hooks (``trace``), so they keep running, with the
    GraphModule as their ``module`` argument. torch.nn layers with hooks stay as they are (passes
    skip them as ``module_hooks``)."""
    done = {p for p, _ in traced}
    for node in gm.graph.nodes:
        full = f"{path}.{node.target}" if path else str(node.target)
        if node.op != "call_module" or full in done:
            continue
        leaf = module.get_submodule(str(node.target))
        if has_hooks(leaf) and not _LeafTracer(leaf_modules).is_leaf_module(leaf, "", hooks=False):
            done.add(full)
            _trace_largest(leaf, full, leaf_modules, traced, untraced, _traced_constants(state, full), state)


def _hooks_from(hooked: dict[str, nn.Module], root: nn.Module) -> None:
    """Give each module of ``root`` at a path of ``hooked`` the hooks of the module that was there
    before graphs replaced it. Each graph was traced from a copy of its own, with copies of whatever
    its hooks are bound to; a hook bound to an object the model holds (timm's FeatureHooks, which
    forward reads back) must reach the root's copy of it, or forward reads nothing."""
    for path, before in hooked.items():
        try:
            now = root.get_submodule(path)
        except AttributeError:  # inside a graph's code, not a module any more
            continue
        if now is not before:
            copy_hooks(before, now)


def _called_in(gm: fx.GraphModule, name: str) -> bool:
    return any(n.op == "call_module" and n.target == name for n in gm.graph.nodes)


# ----------------------------------------------------------------------------------------------
# Shapes


def _concretise_data_dependent(gm: fx.GraphModule, inputs: dict[str, Any]) -> None:
    """Sizes an export left data-dependent (``u0`` rows of a table built from
    ``int(positions.max()) + 1``) become the example's values, as shapes elsewhere are: costs and
    passes compare sizes, which an unbacked symbol cannot answer."""
    if not any(free_unbacked_symbols(n.meta.get("val")) for n in gm.graph.nodes):
        return
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if set(names) != set(inputs):
        raise CaptureError(f"capture: the example values of the exported graph's inputs {names} are unknown")
    propagate(gm, [inputs[name] for name in names], real=True)


def _placeholder_values(gm: fx.GraphModule, args: Sequence[Any]) -> dict[str, Any]:
    """Placeholder name -> the real value the example gives it (passes read shape-built values,
    such as positions, from them)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(names, args))


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The inputs of a captured submodule call, in placeholder order."""
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def _record_submodule_inputs(model: nn.Module, root: nn.Module, graphs: list[Graph], example_inputs: Sequence[Any]) -> None:
    """Run the (partly traced) model once and propagate each subgraph's first call inputs; a subgraph
    called with inputs of several shapes (one block serving frame and global attention) gets their
    number in ``gm.meta[META_CALL_SHAPES]``: a rewrite decided on one call's shapes serves them all."""
    seen: dict[str, list[Any]] = {}
    shapes: dict[str, set] = {}

    def recorder(graph: Graph) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = _positional(graph.gm, args, kwargs)
            seen.setdefault(graph.path, inputs)
            shapes.setdefault(graph.path, set()).add(
                tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in inputs))
        return hook

    # on a copy sharing the weights: what forward writes into plain attributes (a call counter, a list
    # of means, a buffer assigned anew) stays in the copy, not in the model returned
    runner = scratch_copy(root)
    with hooks_silenced(runner):
        run_example(runner, [(runner.get_submodule(graph.path), recorder(graph)) for graph in graphs], example_inputs)
    for graph in graphs:
        if len(shapes.get(graph.path, ())) > 1:
            graph.gm.meta[META_CALL_SHAPES] = len(shapes[graph.path])
        if graph.path in seen:
            graph.placeholder_values = _placeholder_values(graph.gm, seen[graph.path])
            propagate(graph.gm, seen[graph.path], real_fallback=True)
            _guard_given_optionals(graph.gm, model.get_submodule(graph.path), seen[graph.path])
        else:
            graph.called = False
            _log.info("submodule %r was not called by the example inputs; it has no shapes", graph.path)


def _inputs_as_recorded(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Whether the shapes and dtypes in ``gm``'s placeholder meta are those of ``example_inputs``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        recorded = meta_val(node)
        if isinstance(value, torch.Tensor) != isinstance(recorded, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (tuple(recorded.shape) != tuple(value.shape)
                                                or recorded.dtype != value.dtype):
            return False
    return len(placeholders) >= len(example_inputs)


def _needs_shapes(gm: fx.GraphModule) -> bool:
    return any(n.op not in ("output",) and "val" not in n.meta and "example_value" not in n.meta for n in gm.graph.nodes)


def batch_of(example_inputs: Sequence[Any] | None) -> Any:
    """The batch size of a call: the first dim of its first tensor with a dim (None without one)."""
    for x in example_inputs or ():
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return x.shape[0]
    return None


# ----------------------------------------------------------------------------------------------
# Dynamo graphs


_DYNAMO_PARAM = re.compile(r"^[lL]_(?:self|fn|mod|model|m)_")
_DYNAMO_SPLIT = re.compile(r"(?:^|_)(?:modules|parameters|buffers)_")


_SOURCE_STEP = re.compile(r"\._(modules|parameters|buffers)\['([^']*)'\]")


def _source_fqn(node: fx.Node) -> str | None:
    """The parameter/buffer name of a placeholder from the source dynamo recorded for it
    (``G['net']._modules['0']._parameters['weight']`` -> ``0.weight``), whatever the model was
    reached as (``self``, a global, a closure); None for anything else."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    steps = _SOURCE_STEP.findall(name) if isinstance(name, str) else []
    if not steps or steps[-1][0] == "modules" or not name.endswith(f"._{steps[-1][0]}['{steps[-1][1]}']"):
        return None
    return ".".join(step for _, step in steps)


def placeholder_fqns(gm: fx.GraphModule) -> dict[str, str]:
    """Placeholder name -> original parameter/buffer name, for the parameters dynamo lifted to inputs:
    from dynamo's source of each placeholder, else (a graph without it) from the name dynamo gives it."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        fqn = _source_fqn(node)
        if fqn is not None:
            out[node.name] = fqn
            continue
        if not _DYNAMO_PARAM.match(node.name):
            continue
        rest = _DYNAMO_PARAM.sub("", node.name)
        if not re.search(r"(?:^|_)(?:parameters|buffers)_", rest):
            continue
        parts = [p for p in _DYNAMO_SPLIT.split(rest) if p]
        out[node.name] = ".".join(parts).rstrip("_")
    return out


def _dynamo_values(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n.name: v for n, v in zip(placeholders, example_inputs)}


def capture_dynamo(model: nn.Module, example_inputs: Sequence[Any], *, dynamic: bool | None = None) -> list[Graph]:
    """The graphs dynamo hands a backend for ``model(*example_inputs)`` (one per graph break)."""
    graphs: list[Graph] = []

    def record(gm: fx.GraphModule, inputs: list[Any]) -> Any:
        graphs.append(_dynamo_graph(gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(copy.deepcopy(model), backend=record, dynamic=dynamic)
        with torch.no_grad():
            args, kwargs = example_call(model, example_inputs)  # the compiled wrapper takes (*args, **kwargs)
            compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return graphs


def _dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Graph:
    gm.meta[META_PLACEHOLDER_FQNS] = placeholder_fqns(gm)
    return Graph(path="", gm=gm, ir=detect_ir(gm), placeholder_values=_dynamo_values(gm, example_inputs))


# ----------------------------------------------------------------------------------------------
# Entry point


def as_example(example_inputs: Any, model: Any = None) -> tuple[Any, ...] | None:
    """``example_inputs`` as a tuple (a lone tensor is one input), or None; a ValueError naming the
    argument for anything else, and for fewer inputs than ``model.forward`` requires."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        hint = " (torch.from_numpy(a) makes it a tensor)" if type(example_inputs).__module__ == "numpy" else ""
        raise ValueError(f"example_inputs: expected a tensor or a tuple/list of the forward's inputs, got "
                         f"{type(example_inputs).__name__}{hint}")
    example = tuple(example_inputs)
    forward = getattr(model, "forward", None) if isinstance(model, nn.Module) else None
    if forward is not None:
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):  # a builtin or C forward: nothing to compare with
            params = []
        required = [p.name for p in params if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(example) < len(required):
            raise ValueError(f"example_inputs: {type(model).__name__}.forward takes {required}, got {len(example)} "
                             f"input(s); pass one value for each, e.g. ({', '.join(required)},)")
        keywords = [p for p in params if p.kind is p.KEYWORD_ONLY]
        keyword = [p.name for p in keywords if p.default is inspect.Parameter.empty]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # values past the positional parameters go to the keyword-only ones in order (``example_call``),
        # so the example fills them up to the last required one
        last = max((i for i, p in enumerate(keywords) if p.name in keyword), default=-1)
        through = [p.name for p in keywords[: last + 1]]
        if keyword and len(example) < len(positional) + len(through):
            raise ValueError(f"example_inputs: {type(model).__name__}.forward requires the keyword-only "
                             f"argument(s) {keyword}, which positional example inputs do not give; pass them "
                             f"after the others, in order: ({', '.join(positional + through)},)")
    return example


def leaf_module_types(leaf_modules: Any) -> tuple[type, ...]:
    """``leaf_modules`` as a tuple of nn.Module subclasses (a lone class is one); ValueError otherwise."""
    if isinstance(leaf_modules, type):
        leaf_modules = (leaf_modules,)
    if isinstance(leaf_modules, (str, bytes)) or not isinstance(leaf_modules, (tuple, list, set, frozenset)):
        raise ValueError(f"leaf_modules: expected module classes, e.g. (nn.MultiheadAttention,), got "
                         f"{type(leaf_modules).__name__}")
    wrong = [m for m in leaf_modules if not (isinstance(m, type) and issubclass(m, nn.Module))]
    if wrong:
        raise ValueError(f"leaf_modules: expected nn.Module subclasses (the classes, not names or instances), got "
                         f"{wrong[0]!r}")
    return tuple(leaf_modules)


def compiled_original(model: Any, returns: str | None = None) -> Any:
    """The module ``torch.compile`` wrapped, for a model it returned (an ``OptimizedModule``: its
    attributes read through to that module, but a copy of it still runs the original's forward, so
    what fxslim rewrote in the copy would never run); any other model as it is. ``returns``: the
    function that returns a model made from it, which warns that this model is not compiled."""
    if not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model
    if returns:
        warn_user(f"{returns}: took the module torch.compile wrapped ({type(model._orig_mod).__name__}); the model "
                  "it returns is not compiled: torch.compile(it, backend='fxslim') compiles it")
    return model._orig_mod


def _copyable(model: Any) -> Any:
    """``model``, or a copy of it when it holds a tensor autograd made as a plain attribute, which
    ``copy.deepcopy`` refuses ("Only Tensors created explicitly by the user (graph leaves) support the
    deepcopy protocol"): the ``weight`` of ``torch.nn.utils.weight_norm`` (the old function) before any
    forward under no_grad. In the copy that tensor is detached; its forward hook computes it anew."""
    if not isinstance(model, nn.Module):
        return model
    made = {id(value): value.detach().clone() for m in model.modules() for value in vars(m).values()
            if isinstance(value, torch.Tensor) and not value.is_leaf}
    return copy.deepcopy(model, made) if made else model


def capture(
    model: nn.Module | fx.GraphModule | torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | None = None,
    *,
    method: str = "symbolic",
    leaf_modules: Sequence[type] = (),
) -> Captured:
    """Graphs for ``model`` (a copy of it: the caller's model is never modified).

    ``method``: "symbolic" (default; keeps module names and parameters) or "export" (aten IR).
    GraphModules and ExportedPrograms are taken in the IR they are in.
    """
    if method not in ("symbolic", "export"):
        raise ValueError(f"capture: method must be 'symbolic' or 'export', got {method!r}")
    model = _copyable(compiled_original(model))
    example_inputs = as_example(example_inputs, model)
    leaf_modules = leaf_module_types(leaf_modules)
    batch = batch_of(example_inputs)

    if isinstance(model, torch.export.ExportedProgram):
        gm = copy.deepcopy(model.module())
        return Captured(gm, [Graph("", gm, "aten")], [], "export", batch)

    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        ir = detect_ir(gm)
        if ir == "torch" or (example_inputs is not None and _is_dynamo_graph(gm)):
            graph = _dynamo_graph(gm, example_inputs or ())
        else:
            graph = Graph("", gm, ir)
            if _needs_shapes(gm) or (example_inputs is not None and not _inputs_as_recorded(gm, example_inputs)):
                if example_inputs is None:
                    raise ValueError("capture: example_inputs are needed to infer shapes of a GraphModule without node meta")
                propagate(gm, example_inputs, real_fallback=True)  # the shapes of these inputs, not earlier ones
        return Captured(gm, [graph], [], "graph", batch)

    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: model must be an nn.Module, GraphModule or ExportedProgram, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(f"capture: {type(model).__name__} is TorchScript, whose code fx cannot trace; pass the "
                           "nn.Module it was scripted from (torch.jit.script(model): pass model)")
    if example_inputs is None:
        raise ValueError("capture: example_inputs are required for an nn.Module (shapes come from them)")

    if method == "export":
        hooked = [path or type(model).__name__ for path in hooked_modules(model)]
        if hooked:
            warn_user(f"capture='export': torch.export inlines the hooks of {', '.join(map(repr, hooked))}: what they "
                      "return is in the graph, but they do not run when it runs (a hook that records outputs sees "
                      "nothing); the default capture='symbolic' keeps them running")
        try:
            root, parts, eager = export_parts(model, example_inputs)
        except Exception as exc:  # torch.export's own error: nothing of the model exported
            raise CaptureError(
                f"capture='export': {type(model).__name__} does not export, nor any of its submodules "
                f"({short_reason(exc)}). Fix: capture='symbolic' (the default), which keeps code that does not "
                "trace eager and rewrites the parts that do, or torch.compile(model, backend='fxslim'), or make "
                "forward exportable (torch.cond instead of a Python branch on a tensor value)") from exc
        graphs = []
        for part in parts:
            part.gm.meta[META_PREFIX] = part.path
            _concretise_data_dependent(part.gm, part.inputs)
            if not part.path:  # torch's exported module runs a later tensor for an input exported at None, unused
                nones = {k: v for k, v in _constant_arguments(model, example_inputs).items() if v is None}
                if nones:
                    _guard_concrete_args(part.gm, model, nones)
            graphs.append(Graph(part.path, part.gm, "aten", part.inputs))
        return Captured(root, graphs, eager, "export", batch)

    traced: list[tuple[str, fx.GraphModule]] = []
    untraced: list[tuple[str, str]] = []
    defaults = functools.cache(lambda: defaults_in_both_modes(model, example_inputs))
    root_example = functools.cache(lambda: specs(example_call(model, example_inputs)))
    _trace_largest(model, "", leaf_modules, traced, untraced, _constant_arguments(model, example_inputs),
                   _Blockers(defaults, root_example))
    if not traced:
        raise CaptureError(_untraceable_message(model, untraced, leaf_modules))
    if len(traced) == 1 and traced[0][0] == "":
        gm = traced[0][1]
        _guard_given_optionals(gm, model, example_inputs)
        graph = Graph("", gm, "module", _placeholder_values(gm, example_inputs))
        propagate(gm, example_inputs, real_fallback=True)
        return Captured(gm, [graph], untraced, "symbolic", batch)

    traced.sort(key=lambda item: item[0].count(".") + bool(item[0]))  # parents before what nests in them
    root = traced[0][1] if traced[0][0] == "" else copy.deepcopy(model)
    hooked = hooked_modules(root)
    graphs = []
    for path, gm in traced:
        gm.meta[META_PREFIX] = path
        if path:
            set_submodule(root, path, gm)
        graphs.append(Graph(path, gm, "module"))
    _hooks_from(hooked, root)
    _tied_as_in(model, root)
    _record_submodule_inputs(model, root, graphs, example_inputs)
    return Captured(root, graphs, untraced, "symbolic", batch)


def _tied_as_in(model: nn.Module, root: nn.Module) -> None:
    """Make the parameters ``model`` holds at several names one parameter again in ``root``, its
    copy assembled from parts traced apart: a module used at two places (``other.c = shared``) was
    traced apart at each, and each part held its own copy, so QAT trained them apart."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in (g for g in names.values() if len(g) > 1):
        try:
            first = root.get_parameter(group[0])
        except AttributeError:
            continue
        for name in group[1:]:
            path, _, leaf = name.rpartition(".")
            try:
                owner = root.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(getattr(owner, leaf, None), nn.Parameter):
                owner.register_parameter(leaf, first)


def _is_dynamo_graph(gm: fx.GraphModule) -> bool:
    return "dynamo_compile_id" in gm.meta or any(
        n.op == "placeholder" and "example_value" in n.meta for n in gm.graph.nodes
    )


def _untraceable_message(model: nn.Module, untraced: list[tuple[str, str]], leaf_modules: tuple[type, ...]) -> str:
    worst = untraced[0][1] if untraced else "unknown"
    if _is_leaf(model, leaf_modules):  # leaf_modules cannot help: the whole model is the leaf
        return (
            f"{type(model).__name__} could not be traced ({worst}). It is kept as one opaque op only inside "
            f"a model, and here it is the whole model. Fix: capture='export', or wrap it in a module whose "
            f"forward calls it, or use the torch.compile backend (backend='fxslim')."
        )
    return (
        f"{type(model).__name__} could not be traced, nor any of its submodules ({worst}). "
        "Fix: pass leaf_modules=(TheFailingModuleClass,) so fxslim treats it as opaque, set "
        "`fxslim_leaf = True` on that class, or give fxslim a graph from torch.export "
        "(capture='export') or use the torch.compile backend (backend='fxslim')."
    )
