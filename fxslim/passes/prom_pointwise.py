"""PROM convert: the integer forms of chains without arithmetic of their own (docs/methods/PROM.md, "Float islands").

Matches, in a prepared PROM graph, a quantizer fed by a chain of single-user nodes back to uint8
codes (an ActFakeQuant, or layout ops of one), built from:

- layout ops (view/reshape/flatten/(un)squeeze/permute/transpose/slicing/contiguous, dropout,
  inference stochastic depth, identity, constant zero padding): replayed on the codes, since they
  only move values;
- elementwise float ops (activations, a tensor with a scalar): folded into one 256-entry table
  ``quant_out(f(dequant_in(q)))``, computed once at conversion (``fxslim.runtime.prom_codes``);
  with per-channel constants (an inference batch norm, a per-channel scale; all layout ops on one
  side of them): one table per channel (after a concatenation along the channels, each input
  takes its rows);
- max pooling: run on the codes when the pointwise ops before it are non-decreasing on the input
  grid (the table then commutes with the max);
- a concatenation of code tensors: each input through its own table to the output grid, then cat
  (and max pooling, when every table is non-decreasing).

Each form equals the fake-quant model on every code. ``pointwise_chain`` raises ``NoIntegerForm``
(with a short reason) when a chain is none of these; convert then makes it a float island.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from fxslim.hooks import has_hooks
from fxslim.ir import meta_val
from fxslim.passes.prom_graph import is_quant, is_shape_op, layer_of, module_of
from fxslim.runtime.prom_codes import LUT_SIZE, is_monotone, lut_table
from fxslim.runtime.prom_qat import QConv2d

__all__ = ["NoIntegerForm", "PointwiseChain", "pointwise_chain", "is_layout_op", "is_codes_source", "pad_code",
           "max_pool_args", "batch_norm_of", "unit_depthwise_conv", "constant_value"]

_LAYOUT_METHODS = {"permute", "transpose", "flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"}
_LAYOUT_FUNCTIONS = {torch.permute, torch.transpose, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                  nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh)
_UNARY_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh,
                    torch.clamp, torch.exp, torch.abs, operator.neg, torch.neg}
_SCALAR_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
                  "exp", "abs", "neg"}
_BINARY_METHODS = {"add", "sub", "mul", "div", "__add__", "__mul__"}
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
        return (node.target in _LAYOUT_FUNCTIONS or (node.target is operator.getitem and _tensor(node))
                or _inference_stochastic_depth(node))
    return False


def _inference_stochastic_depth(node: fx.Node) -> bool:
    """torchvision.ops.stochastic_depth(x, p, mode, training=False): the identity (named, not
    imported: pass code does not import model libraries)."""
    target = node.target
    if getattr(target, "__name__", "") != "stochastic_depth" or not getattr(target, "__module__", "").startswith("torchvision"):
        return False
    training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    return training is False


def pad_code(node: fx.Node, scale: float, zero_point: int) -> int | None:
    """For ``F.pad(x, pad, "constant", value)`` on a grid: the code whose real value is exactly
    ``value`` (the zero point for 0), or None when that value has no code (or it is not such a pad)."""
    if node.op != "call_function" or node.target is not F.pad or not _no_nodes(node.args[1:]) or not _no_nodes(node.kwargs):
        return None
    mode = _pad_mode(node)
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    value = 0.0 if value is None else float(value)
    if mode != "constant":
        return None
    code = torch.ops.fxslim.quantize_per_tensor(torch.tensor([value]), scale, zero_point)
    return int(code[0]) if float(torch.ops.fxslim.dequantize(code, scale, zero_point)[0]) == value else None


def _pad_mode(node: fx.Node) -> Any:
    """The ``mode`` of an ``F.pad`` call, given by position or name ("constant" by default)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")


def _no_pad_code_reason(node: fx.Node, fns: list) -> str:
    """Why ``pad_code`` gave no code for ``node`` in a chain (after pointwise ops ``fns``)."""
    if node.op != "call_function" or node.target is not F.pad:
        return f"{node.target if node.op != 'call_module' else 'module'} on codes (not a constant pad)"
    mode = _pad_mode(node)
    if mode != "constant":
        return f"padding mode {mode!r} (only constant padding is replayed on codes)"
    return "padding after a pointwise op" if fns else "padding with a value that has no code"


