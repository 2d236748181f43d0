"""HASTE conv: data-free LSH channel merging per sample and output tile (docs/methods/HASTE.md).

``torch.ops.fxslim.haste_conv2d(x, weight, bias, planes, stride, padding, dilation, tile, center,
layer)`` replaces a groups=1 ``conv2d``. For every sample and every T×T output tile it hashes each
input channel's (centred) input patch with the ternary hyperplanes ``planes``, merges channels with
equal codes (mean of inputs, sum of filter slices) and convolves only the B merged channels.

Choices the method leaves open (the loop oracle in ``haste_reference`` implements the same ones):

- Patch of a tile = the receptive field of its output pixels in the zero-padded input, always
  ``t_h × t_w`` with ``t = (T-1)·stride + (k-1)·dilation + 1``, so ``d = t_h·t_w`` is constant.
  Edge tiles with fewer valid outputs read fewer pixels; the rest of their window is zero, which
  after centering contributes nothing to a projection (equivalent to restricting the planes to the
  pixels the smaller patch has, aligned at its top-left corner). Input rows/columns that no output
  reads are never part of a patch.
- Code bit l is ``1[<z, r_l> > 0]`` (strict), so a zero projection gives bit 0.
- Inputs of dtype float16/bfloat16 are computed in float32 (hash, merge, conv) and the result is
  cast back; float32 and float64 compute in their own dtype.
- The output is channels_last when ``x`` is channels_last (and not also NCHW-contiguous), else
  contiguous, like ``F.conv2d``.
- Real kernel for CPU only; fake/meta tensors (tracing, export) work on any device.

The kernel computes the reduced conv for real (never a dense conv on bucket means): codes by one
matmul with the planes, buckets by sorting the codes of each tile, bucket sums by scatter-add,
merged filters per tile by a sparse [B, C] × [C, k²·O] product (O·k²·C multiply-adds; the 1/|b| of
the mean rides along), then one batched matmul per chunk of tiles with similar bucket counts.
``record_buckets()`` collects per-layer bucket statistics from the running kernel, for measured
FLOPs. FlopCounterMode counts the dense conv FLOPs (an upper bound of the reduced conv alone; the
HASTE work depends on the data, see ``record_buckets``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

__all__ = [
    "haste_conv2d",
    "make_planes",
    "patch_shape",
    "resolve_padding",
    "output_shape",
    "HasteStats",
    "record_buckets",
    "MAX_PLANES",
]

MAX_PLANES = 53  # codes are packed exactly into float64 integers
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Merged filters of one chunk of tiles are kept under this many elements (cache-sized; larger
# chunks made the sparse merge several times slower per addition on the reference machine).
_CHUNK_ELEMENTS = 1 << 20
_OUT_BLOCK = 128  # output channels per merged-filter block (same reason)

_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor planes, int[2] stride, int[2] padding, "
    'int[2] dilation, int tile=4, bool center=True, str layer="") -> Tensor'
)


# ----------------------------------------------------------------------------------------------
# Geometry helpers (shared with the graph pass)


def resolve_padding(
    padding: int | tuple[int, int] | str, kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> tuple[int, int]:
    """Symmetric (pad_h, pad_w) for a conv's ``padding`` argument ('same', 'valid', int or pair).

    'same' needs an odd effective kernel ``(k-1)·dilation + 1`` per axis (otherwise PyTorch pads
    asymmetrically, which this op cannot express); PyTorch only allows 'same' with stride 1.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"resolve_padding: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(
                "resolve_padding: padding='same' needs an odd effective kernel (symmetric padding), "
                f"got kernel_size={tuple(kernel_size)}, dilation={tuple(dilation)}"
            )
        return (total[0] // 2, total[1] // 2)
    pair = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(pair) != 2 or any(not isinstance(p, int) or p < 0 for p in pair):
        raise ValueError(f"resolve_padding: padding must be a non-negative int or pair, got {padding!r}")
    return pair


def patch_shape(
    kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], tile: int
) -> tuple[int, int]:
    """Input patch (t_h, t_w) of a tile×tile output tile; the planes have d = t_h·t_w columns."""
    return tuple((tile - 1) * s + (k - 1) * dl + 1 for k, s, dl in zip(kernel_size, stride, dilation))


def output_shape(
    size: tuple[int, int], kernel_size: tuple[int, int], stride, padding, dilation
) -> tuple[int, int]:
    """(H_out, W_out) of the conv, as ``F.conv2d`` computes it."""
    return tuple(
        (n + 2 * p - dl * (k - 1) - 1) // s + 1
        for n, k, s, p, dl in zip(size, kernel_size, stride, padding, dilation)
    )


