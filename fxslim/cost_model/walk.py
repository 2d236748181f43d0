"""Raw counts per node, before conventions: views, registered formulas, recorded aten ops.

Conv, linear and attention nodes are costed from their canonical views in every IR, and an
attention chain is one row (its matmuls are not counted again). A node whose target has a
registered formula is costed directly; any other node's aten ops (recorded while its shapes were
propagated, or by running it on meta tensors) are costed through the registry. Ops without a
formula are collected per op name for ``CostReport.unknown_ops``. Each weight is attributed to
the first node that reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._ops import OpOverload, OpOverloadPacket
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fxslim.capture import Graph
from fxslim.cost_model.conventions import Conventions
from fxslim.cost_model.registry import (
    OpCall, OpCost, TensorSpec, format_of_dtype, lookup, op_namespace, registered_kind, spec_of,
)
from fxslim.cost_model.shapes import NodeRunner, Source
from fxslim.cost_model.views import attention_bias_adds, view_cost
from fxslim.ir import AttentionView, ConvView, LinearView, META_PLACEHOLDER_FQNS, META_PREFIX, View, attribute, meta_val, node_fqn, views
from fxslim.runtime.haste_counts import HasteBuckets

__all__ = ["RawRow", "RawRowCounter", "is_zero"]

_log = logging.getLogger(__name__)


@dataclass
class RawRow:
    """A node's counts as its formulas gave them (conventions not applied yet)."""

    graph: str
    name: str  # the node's name, or "(eager) <module>" for the eager code of an untraced module
    op: str
    fqn: str
    kind: str = "data"
    macs: Any = 0
    elementwise: Any = 0
    ops: dict = field(default_factory=dict)
    declared: str | None = None
    dtype: str | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    out: TensorSpec | None = None
    params: list[tuple[str, Any, torch.Tensor | None]] = field(default_factory=list)  # (name, tensor, real values)
    has_bias: bool = False
    bias_adds: Any = None  # the bias additions where they are not one per output element (an MHA's projections)
    bytes_read: Any = None
    bytes_written: Any = None
    cost_params: Any = None
    storage_bits: Any = None
    measured_macs: Any = None
    zero_fraction: float | None = None
    unknown: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    mac_parts: dict = field(default_factory=dict)  # (kind, declared format or None) -> MACs, per op

    def add(self, cost: OpCost, kind: str) -> None:
        """Add one op's cost; the row's kind is that of its first MAC op, else its first costed op.
        Its MACs are also kept by the op's kind and format (``mac_parts``): a leaf module's row may
        hold a 1x1 and a 3x3 conv, or an int8 conv beside a float matmul, each priced as its own."""
        kind = cost.kind or kind
        if not is_zero(cost.macs):
            key = (kind, cost.format)
            self.mac_parts[key] = self.mac_parts.get(key, 0) + cost.macs
        if not is_zero(cost.macs) and is_zero(self.macs):
            self.kind = kind
        elif is_zero(self.macs) and self.kind == "data" and kind != "data":
            self.kind = kind
        self.macs = self.macs + cost.macs
        self.elementwise = self.elementwise + cost.elementwise
        for k, v in cost.ops.items():
            self.ops[k] = self.ops.get(k, 0) + v
        if cost.format is not None and self.declared is None:
            self.declared = cost.format
        for name in ("bytes_read", "bytes_written", "storage_bits", "measured_macs", "zero_fraction"):
            value = getattr(cost, name)
            if value is not None:
                setattr(self, name, value if getattr(self, name) is None else getattr(self, name) + value)
        if cost.params is not None:
            self.cost_params = cost.params if self.cost_params is None else self.cost_params + cost.params
        self.info.update(cost.info)


def is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}"
    target = node.target
    if isinstance(target, (OpOverload, OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target))


def _fqn(node: fx.Node, gm: fx.GraphModule) -> str:
    """The node's module path; for nodes a pass inserted without module metadata, the module that
    owns the first weight it reads (``"features.2.conv.0.weight"`` -> ``"features.2.conv.0"``)."""
    fqn = node_fqn(node, gm)
    if fqn or node.op != "call_function" or "nn_module_stack" in node.meta:
        return fqn
    names = gm.meta.get(META_PLACEHOLDER_FQNS, {})
    prefix = gm.meta.get(META_PREFIX, "")
    for arg in _flat_nodes((node.args, node.kwargs)):
        path = str(arg.target) if arg.op == "get_attr" else names.get(arg.name) if arg.op == "placeholder" else None
        if path and "." in path:
            return ".".join(p for p in (prefix, path.rsplit(".", 1)[0]) if p)
    return fqn


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


