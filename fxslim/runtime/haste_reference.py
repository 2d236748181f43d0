"""Loop-based oracle for ``fxslim::haste_conv2d``, written straight from docs/methods/HASTE.md.

One sample and one output tile at a time, in plain Python loops: cut the tile's patch from the
padded input, centre it over channels, hash every channel with the planes, group equal codes,
convolve the bucket means with the summed filter slices, add the bias, paste the tile. Slow on
purpose; tests compare the vectorised kernel against it. Same conventions as the kernel (see
``fxslim.runtime.haste``): a patch is the receptive field of the tile's valid outputs, zero-extended
at the bottom/right to the full t_h×t_w window the planes were drawn for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TileBuckets", "haste_conv2d_reference", "tile_buckets_reference", "tile_patch_reference"]


@dataclass(frozen=True)
class TileBuckets:
    """Buckets of one (sample, tile): ``members[b]`` lists the channels of bucket b."""

    sample: int
    tile: tuple[int, int]  # tile row, tile column
    rows: tuple[int, int]  # output rows [start, stop)
    cols: tuple[int, int]  # output columns [start, stop)
    members: tuple[tuple[int, ...], ...]


def tile_patch_reference(x_padded: Tensor, rows, cols, kernel_size, stride, dilation) -> Tensor:
    """[C, rf_h, rf_w] receptive field of output rows/cols [start, stop) in one padded sample [C, Hp, Wp]."""
    (r0, r1), (c0, c1) = rows, cols
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    return x_padded[:, r0 * sh : (r1 - 1) * sh + (kh - 1) * dh + 1, c0 * sw : (c1 - 1) * sw + (kw - 1) * dw + 1]


def _codes(patch: Tensor, planes: Tensor, full: tuple[int, int], center: bool) -> list[tuple[bool, ...]]:
    """L-bit code of every channel of ``patch`` [C, h, w], hashed on its zero-extended full window."""
    c, h, w = patch.shape
    window = patch.new_zeros((c, *full))
    window[:, :h, :w] = patch.nan_to_num(0.0, 0.0, 0.0)  # hashed with NaN and inf taken as 0
    if center:
        window = window - window.mean(dim=0, keepdim=True)
    codes = []
    for channel in range(c):
        z = window[channel].reshape(-1)
        codes.append(tuple(bool(torch.dot(z, plane) > 0) for plane in planes))
    return codes


def tile_buckets_reference(
    x: Tensor, planes: Tensor, kernel_size, stride, padding, dilation, tile: int = 4, center: bool = True
) -> list[TileBuckets]:
    """The buckets HASTE forms, for every sample and tile (row-major), in loops."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x, planes = x.to(compute), planes.to(compute)
    n, c, h, w = x.shape
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    full = ((tile - 1) * sh + (kh - 1) * dh + 1, (tile - 1) * sw + (kw - 1) * dw + 1)
    result = []
    for sample in range(n):
        x_padded = F.pad(x[sample], (pw, pw, ph, ph))
        for i, r0 in enumerate(range(0, h_out, tile)):
            for j, c0 in enumerate(range(0, w_out, tile)):
                rows, cols = (r0, min(r0 + tile, h_out)), (c0, min(c0 + tile, w_out))
                patch = tile_patch_reference(x_padded, rows, cols, (kh, kw), (sh, sw), (dh, dw))
                groups: dict[tuple[bool, ...], list[int]] = {}
                for channel, code in enumerate(_codes(patch, planes, full, center)):
                    groups.setdefault(code, []).append(channel)
                members = tuple(tuple(g) for g in groups.values())
                result.append(TileBuckets(sample, (i, j), rows, cols, members))
    return result


def haste_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    planes: Tensor,
    stride,
    padding,
    dilation,
    tile: int = 4,
    center: bool = True,
) -> Tensor:
    """HASTE conv [N, O, H_out, W_out] (contiguous), one sample and one tile at a time; a 1x1 output
    map is the dense conv (the op's rule: one pixel has nothing to save and little to hash)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[2:]
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc, wc = x.to(compute), weight.to(compute)
    n, o = x.shape[0], weight.shape[0]
    h_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out * w_out == 1:
        b = None if bias is None else bias.to(compute)
        return F.conv2d(xc, wc, b, stride, padding, dilation).to(x.dtype)
    y = xc.new_zeros((n, o, h_out, w_out))
    for entry in tile_buckets_reference(xc, planes, (kh, kw), stride, padding, dilation, tile, center):
        patch = tile_patch_reference(
            F.pad(xc[entry.sample], (pw, pw, ph, ph)), entry.rows, entry.cols, (kh, kw), stride, dilation
        )
        merged_x = torch.stack([patch[list(m)].mean(dim=0) for m in entry.members])  # [B, h, w]
        merged_w = torch.stack([wc[:, list(m)].sum(dim=1) for m in entry.members], dim=1)  # [O, B, kh, kw]
        out = F.conv2d(merged_x[None], merged_w, None, stride, 0, dilation)[0]
        if bias is not None:
            out = out + bias.to(compute)[:, None, None]
        (r0, r1), (c0, c1) = entry.rows, entry.cols
        y[entry.sample, :, r0:r1, c0:c1] = out
    return y.to(x.dtype)