def make_planes(L: int, d: int, sparsity: float = 2 / 3, seed: int = 0) -> Tensor:
    """[L, d] float32 ternary hyperplanes: 0 with probability ``sparsity``, else ±1 equally likely.

    Drawn from a CPU ``torch.Generator`` seeded with ``seed`` (the pass uses seed + layer index).
    All-zero rows are kept as drawn (their bit is always 0).
    """
    if not 1 <= L <= MAX_PLANES:
        raise ValueError(f"make_planes: L must be an int in [1, {MAX_PLANES}], got {L!r}")
    if d < 1:
        raise ValueError(f"make_planes: d must be an int >= 1, got {d!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"make_planes: sparsity must be in [0, 1), got {sparsity!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(L, d, generator=generator, dtype=torch.float64)
    planes = torch.zeros(L, d)
    nonzero = u >= sparsity
    planes[nonzero & (u < sparsity + (1.0 - sparsity) / 2)] = 1.0
    planes[nonzero & (u >= sparsity + (1.0 - sparsity) / 2)] = -1.0
    return planes


# ----------------------------------------------------------------------------------------------
# Bucket statistics recording


@dataclass
class HasteStats:
    """Bucket counts one layer used, summed over calls (tiles τ of all samples).

    ``buckets`` = Σ_τ B_τ, ``bucket_pixels`` = Σ_τ B_τ·p_τ, ``pixels`` = Σ_τ p_τ (valid output pixels),
    ``sample_buckets``/``sample_bucket_pixels`` the same two sums per sample, in call order.
    Reduced-conv MACs = out_channels·k_h·k_w·bucket_pixels; dense MACs = out_channels·channels·k_h·k_w·pixels.
    """

    channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    patch: tuple[int, int]
    planes: int
    tile: int
    calls: int = 0
    samples: int = 0
    tiles: int = 0
    buckets: int = 0
    bucket_pixels: int = 0
    pixels: int = 0
    sample_buckets: list[int] = field(default_factory=list)
    sample_bucket_pixels: list[int] = field(default_factory=list)

    @property
    def d(self) -> int:
        return self.patch[0] * self.patch[1]


_ACTIVE_RECORD: contextvars.ContextVar[dict[str, HasteStats] | None] = contextvars.ContextVar(
    "fxslim_haste_record", default=None
)


@contextlib.contextmanager
def record_buckets() -> Iterator[dict[str, HasteStats]]:
    """While active, every haste_conv2d call with a non-empty ``layer`` adds its stats to ``rec[layer]``.

    Works in eager and under torch.compile (the op is opaque, its real kernel runs and reads this
    context). A nested ``record_buckets()`` shadows the outer one until it exits.
    """
    record: dict[str, HasteStats] = {}
    token = _ACTIVE_RECORD.set(record)
    try:
        yield record
    finally:
        _ACTIVE_RECORD.reset(token)


def _record(layer: str, stats: HasteStats, buckets: Tensor, pixels: Tensor) -> None:
    """Add one call's counts; ``buckets`` [N, P] per tile, ``pixels`` [P] valid outputs per tile."""
    record = _ACTIVE_RECORD.get()
    if record is None or not layer:
        return
    entry = record.setdefault(layer, stats)
    constants = ("channels", "out_channels", "kernel_size", "patch", "planes", "tile")
    if any(getattr(entry, name) != getattr(stats, name) for name in constants):
        raise ValueError(
            f"haste_conv2d: layer key {layer!r} was recorded for another conv "
            f"(expected {[getattr(entry, n) for n in constants]}, got {[getattr(stats, n) for n in constants]})"
        )
    per_sample_buckets = buckets.sum(1)
    per_sample_bucket_pixels = (buckets * pixels).sum(1)
    entry.calls += 1
    entry.samples += buckets.shape[0]
    entry.tiles += buckets.numel()
    entry.buckets += int(per_sample_buckets.sum())
    entry.bucket_pixels += int(per_sample_bucket_pixels.sum())
    entry.pixels += int(pixels.sum()) * buckets.shape[0]
    entry.sample_buckets.extend(per_sample_buckets.tolist())
    entry.sample_bucket_pixels.extend(per_sample_bucket_pixels.tolist())


# ----------------------------------------------------------------------------------------------
# Argument checks (real and fake kernel)


def _check_args(x, weight, bias, planes, stride, padding, dilation, tile) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"haste_conv2d: x must have dtype in {_SUPPORTED_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"haste_conv2d: weight and bias must have x's dtype {x.dtype}, got weight {weight.dtype}"
            f"{'' if bias is None else f', bias {bias.dtype}'}"
        )
    if not planes.dtype.is_floating_point:
        raise TypeError(f"haste_conv2d: planes must be a floating tensor, got {planes.dtype}")
    if x.dim() != 4:
        raise ValueError(f"haste_conv2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"haste_conv2d: weight must be [O, C={x.shape[1]}, kh, kw] (groups=1 only), "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"haste_conv2d: bias must be [{weight.shape[0]}] or None, got shape {tuple(bias.shape)}")
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(value) != 2 or any(v < low for v in value):
            raise ValueError(f"haste_conv2d: {name} must be two ints >= {low}, got {list(value)}")
    if tile < 1:
        raise ValueError(f"haste_conv2d: tile must be an int >= 1, got {tile}")
    kernel = tuple(weight.shape[2:])
    out = output_shape(tuple(x.shape[2:]), kernel, stride, padding, dilation)
    if any(o < 1 for o in out):
        raise ValueError(
            f"haste_conv2d: x of spatial size {tuple(x.shape[2:])} is too small for kernel {kernel}, "
            f"padding {list(padding)}, dilation {list(dilation)} (output {out})"
        )
    th, tw = patch_shape(kernel, stride, dilation, tile)
    if planes.dim() != 2 or planes.shape[1] != th * tw or not 1 <= planes.shape[0] <= MAX_PLANES:
        raise ValueError(
            f"haste_conv2d: planes must be [L, d={th * tw}] (patch {th}x{tw}) with 1 <= L <= {MAX_PLANES}, "
            f"got shape {tuple(planes.shape)}"
        )


def _output_memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# The op


@torch.library.custom_op("fxslim::haste_conv2d", mutates_args=(), device_types="cpu", schema=_SCHEMA)
def haste_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    planes: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    tile: int = 4,
    center: bool = True,
    layer: str = "",
) -> Tensor:
    """HASTE conv of x [N, C, H, W] with weight [O, C, kh, kw] -> [N, O, H_out, W_out].

    planes [L, d]: ternary hyperplanes, d = t_h·t_w of ``patch_shape``; padding is numeric (see
    ``resolve_padding``); ``center`` subtracts the per-pixel channel mean before hashing; ``layer``
    is the key for ``record_buckets`` ("" = never recorded).
    """
    _check_args(x, weight, bias, planes, stride, padding, dilation, tile)
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = _haste_conv2d_cpu(
        x.to(compute), weight.to(compute), None if bias is None else bias.to(compute), planes.to(compute),
        tuple(stride), tuple(padding), tuple(dilation), tile, center, layer, _output_memory_format(x),
    )
    return y.to(x.dtype)


@haste_conv2d.register_fake
def _haste_conv2d_fake(x, weight, bias, planes, stride, padding, dilation, tile=4, center=True, layer=""):
    _check_args(x, weight, bias, planes, stride, padding, dilation, tile)
    h_out, w_out = output_shape(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], h_out, w_out)).contiguous(
        memory_format=_output_memory_format(x)
    )