def _first_names(module: nn.Module) -> dict[str, str]:
    """Every parameter and buffer name of ``module`` → the first name of the same tensor: tied weights
    (an embedding shared with the output layer) are one tensor, stored and counted once."""
    first: dict[int, str] = {}
    names = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: first.setdefault(id(t), name) for name, t in names}


class RawRowCounter:
    """Counts the raw rows (MACs, element-wise ops, tensors touched) of every captured graph and of
    the modules kept eager."""

    def __init__(self, source: Source, conventions: Conventions, mode: FakeTensorMode | None,
                 haste_buckets: HasteBuckets | None = None) -> None:
        self.source = source
        self.conventions = conventions
        self.haste_buckets = haste_buckets
        self.runner = NodeRunner(mode)
        self.seen_params: set[str] = set()
        self.homes: dict[fx.Node, fx.Node] = {}  # of the graph being walked (``_weight_homes``)
        self.tied = _first_names(source.captured.module)
        self.unknown: dict[str, list[str]] = {}

    def rows(self) -> list[RawRow]:
        out = []
        for graph in self.source.captured.graphs:
            out.extend(self._graph_rows(graph) if graph.called else [self._uncalled_row(graph)])
        out.extend(self._eager_rows())
        out.extend(self._repeat_rows())
        return out

    def _repeat_rows(self) -> list[RawRow]:
        """One row per further call of a graph traced apart (``Source.repeats``): the aten ops that
        call ran, at its own shapes; the graph's rows are its first call."""
        rows = []
        for path, calls in self.source.repeats.items():
            kind = type(self.source.captured.module.get_submodule(path)).__name__
            for n, ops in enumerate(calls, start=2):
                raw = RawRow("", f"(call {n}) {path}", kind, path)
                self._add_calls(raw, ops)
                for op in raw.unknown:
                    self.unknown.setdefault(op, []).append(raw.node)
                rows.append(raw)
        return rows

    def _uncalled_row(self, graph: Graph) -> RawRow:
        """A module traced apart that the example never calls (a head for another task, the
        projection ``nn.MultiheadAttention`` computes with its functional form): no compute for this
        input and no shapes to count any with; its weights are still stored."""
        raw = RawRow(graph.path, "(not called)", type(graph.gm).__name__, graph.path)
        raw.params = self._own_params(graph.path, graph.gm.named_parameters())
        return raw

    def _own_params(self, path: str, named: Any) -> list[tuple[str, Any, torch.Tensor | None]]:
        """(name, tensor, real tensor) of the ``named`` parameters of the module at ``path`` not counted yet."""
        own = [(f"{path}.{n}" if path else n, p) for n, p in named]
        found = [(n, p, self._real(n, p)) for n, p in own if self.tied.get(n, n) not in self.seen_params]
        self.seen_params.update(self.tied.get(n, n) for n, _ in own)
        return found

    def _eager_rows(self) -> list[RawRow]:
        """One row per untraced module: the aten ops its own eager code ran (outside any graph)."""
        captured = self.source.captured
        rows = []
        for path, _ in captured.untraced:
            name = f"(eager) {path or '<root>'}"
            mod = captured.module.get_submodule(path) if path else captured.module
            raw = RawRow("", name, type(mod).__name__, path)
            raw.params = self._own_params(path, mod.named_parameters(recurse=False))
            if self.source.eager is None:
                raw.unknown.append(f"{raw.op} (eager code not runnable on meta or real tensors)")
            else:
                self._add_calls(raw, self.source.eager.get(path, []))
            for op in raw.unknown:
                self.unknown.setdefault(op, []).append(name)
            rows.append(raw)
        return rows

    # --------------------------------------------------------------------------------- per graph

    def _graph_rows(self, graph: Graph) -> list[RawRow]:
        gm = graph.gm
        found: dict[fx.Node, View] = {}
        consumed: set[fx.Node] = set()
        for view in views(gm):
            found[view.node] = view
            if isinstance(view, AttentionView):
                consumed.update(n for n in view.nodes if n is not view.node)
        self.homes = _weight_homes(gm, found)
        rows = []
        eager = {path for path, _ in self.source.captured.untraced}
        apart = {g.path for g in self.source.captured.graphs}
        prefix = f"{graph.path}." if graph.path else ""
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module") or node in consumed:
                continue
            if node.op == "call_module" and prefix + str(node.target) in eager:
                continue  # a leaf left eager: its own code has an eager row, its insides their graphs
            if node.op == "call_module" and prefix + str(node.target) in apart:
                continue  # a module traced apart (one with hooks): its own graph has its rows
            raw = RawRow(graph.path, node.name, _op_name(node, gm), _fqn(node, gm))
            self._shapes(raw, node)
            raw.params = self._params(graph, node)
            view = found.get(node)
            if isinstance(view, AttentionView):  # weights the chain reads (learned keys, a temperature)
                raw.params += [p for member in view.nodes if member is not node for p in self._params(graph, member)]
            if view is not None:
                cost = view_cost(view, gm)
                raw.add(cost, cost.kind or "other")
                raw.has_bias = getattr(view, "bias", None) is not None
                if isinstance(view, AttentionView):  # an MHA's own projections' biases
                    raw.bias_adds = attention_bias_adds(view, gm)
                    raw.has_bias = not is_zero(raw.bias_adds)
                raw.dtype = format_of_dtype(view.dtype) or raw.dtype
            elif lookup(node.target) is not None:
                self._direct(raw, graph, node)
            else:
                self._recorded(raw, gm, node)
            for op in raw.unknown:
                self.unknown.setdefault(op, []).append(f"{graph.path}/{node.name}" if graph.path else node.name)
            rows.append(raw)
        return rows

    def _shapes(self, raw: RawRow, node: fx.Node) -> None:
        out = meta_val(node)
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        if isinstance(out, torch.Tensor):
            raw.out = TensorSpec(tuple(out.shape), out.dtype)
            raw.dtype = format_of_dtype(out.dtype)
        for arg in _flat_nodes((node.args, node.kwargs)):
            if arg.op == "get_attr" or (arg.op == "placeholder" and self._placeholder_param(arg)):
                continue
            val = meta_val(arg)
            if isinstance(val, torch.Tensor):
                raw.inputs.append(TensorSpec(tuple(val.shape), val.dtype))

    # --------------------------------------------------------------------------------- parameters

    def _placeholder_param(self, node: fx.Node) -> bool:
        gm = node.graph.owning_module
        names = gm.meta.get(META_PLACEHOLDER_FQNS, {}) if gm is not None else {}
        return node.name in names

    def _real(self, name: str, tensor: Any) -> torch.Tensor | None:
        """The real values of a weight (None on meta/fake tensors without a real counterpart)."""
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and not isinstance(tensor, FakeTensor):
            return tensor
        return self.source.real.get(name)

    def _params(self, graph: Graph, node: fx.Node) -> list[tuple[str, Any, torch.Tensor | None]]:
        """(name, tensor, real tensor) of the weights a node reads, each counted once. Parameters
        only, except for custom ops, whose weights may be buffers (e.g. packed ternary codes). A
        weight a conv or linear reads through a transform of weights alone is that layer's
        (``_weight_homes``), not the transform's."""
        gm = graph.gm
        prefix = f"{graph.path}." if graph.path else ""
        found: list[tuple[str, Any]] = []
        custom = op_namespace(node.target) not in (None, "aten")
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            found = [(f"{node.target}.{n}", p) for n, p in mod.named_parameters()]
        else:
            args = [a for a in _flat_nodes((node.args, node.kwargs)) if self.homes.get(a, node) is node]
            for arg in args + [a for a, home in self.homes.items() if home is node and a not in args]:
                if arg.op == "get_attr":
                    value = attribute(gm, str(arg.target))
                    if isinstance(value, nn.Parameter) or (custom and isinstance(value, torch.Tensor)):
                        found.append((str(arg.target), value))
                elif arg.op == "placeholder" and self._placeholder_param(arg):
                    is_param = "_parameters_" in arg.name
                    if is_param or custom:
                        name = gm.meta[META_PLACEHOLDER_FQNS][arg.name]
                        found.append((name, graph.placeholder_values.get(arg.name, meta_val(arg))))
        out = []
        for name, tensor in found:
            full = prefix + name
            if self.tied.get(full, full) in self.seen_params or not isinstance(tensor, torch.Tensor):
                continue
            self.seen_params.add(self.tied.get(full, full))
            out.append((full, tensor, self._real(full, tensor)))
        return out

    # --------------------------------------------------------------------------------- costing

    def _call(self, target: Any, args: Any, kwargs: Any, out: Any, fqn: str, values: dict[int, torch.Tensor]) -> OpCall:
        return OpCall(target, spec_of(tuple(args)), {k: spec_of(v) for k, v in kwargs.items()}, spec_of(out),
                      self.conventions, fqn, values, self.haste_buckets)

    def _direct(self, raw: RawRow, graph: Graph, node: fx.Node) -> None:
        gm = graph.gm
        formula = lookup(node.target)
        values: dict[int, torch.Tensor] = {}

        def value(n: fx.Node) -> Any:
            if n.op == "get_attr":
                return attribute(gm, str(n.target))
            if n.op == "placeholder" and n.name in graph.placeholder_values:
                return graph.placeholder_values[n.name]
            return meta_val(n)

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node) and a.op in ("get_attr", "placeholder"):
                name = str(a.target) if a.op == "get_attr" else gm.meta.get(META_PLACEHOLDER_FQNS, {}).get(a.name, "")
                real = self._real((f"{graph.path}." if graph.path else "") + name, args[i])
                if real is not None:
                    values[i] = real
        cost = formula(self._call(node.target, args, kwargs, meta_val(node), raw.fqn, values))
        raw.add(cost, registered_kind(node.target))

    def _recorded(self, raw: RawRow, gm: fx.GraphModule, node: fx.Node) -> None:
        try:
            calls = self.source.recorded[node] if node in self.source.recorded else self.runner.record(gm, node)
        except Exception as exc:  # arbitrary user code on meta tensors: report, never guess
            _log.info("could not run node %s on meta tensors: %s", node.format_node(), exc)
            raw.unknown.append(f"{raw.op} (not runnable on meta tensors: {type(exc).__name__})")
            return
        self._add_calls(raw, calls)

    def _add_calls(self, raw: RawRow, calls: list) -> None:
        for func, args, kwargs, out in calls:
            formula = lookup(func)
            if formula is None:
                raw.unknown.append(str(func))
                continue
            cost = formula(self._call(func, args, kwargs, out, raw.fqn, {}))
            raw.add(cost, registered_kind(func))


