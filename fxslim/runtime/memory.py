"""CPU memory for an op's big temporaries, without a page fault per 4 KB on every call.

A tensor of more than a few MB freshly allocated on the CPU is fresh memory from the kernel, and
the first write to each 4 KB page of it is a page fault: at 32 frames HTTM's temporaries (scores,
gathered rows, merged tables: about 80 MB per call) cost 15-20 ms in faults, as much as all the
arithmetic on them.

``scratch`` gives per-thread buffers reused by the next call on the same thread, so their pages are
touched once per thread; only for temporaries that never leave the op.

An op's output stays an ordinary ``torch.empty``. Backing it with 2 MB pages (transparent huge
pages, ``madvise``) made HTTM's op 1.5 % faster at 32 frames on its own, but after a workload that
allocated and freed a few GB its huge-page faults turned slow: in section 5 of
benchmarks.httm_speed, after the whole-model section, the op took 264-394 ms per round (slow in 5
of 7 runs) where it takes 260-265 ms on 4 KB pages, so it is not done.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["scratch", "release"]

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A contiguous uninitialised ``shape`` tensor of ``dtype`` on the CPU, reused by the next request
    for ``name`` on this thread (whose data it then shares: one name per live temporary)."""
    numel = math.prod(shape)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(name, dtype)] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel].view(shape)


def release() -> None:
    """Free this thread's scratch buffers (they are made again on the next request)."""
    _local.buffers = {}