def constant_value(gm: fx.GraphModule, node: Any) -> Any:
    """The value of ``node`` when it depends on no input (get_attr tensors and ops of them, e.g.
    ``gamma.reshape(1, -1, 1, 1)``), else ``_VARIABLE``; non-Node arguments are their own value."""
    if not isinstance(node, fx.Node):
        return node
    if not _constant(gm, node):
        return _VARIABLE
    if node.op == "get_attr":
        return _attribute_value(gm, str(node.target)).detach()
    known = {a: constant_value(gm, a) for a in node.all_input_nodes}
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), known.__getitem__)
    with torch.no_grad():
        return getattr(args[0], str(node.target))(*args[1:], **kwargs) if node.op == "call_method" else node.target(*args, **kwargs)


def _constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` reads only get_attr tensors (and literals), through call_function/call_method
    ops: a walk over its ancestors, each visited once."""
    seen, stack = set(), [node]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "get_attr":
            if not isinstance(_attribute_value(gm, str(cur.target)), Tensor):
                return False
        elif cur.op not in ("call_function", "call_method") or not cur.all_input_nodes:
            return False
        else:
            stack.extend(cur.all_input_nodes)
    return True


def _attribute_value(gm: fx.GraphModule, path: str) -> Any:
    value: Any = gm
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


_VARIABLE = object()  # constant_value of a node that depends on a graph input


def _channel_dim(constant: Any, data: Any) -> int | None | bool:
    """How a constant broadcasts against the data tensor: None (one value), a channel dim (sizes
    1 except that dim, not the batch), or False (it would change the data's shape, or mix dims)."""
    if isinstance(constant, (int, float)) and not isinstance(constant, bool):
        return None
    if not isinstance(constant, Tensor) or not isinstance(data, Tensor) or constant.dim() > data.dim():
        return False
    if constant.numel() == 1:
        return None
    shape = [1] * (data.dim() - constant.dim()) + list(constant.shape)
    dims = [i for i, size in enumerate(shape) if size != 1]
    return dims[0] if len(dims) == 1 and dims[0] != 0 and shape[dims[0]] == data.shape[dims[0]] else False


def batch_norm_of(gm: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d | None:
    """The inference batch norm a node computes: its BatchNorm2d module, or one built from an
    ``F.batch_norm(x, mean, var, weight, bias, training=False, momentum, eps)`` call on constants
    (timm's BatchNormAct2d); None otherwise."""
    module = layer_of(gm, node)
    if isinstance(module, nn.BatchNorm2d):
        return module if module.running_mean is not None and module.running_var is not None else None
    if node.op != "call_function" or node.target is not F.batch_norm or _elementwise(gm, node) is None:
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    given = dict(zip(names, node.args), **node.kwargs)
    mean, var = constant_value(gm, given["running_mean"]), constant_value(gm, given["running_var"])
    weight, bias = constant_value(gm, given.get("weight")), constant_value(gm, given.get("bias"))
    if not (isinstance(mean, Tensor) and isinstance(var, Tensor)):
        return None
    bn = nn.BatchNorm2d(mean.numel(), eps=float(given.get("eps", 1e-5)))
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(weight if isinstance(weight, Tensor) else torch.ones_like(mean))
        bn.bias.copy_(bias if isinstance(bias, Tensor) else torch.zeros_like(mean))
    return bn.eval()


def unit_depthwise_conv(channels: int) -> QConv2d:
    """A depthwise 1×1 conv with weight 1 and no bias, as an int8 QConv2d: a batch norm on codes
    folds into it like into any conv (codes 127, scale 1/127: the real weight is exactly 1)."""
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return QConv2d(conv, "int8")


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int | None] | None:
    """(data input, channel dim or None) when ``node`` maps each element of its one non-constant
    tensor input on its own, with constants shared by all elements (None) or by a channel (an
    inference batch norm, a per-channel scale); None otherwise."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return None
    variable = [a for a in node.all_input_nodes if constant_value(gm, a) is _VARIABLE]
    if len(variable) != 1:
        return None
    data = variable[0]
    module, layer = module_of(gm, node), layer_of(gm, node)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return (data, 1) if module.track_running_stats and node.args[0] is data else None
    if node.op == "call_function" and node.target is F.batch_norm:
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        return (data, 1) if node.args[0] is data and training is False else None
    binary = (node.op == "call_function" and node.target in _SCALAR_FUNCTIONS) or (
        node.op == "call_method" and node.target in _BINARY_METHODS and node.args[0] is data)
    if binary and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if node.args[0] is data else node.args[0]
        dim = _channel_dim(constant_value(gm, other), meta_val(data))
        return None if dim is False else (data, dim)
    if node.args[0] is not data or not _no_nodes(node.args[1:]) or not _no_nodes(node.kwargs):
        return None
    if module is not None:
        timm_act = type(module).__module__.startswith("timm.layers.activations")
        stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
        return (data, None) if isinstance(layer, _UNARY_MODULES) or (timm_act and stateless) else None
    if node.op == "call_method":
        return (data, None) if node.target in _UNARY_METHODS else None
    return (data, None) if node.target in _UNARY_FUNCTIONS else None


def _max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = layer_of(gm, node)
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
    """Whether convert holds ``node`` as uint8 codes: a quantizer, or ops that keep its grid (layout
    ops, max pools, constant pads whose value has a code) applied to one."""
    pads = []
    while isinstance(node, fx.Node) and not is_quant(gm, node):
        is_pad = node.op == "call_function" and node.target is F.pad
        if not (is_layout_op(gm, node) or _max_pool(gm, node) or is_pad):
            return False
        pads += [node] if is_pad else []
        node = node.args[0]
    return is_quant(gm, node) and all(pad_code(p, *module_of(gm, node).qparams()) is not None for p in pads)


def _apply(gm: fx.GraphModule, node: fx.Node, x: Tensor) -> Tensor:
    """``node``'s op on ``x`` in place of its data input (constants by their values; modules in eval mode)."""
    data = _elementwise(gm, node)[0]
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: x if a is data else constant_value(gm, a))
    if node.op == "call_module":
        return copy.deepcopy(module_of(gm, node)).eval()(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


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
    channel_dim: int | None = None  # per-channel tables along this dim (of the sources, or after the steps)
    lut_after_steps: bool = False  # per-channel ops come after the layout steps: tables index their output
    kind: str = "layout"  # layout | lut | channel_lut | max_pool | cat: what the report calls it


def _compose(gm: fx.GraphModule, fns: list[fx.Node]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for node in fns:
            x = _apply(gm, node, x)
        return x

    return run


def _table(fn: Callable[[Tensor], Tensor], source: nn.Module, out: nn.Module, dim: int | None,
           example: Any) -> Tensor | None:
    """The table from ``source``'s grid to ``out``'s (per channel along ``dim`` of a tensor like
    ``example``), or None for the identity."""
    (s_x, z_x), (s_y, z_y) = source.qparams(), out.qparams()
    if dim is None:
        table = lut_table(fn, s_x, z_x, s_y, z_y)
        return None if torch.equal(table, torch.arange(LUT_SIZE, dtype=torch.uint8)) else table
    return lut_table(fn, s_x, z_x, s_y, z_y, channels=example.shape[dim], dim=dim, ndim=example.dim())


def _pools_codes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a codes source passes through a max pool on its way from its quantizer."""
    while not is_quant(gm, node):
        if _max_pool(gm, node):
            return True
        node = node.args[0]
    return False


def _cat_dim(cat: fx.Node) -> int:
    """The dim a cat node concatenates along, non-negative."""
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    return dim % meta_val(cat).dim()


def _grid(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The ActFakeQuant whose codes a codes source holds."""
    while not is_quant(gm, node):
        node = node.args[0]
    return module_of(gm, node)


def pointwise_chain(gm: fx.GraphModule, quant: fx.Node) -> PointwiseChain:
    """Walk back from ``quant``: 1. collect single-user layout/pointwise/max-pool/pad nodes up to
    a codes source or a cat of codes sources; 2. check that max pools see a non-decreasing prefix
    and pads an exact code; 3. build the tables (non-decreasing ones before a pooled cat)."""
    members, cur = [], quant.args[0]
    while not is_codes_source(gm, cur):
        if not isinstance(cur, fx.Node) or len(cur.users) != 1:
            raise NoIntegerForm(cur if isinstance(cur, fx.Node) else quant, "intermediate escapes")
        members.insert(0, cur)
        if cur.op == "call_function" and cur.target in _CAT_FUNCTIONS:
            break
        elementwise = _elementwise(gm, cur)
        known = is_layout_op(gm, cur) or elementwise is not None or _max_pool(gm, cur)
        if not known and not (cur.op == "call_function" and cur.target is F.pad):
            hooked = cur.op == "call_module" and has_hooks(gm.get_submodule(str(cur.target)))
            raise NoIntegerForm(cur, "kept as a module for its hooks" if hooked else "no integer form")
        cur = elementwise[0] if elementwise is not None else cur.args[0]
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
    channel_op: fx.Node | None = None  # the first op with per-channel constants
    grid = _grid(gm, sources[0])
    for node in members:
        elementwise = _elementwise(gm, node)
        if elementwise is not None:
            if elementwise[1] is not None:
                if channel_op is None:
                    channel_op, chain.lut_after_steps = node, bool(chain.steps)
                if chain.lut_after_steps != bool(chain.steps) or (chain.steps and cat is not None):
                    raise NoIntegerForm(node, "layout op between per-channel ops")
                if chain.channel_dim not in (None, elementwise[1]):
                    raise NoIntegerForm(node, "per-channel ops along two dims")
                chain.channel_dim = elementwise[1]
            fns.append(node)
            continue
        if chain.lut_after_steps:
            raise NoIntegerForm(node, "layout op between per-channel ops")
        if chain.channel_dim is not None and not is_layout_op(gm, node):
            raise NoIntegerForm(node, "max pooling or padding after a per-channel op")
        if cat is not None and not (is_layout_op(gm, node) or _max_pool(gm, node)):
            raise NoIntegerForm(node, "padding after a concatenation")
        if cat is None and _max_pool(gm, node) and not is_monotone(_compose(gm, fns), *grid.qparams()):
            raise NoIntegerForm(node, "max pooling after a decreasing pointwise op")
        if not is_layout_op(gm, node) and not _max_pool(gm, node):
            code = pad_code(node, *grid.qparams()) if not fns else None
            if code is None:
                raise NoIntegerForm(node, _no_pad_code_reason(node, fns))
            chain.pad_codes[node] = code
        chain.steps.append(node)
    if chain.channel_dim is not None and any(_max_pool(gm, n) for n in chain.steps):
        raise NoIntegerForm(members[0], "max pooling after a per-channel op")
    if chain.channel_dim is not None and not all(isinstance(meta_val(n), Tensor) for n in [*sources, *fns, *members]):
        raise NoIntegerForm(members[0], "no shape metadata for a per-channel table")
    if chain.channel_dim is not None and cat is not None and _cat_dim(cat) != chain.channel_dim:
        raise NoIntegerForm(cat, "per-channel op across a concatenation along another dim")
    out = module_of(gm, quant)
    fn = _compose(gm, fns)
    if chain.channel_dim is not None and cat is not None:  # each input: its rows of the whole output's tables
        whole = meta_val(cat)
        bounds = [0]
        for s in sources:
            bounds.append(bounds[-1] + meta_val(s).shape[chain.channel_dim])
        chain.tables = [_table(fn, _grid(gm, s), out, chain.channel_dim, whole)[lo:hi]
                        for s, lo, hi in zip(sources, bounds, bounds[1:])]
    else:
        example = meta_val(_elementwise(gm, channel_op)[0]) if channel_op is not None else None
        chain.tables = [_table(fn, _grid(gm, s), out, chain.channel_dim, example) for s in sources]
    pooled = any(_max_pool(gm, n) for n in chain.steps)
    if cat is not None and pooled and not all(t is None or bool((t[1:] >= t[:-1]).all()) for t in chain.tables):
        raise NoIntegerForm(cat, "max pooling after a concatenation with a decreasing table")
    if cat is not None:
        chain.kind = "cat"
    elif pooled or any(_pools_codes(gm, n) for n in sources):
        chain.kind = "max_pool"
    elif chain.channel_dim is not None:
        chain.kind = "channel_lut"
    elif chain.tables[0] is not None:
        chain.kind = "lut"
    return chain
