"""PROM convert: the integer forms of chains without arithmetic of their own (docs/methods/PROM.md, "Float islands").

Matches, in a prepared PROM graph, a quantizer fed by a chain of single-user nodes back to uint8
codes (an ActFakeQuant, or layout ops of one), built from:

- layout ops (view/reshape/flatten/(un)squeeze/permute/transpose/slicing/contiguous, dropout,
  identity, constant zero padding): replayed on the codes, since they only move values;
- unary pointwise float ops (activations, a tensor with a scalar): folded into one 256-entry table
  ``quant_out(f(dequant_in(q)))``, computed once at conversion (``fxslim.runtime.prom_codes``);
- max pooling: run on the codes when the pointwise ops before it are non-decreasing on the input
  grid (the table then commutes with the max);
- a concatenation of code tensors: each input through its own table to the output grid, then cat.

Each form equals the fake-quant model on every code. ``pointwise_chain`` raises ``NoIntegerForm``
(with a short reason) when a chain is none of these; convert then makes it a float island.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from fxslim.ir import meta_val
from fxslim.passes.prom_graph import is_quant, is_shape_op, module_of
from fxslim.runtime.prom_codes import LUT_SIZE, is_monotone, lut_table

__all__ = ["NoIntegerForm", "PointwiseChain", "pointwise_chain", "is_layout_op", "is_codes_source", "pad_code",
           "max_pool_args"]

_LAYOUT_METHODS = {"permute", "transpose", "flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"}
_LAYOUT_FUNCTIONS = {torch.permute, torch.transpose, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                  nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh)
_UNARY_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh,
                    torch.clamp, torch.exp, torch.abs, operator.neg, torch.neg}
_SCALAR_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
                  "exp", "abs", "neg", "add", "sub", "mul", "div"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}


class NoIntegerForm(ValueError):
    """A chain with no integer form; ``reason`` says why (it becomes a float island)."""

    def __init__(self, node: fx.Node, reason: str) -> None:
        super().__init__(f"PROM convert: {reason}: {node.format_node()}")
        self.node = node
        self.reason = reason


def _tensor(node: Any) -> bool:
    return isinstance(meta_val(node), Tensor)


def _no_nodes(values: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return not found


def is_layout_op(gm: fx.GraphModule, node: Any) -> bool:
    """Ops that only move values of their first argument (a tensor): shape ops, permute,
    transpose, constant slicing; the other arguments hold no tensors."""
    if is_shape_op(gm, node):
        return True
    if not isinstance(node, fx.Node) or not node.args or not _tensor(node.args[0]) or not _no_nodes(node.args[1:]):
        return False
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function":
        return node.target in _LAYOUT_FUNCTIONS or (node.target is operator.getitem and _tensor(node))
    return False


def pad_code(node: fx.Node, scale: float, zero_point: int) -> int | None:
    """For ``F.pad(x, pad, "constant", value)`` on a grid: the code whose real value is exactly
    ``value`` (the zero point for 0), or None when that value has no code (or it is not such a pad)."""
    if node.op != "call_function" or node.target is not F.pad or not _no_nodes(node.args[1:]) or not _no_nodes(node.kwargs):
        return None
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    value = 0.0 if value is None else float(value)
    if mode != "constant":
        return None
    code = torch.ops.fxslim.quantize_per_tensor(torch.tensor([value]), scale, zero_point)
    return int(code[0]) if float(torch.ops.fxslim.dequantize(code, scale, zero_point)[0]) == value else None


def _pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A unary elementwise float op of ``node.args[0]`` (any other argument a constant)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or not _no_nodes(node.args[1:]) or not _no_nodes(node.kwargs):
        return False
    if node.op == "call_module":
        module = module_of(gm, node)
        timm_act = type(module).__module__.startswith("timm.layers.activations")
        stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
        return isinstance(module, _UNARY_MODULES) or (timm_act and stateless)
    if node.op == "call_method":
        return node.target in _UNARY_METHODS
    if node.op == "call_function" and node.target in _SCALAR_FUNCTIONS:
        return len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool)
    return node.op == "call_function" and node.target in _UNARY_FUNCTIONS


def _max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if isinstance(module, nn.MaxPool2d):
        return not module.return_indices
    return (node.op == "call_function" and node.target is F.max_pool2d and _no_nodes(node.args[1:])
            and _no_nodes(node.kwargs) and not node.kwargs.get("return_indices", False) and len(node.args) < 7)


def max_pool_args(gm: fx.GraphModule, node: fx.Node) -> tuple[list[int], list[int], list[int], list[int], bool] | None:
    """(kernel_size, stride, padding, dilation, ceil_mode) of a max pool node as pairs, else None."""
    if not _max_pool(gm, node):
        return None
    module = module_of(gm, node)
    if module is not None:
        given = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}
    else:
        given = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), node.args[1:]), **node.kwargs)
    kernel = given["kernel_size"]
    stride = given.get("stride") or kernel  # None or [] means the kernel size

    def pair(v: Any) -> list[int]:
        return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]

    return (pair(kernel), pair(stride), pair(given.get("padding", 0)), pair(given.get("dilation", 1)),
            bool(given.get("ceil_mode", False)))


def is_codes_source(gm: fx.GraphModule, node: Any) -> bool:
    """Whether convert holds ``node`` as uint8 codes: a quantizer, or layout ops of one."""
    while isinstance(node, fx.Node) and not is_quant(gm, node) and is_layout_op(gm, node):
        node = node.args[0]
    return is_quant(gm, node)


def _apply(gm: fx.GraphModule, node: fx.Node, x: Tensor) -> Tensor:
    """``node``'s op on ``x`` in place of its first argument."""
    if node.op == "call_module":
        return module_of(gm, node)(x)
    if node.op == "call_method":
        return getattr(x, str(node.target))(*node.args[1:], **node.kwargs)
    return node.target(x, *node.args[1:], **node.kwargs)


