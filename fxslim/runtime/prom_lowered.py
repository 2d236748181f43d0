"""PROM's oneDNN runtime without its per-call layer: a converted graph lowered to direct oneDNN calls.

``fxslim::qconv2d`` / ``qconv2d_add`` / ``qlinear`` check their arguments, look up their packed
weights and reorder their input on every call: about 20 µs of Python and dispatch per op, which
at batch 1 is as long as MobileNetV2's kernels take together. ``lower`` does those checks and
lookups once, on a copy of the converted graph, and leaves calls that compute nothing twice:

    fxslim::qconv2d(x, ..., weight, ...)           → onednn::qconv_pointwise(x, ..., packed, ...)
    fxslim::qconv2d_add(x, ..., skip, ...)         → onednn::qconv2d_pointwise.binary(x, ..., skip, ...)
                                                     (accumulating into skip itself when no later op reads it,
                                                     else into a copy)
    fxslim::qlinear(x [N, in], ...)                → onednn::qlinear_pointwise(x, ..., packed, ...)
    fxslim::quantize_per_tensor(x f32, 0..255)     → ATen's vectorised quantizer, written channels_last
                                                     when only convs read it
    fxslim::int8_global_avg_pool2d / dequantize / nan_samples → the ops' own arithmetic, called without their checks

Every replacement computes the same values as the op it replaces (tests/runtime/test_prom_lowered.py
compares them bit for bit), so the ``torch.ops.fxslim`` graph stays the model's definition and the
reference the lowered one is tested against. What the ops checked per call and the graph
guarantees is not checked again: the dtype and channel count of each conv input (another lowered
op's output), the weights (constants). A conv that some input size would leave without output
pixels keeps its checking op. Weights are read at lowering: like inductor's freezing, a lowered
graph does not see later in-place changes to them.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.fx as fx
from torch import Tensor

from fxslim.ir import META_PROM_LOWERED, attribute, meta_val, schema_arguments
from fxslim.runtime import prom_onednn
from fxslim.runtime.prom import _INT32_MAX, dequantized, global_avg_pool_codes, nan_flags

__all__ = ["lower", "has_onednn_ops"]

_log = logging.getLogger(__name__)

_OPS = torch.ops.fxslim
_CONV, _CONV_ADD, _LINEAR = _OPS.qconv2d.default, _OPS.qconv2d_add.default, _OPS.qlinear.default
_QUANT, _DEQUANT, _POOL, _NAN = (_OPS.quantize_per_tensor.default, _OPS.dequantize.default,
                                 _OPS.int8_global_avg_pool2d.default, _OPS.nan_samples.default)
_ONEDNN_CONV = torch.ops.onednn.qconv_pointwise.default
_ONEDNN_CONV_ADD = torch.ops.onednn.qconv2d_pointwise.binary
_ONEDNN_LINEAR = torch.ops.onednn.qlinear_pointwise.default
_NON_ALIASING = (_CONV, _CONV_ADD, _LINEAR, _POOL, _DEQUANT)  # ops whose output never shares their input's memory


def has_onednn_ops(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls any of the oneDNN runtime's convs or linears (a ``runtime="onednn"`` graph)."""
    return any(n.op == "call_function" and n.target in (_CONV, _CONV_ADD, _LINEAR) for n in gm.graph.nodes)


# ----------------------------------------------------------------------------------------------
# The direct forms of the cheap ops: each the exact arithmetic of its fxslim op, minus the checks


