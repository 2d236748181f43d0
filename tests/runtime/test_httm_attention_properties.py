"""Property tests of fxslim::httm_attention over dtypes, memory layouts and batch sizes.

tests/runtime/test_httm_op.py checks the merge plan and output against the loop reference in
float32 on contiguous tensors; here random inputs also vary the dtype (float32, float64, bfloat16,
float16), the layout (q, k, v as the [B, N, H, d] -> [B, H, N, d] transposed views attention
modules produce) and the batch size (0, 1, several): the output keeps the dtype and SDPA's shape,
equals the float32 computation within the dtype's precision, equals SDPA when nothing is merged,
and each sample's output does not depend on the rest of the batch. Non-floating inputs raise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxslim  # noqa: F401  (registers the ops)

httm = torch.ops.fxslim.httm_attention.default

pytestmark = pytest.mark.usefixtures("one_thread")

_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@st.composite
def _cases(draw):
    special = draw(st.integers(0, 2))
    return dict(
        batch=draw(st.integers(0, 3)), heads=draw(st.integers(1, 3)), frames=draw(st.integers(1, 4)),
        tokens_per_frame=special + draw(st.integers(1, 9)), special=special, d=draw(st.sampled_from([4, 8])),
        dv=draw(st.sampled_from([4, 6])), q_ratio=draw(st.sampled_from([0.0, 0.5, 0.9])),
        kv_ratio=draw(st.sampled_from([0.0, 0.4, 0.7])), mode=draw(st.sampled_from(["headwise", "uniform", "global"])),
        dtype=draw(st.sampled_from(list(_TOL))), transposed=draw(st.booleans()), seed=draw(st.integers(0, 999)),
    )


def _qkv(case, dtype):
    """q, k, v [B, H, N, d]; ``transposed``: views of [B, N, H, d] tensors, as attention modules make them."""
    g = torch.Generator().manual_seed(case["seed"])
    b, h, n = case["batch"], case["heads"], case["frames"] * case["tokens_per_frame"]
    shapes = ((b, n, h, case["d"]), (b, n, h, case["d"]), (b, n, h, case["dv"]))
    tensors = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    if case["transposed"]:
        return [t.transpose(1, 2) for t in tensors]
    return [t.transpose(1, 2).contiguous() for t in tensors]


def _kwargs(case):
    return dict(special_tokens=case["special"], q_ratio=case["q_ratio"], kv_ratio=case["kv_ratio"], n_s=4, n_t=2,
                outlier_fraction=0.0, mode=case["mode"])


def _run(case, q, k, v, **overrides):
    return httm(q, k, v, case["frames"], case["tokens_per_frame"], **(_kwargs(case) | overrides))


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_httm_attention_any_dtype_layout_and_batch_matches_float32(case):
    q, k, v = _qkv(case, case["dtype"])
    out = _run(case, q, k, v)
    assert out.dtype == case["dtype"] and out.shape == (*q.shape[:3], case["dv"])
    if case["batch"] == 0:
        return
    # matching runs in float32 on the (rounded) values, so the float32 result on the upcast inputs is
    # the same computation without the final rounding
    expected = _run(case, q.float(), k.float(), v.float()) if case["dtype"] != torch.float64 else out
    tol = _TOL[case["dtype"]]
    assert (out.double() - expected.double()).abs().max() <= tol * expected.abs().max().clamp(min=1.0)


@settings(max_examples=25, deadline=None)
@given(_cases())
def test_httm_attention_nothing_merged_equals_sdpa_in_any_dtype_and_layout(case):
    q, k, v = _qkv(case, case["dtype"])
    out = _run(case, q, k, v, q_ratio=0.0, kv_ratio=0.0)
    if case["batch"] == 0:
        assert out.shape == (0, case["heads"], q.shape[2], case["dv"])
        return
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (out.double() - expected).abs().max() <= _TOL[case["dtype"]] * expected.abs().max().clamp(min=1.0)


@settings(max_examples=20, deadline=None)
@given(_cases())
def test_httm_attention_each_sample_alone_equals_it_in_the_batch(case):
    case = case | {"batch": max(case["batch"], 2), "dtype": torch.float32}
    q, k, v = _qkv(case, torch.float32)
    batch = _run(case, q, k, v)
    for i in range(case["batch"]):  # batch 1: merge plans are per sample
        torch.testing.assert_close(_run(case, q[i:i + 1], k[i:i + 1], v[i:i + 1]), batch[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_httm_attention_non_floating_input_raises_type_error(dtype):
    q = torch.ones(1, 2, 2 * 6, 4, dtype=dtype)
    with pytest.raises(TypeError, match="must be a floating tensor"):
        httm(q, q, q, 2, 6)
