"""Integer runtime of PROM (docs/methods/PROM.md): the ops a converted model is made of.

Numbers and layouts (TFLite uint8 convention):

- An activation is a uint8 code tensor ``q`` with a per-tensor scale ``s`` and zero point
  ``z ∈ [0, 255]``: real value ``s·(q − z)``. Real 0 is the code ``z``, so zero padding is exact.
- Weights are per-output-channel codes: ternary ``t ∈ {−1, 0, 1}`` packed four to a byte
  (``pack_ternary``), or int8 codes in ``[−127, 127]``.
- Accumulator, per output channel c: ``acc = Σ w·(q − z_x) + bias_c`` in int32. The zero-point term
  ``z_x·Σw`` is a per-channel constant: the kernels fold it into the bias once per call.
- Requantization (TFLite single rounding) to the next uint8 grid:
  ``out = clamp(((acc·M_c + r_c) >> shift) + z_out, out_min, out_max)`` with an int32 multiplier
  ``M_c ≥ 0`` per channel, one right ``shift`` per op and a rounding offset ``r_c`` that defaults
  to 2^(shift−1) (round half up). A converter may pass ``offset`` r_c = 2^(shift−1) + round(f_c·M_c)
  to keep the sub-step part f_c of a bias that the int32 ``bias`` (in accumulator steps) cannot
  hold. ReLU/ReLU6 are the clamp bounds. ``requant_multiplier`` turns a real multiplier into M_c.
- Conv outputs are channels_last uint8 tensors [N, C, H, W] (the layout every kernel here reads
  fastest); the other ops keep the layout of their input.

Every op has a loop/int64 oracle and a float model it must match within 1 LSB, both in
``fxslim.runtime.prom_reference``.

Fast kernels compute bit-identical integers with float arithmetic where that is provably exact:
an f32 sum of integers is exact while every partial sum stays below 2^24, and all partial sums of
``Σ w·(q − z) + bias`` are bounded by ``255·Σ|w_c| + |bias_c|`` (checked per call; otherwise an f64
kernel, exact below 2^53, is used). Pointwise ternary and depthwise int8 convs run on oneDNN's
u8·s8→s32 kernels: ternary pairs cannot saturate the int16 step of the non-VNNI AVX2 kernel
(2·255 < 2^15), and the depthwise kernel stays exact even at the extremes (codes 255 against
weights ±127, pinned by the tests). Dense int8 convs do saturate there with 8-bit weights, so they
use an fp32 conv on the centred codes. ``torch._int_mm`` is not used: on the
reference CPU (AVX2, no VNNI) it was several times slower than an fp32 matmul of the same shape
(benchmarks/results/prom_op_speed.md).
Requantization runs in int32 after clamping the accumulator to the range that can still change the
output (see ``_requant_tables``); multipliers that need more than int32 fall back to int64.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fxslim.runtime.autocast_kernels import exclude_autocast

__all__ = [
    "CONV_SHIFT",
    "ADD_SHIFT",
    "pack_ternary",
    "unpack_ternary",
    "requant_multiplier",
    "conv_output_size",
    "ternary_conv2d",
    "int8_conv2d",
    "int8_linear",
    "requantize",
    "int8_add",
    "int8_global_avg_pool2d",
    "quantize_per_tensor",
    "dequantize",
    "nan_samples",
]

_log = logging.getLogger(__name__)

# Default shifts: with 23 fractional bits the conv requantization runs in int32 (see
# _requant_tables); 20 keeps the residual add in int32 for multipliers up to about 2 (its
# rounding error stays below 255·2^−20 of a step per input, far from flipping outputs).
CONV_SHIFT = 23
ADD_SHIFT = 20
_F32_EXACT = 1 << 24
_INT32_MAX = (1 << 31) - 1
_MAX_SHIFT = 62  # |acc·M| < 2^62 for int32 operands, so the int64 path never overflows

# 2-bit ternary codes: bit 0 marks +1, bit 1 marks −1 (the two masks the add/sub kernel reads).
_PLUS, _MINUS = 0b01, 0b10


# ----------------------------------------------------------------------------------------------
# Ternary packing


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes [C_out, C_in] (or [C_out, C_in, 1, 1]) into uint8 [C_out, ceil(C_in/4)].

    Input i of a row sits in byte i // 4 at bits 2·(i % 4) and 2·(i % 4) + 1: 0b01 for +1, 0b10
    for −1, 0b00 for 0. Rows are padded with zero codes to a whole byte.
    """
    if not isinstance(codes, Tensor) or codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_ternary: codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() == 4 and codes.shape[2:] == (1, 1):
        codes = codes.flatten(1)
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary: codes must be [C_out, C_in] or [C_out, C_in, 1, 1], got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_ternary: codes must lie in {-1, 0, 1}, got values outside")
    bits = torch.where(codes > 0, _PLUS, torch.where(codes < 0, _MINUS, 0)).to(torch.uint8)
    bits = F.pad(bits, (0, (-bits.shape[1]) % 4)).view(bits.shape[0], -1, 4)
    return (bits[..., 0] | (bits[..., 1] << 2) | (bits[..., 2] << 4) | (bits[..., 3] << 6)).contiguous()


def unpack_ternary(packed: Tensor, in_channels: int) -> Tensor:
    """Inverse of ``pack_ternary``: int8 codes [C_out, in_channels] in {−1, 0, 1}."""
    _check_packed(packed, in_channels)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    fields = ((packed[..., None] >> shifts) & 3).flatten(1)[:, :in_channels]
    if (fields == 3).any():
        raise ValueError("unpack_ternary: packed holds the invalid 2-bit code 0b11")
    return ((fields == _PLUS).to(torch.int8) - (fields == _MINUS).to(torch.int8)).contiguous()


