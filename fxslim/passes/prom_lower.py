"""Per-layer lowering of PROM's fake-quant layers (``fxslim.runtime.prom_qat``) to the fixed-point
integer ops of ``fxslim.runtime.prom`` (docs/methods/PROM.md); ``fxslim.passes.prom_convert`` calls
it node by node.

Conversion (``convert_*``) returns ``IntegerOp``: the op overload plus its tensor and scalar
arguments. Per conv/linear: BN folded into a per-channel real scale S_c = s_x·w_c·γ_c/σ_c and bias
B_c = γ_c(b_c − μ_c)/σ_c + β_c; channels with S_c < 0 get their codes negated (so multipliers are
non-negative); int32 bias k_c = round(B_c/S_c) and the rest f_c = B_c/S_c − k_c carried in the
rounding offset 2^(s−1) + round(f_c·M_c); multiplier M_c = round(S_c/s_y·2^s); ReLU/ReLU6 as
clamp bounds on the output codes. The converted op then matches the fake-quant layer within 1 LSB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fxslim.runtime import prom
from fxslim.runtime.prom_qat import ACTIVATIONS, _QMAX, _QMIN, ActFakeQuant, QConv2d, QLinear, _conv_padding

__all__ = [
    "IntegerOp",
    "convert_input",
    "convert_output",
    "convert_conv",
    "convert_linear",
    "ScaleOutOfRange",
    "convert_add",
    "convert_global_avg_pool",
    "requant_shift",
]

_MAX_OFFSET_SHIFT = 30  # the most fraction bits a rounding offset may carry


# ----------------------------------------------------------------------------------------------
# Conversion to the integer ops


@dataclass(frozen=True)
class IntegerOp:
    """One call of an integer op: ``op(**dict(zip(inputs, tensors_in)), **tensors, **scalars)``.

    ``tensors`` become buffers of the converted module (weights, bias, multipliers); ``scalars``
    (ints, int lists, floats) are baked into the graph as op arguments.
    """

    op: torch._ops.OpOverload
    inputs: tuple[str, ...]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Tensor) -> Tensor:
        if len(args) != len(self.inputs):
            raise TypeError(f"{self.op}: expected {len(self.inputs)} inputs {self.inputs}, got {len(args)}")
        return self.op(**dict(zip(self.inputs, args)), **self.tensors, **self.scalars)


def requant_shift(real: Tensor, acc_bound: Tensor | None = None) -> int:
    """The right shift for per-channel real multipliers ``real`` (float [C]).

    Rounding M to ``round(real·2^s)`` moves an output by at most ``|acc|·2^−(s+1)`` steps, where
    |acc| that can still reach an unsaturated output is below ``min(512/real, acc_bound)``
    (``acc_bound``: a bound on |acc| per channel, e.g. 255·Σ|w_c| + |bias_c|). The int32 kernel
    takes shift 23 for reals ≤ 1 and shift 22 for reals up to 200 (one extra clamp); either is
    returned when that error stays under 1/16 step, otherwise the largest shift whose multipliers
    fit an int32 (int64 kernel), at most 30 so that the int32 rounding offsets
    2^(shift−1) + round(f·M) (|f| ≤ 1/2, M < 2^31) cannot overflow.
    """
    real = real.to(torch.float64).flatten()
    live = real > 0
    if not bool(live.any()):
        return prom.CONV_SHIFT
    reach = 512.0 / real[live]
    if acc_bound is not None:
        reach = torch.minimum(reach, acc_bound.to(torch.float64).flatten()[live])
    largest = float(real.max())
    for shift, max_real in ((prom.CONV_SHIFT, 1.0), (prom.CONV_SHIFT - 1, 200.0)):
        if largest <= max_real and float(reach.max()) * 2.0 ** -(shift + 1) <= 1 / 16:
            return shift
    return min(_MAX_OFFSET_SHIFT, _int32_shift(largest, "a conv or linear"))


class ScaleOutOfRange(ValueError):
    """A grid ratio the reference runtime's int32 multipliers cannot hold (``convert`` adds where)."""


