"""Canonical views of graph nodes, whatever the IR they come from.

A conv is ``call_module`` Conv2d after symbolic tracing, ``call_function torch.conv2d`` with seven
positional arguments in a dynamo graph (weights are placeholders), and ``aten.conv2d`` /
``aten.convolution`` after ``torch.export``. ``view_of(node, gm)`` turns each of them into one
``ConvView`` (likewise ``LinearView`` and ``AttentionView``), so passes and the cost model are
written once. Shapes come from node meta (``val``, ``example_value`` or ``tensor_meta``), which
``fxslim.capture`` guarantees on every graph it hands out.

Attention has three forms: ``scaled_dot_product_attention`` (torch or aten), multi-head attention
(``nn.MultiheadAttention`` as a leaf module or ``F.multi_head_attention_forward``), and the
hand-written ``matmul -> [scale/bias/mask] -> softmax -> [dropout] -> matmul`` chain, anchored at
the softmax. Functions known to hide an attention behind ``torch.fx.wrap`` (torchvision's
shifted-window attention) are described by a small adapter table.
"""

from __future__ import annotations

import collections
import copy
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "IR",
    "ParamRef",
    "ConvView",
    "LinearView",
    "AttentionView",
    "View",
    "detect_ir",
    "op_namespace",
    "view_of",
    "views",
    "node_fqn",
    "meta_val",
    "shape_of",
    "same_size",
    "size_hint",
    "resolve_padding",
    "conv_kind",
    "attribute",
    "set_submodule",
    "OrderedDictOutput",
    "keep_output_type",
    "copy_attributes",
    "META_PLACEHOLDER_FQNS",
    "META_PREFIX",
    "META_FROZEN_MODE",
    "META_CALL_SHAPES",
    "META_PASS",
    "META_REPORT",
    "META_PROM_QUANT",
    "META_PROM_CONVERT",
    "META_PROM_LOWERED",
    "schema_arguments",
]

IR = Literal["module", "torch", "aten"]
aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------
# Node metadata


# Keys fxslim writes into graph and node meta, named once.
META_PLACEHOLDER_FQNS = "fxslim_placeholder_fqns"  # gm.meta of a dynamo graph: placeholder -> parameter name
META_PREFIX = "fxslim_prefix"  # gm.meta of a submodule's graph: where it sits in the model ("a.b")
META_CALL_SHAPES = "fxslim_call_shapes"  # gm.meta of a submodule's graph called with inputs of several shapes
META_FROZEN_MODE = "fxslim_frozen_mode"  # gm.meta of a symbolic trace whose forward branches on self.training
META_PASS = "fxslim_pass"  # node.meta: the pass that emitted the node
META_REPORT = "fxslim_report"  # gm.meta of a prepared model: the OptimizeReport of its rewrite
META_PROM_QUANT = "fxslim_prom_quant"  # node.meta of a PROM integer op: the ActFakeQuant whose grid it writes
META_PROM_CONVERT = "fxslim_prom_convert"  # gm.meta of a PROM integer model: its ConvertReport
META_PROM_LOWERED = "fxslim_prom_lowered"  # gm.meta of a lowered PROM graph: what was lowered, what kept and why