@register_flop_formula(torch.ops.fxslim.haste_conv2d)
def _haste_conv2d_flops(x_shape, w_shape, bias_shape, planes_shape, *args, out_shape, **kwargs) -> int:
    """Dense conv2d FLOPs (2·MACs) of the replaced conv: an input-independent upper bound.

    Ignores: hashing/merging overhead and the data-dependent saving (see ``record_buckets``).
    """
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


# ----------------------------------------------------------------------------------------------
# Vectorised CPU kernel


def _haste_conv2d_cpu(x, weight, bias, planes, stride, padding, dilation, tile, center, layer, memory_format):
    """[N, O, H_out, W_out] in ``memory_format``; see the module docstring for the algorithm."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    h_out, w_out = output_shape((h, w), (kh, kw), stride, padding, dilation)
    th, tw = patch_shape((kh, kw), stride, dilation, tile)
    nth, ntw = math.ceil(h_out / tile), math.ceil(w_out / tile)
    if n == 0:
        return x.new_zeros((0, o, h_out, w_out)).contiguous(memory_format=memory_format)
    patches = _patches(x, (kh, kw), stride, padding, dilation, tile)  # [tiles, th·tw, C]
    codes = _hash_codes(patches, planes, center)  # [tiles, C]
    bucket_count, sizes, by_code, rank = _buckets(codes)
    # Tiles sorted by bucket count, so that a chunk of neighbours pads to a similar B.
    order = bucket_count.argsort(stable=True)
    sums = _bucket_sums(patches, by_code, rank, sizes.shape[1]).index_select(0, order)
    sums = sums.view(-1, th, tw, sizes.shape[1])
    bucket_count, sizes, by_code, rank = (t.index_select(0, order) for t in (bucket_count, sizes, by_code, rank))
    # 1/|b| goes into the filter merge: mean(x_b) ⋆ Σ W_b = Σ x_b ⋆ (Σ W_b / |b|).
    inverse_size = (1.0 / sizes.clamp(min=1).to(x.dtype)).gather(1, rank)  # per channel, code order
    out_sorted = _reduced_conv(
        sums, weight, bias, bucket_count.tolist(), sizes, by_code, inverse_size, stride, dilation, tile
    )
    out_tiles = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
    y = _stitch(out_tiles, n, nth, ntw, tile, (h_out, w_out), memory_format)
    if layer and _ACTIVE_RECORD.get() is not None:
        valid_h = (h_out - torch.arange(nth) * tile).clamp(max=tile)
        valid_w = (w_out - torch.arange(ntw) * tile).clamp(max=tile)
        stats = HasteStats(c, o, (kh, kw), (th, tw), planes.shape[0], tile)
        per_tile = torch.empty_like(bucket_count).scatter_(0, order, bucket_count)
        _record(layer, stats, per_tile.view(n, nth * ntw), (valid_h[:, None] * valid_w).reshape(-1))
    return y


def _patches(x, kernel_size, stride, padding, dilation, tile) -> Tensor:
    """[N·nth·ntw, th·tw, C] every tile's input patch, tiles row-major per sample, channels last.

    A zero canvas holds the padded input cropped to the rows/columns the conv reads, extended to
    whole tiles; tile (i, j) is the th×tw window at (i·T·σ_h, j·T·σ_w), so edge tiles see zeros
    beyond the receptive field of their valid outputs. Channels last keeps the copy's runs long.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    h_out, w_out = output_shape((h, w), kernel_size, stride, padding, dilation)
    th, tw = patch_shape(kernel_size, stride, dilation, tile)
    nth, ntw = math.ceil(h_out / tile), math.ceil(w_out / tile)
    used_h, used_w = (h_out - 1) * sh + (kh - 1) * dh + 1, (w_out - 1) * sw + (kw - 1) * dw + 1
    rows, cols = max(0, min(h, used_h - ph)), max(0, min(w, used_w - pw))
    ch, cw = (nth - 1) * tile * sh + th, (ntw - 1) * tile * sw + tw
    canvas = x.new_zeros((n, ch, cw, c))
    canvas[:, ph : ph + rows, pw : pw + cols] = x[:, :, :rows, :cols].permute(0, 2, 3, 1)
    windows = canvas.as_strided(
        (n, nth, ntw, th, tw, c), (ch * cw * c, tile * sh * cw * c, tile * sw * c, cw * c, c, 1)
    )
    return windows.reshape(n * nth * ntw, th * tw, c)