def _check_packed(packed: Tensor, in_channels: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"weight_packed: expected a uint8 tensor [C_out, ceil(C_in/4)], got {packed.dtype} {tuple(packed.shape)}"
        )
    if packed.shape[1] != (in_channels + 3) // 4:
        raise ValueError(
            f"weight_packed: expected {(in_channels + 3) // 4} bytes per row for {in_channels} input "
            f"channels, got {packed.shape[1]}"
        )


# ----------------------------------------------------------------------------------------------
# Fixed-point multipliers


def requant_multiplier(real: Tensor | float, shift: int = CONV_SHIFT) -> Tensor:
    """int32 multipliers ``round(real · 2^shift)`` for a given right ``shift``.

    The relative error is at most ``2^−(shift+1) / real``. With the default 23 a real multiplier
    in [2^−12, 1] keeps at least 11 significant bits and the requantization runs in int32; smaller
    multipliers want a larger shift (then the kernels use int64), larger ones a smaller shift.
    """
    if not 0 <= shift <= _MAX_SHIFT:
        raise ValueError(f"requant_multiplier: shift must be in [0, {_MAX_SHIFT}], got {shift}")
    real = torch.as_tensor(real, dtype=torch.float64)
    if not torch.isfinite(real).all() or (real < 0).any():
        raise ValueError("requant_multiplier: real multipliers must be finite and >= 0")
    fixed = torch.round(real * 2.0**shift)
    if (fixed > _INT32_MAX).any():
        raise ValueError(
            f"requant_multiplier: real multiplier {float(real.max()):.6g} does not fit an int32 with "
            f"shift {shift}; use a shift <= {shift - math.ceil(math.log2(float(fixed.max()) / _INT32_MAX))}"
        )
    return fixed.to(torch.int32)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Spatial output size of a conv along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# ----------------------------------------------------------------------------------------------
# Argument checks (metadata only, so fake kernels run them too)


def _check_uint8(name: str, t: Tensor) -> None:
    if t.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 activation codes, got {t.dtype}")


def _check_addends(a: Tensor, b: Tensor) -> None:
    """The two inputs of an integer add: uint8 codes of one shape."""
    _check_uint8("a", a)
    _check_uint8("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")


def _check_conv_geometry(x: Tensor, weight: Tensor, groups: int, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Groups, stride, padding and dilation of an integer conv of x [N, C_in, H, W] with weight
    [C_out, C_in/groups, kh, kw]: (output shape, stride, padding, dilation) as pairs.

    The dilation along a kernel side of 1 is returned as 1 (it changes nothing): oneDNN crashed the
    process on a 1×1 kernel with stride 2, padding 1 and dilation 2 (an 8×1 input)."""
    if groups >= 1 and weight.shape[0] % groups == 0 and weight.shape[1] * groups != x.shape[1]:
        # the conv is right, its input is not: a model called on an image of another channel count
        raise ValueError(f"x: expected {weight.shape[1] * groups} channels (weight.shape[1]={weight.shape[1]} · "
                         f"groups={groups}), got shape {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"groups: expected a divisor of C_in={x.shape[1]} and C_out={weight.shape[0]} with "
            f"weight.shape[1]·groups == C_in, got groups={groups}, weight.shape[1]={weight.shape[1]}"
        )
    stride = _check_pair("stride", stride, 1)
    padding = _check_pair("padding", padding, 0)
    dilation = _check_pair("dilation", dilation, 1)
    h, w = (conv_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2))
    if h < 1 or w < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel {tuple(weight.shape[2:])}")
    dilation = tuple(1 if weight.shape[2 + i] == 1 else dilation[i] for i in range(2))
    return (x.shape[0], weight.shape[0], h, w), stride, padding, dilation


def _check_code(name: str, value: int) -> None:
    if not 0 <= value <= 255:
        raise ValueError(f"{name}: expected an integer in [0, 255], got {value}")


def _check_requant_args(
    multiplier: Tensor, offset: Tensor | None, shift: int, out_zero_point: int, out_min: int, out_max: int, channels: int
) -> None:
    if multiplier.dtype != torch.int32 or multiplier.dim() != 1 or multiplier.shape[0] not in (1, channels):
        raise ValueError(
            f"multiplier: expected an int32 tensor of shape [{channels}] or [1], got {multiplier.dtype} {tuple(multiplier.shape)}"
        )
    if offset is not None and (offset.dtype != torch.int32 or offset.shape != multiplier.shape):
        raise ValueError(
            f"offset: expected None or an int32 tensor shaped like multiplier {tuple(multiplier.shape)}, "
            f"got {offset.dtype} {tuple(offset.shape)}"
        )
    _check_out_args(shift, out_zero_point, out_min, out_max)


def _check_out_args(shift: int, out_zero_point: int, out_min: int, out_max: int) -> None:
    if not 0 <= shift <= _MAX_SHIFT:
        raise ValueError(f"shift: expected an integer in [0, {_MAX_SHIFT}], got {shift}")
    _check_code("out_zero_point", out_zero_point)
    _check_code_range(out_min, out_max)


def _check_code_range(out_min: int, out_max: int) -> None:
    """``out_min``/``out_max``: the clamp bounds of an output, two codes in order."""
    _check_code("out_min", out_min)
    _check_code("out_max", out_max)
    if out_min > out_max:
        raise ValueError(f"out_min/out_max: expected out_min <= out_max, got {out_min} > {out_max}")


def _check_bias(bias: Tensor, channels: int) -> None:
    if bias.dtype != torch.int32 or tuple(bias.shape) != (channels,):
        raise ValueError(f"bias: expected an int32 tensor of shape [{channels}], got {bias.dtype} {tuple(bias.shape)}")


def _check_pair(name: str, value: Sequence[int], minimum: int) -> tuple[int, int]:
    if len(value) != 2 or any(v < minimum for v in value):
        raise ValueError(f"{name}: expected two integers >= {minimum}, got {list(value)}")
    return int(value[0]), int(value[1])


def _check_multiplier_values(multiplier: Tensor) -> None:
    def check() -> bool:
        if multiplier.numel() and int(multiplier.min()) < 0:
            raise ValueError("multiplier: expected values >= 0 (fold negative scales into the weight codes)")
        return True

    _CACHE.get(multiplier, "non_negative", check)


# ----------------------------------------------------------------------------------------------
# Derived weight forms, cached per weight tensor (keyed on identity and version counter)


class _WeightCache:
    """Derived forms of constant op arguments (weights, biases, multipliers): unpacked codes, float
    copies, oneDNN layouts, requantization tables, checks already done.

    Entries are keyed on the tensor object (``id`` checked through a weak reference, so a freed
    tensor's address reused by another never hits) and invalidated when its version changes
    (in-place updates). They are dropped when the tensor is freed.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, dict[Any, Any]]] = {}

    def get(self, tensor: Tensor, key: Any, build: Callable[[], Any], also: tuple[Tensor, ...] = ()) -> Any:
        """``build()`` cached on ``tensor`` under ``key``; ``also``: more tensors it depends on."""
        if torch.is_inference(tensor) or any(torch.is_inference(t) for t in also):
            return build()  # inference tensors have no version counter to validate against
        ident, version = id(tensor), tensor._version
        entry = self._entries.get(ident)
        if entry is None or entry[0]() is not tensor or entry[1] != version:
            ref = weakref.ref(tensor, lambda _ref, ident=ident: self._drop(ident, _ref))
            entry = (ref, version, {})
            self._entries[ident] = entry
        derived = entry[2]
        full_key = (key, tuple((id(t), t._version) for t in also))
        hit = derived.get(full_key)
        if hit is None or any(r() is not t for r, t in zip(hit[0], also)):
            hit = (tuple(weakref.ref(t) for t in also), build())
            derived[full_key] = hit
        return hit[1]

    def _drop(self, ident: int, ref: weakref.ref) -> None:
        entry = self._entries.get(ident)
        if entry is not None and entry[0] is ref:
            del self._entries[ident]