def meta_val(node: Any) -> Any:
    """The fake/example value of a node (FakeTensor, SymInt, ...) or None when it has none."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return None


def shape_of(node: Any) -> tuple | None:
    """The shape of a tensor-valued node as a tuple (entries may be SymInts), or None."""
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def attribute(root: Any, path: str, default: Any = ...) -> Any:
    """The object at dotted ``path`` ("layer1.0.conv.weight", a get_attr target) under ``root``;
    ``default`` when a part is missing, if given (else AttributeError)."""
    obj: Any = root
    for part in str(path).split(".") if path else ():
        obj = getattr(obj, part) if default is ... else getattr(obj, part, default)
    return obj


def schema_arguments(target: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a call of op ``target`` (an overload, or a packet: its default overload) by
    schema name: positional, then keyword, then the schema's default (None where it has none)."""
    schema = (target if hasattr(target, "_schema") else target.default)._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            out[arg.name] = args[i]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value
    return out


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` ("a.b.c") in ``root``, whatever its type (``setattr`` checks it)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[name] = new


class OrderedDictOutput(fx.graph.CodeGen):
    """Code generation whose forward returns its output dict as an ``OrderedDict``, as the traced
    forward did (torchvision's segmentation models): fx writes a dict literal. A pass that builds a
    new graph from one with this codegen gives it the same (``keep_output_type``)."""

    def generate_output(self, output_args: Any, *args: Any, **kwargs: Any) -> str:
        plain = super().generate_output(output_args, *args, **kwargs)
        if not isinstance(output_args, dict) or not plain.startswith("return "):
            return plain
        return f"return OrderedDict({plain[len('return '):]})"

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("OrderedDict", collections.OrderedDict)]


def keep_output_type(source: fx.Graph, target: fx.Graph) -> None:
    """Give ``target``, a graph built from ``source``, the code generation that makes its output type."""
    if isinstance(source._codegen, OrderedDictOutput):
        target.set_codegen(OrderedDictOutput())


def copy_attributes(source: nn.Module, target: fx.GraphModule) -> None:
    """Give ``target``, a GraphModule made from ``source``, the plain attributes of ``source`` it
    lacks: fx copies only the submodules, parameters and buffers the graph uses, while code around
    the module reads others (timm's ``feature_info`` and ``pretrained_cfg``, a window size a parent
    that stays eager branches on). Copies, where a value can be copied: never shared with ``source``.
    Not a module kept outside the module tree (a back-reference to a parent or to ``source`` itself:
    a copy of a whole model, or a cycle ``torch.save`` cannot pickle). Kept where fx's deepcopy keeps
    them (``meta["_user_preserved_attributes"]``), as convert deep-copies the prepared model."""
    preserved = target.meta.setdefault("_user_preserved_attributes", {})
    for name, value in vars(source).items():
        if (name.startswith("_") or name == "training" or hasattr(target, name) or isinstance(value, fx.Proxy)
                or _holds_module(value)):
            continue
        try:
            value = copy.deepcopy(value)
        except Exception:  # a lock, a handle: the object itself, as a shallow copy of the module would
            pass
        target.__dict__[name] = preserved[name] = value


def _holds_module(value: Any) -> bool:
    """Whether ``value`` is a module, or a list, tuple, set or dict with one among its items."""
    if isinstance(value, nn.Module):
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) else ()
    return any(_holds_module(v) for v in items)


def _attr_shape(gm: fx.GraphModule, node: Any) -> tuple | None:
    """Shape of a node; for a get_attr without meta, of the attribute it reads."""
    shape = shape_of(node)
    if shape is None and isinstance(node, fx.Node) and node.op == "get_attr":
        obj = attribute(gm, node.target, None)
        if isinstance(obj, torch.Tensor):
            return tuple(obj.shape)
    return shape


def _dtype_of(node: Any) -> torch.dtype | None:
    val = meta_val(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def _prod(values: Any) -> Any:
    out: Any = 1
    for v in values:
        out = out * v
    return out


# a module reached from one of the compiled frame's locals: paths from there when it is the usual name of
# a method's self or a model argument, or the only local the graph reaches modules from (a self research
# code names otherwise); two models passed to one function keep their names apart, as a global does
_DYNAMO_LOCAL = re.compile(r"^L\['([^']+)'\]\.?")
_OWN_NAMES = ("self", "fn", "mod", "model", "m")
_DYNAMO_INDEX = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")
_META_LOCAL_ROOTS = "fxslim_dynamo_local_roots"  # gm.meta: the locals its module paths start from


def _clean_path(path: str, roots: frozenset[str] = frozenset()) -> str:
    local = _DYNAMO_LOCAL.match(path)
    if local is not None and (local.group(1) in _OWN_NAMES or roots == {local.group(1)}):
        path = path[local.end():]
    path = _DYNAMO_INDEX.sub(r".\1", path)
    return path.strip(".")


def _stack_path(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)


def _local_roots(gm: fx.GraphModule) -> frozenset[str]:
    """The locals a dynamo graph's module paths start from (``L['s']``), computed once per graph."""
    roots = gm.meta.get(_META_LOCAL_ROOTS)
    if roots is None:
        found = (_DYNAMO_LOCAL.match(_stack_path(entry)) for n in gm.graph.nodes
                 for entry in (n.meta.get("nn_module_stack") or {}).values())
        roots = gm.meta[_META_LOCAL_ROOTS] = frozenset(m.group(1) for m in found if m is not None)
    return roots


def node_fqn(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """Qualified name of the module a node belongs to ("" for the root), in any IR.

    ``gm.meta['fxslim_prefix']`` (set by capture for submodules traced on their own) is prepended.
    """
    prefix = gm.meta.get(META_PREFIX, "") if gm is not None else ""
    if node.op == "call_module":
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack")
        path = ""
        if stack:
            path = _clean_path(_stack_path(list(stack.values())[-1]), _local_roots(gm) if gm is not None else frozenset())
    return ".".join(p for p in (prefix, path) if p)


def op_namespace(target: Any) -> str | None:
    """'aten', 'fxslim', 'torchvision', ... of an op packet or overload (packets have no
    ``.namespace``); None for anything else."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target).split(".", 1)[0]
    return None


def detect_ir(gm: fx.GraphModule) -> IR:
    """Which IR a graph is in: 'module' (symbolic trace), 'torch' (dynamo) or 'aten' (export/aot)."""
    has_module = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_namespace(node.target) == "aten":
            return "aten"
        if node.op == "call_module":
            has_module = True
    if has_module:
        return "module"
    if any(n.op == "placeholder" and "example_value" in n.meta for n in gm.graph.nodes):
        return "torch"
    return "module"


# ----------------------------------------------------------------------------------------------
# Where weights live


@dataclass(frozen=True)
class ParamRef:
    """Where a weight lives: a dotted attribute path on the GraphModule and/or a graph node.

    ``call_module`` graphs give a path ("features.0.0.weight"); export graphs a ``get_attr`` node
    (with its path); dynamo graphs a placeholder node whose value comes from the backend's
    ``example_inputs`` (``path`` then holds the parameter's original name, for reports only).
    """

    path: str | None = None
    node: fx.Node | None = None

    def tensor(self, gm: fx.GraphModule, placeholder_values: dict[str, Any] | None = None) -> torch.Tensor | None:
        """The real tensor, or None when it is not available (e.g. a dynamo placeholder without values)."""
        if self.node is not None and self.node.op == "placeholder":
            return (placeholder_values or {}).get(self.node.name)
        target = self.node.target if self.node is not None else self.path
        if target is None:
            return None
        return attribute(gm, target)

    def as_node(self, gm: fx.GraphModule) -> fx.Node:
        """A graph node producing the weight (inserts a ``get_attr`` at the current insert point if needed)."""
        if self.node is not None:
            return self.node
        assert self.path is not None, "ParamRef without path or node"
        owner, _, name = self.path.rpartition(".")
        with warnings.catch_warnings():
            if parametrize.is_parametrized(attribute(gm, owner, None), name):  # recomputed at every read:
                # a property, which fx warns is no parameter of the graph (yet the get_attr reads it)
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            return gm.graph.get_attr(self.path)

    @property
    def shape(self) -> tuple | None:
        return shape_of(self.node) if self.node is not None else None


def _param_ref(gm: fx.GraphModule, arg: Any) -> ParamRef | None:
    """A ParamRef for a weight argument of a call_function node (get_attr or placeholder)."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        return ParamRef(path=str(arg.target), node=arg)
    if arg.op == "placeholder":
        names = gm.meta.get(META_PLACEHOLDER_FQNS, {})
        return ParamRef(path=names.get(arg.name), node=arg)
    return ParamRef(path=None, node=arg)


# ----------------------------------------------------------------------------------------------
# Views


def conv_kind(kernel: tuple, groups: int, in_channels: Any, transposed: bool) -> str:
    """'pointwise_conv', 'depthwise_conv', 'grouped_conv', 'transposed_conv' or 'conv'.

    Here, beside the views, because passes (which convs to rewrite) and the cost model (which kind
    a row is) must agree on it and both read ir.
    """
    if transposed:
        return "transposed_conv"
    if groups > 1:
        return "depthwise_conv" if groups == in_channels else "grouped_conv"
    return "pointwise_conv" if tuple(kernel) == (1, 1) else "conv"


@dataclass(frozen=True)
class _LayerView:
    """What every view of a layer with weights holds: its node, where it is, its input, its
    parameters and the shapes around it."""

    node: fx.Node
    ir: IR
    fqn: str
    input: fx.Node
    weight: ParamRef
    bias: ParamRef | None
    input_shape: tuple | None
    output_shape: tuple | None
    dtype: torch.dtype | None


def _layer_fields(node: fx.Node, gm: fx.GraphModule, ir: IR, x: Any, weight: ParamRef | None,
                  bias: ParamRef | None) -> dict[str, Any]:
    """The ``_LayerView`` fields of ``node`` reading input ``x`` with these parameters."""
    return {"node": node, "ir": ir, "fqn": node_fqn(node, gm), "input": x, "weight": weight, "bias": bias,
            "input_shape": shape_of(x), "output_shape": shape_of(node), "dtype": _dtype_of(node)}


def _module_params(node: fx.Node, mod: nn.Module) -> tuple[ParamRef, ParamRef | None]:
    """(weight, bias) of the module a ``call_module`` node calls."""
    bias = ParamRef(path=f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
    return ParamRef(path=f"{node.target}.weight"), bias


@dataclass(frozen=True)
class ConvView(_LayerView):
    """A 2-D convolution: ``[n, c_in, h, w] * [c_out, c_in/groups, kh, kw] -> [n, c_out, h', w']``."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    transposed: bool
    padding_spec: str | None = None  # 'same' / 'valid' when given as a string

    kind = "conv"

    @property
    def is_pointwise(self) -> bool:
        return self.kernel == (1, 1) and self.groups == 1 and not self.transposed

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def pads_asymmetrically(self) -> bool:
        """padding='same' with an even effective kernel ``(k-1)·dilation + 1``: PyTorch then pads one
        more on the far side, which a symmetric ``padding`` pair cannot say."""
        return self.padding_spec == "same" and any((k - 1) * d % 2 for k, d in zip(self.kernel, self.dilation))

    @property
    def conv_kind(self) -> str:
        """The kind of this conv (see ``conv_kind``)."""
        return conv_kind(self.kernel, self.groups, self.in_channels, self.transposed)

    @property
    def macs(self) -> Any:
        """N·C_out·(C_in/groups)·k_h·k_w·H_out·W_out (transposed: over the input positions; an
        unbatched [C, H, W] input is one sample)."""
        if self.output_shape is None or self.input_shape is None:
            return None
        spatial = self.input_shape if self.transposed else self.output_shape
        n, hw = (spatial[0], _prod(spatial[2:])) if len(spatial) == 4 else (1, _prod(spatial[1:]))
        return n * self.out_channels * (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1] * hw


@dataclass(frozen=True)
class LinearView(_LayerView):
    """A linear layer: ``[..., in] @ [out, in]^T -> [..., out]`` (rows = product of leading dims)."""

    in_features: int
    out_features: int

    kind = "linear"

    @property
    def rows(self) -> Any:
        return None if self.input_shape is None else _prod(self.input_shape[:-1])

    @property
    def macs(self) -> Any:
        rows = self.rows
        return None if rows is None else rows * self.in_features * self.out_features


AttentionForm = Literal["sdpa", "mha", "manual", "wrapped"]


@dataclass(frozen=True)
class AttentionView:
    """Softmax attention ``softmax(q k^T * scale) v`` per head.

    ``batch`` is the attention's own batch (the product of q's leading dims, heads excluded): it
    equals the model's batch for global attention and is larger for windowed/per-frame attention.
    """

    node: fx.Node
    ir: IR
    fqn: str
    form: AttentionForm
    batch: Any
    heads: int
    q_len: Any
    kv_len: Any
    head_dim: Any  # a SymInt where it follows an input size (cross-covariance attention: the tokens)
    v_head_dim: Any
    q: fx.Node | None
    k: fx.Node | None
    v: fx.Node | None
    nodes: tuple[fx.Node, ...]
    dtype: torch.dtype | None
    is_causal: bool = False
    has_mask: bool = False
    windows: Any = None  # known windows per sample for wrapped windowed attention

    kind = "attention"

    @property
    def macs(self) -> Any:
        """QK^T and AV: B·H·L_q·L_k·(d + d_v)."""
        return self.batch * self.heads * self.q_len * self.kv_len * (self.head_dim + self.v_head_dim)


View = ConvView | LinearView | AttentionView


def resolve_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[tuple[int, int], str | None]:
    """Numeric (top, left) padding for ints, pairs, 'valid' and 'same' (stride 1: total pad split low-first)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), "valid"
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return (total[0] // 2, total[1] // 2), "same"
        raise ValueError(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
    return _pair(padding), None


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
    return (value, value)


# ----------------------------------------------------------------------------------------------
# Conv


_TORCH_CONV = {torch.conv2d, F.conv2d}
_ATEN_CONV2D = {aten.conv2d.default, aten.conv2d.padding}
_ATEN_CONVOLUTION = {aten.convolution.default, aten._convolution.default}
_CONV_TRANSPOSE = {F.conv_transpose2d, torch.conv_transpose2d, aten.conv_transpose2d.input}


def _conv_view(node: fx.Node, gm: fx.GraphModule, ir: IR) -> ConvView | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            return None
        transposed = isinstance(mod, nn.ConvTranspose2d)
        padding, spec = resolve_padding(mod.padding, mod.kernel_size, mod.dilation)
        return ConvView(
            **_layer_fields(node, gm, ir, node.args[0], *_module_params(node, mod)),
            in_channels=mod.in_channels, out_channels=mod.out_channels,
            kernel=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=padding,
            dilation=tuple(mod.dilation), groups=mod.groups, transposed=transposed, padding_spec=spec,
        )
    if node.op != "call_function":
        return None
    target = node.target
    if target in _TORCH_CONV or target in _ATEN_CONV2D:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        args = _bind(node, names, defaults)
        transposed = False
    elif target in _CONV_TRANSPOSE:
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        args = _bind(node, names, (None, None, None, 1, 0, 0, 1, 1))
        transposed = True
    elif target in _ATEN_CONVOLUTION:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
        args = _bind(node, names, (None,) * 9)
        transposed = bool(args["transposed"])
    else:
        return None
    wshape = _attr_shape(gm, args["weight"])
    if wshape is None or len(wshape) != 4:
        return None  # conv1d/conv3d or unknown weight shape: not a 2-D conv view
    if not isinstance(args["groups"], int):
        return None  # computed in forward (timm's CondConv2d: groups = batch): no fixed layer to view
    groups = args["groups"]
    kernel = (int(wshape[2]), int(wshape[3]))
    dilation = _pair(args["dilation"])
    padding, spec = resolve_padding(args["padding"], kernel, dilation)
    if transposed:
        in_channels, out_channels = int(wshape[0]), int(wshape[1]) * groups
    else:
        out_channels, in_channels = int(wshape[0]), int(wshape[1]) * groups
    return ConvView(
        **_layer_fields(node, gm, ir, args["input"], _param_ref(gm, args["weight"]), _param_ref(gm, args["bias"])),
        in_channels=in_channels, out_channels=out_channels, kernel=kernel,
        stride=_pair(args["stride"]), padding=padding, dilation=dilation, groups=groups,
        transposed=transposed, padding_spec=spec,
    )


def _bind(node: fx.Node, names: tuple[str, ...], defaults: tuple) -> dict[str, Any]:
    """Arguments by name from positional args, kwargs and defaults (no schema lookup: see ir docs)."""
    out = dict(zip(names, defaults))
    out.update(zip(names, node.args))
    out.update({k: v for k, v in node.kwargs.items() if k in out})
    return out


# ----------------------------------------------------------------------------------------------
# Linear


_TORCH_LINEAR = {F.linear, aten.linear.default}
_VIEWLIKE = {
    aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
    aten.expand.default, aten.clone.default, aten._unsafe_view.default, aten.alias.default,
    aten.contiguous.default, aten.unsqueeze.default, aten.squeeze.dim, torch.transpose, torch.permute,
    torch.reshape, operator.getitem,
}
_VIEWLIKE_METHODS = {"t", "transpose", "permute", "view", "reshape", "expand", "contiguous", "clone", "unsqueeze", "squeeze", "flatten"}


def _linear_view(node: fx.Node, gm: fx.GraphModule, ir: IR) -> LinearView | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.Linear):
            return None
        return LinearView(**_layer_fields(node, gm, ir, node.args[0], *_module_params(node, mod)),
                          in_features=mod.in_features, out_features=mod.out_features)
    if node.op != "call_function":
        return None
    if node.target in _TORCH_LINEAR:
        args = _bind(node, ("input", "weight", "bias"), (None, None, None))
        wshape = _attr_shape(gm, args["weight"])
        if wshape is None or len(wshape) != 2:
            return None
        x, weight, bias = args["input"], args["weight"], args["bias"]
    elif node.target in (aten.addmm.default, aten.mm.default):
        # core ATen: linear = addmm(bias, x, t(w)); only when the right operand is a transposed parameter
        bias, x, wt = (node.args if node.target == aten.addmm.default else (None, *node.args))[:3]
        weight = _transposed_param(wt)
        if weight is None:
            return None
        wshape = _attr_shape(gm, weight)
        if wshape is None or len(wshape) != 2:
            return None
    else:
        return None
    return LinearView(**_layer_fields(node, gm, ir, x, _param_ref(gm, weight), _param_ref(gm, bias)),
                      in_features=int(wshape[1]), out_features=int(wshape[0]))


def _transposed_param(node: Any) -> fx.Node | None:
    """The parameter node behind ``t(w)`` / ``permute(w, [1, 0])``, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target not in (aten.t.default, aten.permute.default, aten.transpose.int):
        return None
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op in ("get_attr", "placeholder"):
        return src
    return None


# ----------------------------------------------------------------------------------------------
# Attention


_SDPA = {
    F.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
_MHA_FN = {F.multi_head_attention_forward}
_SOFTMAX = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
# between q@k^T and softmax: scale, bias, mask, dtype casts
_PRE_SOFTMAX = {
    operator.mul, operator.truediv, operator.add, operator.iadd, operator.sub, torch.mul, torch.div,
    torch.add, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, torch.masked_fill, aten._to_copy.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
}
_SCORE_ADDS = {operator.add, operator.iadd, operator.sub, torch.add, aten.add.Tensor}
_PRE_SOFTMAX_METHODS = {"mul", "div", "add", "masked_fill", "float", "to", "type_as", "view", "reshape", "mul_", "add_", "div_"}
_POST_SOFTMAX = {
    F.dropout, aten.dropout.default, aten.native_dropout.default, aten._to_copy.default, torch.nn.functional.dropout,
    aten.expand.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    operator.getitem,
}
_POST_SOFTMAX_METHODS = {"to", "type_as", "float", "half", "expand", "view", "reshape"}
_POST_SOFTMAX_MODULES = (nn.Dropout, nn.Identity)


def _is_call(node: Any, targets: set, methods: set, modules: tuple = (), gm: fx.GraphModule | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_module" and modules and gm is not None:
        return isinstance(gm.get_submodule(str(node.target)), modules)
    return False


def _heads_and_batch(shape: tuple, source: fx.Node | None, other: tuple | None = None) -> tuple[Any, Any]:
    """(batch, heads) of a [..., L, d] attention operand, over the dims it broadcasts to with the
    ``other`` operand's (a query [1, 1, L, d] shared by k/v [B, H, S, d] runs B·H times); 3-D operands
    look through views for the [B, H, L, d] they were folded from. Sizes stay as they are (a
    SymInt heads is a size of the formulas, not its example's value)."""
    lead = _broadcast(tuple(shape[:-2]), tuple(other[:-2])) if other is not None else tuple(shape[:-2])
    if len(lead) >= 2:
        return _prod(lead[:-1]), lead[-1]
    origin = _viewlike_origin(source)
    oshape = shape_of(origin) if origin is not None else None
    rows = _prod(lead)
    # the origin's B·H rows are the operand's (not qkv [B, 3, L, C] that q = qkv[:, 0] is a slice of)
    if (oshape is not None and len(oshape) == 4 and oshape[-2:] == shape[-2:] and len(shape) == 3
            and same_size(oshape[0] * oshape[1], rows)):
        return oshape[0], oshape[1]
    return rows, 1


def _broadcast(a: tuple, b: tuple) -> tuple:
    """The broadcast of two shapes' dims (sizes of 1 give way; else the first's)."""
    width = max(len(a), len(b))
    a, b = (1,) * (width - len(a)) + a, (1,) * (width - len(b)) + b
    return tuple(y if isinstance(x, int) and x == 1 else x for x, y in zip(a, b))


def same_size(a: Any, b: Any) -> bool | None:
    """Whether two (possibly symbolic) sizes are provably equal, without guarding on symbolic ones;
    None when unknown."""
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    diff = sympy.simplify(_size_expr(a) - _size_expr(b))
    if diff == 0:
        return True
    return False if diff.is_number else None


def size_hint(value: Any) -> int:
    """A concrete int for a size that may be a SymInt (its example value)."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    return int(value)


def _size_expr(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return sympy.Integer(value) if isinstance(value, int) else value


def _viewlike_origin(node: Any) -> fx.Node | None:
    """Walk up through view/expand/clone nodes to the first 4-D tensor."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        shape = shape_of(node)
        if shape is not None and len(shape) == 4:
            return node
        if not _is_call(node, _VIEWLIKE, _VIEWLIKE_METHODS):
            return None
        node = node.args[0]
        seen += 1
    return None


def _sdpa_view(node: fx.Node, gm: fx.GraphModule, ir: IR) -> AttentionView | None:
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    args = _bind(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), (None, None, None, None, 0.0, False))
    qs, ks, vs = shape_of(args["query"]), shape_of(args["key"]), shape_of(args["value"])
    if qs is None or ks is None or vs is None:
        return None
    batch, heads = _heads_and_batch(qs, args["query"], ks)
    return AttentionView(
        node=node, ir=ir, fqn=node_fqn(node, gm), form="sdpa", batch=batch, heads=heads,
        q_len=qs[-2], kv_len=ks[-2], head_dim=qs[-1], v_head_dim=vs[-1],
        q=args["query"], k=args["key"], v=args["value"], nodes=(node,), dtype=_dtype_of(args["query"]),
        is_causal=bool(args["is_causal"]), has_mask=args["attn_mask"] is not None,
    )


def _mha_view(node: fx.Node, gm: fx.GraphModule, ir: IR) -> AttentionView | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.MultiheadAttention):
            return None
        heads, embed, batch_first = mod.num_heads, mod.embed_dim, mod.batch_first
        q = node.args[0] if node.args else node.kwargs.get("query")
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        v = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        has_mask = node.kwargs.get("attn_mask") is not None
        is_causal = bool(node.kwargs.get("is_causal", False))
    elif node.op == "call_function" and node.target in _MHA_FN:
        names = ("query", "key", "value", "embed_dim_to_check", "num_heads")
        args = _bind(node, names, (None,) * 5)
        q, k, v = args["query"], args["key"], args["value"]
        heads, embed, batch_first = int(args["num_heads"]), int(args["embed_dim_to_check"]), False
        has_mask = node.kwargs.get("attn_mask") is not None
        is_causal = bool(node.kwargs.get("is_causal", False))
    else:
        return None
    qs, ks = shape_of(q), shape_of(k)
    if qs is None or ks is None:
        return None
    unbatched = len(qs) == 2
    if unbatched:
        batch, q_len, kv_len = 1, qs[0], ks[0]
    elif batch_first:
        batch, q_len, kv_len = qs[0], qs[1], ks[1]
    else:
        batch, q_len, kv_len = qs[1], qs[0], ks[0]
    return AttentionView(
        node=node, ir=ir, fqn=node_fqn(node, gm), form="mha", batch=batch, heads=heads,
        q_len=q_len, kv_len=kv_len, head_dim=embed // heads, v_head_dim=embed // heads,
        q=q, k=k, v=v, nodes=(node,), dtype=_dtype_of(q), is_causal=is_causal, has_mask=has_mask,
    )  # kdim/vdim other than embed_dim: the in-projections map k and v to embed_dim all the same


def _walk_back(node: Any, allowed: set, methods: set, limit: int = 8) -> tuple[fx.Node | None, list[fx.Node]]:
    """From a node, follow first arguments through ``allowed`` ops to a matmul; returns (matmul, path)."""
    path: list[fx.Node] = []
    while isinstance(node, fx.Node) and len(path) <= limit:
        if _is_call(node, _MATMUL, _MATMUL_METHODS):
            return node, path
        if not _is_call(node, allowed, methods):
            return None, path
        path.append(node)
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return None, path


def _is_softmax(node: fx.Node, gm: fx.GraphModule) -> bool:
    return _is_call(node, _SOFTMAX, {"softmax"}, (nn.Softmax,), gm)


def _softmax_dim_is_last(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        dim = gm.get_submodule(str(node.target)).dim
    else:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    shape = shape_of(node)
    if dim is None or shape is None:
        return False
    return dim in (-1, len(shape) - 1)


def _manual_view(node: fx.Node, gm: fx.GraphModule, ir: IR) -> AttentionView | None:
    """matmul(q, k^T) -> [scale/bias/mask] -> softmax(-1) -> [dropout] -> matmul(., v), anchored at softmax."""
    if not _is_softmax(node, gm) or not _softmax_dim_is_last(node, gm):
        return None
    qk, pre = _walk_back(node.args[0], _PRE_SOFTMAX, _PRE_SOFTMAX_METHODS)
    if qk is None:
        return None
    post: list[fx.Node] = []
    cur = node
    av = None
    for _ in range(6):
        users = list(cur.users)
        if len(users) != 1:
            break
        (user,) = users
        if _is_call(user, _MATMUL, _MATMUL_METHODS) and user.args[0] is cur:
            av = user
            break
        if not _is_call(user, _POST_SOFTMAX, _POST_SOFTMAX_METHODS, _POST_SOFTMAX_MODULES, gm):
            break
        post.append(user)
        cur = user
    if av is None:
        return None
    q, kt, v = qk.args[0], qk.args[1], av.args[1]
    qs, kts, vs, scores = shape_of(q), shape_of(kt), shape_of(v), shape_of(qk)
    if qs is None or kts is None or vs is None or scores is None or len(qs) < 3:
        return None
    # from the scores, which hold the broadcast of q's and k's batch and head dims (a query shared by heads)
    batch, heads = _heads_and_batch(scores, qk) if len(scores) >= 4 else _heads_and_batch(qs, q, scores)
    # a mask filled in, or added to the scores (an additive mask, a relative-position bias): one op per score
    has_mask = any(_is_call(n, {aten.masked_fill.Scalar, aten.masked_fill.Tensor, torch.masked_fill}, {"masked_fill"})
                   or (_is_call(n, _SCORE_ADDS, {"add", "add_", "sub"})
                       and sum(isinstance(a, fx.Node) for a in n.args[:2]) == 2) for n in pre)
    return AttentionView(
        node=node, ir=ir, fqn=node_fqn(node, gm), form="manual", batch=batch, heads=heads,
        q_len=scores[-2], kv_len=scores[-1], head_dim=qs[-1], v_head_dim=vs[-1],
        q=q, k=kt, v=v, nodes=(qk, *pre, node, *post, av), dtype=_dtype_of(q), has_mask=has_mask,
    )


# Functions that hide an attention behind torch.fx.wrap: (module, name) -> view builder.
_WrappedBuilder = Callable[[fx.Node, fx.GraphModule, IR], "AttentionView | None"]
_WRAPPED_ATTENTION: dict[tuple[str, str], _WrappedBuilder] = {}


def _torchvision_shifted_window(node: fx.Node, gm: fx.GraphModule, ir: IR) -> AttentionView | None:
    """torchvision.models.swin_transformer.shifted_window_attention(input [B, H, W, C], ..., window_size, num_heads)."""
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads")
    args = _bind(node, names, (None,) * 6)
    shape = shape_of(args["input"])
    if shape is None or len(shape) != 4:
        return None
    b, h, w, c = shape
    wh, ww = args["window_size"]
    heads = int(args["num_heads"])
    windows = math.ceil(h / wh) * math.ceil(w / ww)
    length = wh * ww
    return AttentionView(
        node=node, ir=ir, fqn=node_fqn(node, gm), form="wrapped", batch=b * windows, heads=heads,
        q_len=length, kv_len=length, head_dim=c // heads, v_head_dim=c // heads, q=None, k=None, v=None,
        nodes=(node,), dtype=_dtype_of(node), has_mask=True, windows=windows,
    )


_WRAPPED_ATTENTION[("torchvision.models.swin_transformer", "shifted_window_attention")] = _torchvision_shifted_window


def _wrapped_view(node: fx.Node, gm: fx.GraphModule, ir: IR) -> AttentionView | None:
    if node.op != "call_function":
        return None
    key = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
    builder = _WRAPPED_ATTENTION.get(key)
    return builder(node, gm, ir) if builder is not None else None


_BUILDERS = (_conv_view, _linear_view, _sdpa_view, _mha_view, _manual_view, _wrapped_view)


def view_of(node: fx.Node, gm: fx.GraphModule, ir: IR | None = None) -> View | None:
    """The canonical view of ``node`` (conv, linear or attention), or None for any other node."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    ir = ir or detect_ir(gm)
    for build in _BUILDERS:
        view = build(node, gm, ir)
        if view is not None:
            return view
    return None


def views(gm: fx.GraphModule) -> Iterator[View]:
    """All views of a graph, in execution order."""
    ir = detect_ir(gm)
    for node in list(gm.graph.nodes):
        view = view_of(node, gm, ir)
        if view is not None:
            yield view