def _weight_homes(gm: fx.GraphModule, found: dict[fx.Node, View]) -> dict[fx.Node, fx.Node]:
    """{weight node: the conv or linear node (or fxslim op) it is the weight of} for weights a layer
    reads through ops on weights alone (timm's StdConv2d standardises its weight in forward:
    reshape, batch_norm, reshape_as), so their storage takes the layer's format rather than the
    first reader's, and an op whose formula counts its weight is not counted a second time."""
    weights: set[fx.Node] = set()  # nodes computed from weights (get_attr, parameter placeholders) alone
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "placeholder" and node.name in gm.meta.get(META_PLACEHOLDER_FQNS, {})):
            weights.add(node)
        elif node.op.startswith("call_") and node.all_input_nodes and all(a in weights for a in node.all_input_nodes):
            weights.add(node)
    starts: list[tuple[fx.Node, fx.Node]] = []  # (layer node, its weight computed from weights)
    for node, view in found.items():
        start = getattr(getattr(view, "weight", None), "node", None)
        if isinstance(view, (ConvView, LinearView)) and start is not None:
            starts.append((node, start))
    for node in gm.graph.nodes:  # fxslim's ops (a HASTE conv of a standardised weight) count their weights
        if node.op == "call_function" and op_namespace(node.target) == "fxslim":
            starts += [(node, a) for a in node.all_input_nodes]
    homes: dict[fx.Node, fx.Node] = {}
    for node, start in starts:
        if start not in weights or start.op in ("get_attr", "placeholder"):
            continue
        stack = [start]
        while stack:
            n = stack.pop()
            if n.op in ("get_attr", "placeholder"):
                homes.setdefault(n, node)
            else:
                stack.extend(a for a in n.all_input_nodes if a in weights)
    return homes