_CACHE = _WeightCache()


def _onednn_available(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.numel() > 0
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qconv_pointwise")
    )


def _ternary_codes(packed: Tensor, in_channels: int) -> Tensor:
    return _CACHE.get(packed, ("codes", in_channels), lambda: unpack_ternary(packed, in_channels)[:, :, None, None].contiguous())


def _int8_weight(weight: Tensor) -> Tensor:
    def build() -> Tensor:
        if weight.numel() and (int(weight.min()) < -127 or int(weight.max()) > 127):
            raise ValueError("weight: int8 codes must lie in [-127, 127] (symmetric), got -128")
        return weight

    return _CACHE.get(weight, "checked", build)


def _acc_bound(weight: Tensor, codes: Tensor, bias: Tensor) -> int:
    """An upper bound of every |partial sum| of Σ w·(q − z) + bias: 255·max_c Σ|w_c| + max|bias|."""
    # widened before abs(): int8 abs() leaves −128 at −128 (the oneDNN ops take that code)
    abs_sum = _CACHE.get(weight, ("abs_sum", codes.shape),
                         lambda: int(codes.flatten(1).to(torch.int64).abs().sum(1).max()) if codes.numel() else 0)
    bias_max = _CACHE.get(bias, "abs_max", lambda: int(bias.to(torch.int64).abs().max()) if bias.numel() else 0)
    return 255 * abs_sum + bias_max


def _as_float(weight: Tensor, codes: Tensor, dtype: torch.dtype) -> Tensor:
    return _CACHE.get(weight, ("float", dtype, codes.shape), lambda: codes.to(dtype))


def _f32_exact(x: Tensor, bound: int) -> bool:
    """Whether an f32 conv/matmul of centred codes is exact: partial sums below 2^24 (``bound``),
    on CPU with IEEE fp32 arithmetic (no TF32/bf16 "fast" modes, which round the operands)."""
    ieee = ("none", "ieee")
    return (
        bound < _F32_EXACT
        and x.device.type == "cpu"
        and torch.get_float32_matmul_precision() == "highest"
        and torch.backends.mkldnn.conv.fp32_precision in ieee
        and torch.backends.mkldnn.matmul.fp32_precision in ieee
    )


# ----------------------------------------------------------------------------------------------
# Accumulators (exact integers held in f32 or f64 tensors)