@dataclass
class PointwiseChain:
    """sources → [cat] → steps → quant, with one table per source (None: the identity)."""

    quant: fx.Node
    sources: list[fx.Node]
    tables: list[Tensor | None]
    cat: fx.Node | None = None
    steps: list[fx.Node] = field(default_factory=list)  # layout ops, max pools and pad nodes to replay, graph order
    pad_codes: dict[fx.Node, int] = field(default_factory=dict)
    members: list[fx.Node] = field(default_factory=list)
    kind: str = "layout"  # layout | lut | max_pool | cat: what the report calls it


def _compose(gm: fx.GraphModule, fns: list[fx.Node]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for node in fns:
            x = _apply(gm, node, x)
        return x

    return run


def _table(fn: Callable[[Tensor], Tensor], source: nn.Module, out: nn.Module) -> Tensor | None:
    (s_x, z_x), (s_y, z_y) = source.qparams(), out.qparams()
    table = lut_table(fn, s_x, z_x, s_y, z_y)
    return None if torch.equal(table, torch.arange(LUT_SIZE, dtype=torch.uint8)) else table


def _grid(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The ActFakeQuant whose codes a codes source holds."""
    while not is_quant(gm, node):
        node = node.args[0]
    return module_of(gm, node)


def pointwise_chain(gm: fx.GraphModule, quant: fx.Node) -> PointwiseChain:
    """Walk back from ``quant`` (steps numbered in the module docstring): 1. collect single-user
    layout/pointwise/max-pool/pad nodes up to a codes source or a cat of codes sources; 2. check
    max pools see a non-decreasing prefix and pads an exact code; 3. build the tables."""
    members, cur = [], quant.args[0]
    while not is_codes_source(gm, cur):
        if not isinstance(cur, fx.Node) or len(cur.users) != 1:
            raise NoIntegerForm(cur if isinstance(cur, fx.Node) else quant, "intermediate escapes")
        members.insert(0, cur)
        if cur.op == "call_function" and cur.target in _CAT_FUNCTIONS:
            break
        known = is_layout_op(gm, cur) or _pointwise(gm, cur) or _max_pool(gm, cur)
        if not known and not (cur.op == "call_function" and cur.target is F.pad):
            raise NoIntegerForm(cur, f"no integer form for {cur.op} {getattr(cur.target, '__name__', cur.target)}")
        cur = cur.args[0]
    cat = members.pop(0) if members and members[0].op == "call_function" and members[0].target in _CAT_FUNCTIONS else None
    if cat is not None:
        tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or not all(is_codes_source(gm, t) for t in tensors):
            raise NoIntegerForm(cat, "concatenation of float tensors")
        if not _no_nodes(cat.args[1:]) or not _no_nodes(cat.kwargs):
            raise NoIntegerForm(cat, "concatenation along a computed dim")
        sources = list(tensors)
    else:
        sources = [cur]
    chain = PointwiseChain(quant, sources, [], cat, members=[*members, *([cat] if cat is not None else [])])
    fns: list[fx.Node] = []
    grid = _grid(gm, sources[0])
    for node in members:
        if _pointwise(gm, node):
            fns.append(node)
            continue
        if cat is not None and not is_layout_op(gm, node):
            raise NoIntegerForm(node, "max pooling or padding after a concatenation")
        if _max_pool(gm, node) and not is_monotone(_compose(gm, fns), *grid.qparams()):
            raise NoIntegerForm(node, "max pooling after a decreasing pointwise op")
        if not is_layout_op(gm, node) and not _max_pool(gm, node):
            code = pad_code(node, *grid.qparams()) if not fns else None
            if code is None:
                raise NoIntegerForm(node, "padding with a value that has no code")
            chain.pad_codes[node] = code
        chain.steps.append(node)
    out = module_of(gm, quant)
    chain.tables = [_table(_compose(gm, fns), _grid(gm, s), out) for s in sources]
    if cat is not None:
        chain.kind = "cat"
    elif any(_max_pool(gm, n) for n in chain.steps):
        chain.kind = "max_pool"
    elif chain.tables[0] is not None:
        chain.kind = "lut"
    return chain
