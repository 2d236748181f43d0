"""Ops on PROM's uint8 codes that need no arithmetic: 256-entry lookup tables and max pooling; and
the NaN rule on float outputs.

- ``lut``: ``table[q]`` for uint8 codes ``q`` and a uint8 table of 256 entries (or one per
  channel: ``table[c, q]``). Any map from one uint8 grid to another is one: a requantization, a pointwise activation applied between the two
  grids (``quant_out(f(dequant_in(q)))``), or both. ``lut_table`` builds the table with the same
  float32 arithmetic the fake-quant model uses (``fxslim::dequantize``, ``f``, then
  ``fxslim::quantize_per_tensor``), so the op equals the fake-quant result on every one of the 256
  codes: it is exact, not merely within 1 LSB, and one byte read per element instead of a
  dequantize, a float activation and a quantize. Per-channel tables do the same for maps with
  per-channel constants: an inference batch norm (and its activation) after a quantized tensor.
- ``max_pool2d_codes``: max pooling of codes. Dequantization is increasing, so the max of codes
  is the code of the max: exact on the input's grid.
- ``mark_nan_samples``: a float tensor with the flagged samples (dim 0) set to NaN, the rule
  ``fxslim::dequantize`` applies to quantized outputs, for outputs a float island computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fxslim.runtime.prom import _check_uint8, _memory_order_flat

__all__ = ["lut", "lut_table", "is_monotone", "max_pool2d_codes", "mark_nan_samples", "LUT_SIZE"]

LUT_SIZE = 256
_CHUNK = 1 << 18  # indices per index_select call: 1 MB of int32 stays in L2 with its codes


def _lut_check(x: Tensor, table: Tensor, dim: int) -> None:
    _check_uint8("x", x)
    per_channel = table.dim() == 2 and 0 <= dim < x.dim() and table.shape[0] == x.shape[dim]
    if table.dtype != torch.uint8 or table.shape[-1:] != (LUT_SIZE,) or not (table.dim() == 1 or per_channel):
        raise ValueError(f"table: expected a uint8 tensor [{LUT_SIZE}] or [C, {LUT_SIZE}] with C = x.shape[dim], got "
                         f"{table.dtype} {tuple(table.shape)} for x {tuple(x.shape)}, dim {dim}")


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels_last (memory order has a flat view), else a contiguous copy."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


@torch.library.custom_op("fxslim::lut", mutates_args=(), schema="(Tensor x, Tensor table, int dim=1) -> Tensor")
def lut(x: Tensor, table: Tensor, dim: int = 1) -> Tensor:
    """uint8 codes → uint8 codes ``table[x]`` (``table[c, x]`` for a per-channel table [C, 256],
    c the index along ``dim``); same shape, contiguous or channels_last kept."""
    _lut_check(x, table, dim)
    x = _dense(x)
    index = x.to(torch.int32)  # same layout as x
    if table.dim() == 2:  # row c of the flat table starts at 256·c
        shape = [table.shape[0] if i == dim else 1 for i in range(x.dim())]
        index.add_((torch.arange(table.shape[0], dtype=torch.int32, device=x.device) * LUT_SIZE).view(shape))
    out = torch.empty_like(x)
    flat_index, flat_out, flat_table = _memory_order_flat(index), _memory_order_flat(out), table.reshape(-1)
    for start in range(0, flat_index.numel(), _CHUNK):
        torch.index_select(flat_table, 0, flat_index[start : start + _CHUNK], out=flat_out[start : start + _CHUNK])
    return out


@lut.register_fake
def _lut_fake(x, table, dim=1):
    _lut_check(x, table, dim)
    return torch.empty_like(_dense(x))


@torch.no_grad()
def lut_table(fn: Callable[[Tensor], Tensor], x_scale: float, x_zero_point: int, out_scale: float,
              out_zero_point: int, *, channels: int = 0, dim: int = 1, ndim: int = 1) -> Tensor:
    """uint8 [256]: ``quantize(fn(dequantize(q)))`` for every code q, in the fake-quant model's
    float32 arithmetic (``fn``: a pointwise float function, the identity for a pure requantization).

    ``channels`` > 0: uint8 [channels, 256] for a function with per-channel constants along ``dim``
    of an ``ndim``-d tensor (a batch norm, a per-channel scale), evaluated on a probe of that rank
    holding the channels along ``dim`` and the 256 values along another dim.
    """
    real = torch.ops.fxslim.dequantize(torch.arange(LUT_SIZE, dtype=torch.uint8), x_scale, x_zero_point)
    if not channels:  # a constant of one element may broadcast the values to more dims: flatten back
        values = fn(real).to(torch.float32).reshape(LUT_SIZE)
        return torch.ops.fxslim.quantize_per_tensor(values, out_scale, out_zero_point)
    values_dim = 0 if dim != 0 else 1
    shape = [1] * ndim
    shape[dim], shape[values_dim] = channels, LUT_SIZE
    probe = real.view([LUT_SIZE if i == values_dim else 1 for i in range(ndim)]).expand(shape).contiguous()
    codes = torch.ops.fxslim.quantize_per_tensor(fn(probe).to(torch.float32).contiguous(), out_scale, out_zero_point)
    return codes.movedim((dim, values_dim), (0, 1)).reshape(channels, LUT_SIZE).contiguous()


@torch.no_grad()
def is_monotone(fn: Callable[[Tensor], Tensor], x_scale: float, x_zero_point: int) -> bool:
    """Whether ``fn`` is non-decreasing on the 256 real values of a grid (then it commutes with max pooling)."""
    real = torch.ops.fxslim.dequantize(torch.arange(LUT_SIZE, dtype=torch.uint8), x_scale, x_zero_point)
    values = fn(real)
    return bool((values[1:] >= values[:-1]).all())


_POOL_SCHEMA = "(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor"


def _max_pool(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode) -> Tensor:
    _check_uint8("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected uint8 codes [N, C, H, W], got shape {tuple(x.shape)}")
    # codes are exact in float32, and the float kernel keeps channels_last (the uint8 one refuses it)
    pooled = F.max_pool2d(x.to(torch.float32), list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode)
    return pooled.to(torch.uint8)


@torch.library.custom_op("fxslim::max_pool2d_codes", mutates_args=(), schema=_POOL_SCHEMA)
def max_pool2d_codes(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                     ceil_mode: bool) -> Tensor:
    """Max pooling of uint8 codes [N, C, H, W] (PyTorch's max_pool2d arguments, padding never wins)."""
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode)


