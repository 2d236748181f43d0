"""Oracles of PROM's integer ops (``fxslim.runtime.prom`` and ``prom_codes``): what the tests compare every kernel against.

Two kinds, as docs/methods/PROM.md defines the ops:

- ``*_reference``: exact integer semantics, one loop or int64 formula per op (the ternary one only
  gathers, adds and subtracts activation codes). The fast kernels must equal them bit for bit.
- ``*_float_reference``: the float model of an op (dequantize, float op in float64, quantize with
  rounding half to even); an integer op must match it within 1 LSB, and oneDNN's fused kernels
  (``fxslim.runtime.prom_onednn``) are checked against it.

Slow on purpose: nothing outside tests and benchmarks calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fxslim.runtime.prom import _MINUS, _PLUS, conv_output_size

__all__ = [
    "ternary_accumulate_reference",
    "ternary_conv2d_reference",
    "int8_conv2d_reference",
    "int8_linear_reference",
    "requantize_reference",
    "int8_add_reference",
    "int8_global_avg_pool2d_reference",
    "quantize_float_reference",
    "conv2d_float_reference",
    "linear_float_reference",
    "add_float_reference",
    "global_avg_pool2d_float_reference",
    "lut_reference",
]


def ternary_accumulate_reference(
    x: Tensor, x_zero_point: int, weight_packed: Tensor, bias: Tensor, stride: Sequence[int] = (1, 1)
) -> Tensor:
    """Oracle accumulator (int64 [N, C_out, H', W']): per output channel, the sum of the codes where
    t = +1 minus the sum where t = −1, plus the channel constant bias_c − z_x·Σ_i t_ci.

    No weight is multiplied: it reads the two bit masks of the packed weights and only gathers,
    adds and subtracts int64 activation codes.
    """
    c_in = x.shape[1]
    fields = ((weight_packed[..., None] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3).flatten(1)[:, :c_in]
    xs = x[:, :, :: stride[0], :: stride[1]].to(torch.int64)
    acc = torch.empty((xs.shape[0], weight_packed.shape[0], *xs.shape[2:]), dtype=torch.int64)
    for c in range(weight_packed.shape[0]):
        plus = (fields[c] == _PLUS).nonzero().flatten()
        minus = (fields[c] == _MINUS).nonzero().flatten()
        constant = int(bias[c]) - x_zero_point * (len(plus) - len(minus))
        acc[:, c] = xs[:, plus].sum(1) - xs[:, minus].sum(1) + constant
    return acc


def ternary_conv2d_reference(
    x: Tensor, x_zero_point: int, weight_packed: Tensor, bias: Tensor, multiplier: Tensor, shift: int,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int] = (1, 1), offset: Tensor | None = None,
) -> Tensor:
    """Oracle of ``ternary_conv2d``: the add/sub-only accumulator, then the requantization oracle."""
    acc = ternary_accumulate_reference(x, x_zero_point, weight_packed, bias, stride)
    return requantize_reference(acc, multiplier, shift, out_zero_point, out_min, out_max, offset)


def int8_conv2d_reference(
    x: Tensor, x_zero_point: int, weight: Tensor, bias: Tensor, multiplier: Tensor, shift: int,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1, offset: Tensor | None = None,
) -> Tensor:
    """Oracle: int64 direct convolution, one kernel tap and one group at a time, padded with z_x."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = F.pad(x.to(torch.int64), (pw, pw, ph, ph), value=x_zero_point) - x_zero_point
    c_out, c_in_g, kh, kw = weight.shape
    h = conv_output_size(x.shape[2], kh, sh, ph, dh)
    w = conv_output_size(x.shape[3], kw, sw, pw, dw)
    acc = bias.to(torch.int64).view(1, -1, 1, 1).repeat(x.shape[0], 1, h, w)
    o_g = c_out // groups
    w64 = weight.to(torch.int64)
    for g in range(groups):
        xg = xp[:, g * c_in_g : (g + 1) * c_in_g]
        for i in range(kh):
            for j in range(kw):
                tap = xg[:, :, i * dh : i * dh + (h - 1) * sh + 1 : sh, j * dw : j * dw + (w - 1) * sw + 1 : sw]
                acc[:, g * o_g : (g + 1) * o_g] += torch.einsum("nchw,oc->nohw", tap, w64[g * o_g : (g + 1) * o_g, :, i, j])
    return requantize_reference(acc, multiplier, shift, out_zero_point, out_min, out_max, offset)


def int8_linear_reference(
    x: Tensor, x_zero_point: int, weight: Tensor, bias: Tensor, multiplier: Tensor, shift: int,
    out_zero_point: int, out_min: int, out_max: int, offset: Tensor | None = None,
) -> Tensor:
    """Oracle: int64 matrix product of the centred codes plus bias, then requantization."""
    x2 = x.reshape(-1, weight.shape[1]).to(torch.int64) - x_zero_point
    acc = x2 @ weight.to(torch.int64).t() + bias.to(torch.int64)
    out = requantize_reference(acc, multiplier, shift, out_zero_point, out_min, out_max, offset)
    return out.view(*x.shape[:-1], weight.shape[0])


