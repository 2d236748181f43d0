"""HTTM's native kernels (``native/httm_best.c``, ``native/httm_argmax.c``, ``native/httm_merge.c``) behind
tensor-level calls.

Each function returns None (or False) where its kernel cannot run (no C compiler,
``FXSLIM_NATIVE=0``, inside ``native_kernels.disabled()``, a tensor that is not float32 on the CPU),
and the caller takes its ATen path: the same values (sums in the same order; matching choices equal
up to float32 rounding, as between two float32 GEMMs).
Measured at 32 frames x 261 tokens, 16 heads x 64, 1 thread: group sums 2.8 ms where index_add_
takes 7.4, a row gather 3 ms where index_select takes 14; float32 matching of the keys (70 % removed,
blocks) 58 ms where the chunked GEMM and max take 127 (side by side).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fxslim.runtime import native_kernels

__all__ = ["Screen", "bf16_screen", "bf16_margins", "matching_kernel_runs", "best_destinations", "group_sums",
           "deviations", "gather_rows", "status"]

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def status() -> str:
    """Which kernels run here, in words (for benchmark records)."""
    if _screen() is not None:
        screen = "bfloat16 screening on"
    elif native_kernels.load("httm_argmax") is not None and _argmax_vectorized():
        screen = "bfloat16 screening off (float32 matching, GEMM and argmax in one kernel)"
    else:
        screen = "bfloat16 screening off (float32 matching on ATen's GEMM)"
    merge = "merge kernels on" if native_kernels.load("httm_merge") is not None else (
        f"merge kernels off ({native_kernels.unavailable_reason('httm_merge')})")
    return f"{screen}, {merge}"


@dataclass(frozen=True)
class Screen:
    """The kernels of bfloat16 screening: ``gather_destinations(...)``, ``gather_sources(...)`` and
    ``best_destinations(...)`` (signatures in native/httm_best.c)."""

    gather_destinations: object
    gather_sources: object
    best_destinations: object


def bf16_screen() -> Screen | None:
    """The screening kernels where this CPU has bfloat16 dot-product instructions (AVX512-BF16 or
    AMX), which make ATen's bfloat16 GEMM about 4x its float32 one; else None."""
    return _screen() if native_kernels.active() else None


@functools.cache
def _screen() -> Screen | None:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    if not {"avx512_bf16", "amx_bf16"} & flags:
        return None
    kernels = (native_kernels.function("httm_best", "httm_gather_destinations", _I64, _PTR, _PTR, _I64, _I64, _F32,
                                       _PTR, _PTR, _PTR),
               native_kernels.function("httm_best", "httm_gather_sources", _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR,
                                       _PTR),
               native_kernels.function("httm_best", "httm_best_destinations", _I64, _PTR, _I64, _I64, _I64, _PTR,
                                       _PTR, _PTR, _PTR, _PTR, _PTR, _F32, _I64, _F32, _F32, _F32, _PTR, _I64))
    return None if None in kernels else Screen(*kernels)


def bf16_margins(d: int) -> tuple[float, float, float]:
    """(gamma, out_rel, abs_margin): the constants of the screening margin that
    ``httm_best_destinations`` makes per row from the measured bfloat16 rounding errors of the
    source and of the destinations (its comment in native/httm_best.c derives it).

    gamma = d 2^-24 / (1 - d 2^-24) bounds the relative error of a float32 sum of d products (for
    d < 2^20: ``httm_match`` screens no longer rows);
    out_rel = u / (1 - u), u = 2^-8, the relative error of rounding a score to bfloat16; abs_margin
    covers the products and inputs that bfloat16 dot products flush to zero as denormals: d + √d
    terms below 2^-126 per score, twice (two scores are compared), with 1 % slack."""
    u = 2.0 ** -8
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    return gamma, u / (1 - u), 1.01 * 2 * (d + d ** 0.5) * 2.0 ** -126


def matching_kernel_runs(x: Tensor) -> bool:
    """Whether ``best_destinations`` runs, and is the faster way, on features ``x``: float32 on the CPU,
    kernels on and built with their AVX-512 form (the plain C form took 6.7 s where ATen's GEMM and max
    take 0.68, matching 32 frames on an AVX2 CPU: there httm.py takes those)."""
    return _kernel("best_f32", None, x) is not None and _argmax_vectorized()


@functools.cache
def _argmax_vectorized() -> bool:
    fn = native_kernels.function("httm_argmax", "httm_argmax_vectorized", ctypes.c_int)
    return fn is not None and bool(fn())