def _int32_shift(real: float, layer: str) -> int:
    """The largest right shift at which ``round(real · 2^shift)`` fits an int32. A ValueError that
    names the fix when none does (an input grid 2^31 times coarser than the output's)."""
    if real <= 0:
        return _MAX_OFFSET_SHIFT
    shift = math.floor(math.log2(((1 << 31) - 1) / real))
    while shift >= 0 and round(real * 2.0**shift) > (1 << 31) - 1:
        shift -= 1
    if shift < 0:
        raise ScaleOutOfRange(
            f"convert: {layer} has an input grid {real:.3g} times coarser than its output's, more than the "
            "reference runtime's int32 multipliers hold (a calibration that saw inputs far larger than the "
            "outputs); use runtime='onednn', whose scales are floats, or calibrate on representative inputs")
    return shift


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def _clamp_bounds(activation: str, scale: float, zero_point: int) -> tuple[int, int]:
    """Output code range of quant(act(y)): quant is monotone, so act's bounds map to codes."""
    _check_activation(activation)
    if activation == "none":
        return _QMIN, _QMAX
    if activation == "relu":
        return zero_point, _QMAX
    inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    six = int(torch.round(torch.tensor(6.0, dtype=torch.float32) * inverse))
    return zero_point, min(_QMAX, zero_point + six)


def _input_quant(module: QConv2d | QLinear, x_quant: ActFakeQuant | None) -> ActFakeQuant:
    quant = x_quant if x_quant is not None else module.input_quant
    if quant is None:
        raise ValueError("x_quant: the layer has no input_quant, pass the ActFakeQuant of its input")
    return quant


