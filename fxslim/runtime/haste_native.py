"""HASTE's native kernels (``native/haste_front.c``, ``native/haste_buckets.c``, ``native/haste_tiles.c``)
behind tensor-level calls.

``patches`` returns (False, None), ``buckets`` None and ``tile_convs`` False where a kernel cannot
run (no C compiler, ``FXSLIM_NATIVE=0``, a dtype other than float32, or inside
``native_kernels.disabled()``), and the caller takes its ATen path: on the same input the same
buckets (up to codes whose centred projection lies within float32 rounding of 0), and outputs equal
up to float32 rounding (sums in another order).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from fxslim.runtime import native_kernels

__all__ = ["patches", "buckets", "tile_convs", "status"]

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _kernel():
    return native_kernels.function("haste_tiles", "haste_tile_convs", _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR,
                                   _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                   _I64, _I64, _I64, _PTR, _PTR)


def _front_kernel():
    return native_kernels.function("haste_front", "haste_front", _I64, _PTR, *[_I64] * 17, _PTR, _PTR, _I64, _I64, _PTR,
                                   _PTR)


def patches(x: Tensor, rows: int, cols: int, padding: tuple[int, int], grid: tuple[int, int], tile: int,
            stride: tuple[int, int], window: tuple[int, int], out: Tensor, planes: Tensor | None = None,
            center: bool = False) -> tuple[bool, Tensor | None]:
    """Every tile's input windows of x [N, C, H, W] (float32, any strides) into ``out``
    [N·nth·ntw·C, t_h·t_w] (contiguous), as ``haste_kernel.patches`` makes them, and with ``planes``
    [L, d] each tile's codes [tiles, C] from its windows while they are in cache, as
    ``haste_kernel.hash_codes`` makes them (float32 up to 24 planes, else float64): (whether the
    kernel ran, the codes or None)."""
    fn = _front_kernel() if native_kernels.active() else None
    floats = (x, out) if planes is None else (x, out, planes)
    if fn is None or any(t.dtype != torch.float32 or not t.is_cpu for t in floats) or not out.is_contiguous():
        return False, None
    n, c = x.shape[:2]
    codes, L = None, 0
    if planes is not None:
        planes, L = planes.contiguous(), planes.shape[0]
        codes = torch.empty(out.shape[0] // max(1, c), c, dtype=torch.float32 if L <= 24 else torch.float64)
    f32 = codes is not None and codes.dtype == torch.float32
    status_code = fn(x.data_ptr(), n, c, *x.stride(), rows, cols, *padding, *grid, tile, *stride, *window, out.data_ptr(),
                     None if planes is None else planes.data_ptr(), L, int(center),
                     codes.data_ptr() if f32 else None, codes.data_ptr() if codes is not None and not f32 else None)
    if status_code < 0:
        return False, None
    return True, codes


def _buckets_kernel():
    return native_kernels.function("haste_buckets", "haste_buckets", _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR)


def buckets(codes: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(channels [tiles, C] sorted by code then channel, starts [tiles, B_max] (C past a tile's
    count), count [tiles]) of codes [tiles, C] (exact integers in float32 or float64), tiles in
    their own order: ``haste_kernel.tile_buckets`` without the sort of tiles by count."""
    fn = _buckets_kernel() if native_kernels.active() else None
    if fn is None or codes.dtype not in (torch.float32, torch.float64) or not codes.is_cpu:
        return None
    codes = codes.contiguous()
    tiles, c = codes.shape
    channels, starts = torch.empty(tiles, c, dtype=torch.int64), torch.empty(tiles, c, dtype=torch.int64)
    count = torch.empty(tiles, dtype=torch.int64)
    f32 = codes.dtype == torch.float32
    largest = fn(codes.data_ptr() if f32 else None, None if f32 else codes.data_ptr(), tiles, c, channels.data_ptr(),
                 starts.data_ptr(), count.data_ptr())
    if largest < 0:
        raise MemoryError("haste_conv2d: out of memory in the native bucket kernel")
    return channels, starts[:, :largest].contiguous(), count


def status() -> str:
    """Whether the kernel runs here, in words (for benchmark records)."""
    return "native tile kernel on" if _kernel() is not None else (
        f"native tile kernel off ({native_kernels.unavailable_reason('haste_tiles')})")


def tile_convs(patches: Tensor, channels: Tensor, starts: Tensor, count: Tensor, w_rows: Tensor,
               bias: Tensor | None, geometry: tuple, out: Tensor) -> bool:
    """Every tile's reduced conv written into ``out`` [N, O, H_out, W_out] (any strides: the output map
    of the samples whose tiles ``patches`` holds, tiles row-major per sample).

    ``patches`` [tiles·C, d]; ``channels``, ``starts``, ``count`` as ``buckets`` gives them (tiles in
    their own order); ``w_rows`` [blocks, C·k², O_b] (``haste_kernel.weight_rows``); ``geometry`` =
    (kernel, stride, padding, dilation, tile, grid, output size) as the ATen path takes it.
    """
    fn = _kernel() if native_kernels.active() else None
    floats = (patches, w_rows, out) + (() if bias is None else (bias,))
    if fn is None or any(t.dtype != torch.float32 or not t.is_cpu for t in floats) or not w_rows.is_contiguous():
        return False
    (kh, kw), (sh, sw), _, (dh, dw), tile, _, (h_out, w_out) = geometry
    tw = (tile - 1) * sw + (kw - 1) * dw + 1
    blocks, rows, o_b = w_rows.shape
    c = rows // (kh * kw)
    patches, bias = patches.contiguous(), None if bias is None else bias.contiguous()
    index = [t.to(torch.int64).contiguous() for t in (channels, starts, count)]
    status_code = fn(patches.data_ptr(), count.shape[0], c, patches.shape[1], *(t.data_ptr() for t in index),
                     starts.shape[1], w_rows.data_ptr(), blocks, o_b, 0 if bias is None else bias.data_ptr(),
                     tile, kh, kw, sh, sw, dh, dw, tw, h_out, w_out, out.data_ptr(), (_I64 * 4)(*out.stride()))
    if status_code < 0:
        raise MemoryError("haste_conv2d: out of memory in the native tile kernel")
    return True