def _conv_acc(
    x: Tensor, x_zero_point: int, weight: Tensor, codes: Tensor, bias: Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int, onednn: bool,
) -> Tensor:
    """acc = conv(q − z_x, codes) + bias, exact; f32 [N, C_out, H', W'] when f32 is exact, else f64.

    An f32 conv is exact only as direct sums: with oneDNN's float convs switched off
    (``torch.backends.mkldnn.flags(enabled=False)``) ATen runs batches of 16 and more through NNPACK's
    Winograd convs (sums off by up to 8 at ±127 weights), so those take f64."""
    exact32 = _f32_exact(x, _acc_bound(weight, codes, bias))
    if not (exact32 and (torch.backends.mkldnn.enabled or onednn and _onednn_available(x))):
        _log.debug("an f32 conv would not be exact here (|acc| bound, device, fp32 mode or NNPACK): using f64")
        xc = x.to(torch.float64).sub_(x_zero_point)
        return F.conv2d(xc, _as_float(weight, codes, torch.float64), bias.to(torch.float64), stride, padding, dilation, groups)
    bias_f = _CACHE.get(bias, "f32", lambda: bias.to(torch.float32))
    if onednn and _onednn_available(x):
        c_out = codes.shape[0]
        key = ("onednn", x_zero_point, stride, padding, dilation, groups)
        packed, ones, zeros = _CACHE.get(weight, key, lambda: (
            torch.ops.onednn.qconv_prepack(codes, torch.ones(c_out), 1.0, x_zero_point, list(stride), list(padding),
                                           list(dilation), groups, None),
            torch.ones(c_out),
            torch.zeros(c_out, dtype=torch.int64),
        ))
        return torch.ops.onednn.qconv_pointwise(
            x.contiguous(memory_format=torch.channels_last), 1.0, x_zero_point, packed, ones, zeros, bias_f,
            list(stride), list(padding), list(dilation), groups, 1.0, 0, torch.float32, "none", [], "",
        )
    xc = x.to(torch.float32).sub_(x_zero_point)
    return F.conv2d(xc, _as_float(weight, codes, torch.float32), bias_f, stride, padding, dilation, groups)


def _linear_acc(x: Tensor, x_zero_point: int, weight: Tensor, codes: Tensor, bias: Tensor) -> Tensor:
    """acc = (q − z_x) · codesᵀ + bias for codes x [rows, in], exact; f32 [rows, out] when f32 is exact, else f64."""
    dtype = torch.float32 if _f32_exact(x, _acc_bound(weight, codes, bias)) else torch.float64
    return torch.addmm(bias.to(dtype), x.to(dtype).sub_(x_zero_point), _as_float(weight, codes, dtype).t())


# ----------------------------------------------------------------------------------------------
# Requantization


def _ceil_div(a: Tensor, b: Tensor) -> Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _requant_tables(
    multiplier: Tensor, offset: Tensor | None, shift: int, zp: int, lo: int, hi: int, limit: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool] | None:
    """Per-channel int64 (acc_min, acc_max, multiplier, offset) and a final-clamp flag for the
    int32 requantization, or None when int32 cannot hold it (then the int64 kernel runs).

    f(a) = floor((a·M + r) / 2^s) + z (r: the rounding offset) is non-decreasing in a. Clamping the
    accumulator to [acc_min, acc_max] leaves every output unchanged when f(acc_min) ≤ lo and
    f(acc_max) ≥ hi, and bounds t = a·M + (r + z·2^s) so that it fits an int32 (checked below,
    exactly, at both ends; intermediates a·M too). If every M ≤ 2^s, f steps by at most 1, so
    the smallest a with f(a) ≥ lo has f(a) = lo and the largest with f(a) ≤ hi has f(a) = hi:
    out = t >> s needs no further clamp (t ∈ [lo·2^s, (hi + 1)·2^s) ⊂ [0, 2^31) for s ≤ 23).
    Otherwise the bounds step one further out and the result is clamped to [lo, hi].
    ``limit`` bounds |acc| (2^24 for exact f32 accumulators); a channel whose whole
    [−limit, limit] maps to one code becomes a constant (M = 0, offset = code·2^s).
    """
    if not 0 <= shift <= 23:
        return None
    m = multiplier.to(torch.int64)
    one = 1 << shift
    r = torch.full_like(m, one >> 1) if offset is None else offset.to(torch.int64)
    unit_steps = not m.numel() or int(m.max()) <= one
    safe = torch.where(m > 0, m, torch.ones_like(m))
    acc_min = _ceil_div((lo - zp) * one - r, safe)  # smallest a with f(a) >= lo
    acc_max = _ceil_div((hi + 1 - zp) * one - r, safe) - 1  # largest a with f(a) <= hi
    if not unit_steps:
        acc_min, acc_max = acc_min - 1, acc_max + 1  # f(acc_min) < lo, f(acc_max) > hi
    offset = r + zp * one
    constant = (torch.div(r, one, rounding_mode="floor") + zp).clamp(lo, hi)  # value of a channel with M = 0
    constant = torch.where(acc_min > limit, lo, constant)
    constant = torch.where(acc_max < -limit, hi, constant)
    is_constant = (m == 0) | (acc_min > limit) | (acc_max < -limit)
    acc_min = torch.where(is_constant, 0, acc_min.clamp(-limit, limit))
    acc_max = torch.where(is_constant, 0, acc_max.clamp(-limit, limit))
    offset = torch.where(is_constant, constant * one, offset)
    m = torch.where(is_constant, 0, m)
    ends = torch.stack([acc_min * m, acc_max * m, acc_min * m + offset, acc_max * m + offset])
    if ends.numel() and (int(ends.min()) < -(1 << 31) or int(ends.max()) > _INT32_MAX):
        return None
    return acc_min, acc_max, m, offset, not unit_steps


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """[C] → [1, C, 1, ...] for broadcasting over an [N, C, ...] tensor."""
    return t.view(1, -1, *([1] * (ndim - 2))) if ndim >= 2 else t


def _broadcast_tables(multiplier: Tensor, offset: Tensor | None, shift: int, zp: int, lo: int, hi: int, limit: int, acc: Tensor):
    """``_requant_tables`` shaped [1, C, 1, ...] in the dtypes the kernel uses (bounds in acc's)."""
    tables = _requant_tables(multiplier, offset, shift, zp, lo, hi, limit)
    if tables is None:
        return None
    acc_min, acc_max, m, offset = (_channel_view(t, acc.dim()) for t in tables[:4])
    return acc_min.to(acc.dtype), acc_max.to(acc.dtype), m.to(torch.int32), offset.to(torch.int32), tables[4]


