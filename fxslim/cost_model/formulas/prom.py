"""Cost formulas for PROM's integer ops (``fxslim.runtime.prom``): the arithmetic a converted model
defines, as hardware built for it runs it (on a CPU, oneDNN multiplies ternary codes and the
reference runtime emulates int8 exactly in float32; docs/COST_MODEL.md).

- ``ternary_conv2d``: MACs in format "ternary", which the cost model expands to one addition per MAC
  at the ternary accumulator width and no multiplication (the op adds and subtracts activation
  codes); the zero-point correction is a per-channel constant folded into the bias.
- ``int8_conv2d`` / ``int8_linear``: MACs in format "int8" (an int8 multiply and an add at the
  accumulator width).
- Requantization (one multiply per output element, ``Conventions.requant_format``) is charged only
  when ``Conventions.include_requant`` is set; the residual add charges its two input rescales and
  the pool its output rescale under the same option. Bias additions follow ``include_bias``.
- ``lut`` (a 256-entry table read per element), ``max_pool2d_codes`` (comparisons of codes):
  int8 elementwise work. Float islands are the float ops themselves, costed by the aten formulas at
  their dtype (fp32), with ``dequantize``/``quantize_per_tensor`` at their borders.
- Storage of the conv/linear ops is what they store: weight codes at the format's bits (ternary per
  ``Conventions.ternary_packing``: 2-bit as stored, 1.6-bit base-3 or int8 containers), plus the
  int32 bias, multiplier and rounding offset of every output channel.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fxslim.cost_model.conventions import format_bits
from fxslim.cost_model.registry import OpCall, OpCost, register_cost
from fxslim.ir import conv_kind
from fxslim.runtime.prom import unpack_ternary

__all__: list[str] = []

ops = torch.ops.fxslim
_PER_CHANNEL_BITS = 3 * 32  # int32 bias, multiplier and rounding offset per output channel


def _extras(call: OpCall, outputs: Any, integer_bias: bool) -> dict[tuple[str, str], Any]:
    """Optional per-output operations: the requantization multiply and the bias addition."""
    c = call.conventions
    extra: dict[tuple[str, str], Any] = {}
    if c.include_requant:
        extra[("mul", c.requant_format)] = outputs
    if c.include_bias and integer_bias:
        extra[("add", "int32")] = outputs
    return extra


def _layer(call: OpCall, macs: Any, fmt: str, weights: Any, c_out: Any, kind: str) -> OpCost:
    outputs = call.out.numel
    storage = weights * format_bits(fmt, call.conventions.ternary_packing) + c_out * _PER_CHANNEL_BITS
    return OpCost(macs=macs, format=fmt, ops=_extras(call, outputs, True), params=weights + 3 * c_out,
                  storage_bits=storage, kind=kind)


@register_cost(ops.ternary_conv2d, kind="pointwise_conv")
def _ternary_conv2d(call: OpCall) -> OpCost:
    """[n, c_in, h, w] * ternary [c_out, c_in] -> [n, c_out, h', w']: n·c_out·c_in·h'·w' MACs, additions only.
    Ignores: the zero-point correction (a per-channel constant in the bias)."""
    x, out = call.args[0], call.out
    c_in, c_out = x.shape[1], out.shape[1]
    cost = _layer(call, out.numel * c_in, "ternary", c_out * c_in, c_out, "pointwise_conv")
    packed = call.value(2)  # the codes themselves, for skip_zero_weights (not the bytes they are packed in)
    return cost if packed is None else replace(cost, zero_fraction=_zeros(unpack_ternary(packed, int(c_in))))


def _zeros(codes: torch.Tensor) -> float:
    """The fraction of zero weight codes (the additions ``skip_zero_weights`` leaves out)."""
    return float((codes == 0).float().mean()) if codes.numel() else 0.0


def _conv_kind(call: OpCall, w: Any) -> str:
    """The kind of an integer conv, by the rule the views use (``fxslim.ir.conv_kind``)."""
    return conv_kind(tuple(w.shape[2:]), call.arguments["groups"], call.args[0].shape[1], transposed=False)


@register_cost(ops.int8_conv2d, kind="conv")
def _int8_conv2d(call: OpCall) -> OpCost:
    """[n, c_in, h, w] * [c_out, c_in/g, kh, kw] -> [n, c_out, h', w']: n·c_out·(c_in/g)·kh·kw·h'·w' int8 MACs.
    Ignores: padding (counted as MACs, as for float convs), the zero-point correction."""
    w, out = call.args[2], call.out
    c_out, per_out = w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
    kind = _conv_kind(call, w)
    return _layer(call, out.numel * per_out, "int8", c_out * per_out, c_out, kind)


@register_cost(ops.int8_linear, kind="linear")
def _int8_linear(call: OpCall) -> OpCost:
    """[..., in] @ int8 [out, in]^T -> [..., out]: rows·in·out int8 MACs.
    Ignores: the zero-point correction."""
    w, out = call.args[2], call.out
    return _layer(call, out.numel * w.shape[1], "int8", w.shape[0] * w.shape[1], w.shape[0], "linear")


@register_cost(ops.requantize, kind="elementwise")
def _requantize(call: OpCall) -> OpCost:
    """int32 [n, c, ...] -> uint8 [n, c, ...]: one rescale per element (priced with include_requant).
    Ignores: the shift, rounding offset and clamp."""
    n = call.out.numel
    return OpCost(elementwise=n, format="int8", ops=_extras(call, n, False))


@register_cost(ops.int8_add, kind="elementwise")
def _int8_add(call: OpCall) -> OpCost:
    """uint8 a + uint8 b -> uint8 (same shape): one addition per element; with include_requant also
    the two input rescales. Ignores: zero-point subtraction, shift and clamp."""
    n = call.out.numel
    extra = {("mul", call.conventions.requant_format): 2 * n} if call.conventions.include_requant else {}
    return OpCost(elementwise=n, format="int8", ops=extra)


@register_cost(ops.int8_global_avg_pool2d, kind="pool")
def _int8_global_avg_pool2d(call: OpCall) -> OpCost:
    """uint8 [n, c, h, w] -> [n, c, 1, 1]: n·c·h·w additions; one rescale per output with include_requant.
    Ignores: the zero-point correction (one constant per output)."""
    extra = _extras(call, call.out.numel, False)
    return OpCost(elementwise=call.args[0].numel, format="int8", ops=extra)


@register_cost(ops.quantize_per_tensor, ops.dequantize, kind="elementwise")
def _boundary(call: OpCall) -> OpCost:
    """float <-> uint8 codes at the model's input and output: one scale per element.
    Ignores: rounding and clamping."""
    return OpCost(elementwise=call.out.numel, format="fp32")


@register_cost(ops.lut, kind="elementwise")
def _lut(call: OpCall) -> OpCost:
    """uint8 [...] -> uint8 [...] through a 256-entry table: one int8 operation (a table read) per element.
    Ignores: nothing (the table's 256 bytes are counted as stored parameters)."""
    return OpCost(elementwise=call.out.numel, format="int8")


@register_cost(ops.max_pool2d_codes, kind="pool")
def _max_pool2d_codes(call: OpCall) -> OpCost:
    """uint8 [n, c, h, w] -> [n, c, h', w']: kh·kw − 1 int8 comparisons per output element (as aten max pooling).
    Ignores: padding (windows counted whole)."""
    kernel = call.arguments["kernel_size"]
    return OpCost(elementwise=call.out.numel * (kernel[0] * kernel[1] - 1), format="int8")


@register_cost(ops.mark_nan_samples, kind="elementwise")
def _mark_nan_samples(call: OpCall) -> OpCost:
    """float [n, ...] -> float [n, ...]: a copy with flagged samples set to NaN, no arithmetic.
    Ignores: the copy (data movement)."""
    return OpCost(format="fp32")


@register_cost(ops.nan_samples, kind="elementwise")
def _nan_samples(call: OpCall) -> OpCost:
    """float [n, ...] -> bool [n]: one fp32 comparison (a max) per input element.
    Ignores: the NaN test of the n maxima."""
    return OpCost(elementwise=call.args[0].numel, format="fp32")


# ----------------------------------------------------------------------------------------------
# The oneDNN runtime (``fxslim.runtime.prom_onednn``): the same arithmetic; weights in int8
# containers (ternary codes too) with a float32 scale and bias per output channel.

_ONEDNN_PER_CHANNEL_BITS = 2 * 32  # float32 weight scale and bias


def _onednn_conv(call: OpCall) -> OpCost:
    w, out = call.args[3], call.out
    c_out, per_out = w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
    kind = _conv_kind(call, w)
    codes = call.value(3)
    ternary = kind == "pointwise_conv" and codes is not None and bool(((codes >= -1) & (codes <= 1)).all())
    weights = c_out * per_out
    return OpCost(macs=out.numel * per_out, format="ternary" if ternary else "int8", ops=_extras(call, out.numel, False),
                  params=weights + 2 * c_out, storage_bits=weights * 8 + c_out * _ONEDNN_PER_CHANNEL_BITS, kind=kind,
                  zero_fraction=_zeros(codes) if ternary else None)


@register_cost(ops.qconv2d, kind="conv")
def _qconv2d(call: OpCall) -> OpCost:
    """[n, c_in, h, w] * int8 [c_out, c_in/g, kh, kw] -> [n, c_out, h', w']: n·c_out·(c_in/g)·kh·kw·h'·w' MACs,
    format "ternary" when the weight codes (if known) are all in {-1, 0, 1} on a 1×1 conv, else "int8".
    Ignores: padding (counted as MACs), the zero-point correction; the bias is a float add inside the kernel."""
    return _onednn_conv(call)


@register_cost(ops.qconv2d_add, kind="conv")
def _qconv2d_add(call: OpCall) -> OpCost:
    """``qconv2d`` plus the fused residual: one more addition per output element (and its rescale with
    include_requant). Ignores: what ``qconv2d`` ignores."""
    cost = _onednn_conv(call)
    extra = dict(cost.ops)
    n = call.out.numel
    extra[("add", "int32")] = extra.get(("add", "int32"), 0) + n
    if call.conventions.include_requant:
        extra[("mul", call.conventions.requant_format)] = extra.get(("mul", call.conventions.requant_format), 0) + n
    return replace(cost, ops=extra)


@register_cost(ops.qlinear, kind="linear")
def _qlinear(call: OpCall) -> OpCost:
    """[..., in] @ int8 [out, in]^T -> [..., out]: rows·in·out int8 MACs.
    Ignores: the zero-point correction; the bias is a float add inside the kernel."""
    w, out = call.args[3], call.out
    weights = w.shape[0] * w.shape[1]
    return OpCost(macs=out.numel * w.shape[1], format="int8", ops=_extras(call, out.numel, False), params=weights + 2 * w.shape[0],
                  storage_bits=weights * 8 + w.shape[0] * _ONEDNN_PER_CHANNEL_BITS, kind="linear")


@register_cost(ops.qadd, kind="elementwise")
def _qadd(call: OpCall) -> OpCost:
    """uint8 a + uint8 b -> uint8 (same shape): one addition per element, computed in float32; with
    include_requant also the two input rescales. Ignores: zero points, rounding and clamp."""
    n = call.out.numel
    extra = {("mul", call.conventions.requant_format): 2 * n} if call.conventions.include_requant else {}
    return OpCost(elementwise=n, format="int8", ops=extra)
