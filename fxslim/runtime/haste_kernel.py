"""The CPU kernel behind ``fxslim::haste_conv2d``: whole-layer tensor ops, no per-tile Python.

Samples go in groups whose patches fit ``GROUP_ELEMENTS``. For a group:

1. patches: each channel's t_h×t_w input window of each tile, [tiles·C, d] (one strided copy);
2. codes: one GEMM with the planes, [tiles·C, d] @ [d, L], centring over channels, bits packed;
3. buckets: each tile's codes sorted, a bucket = a run of equal codes (its channels contiguous);
   tiles sorted by bucket count B;
4. bucket means of the inputs: one sparse [tiles·B_max, tiles·C] @ [tiles·C, d] segment mean;
5. per chunk of tiles (cut so that its merged filters fit ``CHUNK_ELEMENTS``, each tile padded to
   the chunk's largest B with empty buckets) and per block of output channels:
   merged filters W̃[τ, ij, b] = Σ_{c∈b} W[:, c, ij] as one sparse 0/1 matrix times the weight's
   rows [C·k², O] (a segment sum), then the reduced convs as one batched GEMM,
   y_τ [T·T, O] = im2col(means_τ) [T·T, k²·B] @ W̃_τ [k²·B, O] (+ bias);
6. the tiles cropped into the output map.

Where a C compiler is there and the dtype is float32, the steps run in native kernels instead
(``haste_native``): steps 1-2 in ``native/haste_front.c`` (a tile's windows gathered from x, then
projected, centred and packed while in cache, where ATen's GEMM of L = 12 columns and four passes
over the projections took longer than the bucket means), step 3 in ``native/haste_buckets.c`` (a
radix sort per tile) and steps 4-6 in ``native/haste_tiles.c``, which sums each merged filter in
registers and never writes one, and writes each tile's outputs into the map from its accumulators.
On the ATen path step 5 writes B_τ·k²·O merged filter values per tile (from O·k²·C reads and
O·k²·(C − B_τ) additions), and ``benchmarks/haste_speed.py`` times writing that many floats.
Intermediates live in per-thread scratch buffers reused across calls (``fxslim.runtime.memory``);
the weight's rows are kept per weight tensor.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from fxslim.runtime import haste_native, memory

__all__ = ["TileBuckets", "hash_codes", "patches", "patches_and_codes", "tile_buckets", "weight_rows", "haste_conv2d_into"]

# Sizes in elements, from timing full-width ResNet18 on the reference machine (2 shared cores):
# from 2^19 to 2^23 the model time moved within the noise (±5 %); groups of 2^25 were 50 % slower.
GROUP_ELEMENTS = 1 << 22  # a group's patches (at least one sample): fewer, larger groups, fewer calls
BLOCK_ELEMENTS = 1 << 20  # a block of output channels' filter rows, read by every tile's merge
CHUNK_ELEMENTS = 1 << 21  # a chunk's merged filters, written and read straight back by the GEMM


def patches(x: Tensor, kernel_size, stride, padding, dilation, tile: int, grid: tuple[int, int]) -> Tensor:
    """[N·nth·ntw·C, t_h·t_w] every channel's input window of every tile (tiles row-major per sample).

    A zero canvas holds the padded input cropped to the rows/columns the conv reads, extended to whole
    tiles; tile (i, j) reads the t_h×t_w window at (i·T·σ_h, j·T·σ_w), so edge tiles see zeros beyond the
    receptive field of their valid outputs. (The native kernel reads the windows straight from x.)
    """
    return _windows(x, kernel_size, stride, padding, dilation, tile, grid, None, False)[0]


def patches_and_codes(x: Tensor, planes: Tensor, center: bool, kernel_size, stride, padding, dilation, tile: int,
                      grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(``patches``, ``hash_codes`` of them): in one native pass over the tiles where it runs."""
    rows, codes = _windows(x, kernel_size, stride, padding, dilation, tile, grid, planes, center)
    return rows, codes if codes is not None else hash_codes(rows, planes, x.shape[1], center)