def _hash_codes(patches: Tensor, planes: Tensor, center: bool) -> Tensor:
    """[tiles, C] int64 codes: bit l = 1[<z, r_l> > 0], z a channel's (centred) patch.

    Centring after projecting equals centring before (linearity) and touches L instead of d values.
    """
    proj = torch.matmul(planes, patches)  # [L, d] @ [tiles, d, C] -> [tiles, L, C]
    if center:
        proj -= proj.mean(dim=2, keepdim=True)
    # Pack the bits with a matmul against 2^l: exact in float32 up to 24 bits, float64 up to 53.
    dtype = torch.float32 if planes.shape[0] <= 24 else torch.float64
    powers = torch.full((planes.shape[0],), 2.0, dtype=dtype).pow(torch.arange(planes.shape[0]))
    return torch.matmul(powers, (proj > 0).to(dtype)).to(torch.int64)  # [L] @ [tiles, L, C] -> [tiles, C]


def _buckets(codes: Tensor):
    """Group equal codes per tile.

    Returns B per tile [tiles], bucket sizes [tiles, B_max], channels sorted by code [tiles, C]
    (each bucket's channels contiguous, buckets in id order) and the bucket id in that order.
    """
    sorted_codes, by_code = codes.sort(dim=1)
    rank = torch.zeros_like(sorted_codes)  # +1 wherever the code changes
    rank[:, 1:] = (sorted_codes[:, 1:] != sorted_codes[:, :-1]).cumsum(1)
    bucket_count = rank[:, -1] + 1
    sizes = torch.zeros((codes.shape[0], int(bucket_count.max())), dtype=torch.int64)
    sizes.scatter_add_(1, rank, torch.ones_like(rank))
    return bucket_count, sizes, by_code, rank


