"""Fake quantization for PROM's quantization-aware training, and the per-layer conversion to the
integer ops of ``fxslim.runtime.prom_ops`` (docs/methods/PROM.md).

QAT pieces (a graph pass inserts them; nothing here edits graphs):

- ``ternary_codes`` / ``ternary_fake_quant``: per-output-channel ternary weights, TWN (default:
  Δ_c = 0.7·mean|W_c|, t = sign(W)·1[|W| > Δ_c], α_c = mean |W| over the kept entries) or absmean
  (γ_c = mean|W_c|, t = clip(round(W/γ_c), −1, 1), α_c = γ_c).
- ``int8_weight_codes`` / ``int8_weight_fake_quant``: symmetric per-channel int8, scale max|W_c|/127.
  Both weight fake quantizers recompute codes and scales at every forward and pass the gradient
  straight through to the latent float weights.
- ``ActFakeQuant``: per-tensor affine uint8 activations with an EMA min/max observer.
- ``QConv2d`` / ``QLinear``: the original float conv/linear, fake-quantized weights, and optionally
  the input's ActFakeQuant. BN stays a separate float module during QAT and is folded at conversion.

Activation grid (TFLite uint8 convention): codes 0..255, real = scale·(code − zero_point), the
observed range is widened to include 0 so that real 0 is a code (exact zero padding, ReLU bounds),
and the zero point is the integer round(−min/scale) clamped to [0, 255] ("nudged"), so the
represented range can shift by up to half a step. Rounding is half to even
(``torch.fake_quantize_per_tensor_affine``), with the gradient clipped outside the range.

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
import torch.nn.functional as F
from torch import Tensor, nn

from fxslim.runtime import prom_ops

__all__ = [
    "TERNARY_METHODS",
    "WEIGHT_QUANTS",
    "ACTIVATIONS",
    "ternary_codes",
    "ternary_fake_quant",
    "int8_weight_codes",
    "int8_weight_fake_quant",
    "ActFakeQuant",
    "freeze_observers",
    "unfreeze_observers",
    "QConv2d",
    "QLinear",
    "IntegerOp",
    "convert_input",
    "convert_output",
    "convert_conv",
    "convert_linear",
    "convert_add",
    "convert_global_avg_pool",
    "requant_shift",
]

TERNARY_METHODS = ("twn", "absmean")
WEIGHT_QUANTS = ("ternary", "int8")
ACTIVATIONS = ("none", "relu", "relu6")
_TWN_THRESHOLD = 0.7
_QMIN, _QMAX = 0, 255
_SCALE_EPS = torch.finfo(torch.float32).eps
_MAX_OFFSET_SHIFT = 30


# ----------------------------------------------------------------------------------------------
# Weight quantizers


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized weight, send the gradient unchanged to the latent weight."""

    @staticmethod
    def forward(ctx: Any, latent: Tensor, quantized: Tensor) -> Tensor:
        return quantized.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _check_method(method: str) -> None:
    if method not in TERNARY_METHODS:
        raise ValueError(f"method: expected one of {TERNARY_METHODS}, got {method!r}")


@torch.no_grad()
def ternary_codes(weight: Tensor, method: str = "twn") -> tuple[Tensor, Tensor]:
    """Ternary codes (int8, shape of ``weight``, in {−1, 0, 1}) and α (float32 [C_out]).

    Rows are output channels (dim 0). A channel with no kept entry gets α = 0.
    """
    _check_method(method)
    w = weight.detach().flatten(1).to(torch.float32)
    absw = w.abs()
    if method == "twn":
        keep = absw > _TWN_THRESHOLD * absw.mean(1, keepdim=True)
        codes = torch.sign(w) * keep
        alpha = (absw * keep).sum(1) / keep.sum(1).clamp_min(1)
    else:
        gamma = absw.mean(1)
        codes = torch.clamp(torch.round(w / gamma.clamp_min(torch.finfo(torch.float32).tiny)[:, None]), -1, 1)
        alpha = gamma
    return codes.to(torch.int8).view(weight.shape), alpha


def ternary_fake_quant(weight: Tensor, method: str = "twn") -> Tensor:
    """α_c·t with a straight-through gradient to ``weight`` (t and α recomputed from it each call)."""
    codes, alpha = ternary_codes(weight, method)
    quantized = codes.to(weight.dtype) * alpha.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return _StraightThrough.apply(weight, quantized)