def _windows(x, kernel_size, stride, padding, dilation, tile, grid, planes, center) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    nth, ntw = grid
    th, tw = (tile - 1) * sh + (kh - 1) * dh + 1, (tile - 1) * sw + (kw - 1) * dw + 1
    h_out, w_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = max(0, min(h, (h_out - 1) * sh + (kh - 1) * dh + 1 - ph))  # input rows some output reads
    cols = max(0, min(w, (w_out - 1) * sw + (kw - 1) * dw + 1 - pw))
    out = memory.scratch("haste.patches", (n * nth * ntw * c, th * tw), x.dtype)
    ran, codes = haste_native.patches(x, rows, cols, (ph, pw), grid, tile, (sh, sw), (th, tw), out, planes, center)
    if ran:
        return out, codes
    ch, cw = (nth - 1) * tile * sh + th, (ntw - 1) * tile * sw + tw
    canvas = memory.scratch("haste.canvas", (n, c, ch, cw), x.dtype).zero_()
    canvas[:, :, ph : ph + rows, pw : pw + cols] = x[:, :, :rows, :cols]
    windows = canvas.as_strided((n, nth, ntw, c, th, tw), (c * ch * cw, tile * sh * cw, tile * sw, ch * cw, cw, 1))
    return out.view(windows.shape).copy_(windows).view(-1, th * tw), None


def hash_codes(rows: Tensor, planes: Tensor, channels: int, center: bool) -> Tensor:
    """[tiles, C] codes (exact integers held in float): bit l = 1[<z, r_l> > 0], z a channel's (centred) window.

    ``rows`` [tiles·C, d]. Centring after projecting equals centring before (linearity) and touches L
    instead of d values per channel. (The native front kernel makes the same codes while it gathers
    the windows: ``patches_and_codes``.)
    """
    L = planes.shape[0]
    proj = memory.scratch("haste.proj", (rows.shape[0], L), rows.dtype)
    torch.matmul(rows, planes.t(), out=proj)  # [tiles·C, d] @ [d, L]
    if not bool(torch.isfinite(proj).all()):  # hashed with NaN and inf taken as 0 (``haste``'s docstring)
        torch.matmul(rows.nan_to_num(0.0, 0.0, 0.0), planes.t(), out=proj)
    proj = proj.view(-1, channels, L)
    if center:
        proj -= proj.mean(dim=1, keepdim=True)
    # Pack the bits with a matmul against 2^l: exact in float32 up to 24 bits, float64 up to 53.
    dtype = torch.float32 if L <= 24 else torch.float64
    powers = torch.tensor([2.0**bit for bit in range(L)], dtype=dtype)
    return torch.matmul((proj > 0).to(dtype), powers)  # [tiles, C, L] @ [L] -> [tiles, C]


@dataclass(frozen=True)
class TileBuckets:
    """Buckets of every tile, tiles sorted by bucket count (row i describes tile ``order[i]``).

    ``count`` [tiles] B per tile; ``channels`` [tiles, C] each tile's channels sorted by code (a
    bucket's channels contiguous, buckets in code order); ``starts`` [tiles, B_max] where each bucket
    starts in that order (C for the buckets a tile does not have, so they come out empty);
    ``bucket_size`` [tiles, C] the size of each channel's bucket, in that order.
    """

    order: Tensor
    count: Tensor
    channels: Tensor
    starts: Tensor
    bucket_size: Tensor


