"""What the PROM oneDNN tests need from the CPU, and a way to run the AVX2 branch on any CPU.

oneDNN's AVX2 int8 kernels add pairs of u8·s8 products in saturating int16, so 8-bit dense convs
are lowered to oneDNN only with VNNI/AMX (``prom_onednn.exact_sums``); elsewhere the ops sum them in
float. ``pretend_no_vnni`` takes that branch on a VNNI CPU too.
"""

from __future__ import annotations

import pytest

from fxslim.runtime import prom_onednn
from fxslim.runtime.prom import _WeightCache

__all__ = ["vnni_only", "pretend_no_vnni"]

vnni_only = pytest.mark.skipif(not prom_onednn.vnni_available(),
                               reason="8-bit dense convs on oneDNN: exact only with VNNI/AMX")


def pretend_no_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """For one test, a CPU without VNNI. The runtime's weight cache is swapped too: its verdicts
    (``exact_sums``) and packed forms are cached on weight tensors, and a model shared between tests
    (a module-scoped fixture) would otherwise keep this test's AVX2 verdicts in the tests after it."""
    monkeypatch.setattr(prom_onednn, "vnni_available", lambda: False)
    monkeypatch.setattr(prom_onednn, "_CACHE", _WeightCache())
