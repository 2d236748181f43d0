"""Property tests of fxslim::haste_conv2d over dtypes, memory formats and batch sizes.

tests/runtime/test_haste_op.py checks geometry (kernel, stride, padding, dilation, tile, L) against
the loop reference; here random inputs also vary dtype (float32, float64, bfloat16, float16),
channels_last and batch size (0, 1, several): the result must equal the float32 (or reference)
computation, follow the input's memory format and keep every sample independent of the batch.
Grouped weights and non-floating inputs must fail with a clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fxslim.runtime.haste import haste_conv2d, make_planes, output_shape, patch_shape, record_buckets
from fxslim.runtime.haste_reference import haste_conv2d_reference

pytestmark = pytest.mark.usefixtures("one_thread")

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@st.composite
def _cases(draw):
    k = draw(st.sampled_from([(1, 1), (3, 3), (2, 3)]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    dilation = draw(st.sampled_from([(1, 1), (2, 1)]))
    padding = draw(st.sampled_from([(0, 0), (1, 1), (2, 0)]))
    h = draw(st.integers(max(1, (k[0] - 1) * dilation[0] + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, (k[1] - 1) * dilation[1] + 1 - 2 * padding[1]), 9))
    return dict(
        n=draw(st.integers(0, 3)), c=draw(st.integers(1, 6)), o=draw(st.integers(1, 4)), size=(h, w), kernel=k,
        stride=stride, padding=padding, dilation=dilation, tile=draw(st.integers(1, 4)), L=draw(st.integers(1, 12)),
        center=draw(st.booleans()), bias=draw(st.booleans()), dtype=draw(st.sampled_from(_DTYPES)),
        channels_last=draw(st.booleans()), seed=draw(st.integers(0, 999)),
    )


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    # small integers times C: channel means are exact in every dtype, so hashes cannot differ by rounding
    x = (torch.randint(-3, 4, (case["n"], case["c"], *case["size"]), generator=g) * case["c"]).float()
    weight = torch.randn(case["o"], case["c"], *case["kernel"], generator=g)
    bias = torch.randn(case["o"], generator=g) if case["bias"] else None
    th, tw = patch_shape(case["kernel"], case["stride"], case["dilation"], case["tile"])
    planes = make_planes(case["L"], th * tw, 2 / 3, case["seed"])
    return x, weight, bias, planes


def _run(case, x, weight, bias, planes):
    return haste_conv2d(x, weight, bias, planes, list(case["stride"]), list(case["padding"]), list(case["dilation"]),
                        case["tile"], case["center"], "")


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_haste_conv2d_any_dtype_layout_and_batch_equals_float32_reference(case):
    x, weight, bias, planes = _inputs(case)
    dtype = case["dtype"]
    xd = x.to(dtype)
    if case["channels_last"]:
        xd = xd.contiguous(memory_format=torch.channels_last)
    bd = None if bias is None else bias.to(dtype)
    y = _run(case, xd, weight.to(dtype), bd, planes)
    h_out, w_out = output_shape(case["size"], case["kernel"], case["stride"], case["padding"], case["dilation"])
    assert y.shape == (case["n"], case["o"], h_out, w_out) and y.dtype == dtype
    if case["n"] == 0:  # an empty batch: an empty result (its layout is moot)
        return
    if case["c"] > 1 and h_out * w_out > 1 and case["size"][0] * case["size"][1] > 1:  # layout unambiguous
        fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)
    # the op computes in float32 for half types: compare with the float32 loop reference on the
    # same (rounded) weights
    ref = haste_conv2d_reference(x.double(), weight.to(dtype).double(), None if bd is None else bd.double(),
                                 planes.double(), case["stride"], case["padding"], case["dilation"], case["tile"],
                                 case["center"])
    tol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    scale = ref.abs().max().clamp(min=1.0)
    assert (y.double() - ref).abs().max() <= tol * scale


@settings(max_examples=20, deadline=None)
@given(_cases())
def test_haste_conv2d_each_sample_alone_equals_it_in_the_batch(case):
    case = case | {"n": max(case["n"], 2), "dtype": torch.float32}
    x, weight, bias, planes = _inputs(case)
    batch = _run(case, x, weight, bias, planes)
    # float32 sums in another order (the GEMMs block the batch differently): a tolerance scaled to the
    # outputs, as in the reference test above; samples sharing buckets would differ by whole terms
    tol = 1e-5 * float(batch.abs().max().clamp(min=1.0))
    for i in range(case["n"]):  # batch size 1 gives the same rows: samples never share buckets
        torch.testing.assert_close(_run(case, x[i:i + 1], weight, bias, planes), batch[i:i + 1], rtol=0, atol=tol)


@settings(max_examples=20, deadline=None)
@given(_cases())
def test_haste_conv2d_all_singleton_buckets_equal_conv2d_at_batch_one(case):
    case = case | {"n": 1, "dtype": torch.float32}
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(1, case["c"], *case["size"], generator=g)
    weight = torch.randn(case["o"], case["c"], *case["kernel"], generator=g)
    th, tw = patch_shape(case["kernel"], case["stride"], case["dilation"], case["tile"])
    planes = make_planes(48, th * tw, 0.0, case["seed"])
    with record_buckets() as rec:
        y = haste_conv2d(x, weight, None, planes, list(case["stride"]), list(case["padding"]),
                         list(case["dilation"]), case["tile"], case["center"], "conv")
    # 48 dense planes separate Gaussian patches unless a tile's patches are (nearly) one-dimensional
    assume(rec["conv"].buckets == case["c"] * rec["conv"].tiles)
    dense = F.conv2d(x, weight, None, case["stride"], case["padding"], case["dilation"])
    assert (y - dense).abs().max() <= 1e-4 * dense.abs().max().clamp(min=1.0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_haste_conv2d_non_floating_input_raises_type_error(dtype):
    x = torch.ones(1, 2, 5, 5).to(dtype)
    planes = make_planes(4, 36, 2 / 3, 0)
    with pytest.raises(TypeError, match="x must have dtype"):
        haste_conv2d(x, torch.ones(3, 2, 3, 3).to(dtype), None, planes, [1, 1], [1, 1], [1, 1], 4, True, "")


def test_haste_conv2d_grouped_weight_raises_value_error_naming_weight():
    x = torch.randn(1, 4, 6, 6)
    planes = make_planes(4, 36, 2 / 3, 0)
    with pytest.raises(ValueError, match="weight"):  # groups=2 layout [O, C/2, k, k]: the op is groups 1 only
        haste_conv2d(x, torch.randn(4, 2, 3, 3), None, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