@max_pool2d_codes.register_fake
def _max_pool2d_codes_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.empty_like(_max_pool(x, kernel_size, stride, padding, dilation, ceil_mode))


def _mark_check(x: Tensor, nan_samples: Tensor) -> None:
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating-point tensor with a batch dimension, got {x.dtype} {tuple(x.shape)}")
    if nan_samples.dtype != torch.bool or nan_samples.dim() != 1:
        raise ValueError(f"nan_samples: expected a bool tensor [N], got {nan_samples.dtype} {tuple(nan_samples.shape)}")


@torch.library.custom_op("fxslim::mark_nan_samples", mutates_args=(), schema="(Tensor x, Tensor nan_samples) -> Tensor")
def mark_nan_samples(x: Tensor, nan_samples: Tensor) -> Tensor:
    """A copy of float ``x`` whose samples flagged in ``nan_samples`` (bool [N]) are NaN; when dim 0
    of ``x`` is not the batch, any flagged sample makes the whole output NaN (as ``fxslim::dequantize``)."""
    _mark_check(x, nan_samples)
    out = x.clone()
    if bool(nan_samples.any()):
        if x.shape[0] == nan_samples.shape[0]:
            out[nan_samples] = float("nan")
        else:
            out.fill_(float("nan"))
    return out


@mark_nan_samples.register_fake
def _mark_nan_samples_fake(x, nan_samples):
    _mark_check(x, nan_samples)
    return torch.empty_like(x)