def requantize_reference(
    acc: Tensor, multiplier: Tensor, shift: int, out_zero_point: int, out_min: int, out_max: int, offset: Tensor | None = None,
) -> Tensor:
    """Oracle of the requantization, one channel at a time in int64 (channel dim 1, or per tensor)."""
    acc = acc.to(torch.int64)
    out = torch.empty(acc.shape, dtype=torch.uint8)
    rounding = [(1 << (shift - 1)) if shift else 0] * multiplier.shape[0] if offset is None else offset.tolist()
    if multiplier.shape[0] == 1:
        pieces = [(slice(None), int(multiplier[0]), rounding[0])]
    else:
        pieces = [((slice(None), c), int(multiplier[c]), rounding[c]) for c in range(acc.shape[1])]
    for index, m, rnd in pieces:
        value = ((acc[index] * m + rnd) >> shift) + out_zero_point
        out[index] = value.clamp(out_min, out_max).to(torch.uint8)
    return out


def int8_add_reference(
    a: Tensor, a_zero_point: int, a_multiplier: int, b: Tensor, b_zero_point: int, b_multiplier: int, shift: int,
    out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Oracle: the defining int64 formula."""
    rnd = (1 << (shift - 1)) if shift else 0
    t = (a.to(torch.int64) - a_zero_point) * a_multiplier + (b.to(torch.int64) - b_zero_point) * b_multiplier + rnd
    return ((t >> shift) + out_zero_point).clamp(out_min, out_max).to(torch.uint8)


def int8_global_avg_pool2d_reference(
    x: Tensor, x_zero_point: int, multiplier: int, shift: int, out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Oracle: per element, Python integers: round half up of Σ(q − z_x)·M / (H·W·2^shift)."""
    denominator = (x.shape[2] * x.shape[3]) << shift
    sums = (x.to(torch.int64) - x_zero_point).sum((2, 3), keepdim=True)
    values = [min(out_max, max(out_min, (int(a) * multiplier + denominator // 2) // denominator + out_zero_point))
              for a in sums.flatten().tolist()]
    return torch.tensor(values, dtype=torch.uint8).view(sums.shape)


def quantize_float_reference(y: Tensor, scale: float, zero_point: int, out_min: int = 0, out_max: int = 255) -> Tensor:
    """Real values → uint8 codes, rounding half to even in float64."""
    return (torch.round(y.to(torch.float64) / scale) + zero_point).clamp(out_min, out_max).to(torch.uint8)


def _real(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return (q.to(torch.float64) - zero_point) * scale


def conv2d_float_reference(
    x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, bias: Tensor | None, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
) -> Tensor:
    """conv2d of the dequantized input with real weights (α·t or scale·codes) and real bias."""
    bias = None if bias is None else bias.to(torch.float64)
    y = F.conv2d(_real(x, x_scale, x_zero_point), weight.to(torch.float64), bias, stride, padding, dilation, groups)
    return quantize_float_reference(y, out_scale, out_zero_point, out_min, out_max)


def linear_float_reference(
    x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, bias: Tensor | None, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """linear of the dequantized input with real weights and bias."""
    bias = None if bias is None else bias.to(torch.float64)
    y = F.linear(_real(x, x_scale, x_zero_point), weight.to(torch.float64), bias)
    return quantize_float_reference(y, out_scale, out_zero_point, out_min, out_max)


def add_float_reference(
    a: Tensor, a_scale: float, a_zero_point: int, b: Tensor, b_scale: float, b_zero_point: int, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Sum of the two dequantized inputs, quantized to the output grid."""
    y = _real(a, a_scale, a_zero_point) + _real(b, b_scale, b_zero_point)
    return quantize_float_reference(y, out_scale, out_zero_point, out_min, out_max)


def global_avg_pool2d_float_reference(
    x: Tensor, x_scale: float, x_zero_point: int, out_scale: float, out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Mean over H, W of the dequantized input, quantized to the output grid ([N, C, 1, 1])."""
    y = _real(x, x_scale, x_zero_point).mean((2, 3), keepdim=True)
    return quantize_float_reference(y, out_scale, out_zero_point, out_min, out_max)


def lut_reference(x: Tensor, table: Tensor, dim: int = 1) -> Tensor:
    """Oracle: one Python lookup per element."""
    if table.dim() == 1:
        entries = table.tolist()
        return torch.tensor([entries[v] for v in x.flatten().tolist()], dtype=torch.uint8).view(x.shape)
    channel = torch.arange(x.shape[dim]).view([-1 if i == dim else 1 for i in range(x.dim())]).expand(x.shape)
    rows = table.tolist()
    values = [rows[c][v] for c, v in zip(channel.flatten().tolist(), x.flatten().tolist())]
    return torch.tensor(values, dtype=torch.uint8).view(x.shape)