@torch.no_grad()
def int8_weight_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 codes in [−127, 127] and scales (float32 [C_out]).

    scale_c = max|W_c| / 127 (1 for an all-zero channel, whose codes are all 0).
    """
    w = weight.detach().flatten(1).to(torch.float32)
    scale = w.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    return codes.to(torch.int8).view(weight.shape), scale


def int8_weight_fake_quant(weight: Tensor) -> Tensor:
    """scale_c·codes with a straight-through gradient to ``weight``."""
    codes, scale = int8_weight_codes(weight)
    quantized = codes.to(weight.dtype) * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return _StraightThrough.apply(weight, quantized)


# ----------------------------------------------------------------------------------------------
# Activation fake quantizer


class ActFakeQuant(nn.Module):
    """Per-tensor affine uint8 fake quantization with an EMA min/max observer.

    The observer updates in training mode while enabled, and on the first batch the module ever
    sees (whatever the mode), which sets min/max directly so the EMA is defined from the start:
    ``min ← momentum·min + (1 − momentum)·batch_min`` afterwards (likewise max). Scale and zero
    point are recomputed after each update (module docstring). An observer that sees NaN or inf
    raises ValueError; otherwise NaN passes through unchanged (as in the float model) and inf is
    clamped to the grid. All state lives in buffers
    (``min_val``, ``max_val``, ``scale``, ``zero_point``, ``initialized``, ``observer_enabled``), so
    it is saved in the state dict and, under DistributedDataParallel, broadcast from rank 0 with
    the other buffers at every forward (each rank observes its own batch in between).
    """

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ActFakeQuant.momentum: expected a float in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("min_val", torch.zeros((), dtype=torch.float32))
        self.register_buffer("max_val", torch.zeros((), dtype=torch.float32))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:  # an empty batch has no range to observe
            return x.clone()
        initialized = bool(self.initialized)
        if bool(self.observer_enabled) and (self.training or not initialized):
            self._observe(x)
        elif not initialized:
            raise RuntimeError("ActFakeQuant: the observer is frozen before it saw any batch; unfreeze it and run data through")
        out = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, _QMIN, _QMAX)
        return torch.where(torch.isnan(x), x, out)  # NaN stays NaN (the grid has no code for it)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        low, high = torch.aminmax(x.detach().to(torch.float32))
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError(f"ActFakeQuant: expected finite activations to observe, got a batch with range "
                             f"[{float(low)}, {float(high)}] (NaN or inf in the input or an earlier layer)")
        if bool(self.initialized):
            self.min_val.mul_(self.momentum).add_((1.0 - self.momentum) * low)
            self.max_val.mul_(self.momentum).add_((1.0 - self.momentum) * high)
        else:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
            self.initialized.fill_(1)
        low = torch.clamp(self.min_val, max=0.0)
        high = torch.clamp(self.max_val, min=0.0)
        scale = torch.clamp((high - low) / (_QMAX - _QMIN), min=_SCALE_EPS)
        self.scale.copy_(scale)
        self.zero_point.copy_(torch.clamp(torch.round(_QMIN - low / scale), _QMIN, _QMAX).to(torch.int32))

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) as Python numbers (scale is the float32 value the model uses)."""
        if not bool(self.initialized):
            raise RuntimeError("ActFakeQuant.qparams: no range observed yet")
        return float(self.scale), int(self.zero_point)

    def freeze(self) -> None:
        """Stop updating min/max (the grid stays fixed)."""
        self.observer_enabled.fill_(0)

    def unfreeze(self) -> None:
        self.observer_enabled.fill_(1)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def freeze_observers(model: nn.Module) -> None:
    """Freeze every ActFakeQuant in ``model`` (e.g. for the last part of QAT)."""
    for module in model.modules():
        if isinstance(module, ActFakeQuant):
            module.freeze()


def unfreeze_observers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ActFakeQuant):
            module.unfreeze()