def _requantize_into(
    out: Tensor, acc: Tensor, multiplier: Tensor, offset: Tensor | None, shift: int, zp: int, lo: int, hi: int, *,
    owned: bool,
) -> Tensor:
    """Write the requantized codes of ``acc`` (exact integers: int32, or f32/f64) into ``out`` (uint8).

    ``owned``: ``acc`` is a temporary of the caller and may be overwritten. The int32 path then
    works in place in acc's memory (f32 → int32 conversion included), because allocating fresh
    pages costs more than the arithmetic on large activations.
    """
    if acc.dtype == torch.float32:
        limit = _F32_EXACT
    elif acc.dtype == torch.int32:
        limit = _INT32_MAX
    else:
        limit = None
    tables = None
    if limit is not None:
        key = ("requant", shift, zp, lo, hi, limit, acc.dim(), acc.dtype)
        tables = _CACHE.get(multiplier, key, lambda: _broadcast_tables(multiplier, offset, shift, zp, lo, hi, limit, acc),
                             also=() if offset is None else (offset,))
    if tables is not None:
        acc_min, acc_max, m, total_offset, final_clamp = tables
        a = acc.clamp_(acc_min, acc_max) if owned else torch.clamp(acc, acc_min, acc_max)
        t = a.view(torch.int32)
        if a.dtype == torch.float32:
            t.copy_(a)  # elementwise in place: each int32 overwrites the float it came from
        torch.addcmul(total_offset, t, m, out=t)
        t >>= shift
        if final_clamp:
            t.clamp_(lo, hi)
        return out.copy_(t)
    t = acc.to(torch.int64) * _channel_view(multiplier.to(torch.int64), acc.dim())
    if offset is not None:
        t += _channel_view(offset.to(torch.int64), acc.dim())
    elif shift:
        t += 1 << (shift - 1)
    t >>= shift
    t += zp
    return out.copy_(t.clamp_(lo, hi))


# ----------------------------------------------------------------------------------------------
# ternary_conv2d

_TERNARY_SCHEMA = (
    "(Tensor x, int x_zero_point, Tensor weight_packed, Tensor bias, Tensor multiplier, int shift, "
    "int out_zero_point, int out_min, int out_max, int[2] stride=1, Tensor? offset=None) -> Tensor"
)


def _ternary_check(x, x_zero_point, weight_packed, bias, multiplier, shift, out_zero_point, out_min, out_max, stride, offset):
    _check_uint8("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-d tensor [N, C_in, H, W], got shape {tuple(x.shape)}")
    _check_code("x_zero_point", x_zero_point)
    _check_packed(weight_packed, x.shape[1])
    c_out = weight_packed.shape[0]
    _check_bias(bias, c_out)
    _check_requant_args(multiplier, offset, shift, out_zero_point, out_min, out_max, c_out)
    sh, sw = _check_pair("stride", stride, 1)
    n, _, h, w = x.shape
    return (n, c_out, (h - 1) // sh + 1, (w - 1) // sw + 1), (sh, sw)


@torch.library.custom_op("fxslim::ternary_conv2d", mutates_args=(), schema=_TERNARY_SCHEMA)
def ternary_conv2d(
    x: Tensor, x_zero_point: int, weight_packed: Tensor, bias: Tensor, multiplier: Tensor, shift: int,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int] = (1, 1), offset: Tensor | None = None,
) -> Tensor:
    """1×1 groups-1 conv with packed ternary weights: uint8 [N, C_in, H, W] → uint8 [N, C_out, H', W'].

    acc_c = Σ_{t=+1} q − Σ_{t=−1} q + (bias_c − z_x·Σ_i t_ci), then requantized (module docstring).
    """
    shape, stride = _ternary_check(
        x, x_zero_point, weight_packed, bias, multiplier, shift, out_zero_point, out_min, out_max, stride, offset
    )
    _check_multiplier_values(multiplier)
    codes = _ternary_codes(weight_packed, x.shape[1])
    acc = _conv_acc(x, x_zero_point, weight_packed, codes, bias, stride, (0, 0), (1, 1), 1, onednn=True)
    out = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
    return _requantize_into(out, acc, multiplier, offset, shift, out_zero_point, out_min, out_max, owned=True)


@ternary_conv2d.register_fake
def _ternary_conv2d_fake(x, x_zero_point, weight_packed, bias, multiplier, shift, out_zero_point, out_min, out_max,
                         stride=(1, 1), offset=None):
    shape, _ = _ternary_check(
        x, x_zero_point, weight_packed, bias, multiplier, shift, out_zero_point, out_min, out_max, stride, offset
    )
    return torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# int8_conv2d

_INT8_CONV_SCHEMA = (
    "(Tensor x, int x_zero_point, Tensor weight, Tensor bias, Tensor multiplier, int shift, "
    "int out_zero_point, int out_min, int out_max, int[2] stride=1, int[2] padding=0, int[2] dilation=1, "
    "int groups=1, Tensor? offset=None) -> Tensor"
)


def _int8_conv_check(x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, stride, padding,
                     dilation, groups, offset):
    _check_uint8("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-d tensor [N, C_in, H, W], got shape {tuple(x.shape)}")
    _check_code("x_zero_point", x_zero_point)
    if weight.dtype != torch.int8 or weight.dim() != 4:
        raise ValueError(f"weight: expected int8 codes [C_out, C_in/groups, kh, kw], got {weight.dtype} {tuple(weight.shape)}")
    c_out = weight.shape[0]
    _check_bias(bias, c_out)
    _check_requant_args(multiplier, offset, shift, out_zero_point, out_min, out_max, c_out)
    return _check_conv_geometry(x, weight, groups, stride, padding, dilation)


