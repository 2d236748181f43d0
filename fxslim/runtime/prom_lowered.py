"""PROM's oneDNN runtime without its per-call layer: a converted graph lowered to direct calls.

``fxslim::qconv2d`` / ``qconv2d_add`` / ``qlinear`` check their arguments, look up their packed
weights and reorder their input on every call: about 20 µs of Python and dispatch per op, which
at batch 1 is as long as MobileNetV2's kernels take together. ``lower`` does those checks and
lookups once, on a copy of the converted graph, and leaves calls that compute nothing twice:

    fxslim::qconv2d(x, ..., weight, ...)           → quantized::conv2d(qx, packed, ...) (relu: conv2d_relu)
      with a clamp short of the u8 range          → onednn::qconv_pointwise
    fxslim::qconv2d_add(x, ..., skip, ...)         → prom_onednn.quantized_conv_add(qx, qskip, packed, ...):
                                                     quantized::conv2d onto the conv's grid, then the add
                                                     (the direct runtime fuses it, ``prom_direct``)
    fxslim::qlinear(x [N, in], ...)                → onednn::qlinear_pointwise(x, ..., packed, ...)
                                                     (direct, full output range: ``prom_native``'s kernel)
    fxslim::quantize_per_tensor(x f32, 0..255)     → the same codes as a QTensor, written channels_last
                                                     when only convs read it (``prom_native``'s kernel, else
                                                     ATen's vectorised quantizer)
    fxslim::int8_global_avg_pool2d / dequantize / nan_samples → the ops' own arithmetic without their
                                                     checks, in C where ``prom_native`` can run it
      nan_samples and a quantizer of the same input → one ``quantize_flagged``: the input read once
      pool → torch.flatten(·, 1) → qlinear → dequantize → one ``classifier_head`` (direct, native linear):
                                                     one C call where they made five Python calls

ATen's quantized convs take and give QTensors; every other reader of one reads its uint8 codes
through a view (``prom_onednn.codes``). Each run of consecutive quantized convs is one
TorchScript function (``QuantizedSegment``): called from Python each op pays about 11 µs more.

Every replacement computes the same values as the op it replaces (the ops run the same ATen
kernels; tests/runtime/test_prom_lowered.py compares them bit for bit), so the ``torch.ops.fxslim``
graph stays the model's definition and the reference the lowered one is tested against. What the
ops checked per call and the graph guarantees is not checked again: the dtype and channel count
of each conv input (another lowered op's output), the weights (constants). A conv that some input
size would leave without output pixels keeps its checking op, and so does a conv or linear whose
weights oneDNN would not sum exactly on this CPU (``prom_onednn.exact_sums``: 8-bit dense weights
without VNNI). Weights are read at lowering: like
inductor's freezing, a lowered graph does not see later in-place changes to them.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import operator
import warnings

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxslim.inplace import remove_dead_code
from fxslim.ir import META_PROM_LOWERED, attribute, meta_val, schema_arguments
from fxslim.runtime import onednn_capi, prom, prom_native, prom_onednn
from fxslim.runtime.prom import _INT32_MAX, conv_output_size
from fxslim.runtime.prom_direct import DirectSegment
from fxslim.runtime.prom_native import dequantized, nan_flags
from fxslim.warn import warn_user

__all__ = ["lower", "has_onednn_ops"]

_log = logging.getLogger(__name__)

_OPS = torch.ops.fxslim
_CONV, _CONV_ADD, _LINEAR = _OPS.qconv2d.default, _OPS.qconv2d_add.default, _OPS.qlinear.default
_QUANT, _DEQUANT, _POOL, _NAN = (_OPS.quantize_per_tensor.default, _OPS.dequantize.default,
                                 _OPS.int8_global_avg_pool2d.default, _OPS.nan_samples.default)
_ONEDNN_CONV = torch.ops.onednn.qconv_pointwise.default
_ONEDNN_LINEAR = torch.ops.onednn.qlinear_pointwise.default
_QCONV = prom_onednn.QUANTIZED_CONV
_QUANTIZED = (*_QCONV.values(), prom_onednn.quantized_conv_add)


def has_onednn_ops(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls any of the oneDNN runtime's convs or linears (a ``runtime="onednn"`` graph)."""
    return any(n.op == "call_function" and n.target in (_CONV, _CONV_ADD, _LINEAR) for n in gm.graph.nodes)


