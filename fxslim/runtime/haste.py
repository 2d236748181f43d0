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
- Codes are computed with NaN and ±inf input values taken as 0: one would make the channel mean,
  so every channel's code, the same, and the whole tile one bucket (finite outputs beside a NaN
  pixel 1.3 off at the exact limit). The bucket means keep them, so they reach the outputs the
  dense conv's reach.
- Inputs of dtype float16/bfloat16 are computed in float32 (hash, merge, conv) and the result is
  cast back; float32 and float64 compute in their own dtype.
- The output is channels_last when ``x`` is channels_last (and not also NCHW-contiguous), else
  contiguous, like ``F.conv2d``.
- Real kernel for CPU only; fake/meta tensors (tracing, export) work on any device.

The kernel (``fxslim.runtime.haste_kernel``) computes the reduced conv for real, never a dense conv
on bucket means: codes by projecting each channel's window on the planes, buckets by sorting the
codes of each tile, then bucket means, merged filters (O·k²·C additions per tile) and the reduced
convs. Where a C compiler is there and the dtype is float32 every step runs in the native kernels
(``haste_native``; merged filters only in registers); otherwise codes come from one matmul with the
planes and the rest from sparse segment sums and batched matmuls over chunks of tiles with similar
bucket counts.
``record_buckets()`` collects per-layer bucket statistics from the running kernel, for measured
FLOPs. FlopCounterMode counts the dense conv FLOPs (an upper bound of the reduced conv alone; the
HASTE work depends on the data, see ``record_buckets``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fxslim.runtime.autocast_kernels import autocast_off, register_autocast
from fxslim.runtime.haste_kernel import haste_conv2d_into

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
    if weight.shape[0] < 1 or weight.shape[1] < 1:  # nothing to hash or merge (the kernel cannot cut 0 rows)
        raise ValueError(
            f"haste_conv2d: weight must have at least one output and one input channel, got shape {tuple(weight.shape)}"
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
    is the key for ``record_buckets`` ("" = never recorded). A call with a 1×1 output map runs the
    dense conv: one pixel per sample has nothing to save (HASTE.md) and little to hash.
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


def _haste_conv2d_autocast_cpu(_keyset, x, weight, bias, *rest):
    """Under ``torch.autocast("cpu")`` the op casts x, weight and bias like ``conv2d`` (every floating
    dtype but float64 to the autocast dtype). Taken as they came, a rewritten model raised "weight and
    bias must have x's dtype" (x already cast by the ops before it, the weights float32 or float16)
    where the model ran."""
    dtype = torch.get_autocast_dtype("cpu")

    def cast(t: Tensor | None) -> Tensor | None:
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    with autocast_off():
        return torch.ops.fxslim.haste_conv2d.default(cast(x), cast(weight), cast(bias), *rest)


register_autocast("haste_conv2d", _haste_conv2d_autocast_cpu)


# ----------------------------------------------------------------------------------------------
# CPU kernel wrapper (the kernel itself: fxslim.runtime.haste_kernel)


def _haste_conv2d_cpu(x, weight, bias, planes, stride, padding, dilation, tile, center, layer, memory_format):
    """[N, O, H_out, W_out] in ``memory_format``; see ``fxslim.runtime.haste_kernel`` for the algorithm."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    h_out, w_out = output_shape((h, w), (kh, kw), stride, padding, dilation)
    y = torch.empty((n, o, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=memory_format)
    if n == 0:
        return y.zero_()
    if h_out * w_out == 1:
        # one output pixel: merging the filters costs what merging the channels saves, and a 1x1 conv's
        # one-pixel patch hashes the channels into two buckets whatever L; the dense conv is exact and no dearer
        y.copy_(F.conv2d(x, weight, bias, stride, padding, dilation))
        buckets = torch.full((n, 1), c, dtype=torch.int64)
    else:
        buckets = haste_conv2d_into(x, weight, bias, planes, stride, padding, dilation, tile, center, y)
    if layer and _ACTIVE_RECORD.get() is not None:
        nth, ntw = -(-h_out // tile), -(-w_out // tile)
        valid_h = (h_out - torch.arange(nth) * tile).clamp(max=tile)
        valid_w = (w_out - torch.arange(ntw) * tile).clamp(max=tile)
        stats = HasteStats(c, o, (kh, kw), patch_shape((kh, kw), stride, dilation, tile), planes.shape[0], tile)
        _record(layer, stats, buckets, (valid_h[:, None] * valid_w).reshape(-1))
    return y