def _bucket_sums(patches: Tensor, by_code: Tensor, rank: Tensor, b_max: int) -> Tensor:
    """[tiles, th·tw, b_max] sums of the raw patches [tiles, th·tw, C] per bucket (columns past B zero)."""
    tiles, d, c = patches.shape
    bucket = torch.empty_like(rank).scatter_(1, by_code, rank)  # bucket id of each channel
    return patches.new_zeros((tiles, d, b_max)).scatter_add_(2, bucket[:, None, :].expand(tiles, d, c), patches)


def _reduced_conv(sums, weight, bias, counts, sizes, by_code, inverse_size, stride, dilation, tile) -> Tensor:
    """[tiles, T·T, O] conv of each tile's B merged channels with its B merged filters (+ bias).

    Per tile:  y [p, O] = bias + im2col(S) [p, B·k²] @ W̃ [B·k², O],  W̃_b = Σ_{c in b} W_c / |b|,
    S_b the bucket sums. W̃ comes from a sparse [B, C] assignment times W (O·k²·C multiply-adds).
    Tiles go in chunks (padded to the chunk's largest B) and output channels in blocks, so the W̃
    of one step stays cache-sized.
    """
    tiles, th, tw, b_max = sums.shape
    o, c, kh, kw = weight.shape
    (sh, sw), (dh, dw), k2, p = stride, dilation, kh * kw, tile * tile
    o_block = min(o, _OUT_BLOCK)
    w_blocks = [  # [C, k²·o_block] rows of W, one matrix per output block
        weight[o0 : o0 + o_block].permute(1, 2, 3, 0).reshape(c, -1) for o0 in range(0, o, o_block)
    ]
    out = sums.new_empty((tiles, p, o))
    buffer = sums.new_empty(max(_CHUNK_ELEMENTS, b_max * k2 * o_block))
    start = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        while start < tiles:
            stop = start + 1
            while stop < tiles and (stop + 1 - start) * counts[stop] * k2 * o_block <= _CHUNK_ELEMENTS:
                stop += 1
            m, b = stop - start, counts[stop - 1]
            crow = torch.zeros(m * b + 1, dtype=torch.int64)
            crow[1:] = sizes[start:stop, :b].reshape(-1).cumsum(0)
            assign = torch.sparse_csr_tensor(
                crow, by_code[start:stop].reshape(-1), inverse_size[start:stop].reshape(-1), (m * b, c),
                check_invariants=False,
            )
            # im2col of the first b bucket sums, [m, p, b·k²]: one strided copy per kernel offset
            # reads runs of b contiguous values (a single gather over all offsets reads 1 at a time).
            cols = sums.new_empty((m, tile, tile, b, kh, kw))
            for i in range(kh):
                for j in range(kw):
                    rows_ = slice(i * dh, i * dh + (tile - 1) * sh + 1, sh)
                    cols_ = slice(j * dw, j * dw + (tile - 1) * sw + 1, sw)
                    cols[..., i, j] = sums[start:stop, rows_, cols_, :b]
            cols = cols.view(m, p, b * k2)
            for block, w_rows in enumerate(w_blocks):
                # addmm into a buffer: torch.sparse.mm zero-fills and copies its result (~30x slower).
                merged_w = buffer[: m * b * w_rows.shape[1]].view(m * b, -1)
                torch.addmm(merged_w, assign, w_rows, beta=0, out=merged_w)
                merged_w = merged_w.view(m, b * k2, -1)
                o0, o1 = block * o_block, block * o_block + merged_w.shape[2]
                target = out[start:stop] if len(w_blocks) == 1 else out.new_empty((m, p, o1 - o0))
                if bias is None:
                    torch.bmm(cols, merged_w, out=target)
                else:
                    torch.baddbmm(bias[o0:o1].view(1, 1, -1), cols, merged_w, out=target)
                if len(w_blocks) > 1:
                    out[start:stop, :, o0:o1] = target
            start = stop
    return out


def _stitch(out_tiles, n, nth, ntw, tile, size, memory_format) -> Tensor:
    """Tiles [N·nth·ntw, T·T, O] -> [N, O, H_out, W_out] in ``memory_format``."""
    o = out_tiles.shape[2]
    full = out_tiles.new_empty((n, o, nth * tile, ntw * tile)).contiguous(memory_format=memory_format)
    grid = full.unflatten(3, (ntw, tile)).unflatten(2, (nth, tile))  # [N, O, nth, T, ntw, T] view
    grid.copy_(out_tiles.view(n, nth, ntw, tile, tile, o).permute(0, 5, 1, 3, 2, 4))
    if tuple(full.shape[2:]) == tuple(size):
        return full
    return full[:, :, : size[0], : size[1]].clone(memory_format=memory_format)
