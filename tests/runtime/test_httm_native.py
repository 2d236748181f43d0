"""HTTM's native kernels: the bfloat16 screening picks float32's choices, merges equal ATen's, and
every path without the kernels gives the same plans and outputs."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxslim.runtime.httm as httm_module
from fxslim.runtime import httm_native, memory, native_kernels
from fxslim.runtime.httm import httm_apply_plan, httm_layout, httm_match, httm_plan

pytestmark = pytest.mark.usefixtures("one_thread")
_MATCH_CLASS = httm_module._match_class
_MATCH_CLASS_NATIVE = httm_module._match_class_native

screen_only = pytest.mark.skipif(httm_native.bf16_screen() is None,
                                 reason="no bfloat16 screening here (no AVX512-BF16/AMX or no C compiler)")
merge_only = pytest.mark.skipif(native_kernels.load("httm_merge") is None,
                                reason=f"no native merge kernels: {native_kernels.unavailable_reason('httm_merge')}")


@pytest.fixture
def without_kernels():
    """Call it to run the ATen paths (no screening, no merge kernels) for the rest of the test."""
    stack = contextlib.ExitStack()
    yield lambda: stack.enter_context(native_kernels.disabled())
    stack.close()


def _match_both(x, layout, without_kernels):
    native = httm_match(x, layout)
    without_kernels()
    return native, httm_match(x, layout)


def _argmax_float64(x: torch.Tensor, layout, slots: torch.Tensor) -> torch.Tensor:
    """The exact (float64) similarity of each token to the destination its slot names."""
    x64 = x.double()
    dest_token = torch.full((layout.num_slots,), -1, dtype=torch.long)
    dest_token[layout.base_slot[layout.base_slot >= 0]] = torch.nonzero(layout.base_slot >= 0).flatten()
    b, h, n, _ = x.shape
    chosen = x64.gather(2, dest_token[slots].unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    return (x64 * torch.nn.functional.normalize(chosen, dim=-1)).sum(-1)


@screen_only
@settings(max_examples=25, deadline=None)
@given(frames=st.integers(2, 6), patches=st.integers(2, 70), d=st.sampled_from([3, 8, 16, 64, 100]),
       ratio=st.sampled_from([0.3, 0.5, 0.9]), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
       seed=st.integers(0, 2**16))
def test_screened_matching_equals_float32_matching(frames, patches, d, ratio, scale, seed):
    # random features at any scale, destinations counts that leave partial 32-column vectors
    g = torch.Generator().manual_seed(seed)
    p = 5 + patches
    x = torch.randn(1, 2, frames * p, d, generator=g) * scale
    layout = httm_layout(frames, p, 5, ratio, 64, 4)
    native = httm_match(x, layout)
    with native_kernels.disabled():
        reference = httm_match(x, layout)
    differ = native != reference
    # a choice may differ only where float32 cannot tell the two destinations apart
    exact_native, exact_reference = _argmax_float64(x, layout, native), _argmax_float64(x, layout, reference)
    gap = (exact_native - exact_reference).abs()[differ]
    norms = x.double().norm(dim=-1)[differ]
    assert bool((gap <= 1e-5 * norms + 1e-300).all()), (int(differ.sum()), gap.max())


@screen_only
@pytest.mark.parametrize("case", ["duplicates", "bfloat16_ties", "negative", "many_near_ties", "tail"])
def test_screened_matching_on_near_ties(case, without_kernels):
    g = torch.Generator().manual_seed(1)
    frames, p, d = 4, 5 + 96, 16
    base = torch.randn(1, 1, frames * p, d, generator=g)
    if case == "duplicates":  # every token one of three vectors: exact ties, the first destination wins
        x = torch.randn(3, d, generator=g)[torch.randint(0, 3, (frames * p,), generator=g)].view(1, 1, -1, d)
    elif case == "bfloat16_ties":  # destinations equal in bfloat16, different in float32
        x = torch.ones(1, 1, frames * p, d) + torch.randint(-3, 4, (1, 1, frames * p, d), generator=g) * 2.0 ** -12
    elif case == "negative":  # every source opposite to every destination: rows of negative scores only
        sign = torch.where(httm_layout(frames, p, 5, 0.3, 96, 4).base_slot >= 0, -1.0, 1.0)
        x = sign.view(1, 1, -1, 1) + base * 1e-3
    elif case == "many_near_ties":  # more candidates than the kernel's list holds
        x = torch.ones(1, 1, frames * p, d) + base * 1e-4
    else:  # 96 patches, ratio 0.3: 70 destinations per block, 2 full vectors and a tail of 6
        x = base
    layout = httm_layout(frames, p, 5, 0.3, 96, 4)
    native, reference = _match_both(x, layout, without_kernels)
    differ = native != reference
    gap = (_argmax_float64(x, layout, native) - _argmax_float64(x, layout, reference)).abs()[differ]
    assert bool((gap <= 1e-5 * x.double().norm(dim=-1)[differ]).all())
    if case == "duplicates":
        assert torch.equal(native, reference)


def _score_error_bound(src: torch.Tensor, dst: torch.Tensor, screened: torch.Tensor) -> torch.Tensor:
    """The per-score error bound of httm_best_destinations' margin (before its factor 2 and slack):
    E + out_rel |score| from the measured rounding errors of float32 sources and unit destinations."""
    gamma, out_rel, _ = httm_native.bf16_margins(src.shape[-1])
    norm = src.double().norm(dim=-1, keepdim=True)
    err = (src.bfloat16().double() - src.double()).norm(dim=-1, keepdim=True)
    dst_err = (dst.bfloat16().double() - dst.double()).norm(dim=-1).max()
    unit = 1 + gamma + 2.0 ** -22
    e = err * unit + (norm + err) * dst_err + gamma * (norm + err) * (unit + dst_err) + gamma * norm
    return e + out_rel * screened.abs()


@pytest.mark.parametrize("case", ["random", "largest_rounding", "aligned"])
def test_screening_margin_covers_bfloat16_error(case):
    # the documented bound against the measured error of ATen's bfloat16 GEMM (the screen's), on
    # random features, on features that all round by almost half a bfloat16 step the same way,
    # and on destinations parallel to the sources (scores near |source|)
    g = torch.Generator().manual_seed(0)
    for d in (8, 64, 256):
        src = torch.randn(4096, d, generator=g) * 10
        dst = torch.randn(512, d, generator=g)
        if case == "largest_rounding":  # 1 + 0.99 * 2^-8 rounds to 1 in bfloat16: relative error ~u
            src = src.sign() * (1 + 0.99 * 2.0 ** -8) * 2.0 ** torch.randint(-3, 4, src.shape, generator=g)
            dst = src[:512].clone()
        elif case == "aligned":
            dst = src[:512] + 1e-3 * dst
        dst = torch.nn.functional.normalize(dst, dim=-1)
        exact = src.double() @ dst.double().T
        screened = src.bfloat16() @ dst.bfloat16().T
        err = (screened.double() - exact).abs()
        bound = _score_error_bound(src, dst, screened.double())
        assert bool((err <= bound).all()), (case, d, float((err / bound).max()))
        # and it is tighter than the fixed bound it replaced, 3u |source| per score
        assert float(bound.max() / (3 * 2.0 ** -8 * src.double().norm(dim=-1).max())) < 1, (case, d)


@merge_only
def test_merge_kernels_equal_aten():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 24, generator=g)
    groups = torch.randint(0, 77, (1000,), generator=g)
    out = torch.zeros(77, 24)
    assert httm_native.group_sums(x, groups, out)
    assert torch.equal(out, torch.zeros(77, 24).index_add_(0, groups, x))  # same order, same floats
    means = out / 3
    dev = httm_native.deviations(x, groups, means)
    torch.testing.assert_close(dev, (x - means[groups]).norm(dim=-1), rtol=1e-6, atol=1e-6)
    gathered = torch.empty(1000, 24)
    assert httm_native.gather_rows(means, groups, gathered)
    assert torch.equal(gathered, means[groups])


@merge_only
def test_group_sums_by_segment_equal_aten_on_two_threads():
    # 6 runs of 500 rows (samples x heads), each into its own 40 groups: the runs go to threads,
    # each group still summed in row order, so the floats equal index_add_'s
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 24, generator=g)
    groups = (torch.randint(0, 40, (6, 500), generator=g) + torch.arange(6).view(6, 1) * 40).flatten()
    torch.set_num_threads(2)
    out = torch.zeros(240, 24)
    assert httm_native.group_sums(x, groups, out, segments=6)
    assert torch.equal(out, torch.zeros(240, 24).index_add_(0, groups, x))
    crossing = groups.clone()
    crossing[700] = 0  # run 1 adding into run 0's groups
    with pytest.raises(IndexError, match="at position 700"):
        httm_native.group_sums(x, crossing, torch.zeros(240, 24), segments=6)
    with pytest.raises(ValueError, match="segments must divide"):
        httm_native.group_sums(x, groups, torch.zeros(240, 24), segments=7)


@merge_only
def test_merge_kernels_refuse_out_of_range_indices():
    x, out = torch.randn(5, 4), torch.zeros(3, 4)
    with pytest.raises(IndexError, match="index 3 at position 2"):
        httm_native.group_sums(x, torch.tensor([0, 1, 3, 0, 0]), out)
    with pytest.raises(IndexError, match="index -1"):
        httm_native.gather_rows(out, torch.tensor([0, -1]), torch.empty(2, 4))
    with pytest.raises(IndexError):
        httm_native.deviations(x, torch.tensor([0, 0, 0, 0, 9]), out)


def test_kernels_refuse_other_dtypes():
    # float64 stays on ATen (its sums are float64)
    x, out = torch.randn(5, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    assert not httm_native.group_sums(x, torch.zeros(5, dtype=torch.long), out)
    assert httm_native.deviations(x, torch.zeros(5, dtype=torch.long), out) is None


@pytest.mark.parametrize("mode", ["headwise", "uniform", "global"])
def test_op_without_kernels_gives_the_same_plan_and_output(mode, without_kernels):
    g = torch.Generator().manual_seed(3)
    frames, p = 5, 5 + 60
    q, k, v = (torch.randn(2, 3, frames * p, 16, generator=g) for _ in range(3))
    kw = dict(n_s=32, n_t=3, mode=mode)
    plan = httm_plan(q, k, frames, p, **kw)
    out = httm_apply_plan(q, k, v, plan)
    without_kernels()
    plan_aten = httm_plan(q, k, frames, p, **kw)
    for name in ("q_slot", "kv_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(plan_aten, name)), name
    torch.testing.assert_close(out, httm_apply_plan(q, k, v, plan_aten), rtol=1e-6, atol=1e-6)


def test_screened_chunks_give_the_same_choices(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5 * 69, 16, generator=g)
    layout = httm_layout(5, 69, 5, 0.7, 16, 4)
    whole = httm_match(x, layout)
    monkeypatch.setattr(httm_module, "_SCREEN_SCORES", 64)
    monkeypatch.setattr(httm_module, "_MIN_ROWS", 3)
    assert torch.equal(whole, httm_match(x, layout))


@screen_only
@pytest.mark.parametrize("where,value", [(30, float("inf")), (30, float("nan")), (31, 1e30)])
def test_non_finite_features_are_matched_again_in_float32(where, value):
    # an infinite or NaN feature (or squares beyond float32) can make scores NaN: the screening's
    # gathers report the row, and every class is matched on the float32 path, as without the screen
    x = torch.randn(1, 2, 3 * 20, 8)
    x[0, 1, where, 0] = value
    layout = httm_layout(3, 20, 5, 0.5, 8, 3)
    calls = []

    def native(*args):  # the float32 path's kernel, where it runs (else _match_class)
        done = _MATCH_CLASS_NATIVE(*args)
        if done:
            calls.append(args[1])
        return done

    with pytest.MonkeyPatch.context() as m:
        m.setattr(httm_module, "_match_class", lambda *a: calls.append(a[1]) or _MATCH_CLASS(*a))
        m.setattr(httm_module, "_match_class_native", native)
        screened = httm_match(x, layout)
        assert calls == list(layout.classes)
        m.setattr(httm_native, "bf16_screen", lambda: None)
        assert torch.equal(screened, httm_match(x, layout))


@screen_only
def test_non_finite_special_token_keeps_the_screen():
    # special tokens are never matched, so a NaN there leaves the bfloat16 screening on
    x = torch.randn(1, 2, 3 * 20, 8)
    x[0, 0, 21, :] = float("nan")  # frame 1, special token 1
    layout = httm_layout(3, 20, 5, 0.5, 8, 3)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(httm_module, "_match_class", lambda *a: pytest.fail("float32 path for a special token"))
        httm_match(x, layout)


def test_native_kernels_report_why_they_are_missing(tmp_path):
    code = ("import os; from fxslim.runtime import native_kernels as n; "
            "print(n.load('httm_merge') is None, '|', n.unavailable_reason('httm_merge'))")
    for env, reason in (({"FXSLIM_NATIVE": "0"}, "FXSLIM_NATIVE=0"),
                        ({"CC": str(tmp_path / "no-such-cc")}, "no C compiler")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**__import__("os").environ, "FXSLIM_CACHE_DIR": str(tmp_path), **env})
        assert result.stdout.startswith("True |") and reason in result.stdout, result.stdout


def test_native_kernels_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="no source"):
        native_kernels.load("no_such_kernel")


def test_scratch_buffers_are_reused_per_name_and_thread():
    a = memory.scratch("test.a", (4, 5))
    assert a.shape == (4, 5) and a.is_contiguous()
    assert memory.scratch("test.a", (2, 3)).data_ptr() == a.data_ptr()
    assert memory.scratch("test.b", (2, 3)).data_ptr() != a.data_ptr()
    assert memory.scratch("test.a", (2, 3), torch.bfloat16).dtype == torch.bfloat16
    memory.release()
    assert memory.scratch("test.a", (1,)).numel() == 1


@screen_only
def test_portable_c_path_chooses_like_the_avx512_path(tmp_path):
    # the plain C loops (compilers not targeting AVX-512BW) against the vector code, on rows with
    # positive and negative maxima, ties, near-ties beyond the candidate list and a 7-column tail
    import ctypes
    import shutil

    source = native_kernels._SOURCES / "httm_best.c"
    portable = tmp_path / "portable.so"
    cc = shutil.which("cc")
    subprocess.run([cc, "-O2", "-march=x86-64", "-fPIC", "-shared", "-std=c11", "-o", str(portable), str(source)],
                   check=True)
    lib = ctypes.CDLL(str(portable))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.httm_best_destinations.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, f32, i64, f32, f32, f32,
                                           ptr, i64]
    lib.httm_best_destinations.restype = i64
    g = torch.Generator().manual_seed(5)
    rows, cols, d = 64, 103, 16
    src = torch.randn(rows, d, generator=g)
    src[:16] = -src[:16].abs()
    dst = torch.nn.functional.normalize(torch.randn(cols, d, generator=g), dim=-1)
    dst[:8] = dst[:8].abs()
    dst[8:90] = dst[7]  # 83 equal destinations: more candidates than the list holds
    src[16:32] = dst[7] * 3 + 1e-6
    scores = (src.bfloat16() @ dst.bfloat16().T).contiguous()
    x = torch.cat([src, dst * 2])  # the kernel reads both from x; destinations rescaled by their norm 2
    src_index, dst_index = torch.arange(rows), torch.arange(rows, rows + cols)
    norms, errs = src.norm(dim=-1), (src.bfloat16().float() - src).norm(dim=-1)
    dst_scales = torch.full((cols,), 2.0)
    dst_err = float((dst.bfloat16().float() - dst).norm(dim=-1).max())
    gamma, out_rel, absolute = httm_native.bf16_margins(d)
    results, rescored = [], []
    for fn in (lib.httm_best_destinations, httm_native.bf16_screen().best_destinations):
        best = torch.empty(rows, dtype=torch.long)
        rescored.append(fn(scores.data_ptr(), 1, rows, cols, x.data_ptr(), src_index.data_ptr(), norms.data_ptr(),
                           errs.data_ptr(), dst_index.data_ptr(), dst_scales.data_ptr(), dst_err, d, gamma, out_rel,
                           absolute, best.data_ptr(), rows))
        results.append(best)
    assert rescored[0] == rescored[1] >= 16 and torch.equal(results[0], results[1])
    exact = src.double() @ dst.double().T
    chosen = exact.gather(1, results[0].view(-1, 1)).flatten()
    assert bool((chosen >= exact.max(dim=1).values - 1e-5 * norms.double()).all())


def test_kernels_give_the_same_plan_and_output_on_two_threads():
    g = torch.Generator().manual_seed(9)
    frames, p = 6, 5 + 200
    q, k, v = (torch.randn(1, 4, frames * p, 32, generator=g) for _ in range(3))
    plan = httm_plan(q, k, frames, p, n_s=64, n_t=4)
    out = httm_apply_plan(q, k, v, plan)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan_two = httm_plan(q, k, frames, p, n_s=64, n_t=4)
        out_two = httm_apply_plan(q, k, v, plan_two)
    finally:
        torch.set_num_threads(before)
    for name in ("q_slot", "kv_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(plan_two, name)), name
    torch.testing.assert_close(out, out_two, rtol=1e-6, atol=1e-6)  # SDPA itself may split sums differently