@torch.library.custom_op("fxslim::int8_conv2d", mutates_args=(), schema=_INT8_CONV_SCHEMA)
def int8_conv2d(
    x: Tensor, x_zero_point: int, weight: Tensor, bias: Tensor, multiplier: Tensor, shift: int,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1, offset: Tensor | None = None,
) -> Tensor:
    """Conv with int8 weight codes (any kernel, stride, padding, dilation, groups incl. depthwise).

    uint8 [N, C_in, H, W] → uint8 channels_last [N, C_out, H', W']; padding is real zero (code z_x).
    """
    shape, stride, padding, dilation = _int8_conv_check(
        x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, stride, padding, dilation,
        groups, offset,
    )
    _check_multiplier_values(multiplier)
    codes = _int8_weight(weight)
    depthwise = groups == x.shape[1] == weight.shape[0]
    acc = _conv_acc(x, x_zero_point, weight, codes, bias, stride, padding, dilation, groups, onednn=depthwise)
    out = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
    return _requantize_into(out, acc, multiplier, offset, shift, out_zero_point, out_min, out_max, owned=True)


@int8_conv2d.register_fake
def _int8_conv2d_fake(x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max,
                      stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, offset=None):
    shape, *_ = _int8_conv_check(
        x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, stride, padding, dilation,
        groups, offset,
    )
    return torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# int8_linear

_INT8_LINEAR_SCHEMA = (
    "(Tensor x, int x_zero_point, Tensor weight, Tensor bias, Tensor multiplier, int shift, "
    "int out_zero_point, int out_min, int out_max, Tensor? offset=None) -> Tensor"
)


