"""HTTM's float32 matching kernel (native/httm_argmax.c): each source's best destination as a float32
GEMM followed by torch.max would choose it, ties and NaN included, on every tail of its tiles."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxslim.runtime.httm as httm_module
from fxslim.runtime import httm_native, native_kernels
from fxslim.runtime.httm import httm_layout, httm_match

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(native_kernels.load("httm_argmax") is None,
                                 reason=f"no native kernels: {native_kernels.unavailable_reason('httm_argmax')}")]


def _reference(x: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """httm.py's ATen path: a float32 GEMM, NaN scores cleaned to -inf, the first maximal index."""
    scores = torch.bmm(x[src_rows], dst.transpose(1, 2))
    return scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).max(dim=-1).indices


def _kernel(x: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    best = torch.full(src_rows.shape, -7, dtype=torch.long)
    assert httm_native.best_destinations(x, src_rows, dst, best)
    return best


def _case(pairs: int, sources: int, destinations: int, d: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(pairs * sources + 5, d, generator=g) * scale
    src_rows = torch.randperm(x.shape[0], generator=g)[: pairs * sources].view(pairs, sources)
    dst = F.normalize(torch.randn(pairs, destinations, d, generator=g), dim=-1)
    return x, src_rows, dst


@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(1, 3), sources=st.integers(1, 110), destinations=st.integers(1, 30),
       d=st.sampled_from([1, 3, 16, 64, 100]), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
       seed=st.integers(0, 2**16))
def test_choices_equal_the_float32_gemm_and_max(pairs, sources, destinations, d, scale, seed):
    # sources past a 48-row tile and destinations past an 8-column group leave tails of every size
    x, src_rows, dst = _case(pairs, sources, destinations, d, scale, seed)
    native, reference = _kernel(x, src_rows, dst), _reference(x, src_rows, dst)
    assert bool(((native >= 0) & (native < destinations)).all())
    differ = native != reference
    # a choice may differ only where float32 cannot tell the two destinations apart
    exact = torch.bmm(x[src_rows].double(), dst.double().transpose(1, 2))
    gap = (exact.gather(2, native.unsqueeze(-1)) - exact.gather(2, reference.unsqueeze(-1))).abs().squeeze(-1)
    norms = x[src_rows].double().norm(dim=-1)
    assert bool((gap[differ] <= 1e-5 * norms[differ] + 1e-300).all()), (int(differ.sum()), gap.max())


def test_ties_nan_and_infinities_as_torch_max():
    g = torch.Generator().manual_seed(3)
    x, src_rows, dst = _case(2, 60, 21, 16, 1.0, 3)
    dst[0, 9:] = dst[0, 4]  # exact ties: every score of columns 4, 9, 10, ... is the same float
    x[src_rows[0, :20]] = dst[0, 4] * 2
    dst[1, 3] = math.nan  # a NaN destination is never chosen
    x[src_rows[1, 0]] = math.nan  # every score NaN: destination 0
    x[src_rows[1, 1]] = 0.0  # every score 0: the first
    x[src_rows[1, 2], 0] = math.inf  # +inf and -inf scores, NaN where a feature of dst is 0
    x[src_rows[1, 3]] = torch.randn(16, generator=g) * 1e38  # scores that overflow to +-inf
    native = _kernel(x, src_rows, dst)
    assert torch.equal(native, _reference(x, src_rows, dst))
    assert bool((native[0, :20] == 4).all()) and not bool((native[1] == 3).any())
    assert int(native[1, 0]) == 0 and int(native[1, 1]) == 0


def test_an_index_out_of_range_is_named_and_nothing_is_written():
    x, src_rows, dst = _case(2, 10, 5, 8, 1.0, 0)
    src_rows[1, 4] = x.shape[0]
    best = torch.full(src_rows.shape, -7, dtype=torch.long)
    with pytest.raises(IndexError, match=f"index {x.shape[0]} at position 14"):
        httm_native.best_destinations(x, src_rows, dst, best)
    assert bool((best == -7).all())
    with pytest.raises(ValueError, match="expected dst"):
        httm_native.best_destinations(x, src_rows[:, :3].contiguous(), dst[:1], best[:, :3].contiguous())


def test_no_kernel_for_other_dtypes_or_layouts():
    x, src_rows, dst = _case(1, 10, 5, 8, 1.0, 0)
    best = torch.empty(src_rows.shape, dtype=torch.long)
    assert not httm_native.best_destinations(x.double(), src_rows, dst.double(), best)
    assert not httm_native.best_destinations(x, src_rows, dst.transpose(1, 2).contiguous().transpose(1, 2), best)
    with native_kernels.disabled():
        assert not httm_native.matching_kernel_runs(x)
        assert not httm_native.best_destinations(x, src_rows, dst, best)


def test_portable_form_chooses_like_the_vector_form(tmp_path):
    # both sum each score's products in feature order with fused multiply-adds: the same floats, so
    # the same choices, ties included
    source = native_kernels._SOURCES / "httm_argmax.c"
    portable = tmp_path / "portable.so"
    subprocess.run([shutil.which("cc"), "-O2", "-march=x86-64", "-fPIC", "-shared", "-std=c11", "-o", str(portable),
                    str(source), "-lm"], check=True)
    fn = ctypes.CDLL(str(portable)).httm_best_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes, fn.restype = [ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr], i64
    x, src_rows, dst = _case(3, 101, 29, 64, 1.0, 11)
    dst[2, 20:] = dst[2, 1]
    x[src_rows[2, :30]] = dst[2, 1] + 1e-7
    best = torch.empty(src_rows.shape, dtype=torch.long)
    assert fn(x.data_ptr(), x.shape[0], src_rows.data_ptr(), 3, 101, dst.data_ptr(), 29, 64, best.data_ptr()) == -1
    assert torch.equal(best, _kernel(x, src_rows, dst))


def test_matching_through_the_kernel_equals_the_aten_path(monkeypatch):
    # also the kernel's plain C form, which httm.py leaves for ATen's GEMM on CPUs without AVX-512 (it is slower)
    monkeypatch.setattr(httm_native, "_argmax_vectorized", lambda: True)
    g = torch.Generator().manual_seed(2)
    frames, p = 6, 5 + 150
    x = torch.randn(1, 3, frames * p, 64, generator=g)
    x[0, 1, 40] = math.nan  # a non-finite feature: the ATen path cleans its scores
    for ratio in (0.3, 0.9):
        layout = httm_layout(frames, p, 5, ratio, 64, 4)
        rows = x.view(3, frames * p, 64)
        native = layout.base_slot.expand(3, -1).clone()
        reference = native.clone()
        for cls in layout.classes:
            assert httm_module._match_class_native(rows, cls, native)
            httm_module._match_class(rows, cls, reference, True)
        assert torch.equal(native, reference)
        if httm_native.bf16_screen() is None:  # then httm_match itself runs the kernel
            assert torch.equal(httm_match(x, layout).view(3, -1), native)


def test_matching_takes_the_kernel_only_in_its_vector_form(monkeypatch):
    x = torch.randn(10, 64)
    monkeypatch.setattr(httm_native, "_argmax_vectorized", lambda: False)
    assert not httm_native.matching_kernel_runs(x)
    monkeypatch.setattr(httm_native, "_argmax_vectorized", lambda: True)
    assert httm_native.matching_kernel_runs(x)