def quantize_channels_last(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """``fxslim::quantize_per_tensor(x, scale, zero_point)`` for float32 [N, C, H, W], written channels_last.

    ATen's quantizer computes round_half_even(x · fl32(1/scale)) + z saturated to 0..255 in
    float32, as the fxslim op does. A few samples at a time, so that the codes are still in cache
    when they are reordered to channels_last.
    """
    rows = max(1, _QUANT_CHUNK // max(1, x[0].numel()))
    if x.shape[0] <= rows:
        return quantize(x, scale, zero_point).contiguous(memory_format=torch.channels_last)
    out = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
    for start in range(0, x.shape[0], rows):
        out[start : start + rows].copy_(quantize(x[start : start + rows], scale, zero_point))
    return out


_QUANT_CHUNK = 1 << 18  # floats per slice: 1 MB, its codes reordered while in L2


def quantize(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """``fxslim::quantize_per_tensor(x, scale, zero_point)`` of a float ``x`` (same layout as x)."""
    q = torch.quantize_per_tensor(x.to(torch.float32), scale, zero_point, torch.quint8)  # float32 as the op does
    # its uint8 codes without int_repr's copy (3 ms at batch 32, 224 px): a view of the same storage
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def global_avg_pool(x: Tensor, x_zero_point: int, multiplier: int, shift: int, out_zero_point: int, out_min: int,
                    out_max: int) -> Tensor:
    """``fxslim::int8_global_avg_pool2d`` with only the check the graph cannot guarantee: H·W of this input."""
    if x.shape[2] * x.shape[3] * 255 > _INT32_MAX:
        raise ValueError(f"x: H·W = {x.shape[2] * x.shape[3]} is too large for an int32 sum")
    return global_avg_pool_codes(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)


# ----------------------------------------------------------------------------------------------
# lower


class _Lowering:
    def __init__(self, gm: fx.GraphModule, constants: dict[str, Tensor]) -> None:
        self.gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__ + "Lowered")
        self.graph = self.gm.graph
        self.constants = constants
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.lowered: dict[str, int] = {}
        self.channels_last: set[fx.Node] = set()  # nodes whose output is a fresh channels_last tensor
        self.attrs = 0

    def constant(self, node: object) -> Tensor | None:
        """The tensor behind a get_attr or a placeholder with a known value, else None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            value = attribute(self.gm, node.target)
            return value if isinstance(value, Tensor) else None
        if node.op == "placeholder":
            return self.constants.get(node.name)
        return None

    def attr(self, node: fx.Node, tensor: Tensor, what: str) -> fx.Node:
        """A constant of a lowered op as a plain attribute of the lowered module: one dict lookup per
        call, where a buffer takes nn.Module.__getattr__ and a nested path one call per level."""
        name = f"_onednn{self.attrs}_{what}"
        self.attrs += 1
        self.gm.__dict__[name] = tensor
        with self.graph.inserting_before(node):
            return self.graph.create_node("get_attr", name)  # Graph.get_attr warns about a non-buffer

    def count(self, what: str) -> None:
        self.lowered[what] = self.lowered.get(what, 0) + 1

    def replace(self, node: fx.Node, target: object, args: tuple, what: str) -> fx.Node:
        with self.graph.inserting_before(node):
            new = self.graph.call_function(target, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.order[new] = self.order[node]
        self.count(what)
        return new

    def channels_last_input(self, node: fx.Node, x: fx.Node) -> fx.Node:
        if x in self.channels_last:
            return x
        with self.graph.inserting_before(node):
            return self.graph.call_function(prom_onednn._channels_last, (x,))

    def conv(self, node: fx.Node) -> None:
        a = schema_arguments(node.target, node.args, node.kwargs)
        weight, w_scale, bias = (self.constant(a[k]) for k in ("weight", "w_scale", "bias"))
        x = meta_val(a["x"])
        if weight is None or w_scale is None or bias is None or not isinstance(x, Tensor):
            self.count("kept:weight_at_run_time")  # the op packs it per call
            return
        args = [a[k] for k in ("x", "x_scale", "x_zero_point", "weight", "w_scale", "bias", "out_scale", "out_zero_point",
                               "out_min", "out_max", "stride", "padding", "dilation", "groups")]
        args[3:6] = weight, w_scale, bias
        args[0] = x
        packed, zeros, attr, scalars, stride, padding, dilation, any_size = prom_onednn._conv_plan(*args, full=True)
        if not any_size:
            self.count("kept:input_size_checked")  # a small enough input gives no output pixel: the op checks
            return
        common = (self.channels_last_input(node, a["x"]), a["x_scale"], a["x_zero_point"], self.attr(node, packed, "packed"),
                  self.attr(node, w_scale, "w_scale"), self.attr(node, zeros, "zeros"))
        bias_node = self.attr(node, bias, "bias")
        tail = (stride, padding, dilation, a["groups"], a["out_scale"], a["out_zero_point"], None)
        if node.target is _CONV:
            new = self.replace(node, _ONEDNN_CONV, (*common, bias_node, *tail, attr, scalars, ""), "qconv2d")
        else:
            accum = self.accumulator(node, a["skip"])
            new = self.replace(node, _ONEDNN_CONV_ADD, (*common, accum, bias_node, *tail, a["skip_scale"],
                                                        a["skip_zero_point"], "sum", 1.0, attr, scalars, ""), "qconv2d_add")
        self.channels_last.add(new)

    def accumulator(self, node: fx.Node, skip: fx.Node) -> fx.Node:
        """``skip`` itself when the sum post-op may overwrite it (a fresh tensor that no op after this
        one reads, nor any view of it), else a channels_last copy."""
        others = [u for u in skip.users if u is not node]
        if skip in self.channels_last and all(
                self.order.get(u, len(self.order)) < self.order[node] and (u.target in _NON_ALIASING or u in self.channels_last) for u in others):
            self.count("in_place_skip")
            return skip
        with self.graph.inserting_before(node):
            return self.graph.call_method("clone", (skip,), {"memory_format": torch.channels_last})

    def linear(self, node: fx.Node) -> None:
        a = schema_arguments(node.target, node.args, node.kwargs)
        weight, w_scale, bias = (self.constant(a[k]) for k in ("weight", "w_scale", "bias"))
        x = meta_val(a["x"])
        if weight is None or w_scale is None or bias is None or not isinstance(x, Tensor) or x.dim() != 2:
            self.count("kept:weight_at_run_time" if weight is None else "kept:not_2d")
            return
        prom_onednn._linear_check(x, a["x_scale"], a["x_zero_point"], weight, w_scale, bias, a["out_scale"],
                                  a["out_zero_point"], a["out_min"], a["out_max"])
        packed, zeros = prom_onednn.prepack_linear(weight)
        attr, scalars = prom_onednn._post_op(a["out_scale"], a["out_zero_point"], a["out_min"], a["out_max"])
        with self.graph.inserting_before(node):
            x_contiguous = self.graph.call_method("contiguous", (a["x"],))
        self.replace(node, _ONEDNN_LINEAR, (x_contiguous, a["x_scale"], a["x_zero_point"], self.attr(node, packed, "packed"),
                                            self.attr(node, w_scale, "w_scale"), self.attr(node, zeros, "zeros"),
                                            self.attr(node, bias, "bias"), a["out_scale"],
                                            a["out_zero_point"], None, attr, scalars, ""), "qlinear")

    def quantize(self, node: fx.Node) -> None:
        a = schema_arguments(node.target, node.args, node.kwargs)
        x = meta_val(a["x"])
        if not isinstance(x, Tensor) or (a["out_min"], a["out_max"]) != (0, 255):
            self.count("kept:not_full_range")  # ATen's quantizer saturates to the whole u8 range
            return
        convs = all(u.op == "call_function" and u.target in (_CONV, _CONV_ADD) and u.args[0] is node for u in node.users)
        if convs and x.dim() == 4:
            new = self.replace(node, quantize_channels_last, (a["x"], a["scale"], a["zero_point"]), "quantize")
            self.channels_last.add(new)
        else:
            self.replace(node, quantize, (a["x"], a["scale"], a["zero_point"]), "quantize")

    def cheap(self, node: fx.Node) -> None:
        a = schema_arguments(node.target, node.args, node.kwargs)
        if node.target is _NAN:
            self.replace(node, nan_flags, (a["x"],), "nan_samples")  # the op's checks held at conversion
        elif node.target is _POOL:
            if isinstance(meta_val(a["x"]), Tensor) and meta_val(a["x"]).dim() == 4:
                self.replace(node, global_avg_pool, tuple(a[k] for k in ("x", "x_zero_point", "multiplier", "shift",
                                                                       "out_zero_point", "out_min", "out_max")), "pool")
            else:
                self.count("kept:not_4d")
        else:
            self.replace(node, dequantized, (a["q"], a["scale"], a["zero_point"], a["nan_samples"]), "dequantize")

    def run(self) -> fx.GraphModule:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in (_CONV, _CONV_ADD):
                self.conv(node)
            elif node.target is _LINEAR:
                self.linear(node)
            elif node.target is _QUANT:
                self.quantize(node)
            elif node.target in (_NAN, _POOL, _DEQUANT):
                self.cheap(node)
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.gm.recompile()
        _log.info("PROM lowering: %s", self.lowered)
        return self.gm


def lower(gm: fx.GraphModule, constants: dict[str, Tensor] | None = None) -> fx.GraphModule:
    """A copy of a converted ``runtime="onednn"`` graph with its ops lowered (module docstring).

    ``gm`` is only read; the copy shares its weights and holds oneDNN's packed forms of them as
    plain attributes (not buffers: they cannot be copied, saved or moved to another device). ``constants``: values of placeholders that
    hold weights (a graph dynamo captured, whose parameters arrive as inputs), by node name.
    ``gm.meta[META_PROM_LOWERED]`` counts what was lowered, and as ``kept:<reason>`` what was not.
    """
    with warnings.catch_warnings():  # ATen's quantizer warns once that quantized dtypes are deprecated
        warnings.simplefilter("ignore", UserWarning)
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
    lowering = _Lowering(gm, dict(constants or {}))
    out = lowering.run()
    out.meta[META_PROM_LOWERED] = dict(lowering.lowered)
    return out
