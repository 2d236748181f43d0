"""PROM's boundary ops in C (``native/prom_boundary.c``) for the lowered runtime, ATen where they cannot run.

A lowered MobileNetV2 at batch 1 spends about a fifth of its time outside its convs: NaN flags and
quantization of the input, the global average pool, the classifier's linear layer, dequantization of
the logits, as 20-odd ATen calls that each pay a fixed cost with caches cold after the convs. Each
function here is one C call computing the same values as the ATen form beside it
(tests/runtime/test_prom_native.py compares them bit for bit; the linear layer's codes equal
oneDNN's but for rare 1-LSB rounding ties), and takes that form where the kernel cannot run: no C
compiler, ``FXSLIM_NATIVE=0``, inside ``native_kernels.disabled()``, or inputs it does not handle (dtypes
other than float32 / uint8, empty tensors, dequantization whose flags are not per row).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from fxslim.runtime import native_kernels, prom, prom_onednn

__all__ = ["nan_flags", "quantize_codes", "global_avg_pool_codes", "LinearWeights", "linear_codes", "dequantized",
           "head", "status"]

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_LIB = "prom_boundary"


def _fn(symbol: str, restype, *argtypes):
    return native_kernels.function(_LIB, symbol, restype, *argtypes) if native_kernels.active() else None


def _per_row(flags: Tensor | None, rows: int) -> bool:
    """Whether the C kernels can read ``flags`` as one NaN flag per row: None, or contiguous bool [rows]."""
    return flags is None or (flags.dtype == torch.bool and tuple(flags.shape) == (rows,) and flags.is_contiguous())


def nan_flags(x: Tensor) -> Tensor:
    """``prom.nan_flags``: which samples (dim 0) of ``x`` hold a NaN, bool [N]."""
    fn = _fn("prom_nan_flags", None, _PTR, _I64, _I64, _PTR)
    if fn is None or x.dtype != torch.float32 or not x.is_cpu or x.numel() == 0 or not x.is_contiguous():
        return prom.nan_flags(x)
    flags = torch.empty(x.shape[0], dtype=torch.bool)
    fn(x.data_ptr(), x.shape[0], x.numel() // x.shape[0], flags.data_ptr())
    return flags


def quantize_codes(x: Tensor, bound: float, scale: float, inverse: float, zero_point: int,
                   memory_format: torch.memory_format, flags: Tensor | None = None) -> Tensor | None:
    """The quint8 QTensor (scale, zero point z, in ``memory_format``) of codes
    ``clamp(round_half_even(clamp(x, ±bound) · inverse) + z, 0, 255)`` of a float32 4-d ``x`` (any
    strides): ``torch.quantize_per_tensor(x.clamp(-bound, bound), scale, z, torch.quint8)`` with
    ``inverse`` = fl32(1/scale), as ATen's quantizer rounds. With ``flags`` (bool [N], contiguous),
    also ``nan_flags(x)`` written there, from the same pass over ``x``. None where the kernel cannot
    run (``flags`` then untouched)."""
    fn = _fn("prom_quantize", None, _PTR, *[_I64] * 8, _F32, _F32, _I64, _PTR, *[_I64] * 4, _PTR)
    if fn is None or x.dtype != torch.float32 or not x.is_cpu or x.dim() != 4 or x.numel() == 0:
        return None
    if not _per_row(flags, x.shape[0]):
        raise ValueError(f"quantize_codes: flags must be a contiguous bool tensor of shape ({x.shape[0]},), got "
                         f"{flags.dtype} {tuple(flags.shape)}")
    out = torch._empty_affine_quantized(x.shape, scale=scale, zero_point=zero_point, dtype=torch.quint8,
                                        memory_format=memory_format)
    fn(x.data_ptr(), *x.shape, *x.stride(), bound, inverse, zero_point, out.data_ptr(), *out.stride(),
       None if flags is None else flags.data_ptr())
    return out


def global_avg_pool_codes(x: Tensor, x_zero_point: int, multiplier: int, shift: int, out_zero_point: int,
                          out_min: int, out_max: int) -> Tensor:
    """``prom.global_avg_pool_codes`` (checked arguments, 255·H·W within int32)."""
    fn = _fn("prom_global_avg_pool", _I64, _PTR, *[_I64] * 14, _PTR)
    if fn is None or x.dtype != torch.uint8 or not x.is_cpu or x.dim() != 4 or x.numel() == 0:
        return prom.global_avg_pool_codes(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)
    n, c = x.shape[:2]
    out = torch.empty(n, c, 1, 1, dtype=torch.uint8)
    if fn(x.data_ptr(), *x.shape, *x.stride(), x_zero_point, multiplier, shift, out_zero_point, out_min, out_max,
          out.data_ptr()) < 0:
        return prom.global_avg_pool_codes(x, x_zero_point, multiplier, shift, out_zero_point, out_min, out_max)
    return out


class LinearWeights:
    """A linear layer's constants as ``linear_codes`` reads them: int8 ``weight`` [O, K] packed as
    [ceil(O / 16), ceil(K / 4), 16, 4] (zeros beyond O and K), its row sums, the float32 scales
    fl32(x scale) · fl32(w scale) and the bias, and fl32(1 / out scale)."""

    def __init__(self, weight: Tensor, w_scale: Tensor, bias: Tensor, x_scale: float, out_scale: float) -> None:
        o, k = weight.shape
        padded = torch.zeros(-(-o // 16) * 16, -(-k // 4) * 4, dtype=torch.int8)
        padded[:o, :k] = weight
        self.packed = padded.view(-1, 16, padded.shape[1] // 4, 4).transpose(1, 2).contiguous()
        self.sums = weight.sum(1, dtype=torch.int32).contiguous()
        self.scale, self.inverse = prom_onednn.requantization(x_scale, w_scale, out_scale)
        self.bias = bias.to(torch.float32).contiguous()
        self.out_features, self.in_features = o, k


def linear_codes(x: Tensor, x_zero_point: int, weights: LinearWeights, out_zero_point: int,
                 portable: bool = False) -> Tensor | None:
    """u8 codes [N, O] of ``fxslim::qlinear`` with the full 0..255 output range for u8 codes ``x``
    [N, K] (contiguous): oneDNN's arithmetic (``native/prom_boundary.c``; ``portable``: its form for
    machines without AVX-512 VNNI, the same values). None where the kernel cannot run."""
    fn = _fn("prom_linear", None, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _F32, _I64, _PTR, _I64)
    if (fn is None or x.dtype != torch.uint8 or not x.is_cpu or x.dim() != 2 or not x.is_contiguous()
            or x.shape[1] != weights.in_features):
        return None
    out = torch.empty(x.shape[0], weights.out_features, dtype=torch.uint8)
    fn(x.data_ptr(), x.shape[0], x.shape[1], weights.out_features, x_zero_point, weights.packed.data_ptr(),
       weights.sums.data_ptr(), weights.scale.data_ptr(), weights.bias.data_ptr(), weights.inverse, out_zero_point,
       out.data_ptr(), int(portable))
    return out


def dequantized(q: Tensor, scale: float, zero_point: int, flags: Tensor | None = None) -> Tensor:
    """``prom.dequantized``: float32 ``(q − z)·fl32(scale)``, samples flagged in ``flags`` NaN."""
    fn = _fn("prom_dequantize", None, _PTR, _I64, _I64, _I64, _F32, _PTR, _PTR)
    if (fn is None or q.dtype != torch.uint8 or not q.is_cpu or q.dim() == 0 or q.numel() == 0
            or not q.is_contiguous() or not _per_row(flags, q.shape[0])):
        return prom.dequantized(q, scale, zero_point, flags)
    out = torch.empty(q.shape, dtype=torch.float32)
    fn(q.data_ptr(), q.shape[0], q.numel() // q.shape[0], zero_point, scale,
       None if flags is None else flags.data_ptr(), out.data_ptr())
    return out


def head(x: Tensor, x_zero_point: int, multiplier: int, shift: int, pool_zero_point: int, pool_min: int,
         pool_max: int, weights: LinearWeights, linear_zero_point: int, linear_out_zero_point: int, scale: float,
         zero_point: int, flags: Tensor | None) -> Tensor | None:
    """``dequantized(linear_codes(global_avg_pool_codes(x, ...).flatten(1), ...), ...)``, float32 [N, O],
    in one C call (the same values; the pool's arguments as in ``global_avg_pool_codes``, the linear
    layer's as in ``linear_codes``, then ``dequantized``'s). ``x``: uint8 codes or a quint8 QTensor
    [N, C, H, W], any strides. None where the kernels cannot run these tensors."""
    fn = _fn("prom_head", _I64, _PTR, *[_I64] * 16, _PTR, _PTR, _PTR, _PTR, _F32, _I64, _I64, _I64, _F32, _PTR, _PTR)
    if (fn is None or x.dtype not in (torch.uint8, torch.quint8) or not x.is_cpu or x.dim() != 4 or x.numel() == 0
            or x.shape[1] != weights.in_features or not _per_row(flags, x.shape[0])):
        return None
    n = x.shape[0]
    out = torch.empty(n, weights.out_features, dtype=torch.float32)
    status = fn(x.data_ptr(), *x.shape, *x.stride(), x_zero_point, multiplier, shift, pool_zero_point, pool_min,
                pool_max, weights.out_features, linear_zero_point, weights.packed.data_ptr(), weights.sums.data_ptr(),
                weights.scale.data_ptr(), weights.bias.data_ptr(), weights.inverse, linear_out_zero_point, 0,
                zero_point, scale, None if flags is None else flags.data_ptr(), out.data_ptr())
    return None if status < 0 else out


def status() -> str:
    """Whether the kernels run here, in words (for benchmark records)."""
    reason = native_kernels.unavailable_reason(_LIB)
    return f"native boundary kernels off ({reason})" if reason else "native boundary kernels on"