def best_destinations(x: Tensor, src_rows: Tensor, dst: Tensor, best: Tensor) -> bool:
    """best[p, s] = argmax over c of x[src_rows[p, s]] · dst[p, c] for float32 x [R, d] and dst [P, D, d]
    (both contiguous), int64 ``src_rows`` [P, S] and ``best`` [P, S] (contiguous): the first maximal
    destination, a NaN score never chosen (as torch.max after nan_to_num(nan=-inf)), each score a float32
    sum in feature order. False (and nothing written) where the kernel cannot run."""
    fn = _kernel("best_f32", src_rows, x, dst) if src_rows.dtype == best.dtype == torch.int64 else None
    if fn is None or not all(t.is_contiguous() for t in (x, src_rows, dst, best)):
        return False
    pairs, sources = src_rows.shape
    if dst.dim() != 3 or dst.shape[0] != pairs or dst.shape[2] != x.shape[-1] or best.shape != src_rows.shape:
        raise ValueError(f"httm matching: expected dst [{pairs}, D, {x.shape[-1]}] and best {tuple(src_rows.shape)}, "
                         f"got dst {tuple(dst.shape)} and best {tuple(best.shape)}")
    result = fn(x.data_ptr(), x.shape[0], src_rows.data_ptr(), pairs, sources, dst.data_ptr(), dst.shape[1],
                x.shape[-1], best.data_ptr())
    if result == -2:
        raise MemoryError("httm matching: out of memory for a tile of sources")
    _checked(result, src_rows.view(-1), x.shape[0], "httm matching")
    return True


_MERGE = {"group_sums": (_PTR, _PTR, _I64, _I64, _PTR, _I64, _I64),
          "deviations": (_PTR, _PTR, _I64, _I64, _PTR, _I64, _PTR),
          "gather_rows": (_PTR, _I64, _PTR, _I64, _I64, _PTR),
          "best_f32": (_PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR)}
_LIBRARY = {"best_f32": "httm_argmax"}  # kernels that are not in native/httm_merge.c


def _kernel(kernel: str, index: Tensor | None, *tensors: Tensor):
    """``httm_<kernel>`` (from native/httm_merge.c, or the file ``_LIBRARY`` names) where it runs on
    these tensors (int64 indices, float32 CPU tensors, kernels not disabled), else None. ``index`` None:
    whatever indices the call will be given."""
    floats = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
    if native_kernels.active() and (index is None or index.dtype == torch.int64) and floats:
        return native_kernels.function(_LIBRARY.get(kernel, "httm_merge"), f"httm_{kernel}", _I64, *_MERGE[kernel])
    return None


def _checked(bad: int, index: Tensor, limit: int, what: str) -> None:
    if bad >= 0:
        raise IndexError(f"{what}: index {int(index[bad])} at position {bad} is out of range for {limit} rows")


def group_sums(x: Tensor, groups: Tensor, out: Tensor, segments: int = 1) -> bool:
    """Adds the rows of x [R, d] (float32) into ``out`` [rows, d] (contiguous) at ``groups`` [R];
    False (and nothing added) where the kernel cannot run. With ``segments`` > 1 the rows are that
    many equal runs and run s adds only into the s-th equal run of ``out``'s rows (raises otherwise):
    the runs are summed on separate threads, to the same floats."""
    fn = _kernel("group_sums", groups, x, out)
    if fn is None or not out.is_contiguous():
        return False
    if segments < 1 or x.shape[0] % segments or out.shape[0] % segments:
        raise ValueError(f"httm group sums: segments must divide both {x.shape[0]} rows and {out.shape[0]} groups, "
                         f"got {segments}")
    x, groups = x.contiguous(), groups.contiguous()
    _checked(fn(x.data_ptr(), groups.data_ptr(), x.shape[0], x.shape[-1], out.data_ptr(), out.shape[0], segments),
             groups, out.shape[0], "httm group sums")
    return True


def deviations(x: Tensor, groups: Tensor, means: Tensor) -> Tensor | None:
    """|x[i] - means[groups[i]]| for the rows of x [R, d] (float32) -> [R]."""
    fn = _kernel("deviations", groups, x, means)
    if fn is None:
        return None
    x, groups, means = x.contiguous(), groups.contiguous(), means.contiguous()
    out = torch.empty(x.shape[0])
    _checked(fn(x.data_ptr(), groups.data_ptr(), x.shape[0], x.shape[-1], means.data_ptr(), means.shape[0],
                out.data_ptr()), groups, means.shape[0], "httm deviations")
    return out


def gather_rows(table: Tensor, index: Tensor, out: Tensor) -> bool:
    """out[:] = table[index] for a float32 table [T, d] and ``out`` [len(index), d] (contiguous): index_select
    on dim 0; False (and nothing written) where the kernel cannot run."""
    fn = _kernel("gather_rows", index, table, out)
    if fn is None or not out.is_contiguous():
        return False
    table, index = table.contiguous(), index.contiguous()
    _checked(fn(table.data_ptr(), table.shape[0], index.data_ptr(), index.shape[0], table.shape[-1], out.data_ptr()),
             index, table.shape[0], "httm gather")
    return True