def fold_bn(scale: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    """A BatchNorm folded into the per-channel weight ``scale`` and the conv's ``bias``:
    (scale · gain, gain · (bias − mean) + beta), float64 [C]; unchanged without ``bn``."""
    real_bias = torch.zeros_like(scale) if bias is None else bias.detach().to(torch.float64)
    if bn is None:
        return scale, real_bias
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: expected a BatchNorm with running statistics (track_running_stats=True)")
    gain = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
    if bn.weight is not None:
        gain = gain * bn.weight.detach().to(torch.float64)
    real_bias = gain * (real_bias - bn.running_mean.to(torch.float64))
    if bn.bias is not None:
        real_bias = real_bias + bn.bias.detach().to(torch.float64)
    return scale * gain, real_bias


def _fold(
    codes: Tensor, w_scale: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d | None, s_x: float, s_y: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BN folding and sign handling: codes, int32 bias (accumulator steps), the rest of the bias
    in [−0.5, 0.5] steps (float64), real multiplier (float64 [C])."""
    scale, real_bias = fold_bn(s_x * w_scale.to(torch.float64), bias, bn)
    sign = torch.where(scale < 0, -1, 1).to(torch.int8)
    codes = codes * sign.view(-1, *([1] * (codes.dim() - 1)))
    scale = scale.abs()
    dead = scale == 0  # constant channel: zero codes, unit multiplier, bias in output steps
    codes = torch.where(dead.view(-1, *([1] * (codes.dim() - 1))), torch.zeros_like(codes), codes)
    scale = torch.where(dead, torch.full_like(scale, s_y), scale)
    steps = real_bias / scale
    int_bias = torch.round(steps).clamp(-(1 << 31), (1 << 31) - 1)
    fraction = (steps - int_bias).clamp(-0.5, 0.5)
    return codes, int_bias.to(torch.int32), fraction, scale / s_y


def _rounding_offset(fraction: Tensor, multiplier: Tensor, shift: int) -> Tensor:
    """Rounding offsets 2^(shift−1) + round(fraction·M): the sub-step bias in output 2^−shift units."""
    base = (1 << (shift - 1)) if shift else 0
    return (base + torch.round(fraction * multiplier.to(torch.float64))).to(torch.int32)


def _acc_bound(codes: Tensor, bias: Tensor) -> Tensor:
    """Largest |acc| per channel: 255·Σ|w_c| + |bias_c|."""
    return 255 * codes.flatten(1).to(torch.int64).abs().sum(1) + bias.to(torch.int64).abs()


def convert_input(act: ActFakeQuant) -> IntegerOp:
    """Model input: float → uint8 codes on ``act``'s grid (``fxslim::quantize_per_tensor``)."""
    scale, zero_point = act.qparams()
    return IntegerOp(torch.ops.fxslim.quantize_per_tensor.default, ("x",), scalars={"scale": scale, "zero_point": zero_point})


def convert_output(act: ActFakeQuant) -> IntegerOp:
    """Model output: uint8 codes → float32 (``fxslim::dequantize``)."""
    scale, zero_point = act.qparams()
    return IntegerOp(torch.ops.fxslim.dequantize.default, ("q",), scalars={"scale": scale, "zero_point": zero_point})


def _requantized_layer(
    layer: QConv2d | QLinear, bias: Tensor | None, bn: nn.BatchNorm2d | None, out_quant: ActFakeQuant,
    activation: str, x_quant: ActFakeQuant | None, shift: int | None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """(weight codes, tensor args, scalar args) of a conv or linear requantized to ``out_quant``'s
    grid: BN folded, multipliers at ``shift`` (default ``requant_shift``), the activation as clamp bounds."""
    s_x, z_x = _input_quant(layer, x_quant).qparams()
    s_y, z_y = out_quant.qparams()
    codes, w_scale = layer.weight_codes()
    codes, int_bias, fraction, real = _fold(codes, w_scale, bias, bn, s_x, s_y)
    shift = requant_shift(real, _acc_bound(codes, int_bias)) if shift is None else shift
    multiplier = prom.requant_multiplier(real, shift)
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    tensors = {"bias": int_bias, "multiplier": multiplier, "offset": _rounding_offset(fraction, multiplier, shift)}
    return codes, tensors, {"x_zero_point": z_x, "shift": shift, "out_zero_point": z_y, "out_min": lo, "out_max": hi}


def convert_conv(
    qconv: QConv2d, out_quant: ActFakeQuant, *, bn: nn.BatchNorm2d | None = None, activation: str = "none",
    x_quant: ActFakeQuant | None = None, shift: int | None = None,
) -> IntegerOp:
    """``out_quant(activation(bn(qconv(x))))`` as ``fxslim::ternary_conv2d`` or ``fxslim::int8_conv2d``.

    ``x_quant`` is the grid of the input (default: ``qconv.input_quant``); BN uses its running
    statistics; ``shift`` defaults to ``requant_shift`` of the multipliers.
    """
    codes, tensors, scalars = _requantized_layer(qconv, qconv.conv.bias, bn, out_quant, activation, x_quant, shift)
    scalars["stride"] = list(qconv.conv.stride)
    if qconv.weight_quant == "ternary":
        tensors["weight_packed"] = prom.pack_ternary(codes)
        return IntegerOp(torch.ops.fxslim.ternary_conv2d.default, ("x",), tensors, scalars)
    tensors["weight"] = codes.contiguous()
    scalars.update(padding=list(_conv_padding(qconv.conv)), dilation=list(qconv.conv.dilation), groups=qconv.conv.groups)
    return IntegerOp(torch.ops.fxslim.int8_conv2d.default, ("x",), tensors, scalars)


def convert_linear(
    qlinear: QLinear, out_quant: ActFakeQuant, *, activation: str = "none", x_quant: ActFakeQuant | None = None,
    shift: int | None = None,
) -> IntegerOp:
    """``out_quant(activation(qlinear(x)))`` as ``fxslim::int8_linear``."""
    codes, tensors, scalars = _requantized_layer(qlinear, qlinear.linear.bias, None, out_quant, activation, x_quant,
                                                 shift)
    tensors["weight"] = codes.contiguous()
    return IntegerOp(torch.ops.fxslim.int8_linear.default, ("x",), tensors, scalars)


def convert_add(
    a_quant: ActFakeQuant, b_quant: ActFakeQuant, out_quant: ActFakeQuant, *, activation: str = "none",
) -> IntegerOp:
    """``out_quant(activation(a + b))`` for inputs on the grids of ``a_quant``/``b_quant``.

    The shift is ``prom.ADD_SHIFT``, or less where an input's grid is over 2^(31 − ADD_SHIFT) times
    coarser than the output's (``y + y * -0.9999``): its multiplier would not fit an int32."""
    s_a, z_a = a_quant.qparams()
    s_b, z_b = b_quant.qparams()
    s_y, z_y = out_quant.qparams()
    reals = torch.tensor([s_a / s_y, s_b / s_y], dtype=torch.float64)
    shift = min(prom.ADD_SHIFT, _int32_shift(float(reals.max()), "a residual add"))
    multipliers = prom.requant_multiplier(reals, shift)
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    scalars = {"a_zero_point": z_a, "a_multiplier": int(multipliers[0]), "b_zero_point": z_b,
               "b_multiplier": int(multipliers[1]), "shift": shift, "out_zero_point": z_y, "out_min": lo, "out_max": hi}
    return IntegerOp(torch.ops.fxslim.int8_add.default, ("a", "b"), scalars=scalars)


def convert_global_avg_pool(x_quant: ActFakeQuant, out_quant: ActFakeQuant) -> IntegerOp:
    """``out_quant(mean over H, W)``: the multiplier is s_x/s_out; the op divides by the run-time H·W."""
    s_x, z_x = x_quant.qparams()
    s_y, z_y = out_quant.qparams()
    real = s_x / s_y
    shift = min(_MAX_OFFSET_SHIFT, _int32_shift(real, "a global average pool"))  # the most bits an int32 M holds
    scalars = {"x_zero_point": z_x, "multiplier": int(prom.requant_multiplier(real, shift)), "shift": shift,
               "out_zero_point": z_y, "out_min": _QMIN, "out_max": _QMAX}
    return IntegerOp(torch.ops.fxslim.int8_global_avg_pool2d.default, ("x",), scalars=scalars)
