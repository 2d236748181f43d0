"""Storage helpers: bits per format and the real size of a saved state dict.

The per-layer storage of a report (``CostRow.storage_bits``) is Σ params × bits of their format +
per-output-channel scales of quantized weights at ``Conventions.metadata_bits``; ternary weights
take ``Conventions.ternary_packing`` bits each: "2bit" (four per byte, default), "base3" (five per
byte, 1.6 bit), "log2_3" (the entropy bound, 1.585 bit), "nibble" (4 bit) or "int8" (containers).
``state_dict_bytes`` gives the size of what ``torch.save`` actually writes, to put beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxslim.cost_model.conventions import PACKINGS, format_bits

__all__ = ["state_dict_bytes", "format_bits", "PACKINGS"]


def state_dict_bytes(obj: nn.Module | Mapping[str, Any]) -> int:
    """Bytes ``torch.save`` writes for a module's state dict (or a state dict), container overhead
    included; counted as they are written, not kept (a model of gigabytes needs no copy)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"state_dict_bytes: expected an nn.Module or a state dict, got {type(obj).__name__}")
    sink = _ByteCount()
    torch.save(obj, sink)
    return sink.count


class _ByteCount:
    """A file that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size

    def flush(self) -> None:
        pass