# ----------------------------------------------------------------------------------------------
# The direct forms of the cheap ops: each the exact arithmetic of its fxslim op, minus the checks


def quantize_qtensor(x: Tensor, scale: float, zero_point: int, channels_last: bool) -> Tensor:
    """``fxslim::quantize_per_tensor(x, scale, zero_point)`` as a quint8 QTensor: its codes are the op's output.

    ATen's quantizer computes round_half_even(x · fl32(1/scale)) + z saturated to 0..255 in
    float32, as the fxslim op does, but only while x · (1/scale) fits an int32: beyond (an input
    of 1e8 at scale 0.03, or ±inf) it wraps and gives code 0 where the op saturates to 255. So x is
    first clamped to ±512·scale, a bound past either end of the grid (|x·(1/scale)| ≥ 512 − 1 ulp
    saturates as it did). ``channels_last`` (a 4-d ``x``): written channels_last, by the native kernel
    in one pass (``prom_native.quantize_codes``), else by ATen a few samples at a time, so that the
    codes are still in cache when they are reordered.
    """
    bound = _SATURATED * scale
    if x.dim() == 4 and x.dtype == torch.float32:
        out = prom_native.quantize_codes(x, bound, scale, _inverse_scale(scale), zero_point, _layout(x, channels_last))
        if out is not None:
            return out

    def quantized(part: Tensor) -> Tensor:
        return torch.quantize_per_tensor(part.to(torch.float32).clamp(-bound, bound), scale, zero_point, torch.quint8)

    if not channels_last or x.dim() != 4:
        return quantized(x)  # float32 as the op does
    # the size of one sample from the shape, not x[0]: a batch of 0 samples has no x[0]
    rows = max(1, _QUANT_CHUNK // max(1, math.prod(x.shape[1:])))
    if x.shape[0] <= rows:
        return quantized(x).contiguous(memory_format=torch.channels_last)
    out = torch._empty_affine_quantized(x.shape, scale=scale, zero_point=zero_point, dtype=torch.quint8,
                                        memory_format=torch.channels_last)
    for start in range(0, x.shape[0], rows):
        out[start : start + rows].copy_(quantized(x[start : start + rows]))
    return out


def quantize_flagged(x: Tensor, scale: float, zero_point: int, channels_last: bool) -> tuple[Tensor, Tensor]:
    """(``quantize_qtensor(x, ...)``, ``nan_flags(x)``), where the native quantizer runs from one pass
    over ``x``: a model's float input is read once rather than twice."""
    if x.dim() == 4 and x.dtype == torch.float32 and x.shape[0] > 0:
        flags = torch.empty(x.shape[0], dtype=torch.bool)
        out = prom_native.quantize_codes(x, _SATURATED * scale, scale, _inverse_scale(scale), zero_point,
                                         _layout(x, channels_last), flags)
        if out is not None:
            return out, flags
    return quantize_qtensor(x, scale, zero_point, channels_last), nan_flags(x)


def _layout(x: Tensor, channels_last: bool) -> torch.memory_format:
    """The layout ``quantize_qtensor`` writes the codes of a 4-d ``x`` in."""
    return torch.channels_last if channels_last or _channels_last_only(x) else torch.contiguous_format


def _channels_last_only(x: Tensor) -> bool:
    """Whether ATen's quantizer writes its QTensor of ``x`` channels_last (its layout when not contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


_inverse_scale = functools.lru_cache(maxsize=1024)(prom._inverse_scale)  # a constant per graph node
_SATURATED = 512.0  # steps of the grid from 0 past which every code saturates (the grid spans 255)
_QUANT_CHUNK = 1 << 18  # floats per slice: 1 MB, its codes reordered while in L2


def _check_pool_size(x: Tensor) -> None:
    if x.shape[2] * x.shape[3] * 255 > _INT32_MAX:
        raise ValueError(f"x: H·W = {x.shape[2] * x.shape[3]} is too large for an int32 sum")


def global_avg_pool(x: Tensor, x_zero_point: int, multiplier: int, shift: int, out_zero_point: int, out_min: int,
                    out_max: int) -> Tensor:
    """``fxslim::int8_global_avg_pool2d`` with only the check the graph cannot guarantee: H·W of this input."""
    _check_pool_size(x)
    return prom_native.global_avg_pool_codes(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)


def widened_qtensor(x: Tensor, kernel: int, stride: int, padding: int, dilation: int) -> Tensor:
    """``prom_onednn.one_column_widened`` on a QTensor (TorchScript): ``x`` with ``stride`` columns
    of its zero point appended when the conv (column stride above 1) gives one output column."""
    if conv_output_size(x.size(3), kernel, stride, padding, dilation) != 1:
        return x
    pad = torch.quantize_per_tensor(torch.zeros([x.size(0), x.size(1), x.size(2), stride]), x.q_scale(),
                                    x.q_zero_point(), torch.quint8)
    return torch.cat([x, pad], 3)


def first_column(out: Tensor, x: Tensor, wide: Tensor) -> Tensor:
    """``out`` itself, or its first column when the conv ran on a ``widened_qtensor`` of ``x``."""
    if wide.size(3) == x.size(3):
        return out
    return out.narrow(3, 0, 1).contiguous(memory_format=torch.channels_last)


_COLUMN_GUARDS = (widened_qtensor, first_column)


def linear_codes(x: Tensor, x_scale: float, x_zero_point: int, packed: Tensor, w_scale: Tensor, zeros: Tensor,
                 bias: Tensor, out_scale: float, out_zero_point: int, native: prom_native.LinearWeights) -> Tensor:
    """``fxslim::qlinear`` with the full output range in the direct runtime: the native kernel, one C
    call (oneDNN's arithmetic; 28 µs where ATen's op takes 52 for MobileNetV2's classifier at batch 1,
    about 200 with caches cold after the convs), else oneDNN's op on ``packed``."""
    out = prom_native.linear_codes(x, x_zero_point, native, out_zero_point)
    if out is not None:
        return out
    return _ONEDNN_LINEAR(x, x_scale, x_zero_point, packed, w_scale, zeros, bias, out_scale, out_zero_point, None,
                          "none", [], "")


def classifier_head(x: Tensor, pool: tuple, linear: tuple, dequantize: tuple) -> Tensor:
    """``dequantized(linear_codes(global_avg_pool(x, *pool).flatten(1).contiguous(), *linear), *dequantize)``
    for codes or a QTensor ``x``: one C call (``prom_native.head``) where the three steps took five
    Python calls, each paying its fixed cost with caches cold after the convs; the same values."""
    _check_pool_size(x)
    x_zero_point, out_zero_point, native = linear[1], linear[7], linear[8]  # linear_codes' arguments after x
    out = prom_native.head(x, *pool, native, x_zero_point, out_zero_point, *dequantize)
    if out is not None:
        return out
    pooled = prom_native.global_avg_pool_codes(prom_onednn.codes(x) if x.is_quantized else x, *pool)  # size checked
    return dequantized(linear_codes(torch.flatten(pooled, 1).contiguous(), *linear), *dequantize)


def _flattens_from_dim_1(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)`` or ``x.flatten(1)``, start_dim given by position or name."""
    if not ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")):
        return False
    named = {**dict(zip(("input", "start_dim", "end_dim"), node.args)), **node.kwargs}
    return set(named) <= {"input", "start_dim", "end_dim"} and named.get("start_dim", 0) == 1 and named.get(
        "end_dim", -1) == -1


def _head_chain(dequantize: fx.Node) -> tuple[fx.Node, ...] | None:
    """(pool input, pool, flatten, contiguous, linear) of a lowered ``global_avg_pool`` → flatten from dim 1
    → ``contiguous`` → native ``linear_codes`` chain ending in ``dequantize``, each link read only by the
    next; None for anything else (it stays as it is)."""
    def only_reader(node: object, test) -> bool:
        return isinstance(node, fx.Node) and len(node.users) == 1 and test(node)

    linear = dequantize.args[0]
    if not only_reader(linear, lambda n: n.target is linear_codes and n.args[-1] is not None):
        return None
    contiguous = linear.args[0]
    if not only_reader(contiguous, lambda n: n.op == "call_method" and n.target == "contiguous" and len(n.args) == 1
                       and not n.kwargs):
        return None
    flat = contiguous.args[0]
    if not only_reader(flat, _flattens_from_dim_1):
        return None
    pool = flat.args[0]
    if not only_reader(pool, lambda n: n.target is global_avg_pool):
        return None
    return pool.args[0], pool, flat, contiguous, linear


# ----------------------------------------------------------------------------------------------
# lower


class _Lowering:
    def __init__(self, gm: fx.GraphModule, constants: dict[str, Tensor], direct: bool) -> None:
        self.direct = direct
        self.gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__ + "Lowered")
        self.graph = self.gm.graph
        self.constants = constants
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.lowered: dict[str, int] = {}
        self.channels_last: set[fx.Node] = set()  # nodes whose output is a fresh channels_last tensor
        self.qparams: dict[fx.Node, tuple[float, int]] = {}
        self.packers: dict[str, prom_onednn.ConvWeights] = {}  # packed weights' attributes: what they pack
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
        if not prom_onednn.exact_sums(weight, a["groups"]):
            self.count("kept:inexact_sums")  # oneDNN's kernels on this CPU would saturate: the op sums exactly
            return
        packed, zeros, attr, scalars, stride, padding, dilation, any_size = prom_onednn._conv_plan(*args, full=True)
        if not any_size:
            self.count("kept:input_size_checked")  # a small enough input gives no output pixel: the op checks
            return
        if prom_onednn.may_pad_explicitly(weight, padding, dilation):
            self.count("kept:explicit_padding")  # the op pads explicitly, per input size, what oneDNN gets wrong
            return
        if node.target is _CONV_ADD and attr not in _QCONV:
            self.count("kept:clamped_residual")  # a clamp short of 255 after the sum: the op clamps the codes
            return
        if stride[1] > 1 and (node.target is _CONV_ADD or attr not in _QCONV):
            # one output column at a column stride above 1 needs the input widened (prom_onednn.one_column_widened):
            # the op does it, a QTensor conv gets guards in quantized_conv
            self.count("kept:column_stride")
            return
        if prom_onednn.miscomputed_grouping(weight, a["groups"]) and not (self.direct and attr in _QCONV):
            # torch's oneDNN gets some of these wrong: the op computes them exactly; a direct segment runs them on
            # oneDNN's own library, which gets them right
            self.count("kept:grouped_conv")
            return
        if attr in _QCONV:
            pack = prom_onednn.ConvWeights(weight, w_scale, bias, tuple(stride), tuple(padding), tuple(dilation), a["groups"])
            self.quantized_conv(node, a, packed, pack, attr, (weight.shape[3], stride[1], padding[1], dilation[1]))
            return
        common = (self.channels_last_input(node, a["x"]), a["x_scale"], a["x_zero_point"], self.attr(node, packed, "packed"),
                  self.attr(node, w_scale, "w_scale"), self.attr(node, zeros, "zeros"))
        bias_node = self.attr(node, bias, "bias")
        tail = (stride, padding, dilation, a["groups"], a["out_scale"], a["out_zero_point"], None)
        new = self.replace(node, _ONEDNN_CONV, (*common, bias_node, *tail, attr, scalars, ""), "qconv2d")
        self.channels_last.add(new)

    def quantized_conv(self, node: fx.Node, a: dict, packed: torch.ScriptObject, pack: prom_onednn.ConvWeights,
                       attr: str, columns: tuple[int, int, int, int]) -> None:
        """``node`` as ATen's quantized conv on oneDNN: QTensors in and out, the skip accumulated in
        place; ``pack``: its constants, packed anew by each segment copy (``QuantizedSegment``). ``columns``: the kernel's
        width, stride, padding and dilation along W."""
        x = self.qtensor_input(node, a["x"], a["x_scale"], a["x_zero_point"])
        packed_node = self.attr(node, packed, "packed")
        self.packers[packed_node.target] = pack
        tail = (packed_node, a["out_scale"], a["out_zero_point"])
        if node.target is _CONV and columns[1] > 1:  # a column stride: guarded against one output column
            with self.graph.inserting_before(node):
                wide = self.graph.call_function(widened_qtensor, (x, *columns))
            self.order[wide] = self.order[node]
            self.qparams[wide] = (a["x_scale"], a["x_zero_point"])
            new = self.replace(node, _QCONV[attr], (wide, *tail), "qconv2d")
            self.qparams[new] = (a["out_scale"], a["out_zero_point"])
            with self.graph.inserting_after(new):
                narrowed = self.graph.call_function(first_column, (new, x, wide))
            narrowed.meta.update(new.meta)
            new.replace_all_uses_with(narrowed, delete_user_cb=lambda user: user is not narrowed)
            self.order[narrowed] = self.order[new]
            new = narrowed
        elif node.target is _CONV:
            new = self.replace(node, _QCONV[attr], (x, *tail), "qconv2d")
        else:
            skip = self.qtensor_input(node, a["skip"], a["skip_scale"], a["skip_zero_point"])
            new = self.replace(node, prom_onednn.quantized_conv_add, (
                x, skip, packed_node, a["conv_scale"], a["conv_zero_point"], attr == "relu", *tail[1:]), "qconv2d_add")
        self.channels_last.add(new)
        self.qparams[new] = (a["out_scale"], a["out_zero_point"])

    def qtensor_input(self, node: fx.Node, x: fx.Node, scale: float, zero_point: int) -> fx.Node:
        """``x`` as a QTensor with these parameters: itself if it is one, else a QTensor copy of its codes."""
        if self.qparams.get(x) == (scale, zero_point):
            return x
        with self.graph.inserting_before(node):
            copied = self.graph.call_function(prom_onednn.as_qtensor, (x, scale, zero_point))
        self.order[copied] = self.order[node]
        return copied

    def linear(self, node: fx.Node) -> None:
        a = schema_arguments(node.target, node.args, node.kwargs)
        weight, w_scale, bias = (self.constant(a[k]) for k in ("weight", "w_scale", "bias"))
        x = meta_val(a["x"])
        if weight is None or w_scale is None or bias is None or not isinstance(x, Tensor) or x.dim() != 2:
            self.count("kept:weight_at_run_time" if weight is None else "kept:not_2d")
            return
        if not prom_onednn.exact_sums(weight, 1):
            self.count("kept:inexact_sums")  # as for convs
            return
        prom_onednn._linear_check(x, a["x_scale"], a["x_zero_point"], weight, w_scale, bias, a["out_scale"],
                                  a["out_zero_point"], a["out_min"], a["out_max"])
        packed, zeros = prom_onednn.prepack_linear(weight)
        attr, scalars = prom_onednn._post_op(a["out_scale"], a["out_zero_point"], a["out_min"], a["out_max"])
        with self.graph.inserting_before(node):
            x_contiguous = self.graph.call_method("contiguous", (a["x"],))
        onednn = (x_contiguous, a["x_scale"], a["x_zero_point"], self.attr(node, packed, "packed"),
                  self.attr(node, w_scale, "w_scale"), self.attr(node, zeros, "zeros"), self.attr(node, bias, "bias"),
                  a["out_scale"], a["out_zero_point"])
        if self.direct and (a["out_min"], a["out_max"]) == (0, 255):
            native = prom_native.LinearWeights(weight, w_scale, bias, a["x_scale"], a["out_scale"])
            self.replace(node, linear_codes, (*onednn, self.attr(node, native, "native")), "qlinear_native")
        else:
            self.replace(node, _ONEDNN_LINEAR, (*onednn, None, attr, scalars, ""), "qlinear")

    def quantize(self, node: fx.Node) -> None:
        a = schema_arguments(node.target, node.args, node.kwargs)
        x = meta_val(a["x"])
        if not isinstance(x, Tensor) or (a["out_min"], a["out_max"]) != (0, 255):
            self.count("kept:not_full_range")  # ATen's quantizer saturates to the whole u8 range
            return
        convs = all(u.op == "call_function" and u.target in (_CONV, _CONV_ADD) and u.args[0] is node for u in node.users)
        # channels_last for convs, direct segments too: the native quantizer writes either layout in one
        # pass and a segment then skips its reorder (batch 1, MobileNetV2: 1.6 % faster than NCHW codes)
        layout = convs and x.dim() == 4
        args = (a["x"], a["scale"], a["zero_point"], layout)
        flags = next((u for u in a["x"].users if u.target is nan_flags), None)
        if flags is None or x.dim() != 4 or x.dtype != torch.float32:
            new = self.replace(node, quantize_qtensor, args, "quantize")
        else:
            new = self.quantize_flagged(node, flags, args)
        self.qparams[new] = (a["scale"], a["zero_point"])
        if layout:
            self.channels_last.add(new)

    def quantize_flagged(self, node: fx.Node, flags: fx.Node, args: tuple) -> fx.Node:
        """The quantizer ``node`` and the NaN flags ``flags`` of the same float input as one
        ``quantize_flagged`` call, placed where the flags were (before the quantizer); its codes."""
        with self.graph.inserting_before(flags):
            both = self.graph.call_function(quantize_flagged, args)
            codes, nan = (self.graph.call_function(operator.getitem, (both, i)) for i in (0, 1))
        codes.meta.update(node.meta)
        nan.meta.update(flags.meta)
        node.replace_all_uses_with(codes)
        flags.replace_all_uses_with(nan)
        for old in (node, flags):
            self.graph.erase_node(old)
        self.order.update(dict.fromkeys((both, codes, nan), self.order[flags]))
        self.count("quantize_flagged")
        return codes

    def read_codes(self) -> None:
        """Every reader of a QTensor but ATen's quantized convs reads its uint8 codes, through one view."""
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        for q in list(self.qparams):
            readers = [u for u in q.users if not ((u.target in _QUANTIZED and q in u.args[:2]) or u in self.qparams)]
            if not readers:
                continue
            with self.graph.inserting_before(min(readers, key=position.__getitem__)):  # not between two convs
                view = self.graph.call_function(prom_onednn.codes, (q,))
            for user in readers:
                user.replace_input_with(q, view)

    def fuse_heads(self) -> None:
        """Each classifier head (``_head_chain``) as one ``classifier_head`` call, reading the QTensor
        itself where its codes view had no other reader."""
        for node in list(self.graph.nodes):
            chain = _head_chain(node) if node.target is dequantized else None
            if chain is None:
                continue
            x, pool, flat, contiguous, linear = chain
            view = x if x.target is prom_onednn.codes and len(x.users) == 1 else None
            with self.graph.inserting_before(node):
                head = self.graph.call_function(classifier_head, (
                    x if view is None else view.args[0], pool.args[1:], linear.args[1:], node.args[1:]))
            head.meta.update(node.meta)
            node.replace_all_uses_with(head)
            for old in (node, linear, contiguous, flat, pool, *([view] if view is not None else [])):
                self.graph.erase_node(old)
            self.count("head")

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
        self.read_codes()
        if self.direct:
            self.fuse_heads()
        remove_dead_code(self.gm)  # not an in-place write into a float island's input (fx's keeps no call_method)
        self.graph.lint()
        self.gm.recompile()
        _log.info("PROM lowering: %s", self.lowered)
        return _scripted(self.gm, self.packers, self.direct)


def lower(gm: fx.GraphModule, constants: dict[str, Tensor] | None = None, *, direct: bool = True) -> fx.GraphModule:
    """A copy of a converted ``runtime="onednn"`` graph with its ops lowered (module docstring).

    ``gm`` is only read; the copy shares its weights and holds oneDNN's packed forms of them as
    plain attributes (not buffers: they cannot be copied, saved or moved to another device). ``constants``: values of placeholders that
    hold weights (a graph dynamo captured, whose parameters arrive as inputs), by node name.
    ``gm.meta[META_PROM_LOWERED]`` counts what was lowered, and as ``kept:<reason>`` what was not.
    """
    prom_onednn.quiet_qtensor_warning()
    lowering = _Lowering(gm, dict(constants or {}), direct and onednn_capi.available())
    out = lowering.run()
    out.meta[META_PROM_LOWERED] = dict(lowering.lowered)
    return out


# ----------------------------------------------------------------------------------------------
# TorchScript segments: the quantized convs called from C++
#
# Called from Python, each ATen op pays about 11 µs for the call itself (argument parsing, the
# packed weights' ScriptObject, dispatch), more than a 7×7 conv of MobileNetV2 computes; called from
# TorchScript the whole call costs 7.5 µs. So every run of consecutive quantized convs becomes one
# scripted function: only ops with a fixed schema, no Python control flow, nothing that the
# example input's sizes could freeze.


def _in_script(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _QUANTIZED or node.target in _COLUMN_GUARDS)


def _segments(graph: fx.Graph) -> list[list[fx.Node]]:
    """Runs of consecutive scriptable nodes; get_attr nodes between them do not break a run."""
    runs, current = [], []
    for node in graph.nodes:
        if _in_script(node):
            current.append(node)
        elif node.op != "get_attr":
            if current:
                runs.append(current)
            current = []
    return [run for run in runs if any(n.target in _QUANTIZED for n in run)]


SHAPES = 4  # input shapes a segment keeps its own packed weights for


class QuantizedSegment(nn.Module):
    """A run of ATen quantized convs as TorchScript, under the oneDNN engine, one copy per input shape.

    A packed conv weight keeps the oneDNN primitive of the first input shape it runs at and builds
    a new one on every call at any other shape. So each input shape (up to ``SHAPES``) gets its own
    copy of the run, with weights packed afresh on its first call; further shapes share the first
    copy (the same values, at the uncached speed). The engine is process-wide state (the packed
    weights are oneDNN's only under it): it is set for the call and restored after.
    """

    def __init__(self, graph: fx.Graph, constants: dict[str, object], packers: dict[str, prom_onednn.ConvWeights]) -> None:
        super().__init__()
        self.__dict__.update(_graph=graph, _constants=constants, _packers=packers, _copies={})
        self.__dict__["_first"] = self._build()

    @property
    def graph(self) -> fx.Graph:
        """The run's ops (each copy runs them as TorchScript)."""
        return self._graph

    @property
    def weights(self) -> dict[str, prom_onednn.ConvWeights]:
        """The constants of the run's packed weights, by the name its graph reads them under."""
        return dict(self._packers)

    @property
    def copies(self) -> dict[tuple, nn.Module]:
        """The copy each input shape seen so far runs (by the shapes of the run's inputs)."""
        return dict(self._copies)

    def _build(self) -> nn.Module:
        root = nn.Module()
        for name, value in self._constants.items():
            root.__dict__[name] = self._packers[name].pack() if name in self._packers else value
        module = fx.GraphModule(root, copy.deepcopy(self._graph), "PromQuantizedSegment")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated (see prom_onednn.QUANTIZED_CONV)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
                return torch.jit.script(module)
        except Exception as error:  # noqa: BLE001 - any refusal leaves the run in Python: slower, the same values
            warn_user(f"PROM lowering: a run of quantized convs stays in Python ({error})")
            return module

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        key = tuple(tuple(a.shape) for a in args)
        module = self._copies.get(key)
        if module is None:
            module = self._build() if self._copies else self._first
            if len(self._copies) < SHAPES:
                self._copies[key] = module
            else:
                module = self._first
        with prom_onednn.onednn_engine():
            return module(*args)


def _segment(gm: fx.GraphModule, run: list[fx.Node], packers: dict[str, prom_onednn.ConvWeights]
             ) -> tuple[QuantizedSegment, list[fx.Node], list[fx.Node]]:
    """``run`` as a segment of its own: (segment, outer nodes it reads, its nodes read outside)."""
    members = set(run)
    inputs = list(dict.fromkeys(a for n in run for a in n.all_input_nodes if a not in members and a.op != "get_attr"))
    outputs = [n for n in run if any(u not in members for u in n.users)]
    graph, env, constants, segment_packers = fx.Graph(), {}, {}, {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"x{i}")
    for node in run:
        for attr in node.all_input_nodes:
            if attr.op == "get_attr" and attr not in env:
                name = f"c{len(constants)}"
                constants[name] = attribute(gm, attr.target)  # a packed weight or a tensor constant
                if attr.target in packers:
                    segment_packers[name] = packers[attr.target]
                env[attr] = graph.get_attr(name)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return QuantizedSegment(graph, constants, segment_packers), inputs, outputs


def _scripted(gm: fx.GraphModule, packers: dict[str, prom_onednn.ConvWeights], direct: bool) -> fx.GraphModule:
    """``gm`` with every run of quantized convs replaced by a call of its ``QuantizedSegment``, with
    ``direct`` wrapped in a ``DirectSegment``. ``packers``: the packed weights' constants, by attribute name."""
    for index, run in enumerate(_segments(gm.graph)):
        segment, inputs, outputs = _segment(gm, run, packers)
        if direct:
            segment = DirectSegment(segment)
        members = set(run)
        name = f"_quantized_segment{index}"
        gm.add_submodule(name, segment)
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_module(name, tuple(inputs))
        with gm.graph.inserting_after(call):
            for i, node in enumerate(outputs):
                item = gm.graph.call_function(operator.getitem, (call, i))
                item.meta.update(node.meta)
                node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        for node in reversed(run):
            gm.graph.erase_node(node)
    remove_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