# ----------------------------------------------------------------------------------------------
# Layer wrappers


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    spans = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if any(s % 2 for s in spans):
        raise ValueError(f"conv.padding: 'same' with an even effective kernel pads asymmetrically, got kernel {conv.kernel_size}")
    return (spans[0] // 2, spans[1] // 2)


class QConv2d(nn.Module):
    """A float ``nn.Conv2d`` whose weights are fake-quantized (``"ternary"`` or ``"int8"``).

    ``input_quant`` fake-quantizes the input first; leave it None when the input is already the
    output of an ActFakeQuant (one quantizer per tensor, shared by all its consumers). Ternary
    needs a 1×1, groups-1, unpadded conv, like ``fxslim::ternary_conv2d``.
    """

    def __init__(
        self, conv: nn.Conv2d, weight_quant: str = "int8", *, ternary_method: str = "twn",
        input_quant: ActFakeQuant | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QConv2d.conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"QConv2d.weight_quant: expected one of {WEIGHT_QUANTS}, got {weight_quant!r}")
        _check_method(ternary_method)
        if conv.padding_mode != "zeros":
            raise ValueError(f"QConv2d.conv: expected padding_mode 'zeros', got {conv.padding_mode!r}")
        padding = _conv_padding(conv)
        if weight_quant == "ternary" and (conv.kernel_size != (1, 1) or conv.groups != 1 or padding != (0, 0)):
            raise ValueError(
                "QConv2d.weight_quant: 'ternary' needs a 1x1, groups=1, unpadded conv, got kernel "
                f"{conv.kernel_size}, groups {conv.groups}, padding {padding}"
            )
        self.conv = conv
        self.weight_quant = weight_quant
        self.ternary_method = ternary_method
        self.input_quant = input_quant

    def quantized_weight(self) -> Tensor:
        if self.weight_quant == "ternary":
            return ternary_fake_quant(self.conv.weight, self.ternary_method)
        return int8_weight_fake_quant(self.conv.weight)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """(int8 codes [C_out, C_in/groups, kh, kw], per-channel real scale α_c or s_c)."""
        if self.weight_quant == "ternary":
            return ternary_codes(self.conv.weight, self.ternary_method)
        return int8_weight_codes(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.conv._conv_forward(x, self.quantized_weight(), self.conv.bias)

    def extra_repr(self) -> str:
        method = f", ternary_method={self.ternary_method!r}" if self.weight_quant == "ternary" else ""
        return f"weight_quant={self.weight_quant!r}{method}"


class QLinear(nn.Module):
    """A float ``nn.Linear`` with int8 per-channel fake-quantized weights (input_quant as in QConv2d)."""

    def __init__(self, linear: nn.Linear, *, input_quant: ActFakeQuant | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.linear: expected an nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.input_quant = input_quant

    def quantized_weight(self) -> Tensor:
        return int8_weight_fake_quant(self.linear.weight)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        return int8_weight_codes(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight(), self.linear.bias)


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
        return prom_ops.CONV_SHIFT
    reach = 512.0 / real[live]
    if acc_bound is not None:
        reach = torch.minimum(reach, acc_bound.to(torch.float64).flatten()[live])
    largest = float(real.max())
    for shift, max_real in ((prom_ops.CONV_SHIFT, 1.0), (prom_ops.CONV_SHIFT - 1, 200.0)):
        if largest <= max_real and float(reach.max()) * 2.0 ** -(shift + 1) <= 1 / 16:
            return shift
    shift = min(_MAX_OFFSET_SHIFT, math.floor(math.log2(((1 << 31) - 1) / largest)))
    while shift > 0 and round(largest * 2.0**shift) > (1 << 31) - 1:
        shift -= 1
    return max(0, shift)


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


def convert_conv(
    qconv: QConv2d, out_quant: ActFakeQuant, *, bn: nn.BatchNorm2d | None = None, activation: str = "none",
    x_quant: ActFakeQuant | None = None, shift: int | None = None,
) -> IntegerOp:
    """``out_quant(activation(bn(qconv(x))))`` as ``fxslim::ternary_conv2d`` or ``fxslim::int8_conv2d``.

    ``x_quant`` is the grid of the input (default: ``qconv.input_quant``); BN uses its running
    statistics; ``shift`` defaults to ``requant_shift`` of the multipliers.
    """
    s_x, z_x = _input_quant(qconv, x_quant).qparams()
    s_y, z_y = out_quant.qparams()
    codes, w_scale = qconv.weight_codes()
    codes, bias, fraction, real = _fold(codes, w_scale, qconv.conv.bias, bn, s_x, s_y)
    shift = requant_shift(real, _acc_bound(codes, bias)) if shift is None else shift
    multiplier = prom_ops.requant_multiplier(real, shift)
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    scalars = {"x_zero_point": z_x, "shift": shift, "out_zero_point": z_y, "out_min": lo, "out_max": hi,
               "stride": list(qconv.conv.stride)}
    tensors = {"bias": bias, "multiplier": multiplier, "offset": _rounding_offset(fraction, multiplier, shift)}
    if qconv.weight_quant == "ternary":
        tensors["weight_packed"] = prom_ops.pack_ternary(codes)
        return IntegerOp(torch.ops.fxslim.ternary_conv2d.default, ("x",), tensors, scalars)
    tensors["weight"] = codes.contiguous()
    scalars.update(padding=list(_conv_padding(qconv.conv)), dilation=list(qconv.conv.dilation), groups=qconv.conv.groups)
    return IntegerOp(torch.ops.fxslim.int8_conv2d.default, ("x",), tensors, scalars)


def convert_linear(
    qlinear: QLinear, out_quant: ActFakeQuant, *, activation: str = "none", x_quant: ActFakeQuant | None = None,
    shift: int | None = None,
) -> IntegerOp:
    """``out_quant(activation(qlinear(x)))`` as ``fxslim::int8_linear``."""
    s_x, z_x = _input_quant(qlinear, x_quant).qparams()
    s_y, z_y = out_quant.qparams()
    codes, w_scale = qlinear.weight_codes()
    codes, bias, fraction, real = _fold(codes, w_scale, qlinear.linear.bias, None, s_x, s_y)
    shift = requant_shift(real, _acc_bound(codes, bias)) if shift is None else shift
    multiplier = prom_ops.requant_multiplier(real, shift)
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    tensors = {"weight": codes.contiguous(), "bias": bias, "multiplier": multiplier,
               "offset": _rounding_offset(fraction, multiplier, shift)}
    scalars = {"x_zero_point": z_x, "shift": shift, "out_zero_point": z_y, "out_min": lo, "out_max": hi}
    return IntegerOp(torch.ops.fxslim.int8_linear.default, ("x",), tensors, scalars)


def convert_add(
    a_quant: ActFakeQuant, b_quant: ActFakeQuant, out_quant: ActFakeQuant, *, activation: str = "none",
    shift: int = prom_ops.ADD_SHIFT,
) -> IntegerOp:
    """``out_quant(activation(a + b))`` for inputs on the grids of ``a_quant``/``b_quant``."""
    s_a, z_a = a_quant.qparams()
    s_b, z_b = b_quant.qparams()
    s_y, z_y = out_quant.qparams()
    multipliers = prom_ops.requant_multiplier(torch.tensor([s_a / s_y, s_b / s_y], dtype=torch.float64), shift)
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    scalars = {"a_zero_point": z_a, "a_multiplier": int(multipliers[0]), "b_zero_point": z_b,
               "b_multiplier": int(multipliers[1]), "shift": shift, "out_zero_point": z_y, "out_min": lo, "out_max": hi}
    return IntegerOp(torch.ops.fxslim.int8_add.default, ("a", "b"), scalars=scalars)


def convert_global_avg_pool(x_quant: ActFakeQuant, out_quant: ActFakeQuant) -> IntegerOp:
    """``out_quant(mean over H, W)``: the multiplier is s_x/s_out; the op divides by the run-time H·W."""
    s_x, z_x = x_quant.qparams()
    s_y, z_y = out_quant.qparams()
    real = s_x / s_y
    shift = min(_MAX_OFFSET_SHIFT, math.floor(math.log2(((1 << 31) - 1) / real)))  # the most bits an int32 M holds
    scalars = {"x_zero_point": z_x, "multiplier": int(prom_ops.requant_multiplier(real, shift)), "shift": shift,
               "out_zero_point": z_y, "out_min": _QMIN, "out_max": _QMAX}
    return IntegerOp(torch.ops.fxslim.int8_global_avg_pool2d.default, ("x",), scalars=scalars)
