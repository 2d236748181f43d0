"""PROM's 3×3 depthwise convs as one C call each (``native/prom_depthwise.c``), for ``prom_direct``'s plans.

oneDNN 3.2's int8 depthwise kernels took a third of MobileNetV2's conv time at batch 1. The C kernel
interleaves the three rows of an input column per channel so that one VNNI dot product adds three
taps of 16 channels, and feeds each column it reads to every output of a row tile that needs it. It
works on 64 channels at a time; a block of 32 or fewer holds two outputs per vector. On MobileNetV2's
layers it is 1.1-2.3× the speed of oneDNN 3.2's primitive (benchmarks/results/prom_depthwise_speed.md:
Intel Xeon, AVX-512 VNNI, batch 1 and 16); at 16 channels oneDNN is faster (0.6×) and at 24 the two
trade places from run to run, so the plan keeps oneDNN below ``prom_direct.NATIVE_DEPTHWISE_CHANNELS``.
Its arithmetic is the oneDNN conv's (the C file says how); its codes equal ATen's but for rare rounding
ties, 1 LSB apart (tests/runtime/test_prom_depthwise.py).

A step is built once per plan over the plan's own buffers (fixed addresses) and called through a
pointer to its parameters: about 1 µs of ctypes per call, as a oneDNN primitive costs.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from fxslim.runtime import native_kernels, prom_onednn
from fxslim.runtime.prom_onednn import ConvWeights

__all__ = ["supported", "DepthwiseStep", "available"]

_LIB = "prom_depthwise"
_I64 = ctypes.c_int64


class _Params(ctypes.Structure):
    """prom_dw_params of the C file."""

    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("quads", ctypes.c_void_p),
                ("scale4", ctypes.c_void_p), ("bias4", ctypes.c_void_p), ("taps4", ctypes.c_void_p), ("n", _I64),
                ("h", _I64), ("w", _I64),
                ("c", _I64), ("oh", _I64), ("ow", _I64), ("stride", _I64), ("pad", _I64), ("relu", _I64),
                ("src_zero_point", ctypes.c_float), ("inverse", ctypes.c_float), ("dst_zero_point", ctypes.c_float)]


def _function(symbol: str = "prom_depthwise3x3"):
    if not native_kernels.active():
        return None
    return native_kernels.function(_LIB, symbol, ctypes.c_int, ctypes.POINTER(_Params))


def available() -> bool:
    """Whether the kernel is built with its vector form (AVX-512 with VNNI; the portable form is
    slower than oneDNN's) and not switched off (``native_kernels``)."""
    if _function() is None:
        return False
    return bool(native_kernels.function(_LIB, "prom_depthwise_vectorized", ctypes.c_int)())


def supported(weights: ConvWeights, channels: int) -> bool:
    """Whether the kernel computes this conv: plain depthwise (one input and one output channel per
    group, ``channels`` of them), 3×3, equal strides of 1 or 2, equal padding of 0 to 2, no dilation."""
    o, i, kh, kw = weights.weight.shape
    stride, padding = tuple(weights.stride), tuple(weights.padding)
    return ((kh, kw) == (3, 3) and i == 1 and weights.groups == o == channels and weights.weight.dtype == torch.int8
            and stride in ((1, 1), (2, 2)) and padding in ((0, 0), (1, 1), (2, 2))
            and tuple(weights.dilation) == (1, 1))


def _quad_lanes() -> Tensor:
    """Channel of each int32 lane (of 16) of the four quad vectors of a block of 64 channels: unpacking
    bytes, then words, puts in quarter k of each 128-bit lane L the channels 16L + 4k .. 16L + 4k + 3."""
    lane = torch.arange(16)
    return torch.stack([16 * (lane // 4) + 4 * k + lane % 4 for k in range(4)])  # [4, 16]


def _blocked(values: Tensor, channels: int) -> Tensor:
    """``values`` [..., C] padded with zeros to whole blocks of 64 channels and ordered as the quad
    vectors' lanes: [blocks, ..., 4, 16]."""
    blocks = -(-channels // 64)
    padded = torch.zeros((*values.shape[:-1], blocks * 64), dtype=values.dtype)
    padded[..., :channels] = values
    index = (torch.arange(blocks).view(-1, 1, 1) * 64 + _quad_lanes()).view(-1)  # [blocks * 64]
    return padded[..., index].unflatten(-1, (blocks, 4, 16)).movedim(-3, 0).contiguous()


class DepthwiseStep:
    """The conv of ``weights`` from the u8 NHWC buffer at ``src`` (shape ``x_shape`` [N, C, H, W]) into
    the one at ``dst`` (``out_shape``), with the quantization parameters of its input and output."""

    def __init__(self, weights: ConvWeights, x_shape: tuple[int, ...], out_shape: tuple[int, ...], x_scale: float,
                 x_zero_point: int, out_scale: float, out_zero_point: int, relu: bool, src: int, dst: int,
                 symbol: str = "prom_depthwise3x3") -> None:
        fn = _function(symbol)
        if fn is None:
            raise RuntimeError(f"the depthwise kernel is unavailable: {native_kernels.unavailable_reason(_LIB)}")
        n, c, h, w = x_shape
        # taps first, channels innermost: w[kh * 3 + kw][c], the int8 codes as floats (exact)
        self.weight = weights.weight.reshape(c, 9).t().contiguous().to(torch.float32)
        self.scale, inverse = prom_onednn.requantization(x_scale, weights.w_scale, out_scale)
        self.bias = weights.bias.to(torch.float32).contiguous()
        taps = weights.weight.reshape(c, 3, 3)  # [c, kh, kw]
        # [kw, 4 bytes (rows 0, 1, 2 and a zero), c] → [blocks, kw, 4 bytes, quarter, 16 lanes]
        quads = torch.cat([taps.permute(2, 1, 0), torch.zeros(3, 1, c, dtype=torch.int8)], 1)
        # → [blocks, kw, quarter, 16 lanes, 4 bytes]: the three taps of a lane's channel adjacent
        self.quads = _blocked(quads, c).permute(0, 1, 3, 4, 2).contiguous()
        self.scale4, self.bias4 = _blocked(self.scale, c), _blocked(self.bias, c)
        self.taps4 = _blocked(taps.permute(1, 2, 0).to(torch.int32), c)  # [blocks, kh, kw, 4, 16]
        self.params = _Params(src, dst, self.weight.data_ptr(), self.scale.data_ptr(), self.bias.data_ptr(),
                              self.quads.data_ptr(), self.scale4.data_ptr(), self.bias4.data_ptr(),
                              self.taps4.data_ptr(), n, h, w, c,
                              out_shape[2], out_shape[3], weights.stride[0], weights.padding[0], int(relu),
                              float(x_zero_point), inverse, float(out_zero_point))
        self.fn, self.arg = fn, ctypes.byref(self.params)

    def __call__(self) -> int:
        return self.fn(self.arg)