def _int8_linear_check(x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, offset):
    _check_uint8("x", x)
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight: expected int8 codes [out_features, in_features], got {weight.dtype} {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dimension {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    _check_code("x_zero_point", x_zero_point)
    _check_bias(bias, weight.shape[0])
    _check_requant_args(multiplier, offset, shift, out_zero_point, out_min, out_max, weight.shape[0])
    return (*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fxslim::int8_linear", mutates_args=(), schema=_INT8_LINEAR_SCHEMA)
def int8_linear(
    x: Tensor, x_zero_point: int, weight: Tensor, bias: Tensor, multiplier: Tensor, shift: int,
    out_zero_point: int, out_min: int, out_max: int, offset: Tensor | None = None,
) -> Tensor:
    """Linear with int8 weight codes: uint8 [..., in] → uint8 [..., out] (contiguous)."""
    shape = _int8_linear_check(x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, offset)
    _check_multiplier_values(multiplier)
    acc = _linear_acc(x.reshape(-1, weight.shape[1]), x_zero_point, weight, _int8_weight(weight), bias)
    out = torch.empty(shape, dtype=torch.uint8, device=x.device)
    _requantize_into(out.view(-1, weight.shape[0]), acc, multiplier, offset, shift, out_zero_point, out_min, out_max, owned=True)
    return out


@int8_linear.register_fake
def _int8_linear_fake(x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, offset=None):
    shape = _int8_linear_check(x, x_zero_point, weight, bias, multiplier, shift, out_zero_point, out_min, out_max, offset)
    return torch.empty(shape, dtype=torch.uint8, device=x.device)


# ----------------------------------------------------------------------------------------------
# requantize


def _requantize_check(acc, multiplier, shift, out_zero_point, out_min, out_max, offset):
    if acc.dtype != torch.int32:
        raise ValueError(f"acc: expected an int32 accumulator tensor, got {acc.dtype}")
    channels = acc.shape[1] if acc.dim() >= 2 else 1
    _check_requant_args(multiplier, offset, shift, out_zero_point, out_min, out_max, channels)
    if acc.dim() < 2 and multiplier.shape[0] != 1:
        raise ValueError(f"multiplier: expected shape [1] for a {acc.dim()}-d accumulator, got {tuple(multiplier.shape)}")


@torch.library.custom_op(
    "fxslim::requantize", mutates_args=(),
    schema="(Tensor acc, Tensor multiplier, int shift, int out_zero_point, int out_min, int out_max, Tensor? offset=None) -> Tensor",
)
def requantize(
    acc: Tensor, multiplier: Tensor, shift: int, out_zero_point: int, out_min: int, out_max: int, offset: Tensor | None = None,
) -> Tensor:
    """int32 accumulators [N, C, ...] → uint8 codes of the same shape and layout (channel dim 1)."""
    _requantize_check(acc, multiplier, shift, out_zero_point, out_min, out_max, offset)
    _check_multiplier_values(multiplier)
    out = torch.empty_like(acc, dtype=torch.uint8)
    return _requantize_into(out, acc, multiplier, offset, shift, out_zero_point, out_min, out_max, owned=False)


@requantize.register_fake
def _requantize_fake(acc, multiplier, shift, out_zero_point, out_min, out_max, offset=None):
    _requantize_check(acc, multiplier, shift, out_zero_point, out_min, out_max, offset)
    return torch.empty_like(acc, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# int8_add (residual add)

_ADD_SCHEMA = (
    "(Tensor a, int a_zero_point, int a_multiplier, Tensor b, int b_zero_point, int b_multiplier, int shift, "
    "int out_zero_point, int out_min, int out_max) -> Tensor"
)


def _add_check(a, a_zero_point, a_multiplier, b, b_zero_point, b_multiplier, shift, out_zero_point, out_min, out_max):
    _check_addends(a, b)
    _check_code("a_zero_point", a_zero_point)
    _check_code("b_zero_point", b_zero_point)
    for name, m in (("a_multiplier", a_multiplier), ("b_multiplier", b_multiplier)):
        if not 0 <= m <= _INT32_MAX:
            raise ValueError(f"{name}: expected an integer in [0, 2^31 - 1], got {m}")
    _check_out_args(shift, out_zero_point, out_min, out_max)


@torch.library.custom_op("fxslim::int8_add", mutates_args=(), schema=_ADD_SCHEMA)
def int8_add(
    a: Tensor, a_zero_point: int, a_multiplier: int, b: Tensor, b_zero_point: int, b_multiplier: int, shift: int,
    out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Residual add of two uint8 tensors on their own grids into a third grid (same shape, layout of a).

    out = clamp((((a − z_a)·M_a + (b − z_b)·M_b + 2^(shift−1)) >> shift) + z_out, out_min, out_max).
    """
    _add_check(a, a_zero_point, a_multiplier, b, b_zero_point, b_multiplier, shift, out_zero_point, out_min, out_max)
    out = torch.empty_like(a, dtype=torch.uint8)
    rnd = (1 << (shift - 1)) if shift else 0
    constant = rnd - a_zero_point * a_multiplier - b_zero_point * b_multiplier + out_zero_point * (1 << shift)
    # |a·M_a|, |a·M_a + b·M_b| and the result are all below this bound: int32 suffices under 2^31.
    bound = 255 * (a_multiplier + b_multiplier) + abs(constant)
    dtype = torch.int32 if bound <= _INT32_MAX else torch.int64
    t = a.to(dtype).mul_(a_multiplier)
    t.add_(b.to(dtype), alpha=b_multiplier).add_(constant)
    t >>= shift
    return out.copy_(t.clamp_(out_min, out_max))


@int8_add.register_fake
def _int8_add_fake(a, a_zero_point, a_multiplier, b, b_zero_point, b_multiplier, shift, out_zero_point, out_min, out_max):
    _add_check(a, a_zero_point, a_multiplier, b, b_zero_point, b_multiplier, shift, out_zero_point, out_min, out_max)
    return torch.empty_like(a, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# int8_global_avg_pool2d

_POOL_SCHEMA = "(Tensor x, int x_zero_point, int multiplier, int shift, int out_zero_point, int out_min, int out_max) -> Tensor"


def _pool_check(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max):
    _check_uint8("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-d tensor [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] * x.shape[3] * 255 > _INT32_MAX:
        raise ValueError(f"x: H·W = {x.shape[2] * x.shape[3]} is too large for an int32 sum")
    if not 0 <= shift <= 30:
        raise ValueError(f"shift: expected an integer in [0, 30] (acc·M + H·W·2^shift must fit int64), got {shift}")
    _check_code("x_zero_point", x_zero_point)
    if not 0 <= multiplier <= _INT32_MAX:
        raise ValueError(f"multiplier: expected an integer in [0, 2^31 - 1], got {multiplier}")
    _check_out_args(shift, out_zero_point, out_min, out_max)
    return (x.shape[0], x.shape[1], 1, 1)


@torch.library.custom_op("fxslim::int8_global_avg_pool2d", mutates_args=(), schema=_POOL_SCHEMA)
def int8_global_avg_pool2d(
    x: Tensor, x_zero_point: int, multiplier: int, shift: int, out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Global average pool: uint8 [N, C, H, W] → uint8 [N, C, 1, 1] (contiguous).

    ``multiplier``·2^−shift is s_x/s_out without the 1/(H·W): the op divides by the H·W of the
    input it gets, so one converted model serves every resolution. With acc = Σ_{H,W} (q − z_x) in
    int64 and D = H·W·2^shift: out = clamp(floor((acc·M + D/2) / D) + z_out, out_min, out_max).
    """
    _pool_check(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)
    return global_avg_pool_codes(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)


def global_avg_pool_codes(x: Tensor, x_zero_point: int, multiplier: int, shift: int, out_zero_point: int,
                          out_min: int, out_max: int) -> Tensor:
    """The arithmetic of ``int8_global_avg_pool2d`` on checked arguments (the lowered runtime calls it
    directly): contiguous uint8 [N, C, 1, 1]."""
    hw = x.shape[2] * x.shape[3]
    # int32 sums (exact: 255·H·W fits, checked) are twice as fast as int64 ones; the few sums widen after
    acc = x.sum((2, 3), keepdim=True, dtype=torch.int32).to(torch.int64)
    denominator = hw << shift
    acc.sub_(hw * x_zero_point).mul_(multiplier).add_(denominator >> 1)
    acc = torch.div(acc, denominator, rounding_mode="floor").add_(out_zero_point).clamp_(out_min, out_max)
    return acc.to(torch.uint8)


@int8_global_avg_pool2d.register_fake
def _int8_global_avg_pool2d_fake(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max):
    shape = _pool_check(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)
    return torch.empty(shape, dtype=torch.uint8, device=x.device)


# ----------------------------------------------------------------------------------------------
# Model boundaries: quantize_per_tensor, dequantize


def _inverse_scale(scale: float) -> float:
    """1/scale rounded to float32, as torch.fake_quantize_per_tensor_affine computes it."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))


def _quantize_check(x, scale, zero_point, out_min, out_max):
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite float > 0, got {scale}")
    _check_code("zero_point", zero_point)
    _check_code_range(out_min, out_max)


@torch.library.custom_op(
    "fxslim::quantize_per_tensor", mutates_args=(),
    schema="(Tensor x, float scale, int zero_point, int out_min=0, int out_max=255) -> Tensor",
)
def quantize_per_tensor(x: Tensor, scale: float, zero_point: int, out_min: int = 0, out_max: int = 255) -> Tensor:
    """Float → uint8 codes ``clamp(round_half_even(x · fl32(1/scale)) + z, out_min, out_max)``.

    The same arithmetic as ``torch.fake_quantize_per_tensor_affine`` (float32), so the codes equal
    the ones the fake-quant model uses. Same shape and layout as ``x``.
    """
    _quantize_check(x, scale, zero_point, out_min, out_max)
    out = torch.empty_like(x, dtype=torch.uint8)
    inverse = _inverse_scale(scale)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
        out = torch.empty_like(x, dtype=torch.uint8)
    # Flat views in memory order, worked on in cache-sized chunks: four passes over a chunk that
    # stays in L2 instead of four over a whole-batch float temporary.
    flat_x, flat_out = _memory_order_flat(x), _memory_order_flat(out)
    buffer = torch.empty(min(_QUANT_CHUNK, flat_x.numel()), dtype=torch.float32, device=x.device)
    for start in range(0, flat_x.numel(), _QUANT_CHUNK):
        chunk = flat_x[start : start + _QUANT_CHUNK].to(torch.float32)  # the fake quantizer's arithmetic
        t = torch.mul(chunk, inverse, out=buffer[: chunk.numel()])
        t.round_().clamp_(out_min - zero_point, out_max - zero_point).add_(zero_point)
        flat_out[start : start + _QUANT_CHUNK].copy_(t)
    return out


_QUANT_CHUNK = 1 << 17  # 512 KB of float32: stays in L2 with its uint8 output


def _memory_order_flat(t: Tensor) -> Tensor:
    """A 1-d view of a contiguous or channels_last tensor, elements in memory order."""
    if t.is_contiguous():
        return t.view(-1)
    return t.permute(0, 2, 3, 1).reshape(-1)  # channels_last: NHWC is contiguous, so this is a view


@quantize_per_tensor.register_fake
def _quantize_per_tensor_fake(x, scale, zero_point, out_min=0, out_max=255):
    _quantize_check(x, scale, zero_point, out_min, out_max)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # as the kernel does: a transposed input's codes come out contiguous
    return torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op(
    "fxslim::dequantize", mutates_args=(), schema="(Tensor q, float scale, int zero_point, Tensor? nan_samples=None) -> Tensor",
)
def dequantize(q: Tensor, scale: float, zero_point: int, nan_samples: Tensor | None = None) -> Tensor:
    """uint8 codes → float32 ``(q − z)·scale`` (same shape and layout as ``q``).

    ``nan_samples`` (bool [N], from ``nan_samples``): those samples (dim 0) come out NaN, since codes
    cannot carry the NaN their input had. When dim 0 of ``q`` is not the batch, any NaN sample
    makes the whole output NaN.
    """
    _dequantize_check(q, zero_point, nan_samples)
    return dequantized(q, scale, zero_point, nan_samples)


def dequantized(q: Tensor, scale: float, zero_point: int, flags: Tensor | None = None) -> Tensor:
    """The arithmetic of ``dequantize`` on checked arguments (the lowered runtime calls it directly)."""
    out = q.to(torch.float32).sub_(zero_point).mul_(scale)  # the scale is applied as float32, as a 0-d tensor would be
    if flags is not None and bool(flags.any()):
        if q.dim() >= 1 and q.shape[0] == flags.shape[0]:
            out.masked_fill_(flags.view(-1, *([1] * (q.dim() - 1))), float("nan"))
        else:
            out.fill_(float("nan"))
    return out


def _dequantize_check(q: Tensor, zero_point: int, nan_samples: Tensor | None) -> None:
    _check_uint8("q", q)
    _check_code("zero_point", zero_point)
    if nan_samples is not None and (nan_samples.dtype != torch.bool or nan_samples.dim() != 1):
        raise ValueError(f"nan_samples: expected None or a bool tensor [N], got {nan_samples.dtype} {tuple(nan_samples.shape)}")


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point, nan_samples=None):
    _dequantize_check(q, zero_point, nan_samples)
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("fxslim::nan_samples", mutates_args=(), schema="(Tensor x) -> Tensor")
def nan_samples(x: Tensor) -> Tensor:
    """Which samples (dim 0) of a float tensor hold a NaN: bool [N] (one reduction; max propagates NaN)."""
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating-point tensor with a batch dimension, got {x.dtype} {tuple(x.shape)}")
    return nan_flags(x)


def nan_flags(x: Tensor) -> Tensor:
    """The arithmetic of ``nan_samples`` on a checked ``x`` (the lowered runtime calls it directly)."""
    if x.numel() == 0:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return x.reshape(x.shape[0], -1).amax(1).isnan()


@nan_samples.register_fake
def _nan_samples_fake(x):
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating-point tensor with a batch dimension, got {x.dtype} {tuple(x.shape)}")
    return x.new_empty((x.shape[0],), dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# Autocast: the ops compute as if it were off. The float convs and matmuls the kernels sum codes
# with are exact only in float32 (``_f32_exact``); under ``torch.autocast("cpu")`` they ran in
# float16/bfloat16: an int8 linear was up to 255 LSB off.

exclude_autocast("ternary_conv2d", "int8_conv2d", "int8_linear", "requantize", "int8_add", "int8_global_avg_pool2d",
                 "quantize_per_tensor", "dequantize", "nan_samples")