def tile_buckets(codes: Tensor) -> TileBuckets:
    """Group equal codes of each row of ``codes`` [tiles, C]; see ``TileBuckets``."""
    tiles, c = codes.shape
    sorted_codes, by_code = codes.sort(dim=1)
    new = torch.ones((tiles, c), dtype=torch.int64)  # 1 where a bucket begins
    new[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    rank = new.cumsum(1) - 1  # bucket of each sorted channel
    count = rank[:, -1] + 1
    order = count.argsort(stable=True)
    sizes = torch.zeros((tiles, int(count.max())), dtype=torch.int64).scatter_add_(1, rank, new.new_ones(()).expand(tiles, c))
    bucket_size = sizes.gather(1, rank).index_select(0, order)
    sizes = sizes.index_select(0, order)
    return TileBuckets(order, count.index_select(0, order), by_code.index_select(0, order), sizes.cumsum(1) - sizes,
                       bucket_size)


_ROWS: dict[int, tuple[weakref.ref, int, Tensor, Tensor]] = {}


def _same_data(alias: Tensor, weight: Tensor) -> bool:
    """``weight`` still holds the tensor ``alias`` was taken from (same storage, dtype and layout)."""
    return (alias.data_ptr() == weight.data_ptr() and alias.dtype == weight.dtype
            and alias.shape == weight.shape and alias.stride() == weight.stride())


def weight_rows(weight: Tensor) -> Tensor:
    """[blocks, C·k_h·k_w, O/blocks] contiguous: the filter slice of every (input channel, kernel offset)
    as a row, output channels cut into blocks of at most about ``BLOCK_ELEMENTS`` values.

    Every tile's merge reads a whole block, so a block should stay in cache. A transposing copy of the
    weight runs at a few GB/s and costs more than a dense conv at batch 1, so the copy is kept while
    ``weight`` lives and is not modified in place (same version counter); a new or changed weight gets
    a new copy (inference tensors, which cannot tell, get a new copy every call).

    The version counter alone misses ``p.data = t`` (also what ``module.double()`` or ``.to()`` do to a
    Parameter): the Parameter and its counter stay, its data is another tensor, and the stale copy gave
    wrong outputs or a dtype error. So the entry also keeps an alias of the data it was made from (which
    keeps that storage alive, so its address cannot be reused) and is used only while ``weight`` still
    holds that storage, dtype and layout. Writes through ``p.data`` in place (``p.data.copy_(t)``) bump
    no counter and cannot be seen without reading the weight: change weights under ``torch.no_grad()``.
    """
    key, versioned = id(weight), not weight.is_inference()  # inference tensors have no version counter
    cached = _ROWS.get(key)
    if (versioned and cached is not None and cached[0]() is weight and cached[1] == weight._version
            and _same_data(cached[2], weight)):
        return cached[3]
    o = weight.shape[0]
    # at most one block per output channel: a filter of more than BLOCK_ELEMENTS values (C·k_h·k_w > 2^20)
    # asked for more blocks than O, and no divisor of O is that large (the search never ended)
    blocks = min(o, math.ceil(weight.numel() / BLOCK_ELEMENTS))
    while o % blocks:
        blocks += 1
    rows = weight.detach().reshape(blocks, o // blocks, -1).transpose(1, 2).contiguous()
    if versioned:
        _ROWS[key] = (weakref.ref(weight, lambda _ref, key=key: _ROWS.pop(key, None)), weight._version,
                      weight.detach(), rows)
    return rows


def _chunks(count: list[int], row: int) -> list[tuple[int, int, int]]:
    """(start, stop, padded B) of runs of the sorted tiles whose merged filters (``row`` values per
    bucket) fit ``CHUNK_ELEMENTS``; a chunk pads its tiles to its last (largest) count."""
    out, start, tiles = [], 0, len(count)
    while start < tiles:
        stop = start + 1
        while stop < tiles and (stop + 1 - start) * count[stop] * row <= CHUNK_ELEMENTS:
            stop += 1
        out.append((start, stop, count[stop - 1]))
        start = stop
    return out


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _group(x, w_rows, bias, planes, geometry, center, out: Tensor, count_out: Tensor) -> None:
    """The output map [n, O, H_out, W_out] of the samples x into ``out``, and the bucket counts
    [tiles] of their tiles into ``count_out`` (tiles row-major per sample)."""
    kernel, stride, padding, dilation, tile, grid, _ = geometry
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    c, (blocks, _, o), k2, p = x.shape[1], w_rows.shape, kh * kw, tile * tile
    th, tw = (tile - 1) * sh + (kh - 1) * dh + 1, (tile - 1) * sw + (kw - 1) * dw + 1
    d = th * tw
    rows, codes = patches_and_codes(x, planes, center, kernel, stride, padding, dilation, tile, grid)
    tiles = rows.shape[0] // c
    native = haste_native.buckets(codes) if rows.dtype == torch.float32 else None
    if native is not None:
        channels, starts, count = native
        if haste_native.tile_convs(rows, channels, starts, count, w_rows, bias, geometry, out):
            count_out.copy_(count)
            return
    bk = tile_buckets(codes)
    b_max = bk.starts.shape[1]
    # Sparse indices in int32 when they fit (MKL's own index type: int64 ones are converted every call).
    index = torch.int32 if tiles * k2 * c < 2**31 else torch.int64
    channels, starts = bk.channels.to(index), bk.starts.to(index)
    # Means of every (tile, bucket), all tiles padded to B_max: row (τ, b) averages rows order[τ]·C + c.
    crow = torch.cat([(torch.arange(tiles, dtype=index)[:, None] * c + starts).view(-1),
                      torch.tensor([tiles * c], dtype=index)])
    col = (bk.order.to(index)[:, None] * c + channels).view(-1)
    means = memory.scratch("haste.means", (tiles * b_max, d), x.dtype)
    torch.addmm(means, _csr(crow, col, bk.bucket_size.view(-1).to(x.dtype).reciprocal(), (tiles * b_max, tiles * c)), rows,
                beta=0, out=means)
    # [tiles, th·tw, B_max]: the buckets of a pixel contiguous
    means_cl = memory.scratch("haste.means_cl", (tiles, d, b_max), x.dtype)
    means = means_cl.copy_(means.view(tiles, b_max, d).transpose(1, 2))
    # Merged filters of a chunk: row (τ, ij, b), b below the chunk's B, sums rows (c, ij) of w_rows.
    count = bk.count.tolist()
    offset = torch.arange(k2, dtype=index)[None, :, None]
    first = (torch.arange(tiles, dtype=index)[:, None, None] * k2 + offset) * c + starts[:, None, :]  # [tiles, k², B_max]
    col = (channels[:, None, :] * k2 + offset).view(-1)
    chunks = _chunks(count, k2 * o)
    ones = x.new_ones(max(stop - start for start, stop, _ in chunks) * k2 * c)
    by_count = memory.scratch("haste.by_count", (blocks, tiles, p, o), x.dtype)
    for start, stop, b in chunks:
        m = stop - start
        crow = torch.cat([first[start:stop, :, :b].reshape(-1) - start * k2 * c, torch.tensor([m * k2 * c], dtype=index)])
        assign = _csr(crow, col[start * k2 * c : stop * k2 * c], ones[: m * k2 * c], (m * k2 * b, c * k2))
        window = means[start:stop].as_strided(  # im2col of the means, columns (ij, b) like the merged rows
            (m, tile, tile, kh, kw, b), (d * b_max, sh * tw * b_max, sw * b_max, dh * tw * b_max, dw * b_max, 1)
        )
        cols = memory.scratch("haste.cols", window.shape, x.dtype).copy_(window).view(m, p, k2 * b)
        merged = memory.scratch("haste.merged", (m * k2 * b, o), x.dtype)
        for block in range(blocks):
            torch.addmm(merged, assign, w_rows[block], beta=0, out=merged)
            if bias is None:
                torch.bmm(cols, merged.view(m, k2 * b, o), out=by_count[block, start:stop])
            else:
                torch.baddbmm(bias[block * o : (block + 1) * o].view(1, 1, o), cols, merged.view(m, k2 * b, o),
                              out=by_count[block, start:stop])
    tiled = memory.scratch("haste.tiled", (blocks, tiles, p, o), x.dtype).index_copy_(1, bk.order, by_count)
    _stitch(tiled.view(blocks, x.shape[0], *grid, tile, tile, o).permute(1, 2, 3, 4, 5, 0, 6), out)
    count_out.index_copy_(0, bk.order, bk.count)


def _stitch(tiles: Tensor, out: Tensor) -> None:
    """``out`` [N, O, H_out, W_out] = tiles [N, nth, ntw, T, T, blocks, O/blocks] cropped to its size
    (output channel = block·O/blocks + index in the block)."""
    n, nth, ntw, tile, _, blocks, o_block = tiles.shape
    full = tiles.permute(0, 5, 6, 1, 3, 2, 4).reshape(n, blocks * o_block, nth * tile, ntw * tile)
    out.copy_(full[:, :, : out.shape[2], : out.shape[3]])


def haste_conv2d_into(x, weight, bias, planes, stride, padding, dilation, tile, center, out: Tensor) -> Tensor:
    """The HASTE conv of x [N, C, H, W] written into ``out`` [N, O, H_out, W_out] (any layout); returns
    the bucket count of every output tile, [N, nth·ntw].

    The native kernel writes each tile's pixels inside the output straight into ``out``; the ATen path
    computes whole tiles (edge pixels past the output on zeros) and crops them into it.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    h_out, w_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    grid = (math.ceil(h_out / tile), math.ceil(w_out / tile))
    tiles = grid[0] * grid[1]
    w_rows = weight_rows(weight)
    blocks, _, o_block = w_rows.shape
    d = ((tile - 1) * sh + (kh - 1) * dh + 1) * ((tile - 1) * sw + (kw - 1) * dw + 1)
    per_sample = tiles * c * d  # patches
    step = max(1, GROUP_ELEMENTS // per_sample)
    geometry = ((kh, kw), stride, padding, dilation, tile, grid, (h_out, w_out))
    count = torch.empty(n * tiles, dtype=torch.int64)
    for s in range(0, n, step):
        rows = slice(s * tiles, min(n, s + step) * tiles)
        _group(x[s : s + step], w_rows, bias, planes, geometry, center, out[s : s + step], count[rows])
    return count.view(n, tiles)
