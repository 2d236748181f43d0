"""PROM's native boundary kernels (native/prom_boundary.c) bit for bit against their ATen forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslim.runtime import native_kernels, prom, prom_native
from fxslim.runtime import prom_lowered as L
from fxslim.runtime.prom_onednn import codes, onednn_available
from tests.runtime.cpu_isa import vnni_only

pytestmark = pytest.mark.skipif(native_kernels.load("prom_boundary") is None, reason=prom_native.status())
_ONEDNN = pytest.mark.skipif(not onednn_available(), reason="needs oneDNN quantized ops")


def _layouts(x: torch.Tensor) -> list[torch.Tensor]:
    """x contiguous, channels_last and as a strided view of a larger tensor."""
    wide = torch.full((x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3]), 7.0, dtype=x.dtype)
    wide[..., ::2] = x
    return [x.contiguous(), x.contiguous(memory_format=torch.channels_last), wide[..., ::2]]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 40),
       scale=st.floats(1e-4, 10.0), zero_point=st.integers(0, 255), magnitude=st.sampled_from([1.0, 100.0, 1e9]),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_equals_atens_quantizer(n, c, h, w, scale, zero_point, magnitude, channels_last, seed):
    # rows of 1..40 floats: the 16-wide vector loop, its tail and the scalar path for strided rows
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) * magnitude * scale
    ties = (torch.randint(-300, 300, (x.numel() // 3,), generator=g).float() + 0.5) / prom._inverse_scale(scale)
    x.view(-1)[: ties.numel()] = ties  # x·(1/s) exactly k + ½: rounding half to even decides
    x.view(-1)[-1] = float("inf")
    for layout in _layouts(x):
        native = L.quantize_qtensor(layout, scale, zero_point, channels_last)
        with native_kernels.disabled():
            aten = L.quantize_qtensor(layout, scale, zero_point, channels_last)
        assert torch.equal(codes(native), codes(aten))
        for layout_kind in (torch.contiguous_format, torch.channels_last):  # strides of size-1 dims may differ
            assert native.is_contiguous(memory_format=layout_kind) == aten.is_contiguous(memory_format=layout_kind)
        assert (native.q_scale(), native.q_zero_point()) == (aten.q_scale(), aten.q_zero_point())


@pytest.mark.parametrize("w", [64, 130, 224])
def test_quantize_rgb_rows_into_channels_last_codes_equal_atens(w):
    """Three channels of whole 64-pixel blocks, then a tail: the interleaving path of RGB inputs."""
    g = torch.Generator().manual_seed(w)
    x = torch.randn(2, 3, 5, w, generator=g) * 3.0
    native = L.quantize_qtensor(x, 0.02, 114, True)
    with native_kernels.disabled():
        aten = L.quantize_qtensor(x, 0.02, 114, True)
    assert native.is_contiguous(memory_format=torch.channels_last) and torch.equal(codes(native), codes(aten))


def test_quantize_nan_codes_stay_in_their_sample_and_other_dtypes_take_aten():
    x = torch.randn(3, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    native = codes(L.quantize_qtensor(x, 0.02, 128, True))
    with native_kernels.disabled():
        aten = codes(L.quantize_qtensor(x, 0.02, 128, True))
    keep = torch.tensor([True, False, True])
    assert torch.equal(native[keep], aten[keep])  # a NaN's code is unspecified: its sample comes out NaN
    half = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert prom_native.quantize_codes(half, 1.0, 0.02, 50.0, 0, torch.contiguous_format) is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), c=st.sampled_from([1, 3, 5]), h=st.integers(1, 6), w=st.integers(1, 70),
       nan_at=st.lists(st.integers(0, 10**6), max_size=3), channels_last=st.booleans(),
       special=st.sampled_from([float("inf"), float("-inf"), 3.0e38, 1e-45]))
def test_quantize_flagged_reads_codes_and_nan_flags_in_one_pass(n, c, h, w, nan_at, channels_last, special):
    """Every layout and path (16-wide loop and tail, strided rows, RGB interleaving): the codes of
    quantize_qtensor and the flags of nan_flags, with a NaN anywhere and no-NaN specials beside it."""
    x = torch.randn(n, c, h, w)
    x.view(-1)[-1] = special
    for i in nan_at:
        x.view(-1)[i % x.numel()] = float("nan")
    clean = ~prom.nan_flags(x)
    for layout in _layouts(x):
        q, flags = L.quantize_flagged(layout, 0.02, 114, channels_last)
        assert torch.equal(flags, prom.nan_flags(x))
        reference = L.quantize_qtensor(layout, 0.02, 114, channels_last)
        assert torch.equal(codes(q)[clean], codes(reference)[clean])  # a NaN's code is unspecified
        assert q.stride() == reference.stride()
    with native_kernels.disabled():
        q, flags = L.quantize_flagged(x, 0.02, 114, channels_last)
    assert torch.equal(flags, prom.nan_flags(x)) and torch.equal(codes(q)[clean], codes(reference)[clean])


def test_quantize_codes_rejects_flags_of_another_shape_or_dtype():
    x = torch.randn(2, 3, 4, 4)
    for bad in (torch.empty(3, dtype=torch.bool), torch.empty(2, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="flags"):
            prom_native.quantize_codes(x, 10.0, 0.02, 50.0, 0, torch.contiguous_format, bad)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), per=st.integers(1, 300), nan_at=st.lists(st.integers(0, 10**6), max_size=3),
       special=st.sampled_from([float("inf"), float("-inf"), 3.0e38, 1e-45]))
def test_nan_flags_equal_the_reduction(n, per, nan_at, special):
    x = torch.randn(n, per)
    x.view(-1)[0] = special  # infinities, the largest and the smallest floats are no NaN
    for i in nan_at:
        x.view(-1)[i % x.numel()] = float("nan")
    assert torch.equal(prom_native.nan_flags(x), prom.nan_flags(x))
    x4 = x.view(n, 1, 1, per)
    assert torch.equal(prom_native.nan_flags(x4), prom.nan_flags(x4))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 9), w=st.integers(1, 9),
       x_zero_point=st.integers(0, 255), multiplier=st.integers(1, 2**31 - 1), shift=st.integers(0, 31),
       out_zero_point=st.integers(0, 255), low=st.integers(0, 100), seed=st.integers(0, 2**16))
def test_global_avg_pool_equals_the_aten_arithmetic(n, c, h, w, x_zero_point, multiplier, shift, out_zero_point, low,
                                                    seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g).to(torch.uint8)
    args = (x_zero_point, multiplier, shift, out_zero_point, low, 255 - low // 2)
    ref = prom.global_avg_pool_codes(x, *args)
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert torch.equal(prom_native.global_avg_pool_codes(layout, *args), ref)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), per=st.integers(1, 50), scale=st.floats(1e-6, 1e3), zero_point=st.integers(0, 255),
       flagged=st.lists(st.booleans(), min_size=4, max_size=4))
def test_dequantize_equals_aten_with_nan_rows(n, per, scale, zero_point, flagged):
    q = torch.randint(0, 256, (n, per)).to(torch.uint8)
    flags = torch.tensor(flagged[:n])
    for f in (None, flags):
        out, ref = prom_native.dequantized(q, scale, zero_point, f), prom.dequantized(q, scale, zero_point, f)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    other = torch.randint(0, 256, (n + 1, per)).to(torch.uint8)  # flags not per row: the ATen form's whole-NaN rule
    assert torch.equal(prom_native.dequantized(other, scale, zero_point, flags).isnan(),
                       prom.dequantized(other, scale, zero_point, flags).isnan())


@_ONEDNN
def test_lowered_mobilenet_equal_with_and_without_native_kernels():
    from fxslim.api import prepare
    from fxslim.passes.prom import calibrate
    from fxslim.passes.prom_batching import micro_batched
    from fxslim.passes.prom_convert import convert
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(weights=None).eval()
    x = torch.randn(3, 3, 96, 80)
    x[1, 0, 5, 5] = float("nan")
    int_model = micro_batched(convert(calibrate(prepare(model, (x[:1],)), [x[[0, 2]]]), runtime="onednn"))
    with torch.no_grad():
        native = int_model(x)
        with native_kernels.disabled():
            aten = int_model(x)
    assert native[1].isnan().all() and not native[[0, 2]].isnan().any()
    assert torch.equal(native.nan_to_num(), aten.nan_to_num())


@_ONEDNN
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 300), o=st.integers(1, 70), x_zero_point=st.integers(0, 255),
       out_zero_point=st.integers(0, 255), out_scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**16))
def test_linear_equals_onednns_codes(n, k, o, x_zero_point, out_zero_point, out_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-128, 128, (o, k), generator=gen).to(torch.int8)
    w_scale, bias = 0.0005 + 0.01 * torch.rand(o, generator=gen), torch.randn(o, generator=gen)
    x = torch.randint(0, 256, (n, k), generator=gen).to(torch.uint8)
    ref = torch.ops.fxslim.qlinear(x, 0.02, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, 0, 255)
    weights = prom_native.LinearWeights(weight, w_scale, bias, 0.02, out_scale)
    ours = prom_native.linear_codes(x, x_zero_point, weights, out_zero_point)
    assert ours.dtype == torch.uint8 and ours.shape == ref.shape
    assert (ours.int() - ref.int()).abs().max() <= 1 and int((ours != ref).sum()) <= 1 + ref.numel() // 1000
    assert torch.equal(prom_native.linear_codes(x, x_zero_point, weights, out_zero_point, portable=True), ours)


def test_linear_takes_only_what_it_computes():
    weights = prom_native.LinearWeights(torch.ones(4, 8, dtype=torch.int8), torch.ones(4), torch.zeros(4), 0.1, 0.1)
    assert prom_native.linear_codes(torch.zeros(2, 7, dtype=torch.uint8), 0, weights, 0) is None  # in features
    assert prom_native.linear_codes(torch.zeros(2, 8), 0, weights, 0) is None  # float input
    assert prom_native.linear_codes(torch.zeros(8, 2, dtype=torch.uint8).t(), 0, weights, 0) is None  # strided
    with native_kernels.disabled():
        assert prom_native.linear_codes(torch.zeros(2, 8, dtype=torch.uint8), 0, weights, 0) is None


@vnni_only
@_ONEDNN
def test_direct_lowering_runs_the_classifier_as_the_native_linear(monkeypatch):
    from fxslim.api import prepare
    from fxslim.ir import META_PROM_LOWERED
    from fxslim.passes.prom import calibrate
    from fxslim.passes.prom_convert import convert
    from torchvision.models import mobilenet_v2

    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    int_model = convert(calibrate(prepare(mobilenet_v2(weights=None).eval(), (x[:1],)), [x]), runtime="onednn")
    direct, aten = L.lower(int_model), L.lower(int_model, direct=False)
    assert direct.meta[META_PROM_LOWERED].get("qlinear_native") == 1
    assert "qlinear_native" not in aten.meta[META_PROM_LOWERED]
    # pool, flatten, linear and dequantize: one classifier_head call
    assert direct.meta[META_PROM_LOWERED].get("head") == 1 and "head" not in aten.meta[META_PROM_LOWERED]
    assert len(direct.graph.find_nodes(op="call_function", target=L.classifier_head)) == 1
    scale = int_model.graph.find_nodes(op="call_function", target=torch.ops.fxslim.dequantize.default)[0].args[1]
    with torch.no_grad():
        assert ((direct(x) - aten(x)).abs() / scale).max() <= 4.01  # 1-LSB depthwise ties may propagate
        fused = direct(x)
        monkeypatch.setattr(prom_native, "head", lambda *args: None)  # the head's five calls in turn
        assert torch.equal(direct(x), fused)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 70), hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
       o=st.integers(1, 40), zero_points=st.tuples(*[st.integers(0, 255)] * 3), shift=st.integers(0, 31),
       flagged=st.none() | st.lists(st.booleans(), min_size=3, max_size=3),
       layout=st.sampled_from(["nchw", "nhwc", "q"]), seed=st.integers(0, 2**16))
def test_head_equals_pool_linear_and_dequantize_in_turn(n, c, hw, o, zero_points, shift, flagged, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, *hw), generator=gen).to(torch.uint8)
    x_zero_point, pool_zero_point, out_zero_point = zero_points
    pool = (x_zero_point, int(torch.randint(1, 2**31 - 1, (1,), generator=gen)), shift, pool_zero_point, 0, 255)
    weight = torch.randint(-128, 128, (o, c), generator=gen).to(torch.int8)
    w_scale, bias = 0.0005 + 0.01 * torch.rand(o, generator=gen), torch.randn(o, generator=gen)
    weights = prom_native.LinearWeights(weight, w_scale, bias, 0.02, 0.05)
    flags = None if flagged is None else torch.tensor(flagged[:n])
    pooled = prom_native.global_avg_pool_codes(x, *pool).flatten(1)
    ref = prom_native.dequantized(prom_native.linear_codes(pooled, pool_zero_point, weights, out_zero_point), 0.05,
                                  out_zero_point, flags)
    if layout == "q":
        x = torch._make_per_tensor_quantized_tensor(x.contiguous(memory_format=torch.channels_last), 0.1, 3)
    elif layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    out = prom_native.head(x, *pool, weights, pool_zero_point, out_zero_point, 0.05, out_zero_point, flags)
    assert out.shape == (n, o) and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


def test_head_takes_only_what_it_computes():
    weights = prom_native.LinearWeights(torch.ones(4, 8, dtype=torch.int8), torch.ones(4), torch.zeros(4), 0.1, 0.1)
    x, pool = torch.zeros(2, 8, 3, 3, dtype=torch.uint8), (0, 1, 0, 0, 0, 255)
    assert prom_native.head(x, *pool, weights, 0, 0, 0.1, 0, None) is not None
    assert prom_native.head(x[:, :7], *pool, weights, 0, 0, 0.1, 0, None) is None  # in features
    assert prom_native.head(x.float(), *pool, weights, 0, 0, 0.1, 0, None) is None  # float input
    assert prom_native.head(x, *pool, weights, 0, 0, 0.1, 0, torch.zeros(3, dtype=torch.bool)) is None  # flags
    assert prom_native.head(torch.zeros(2, 9000, 1, 1, dtype=torch.uint8), *pool,
                            prom_native.LinearWeights(torch.ones(4, 9000, dtype=torch.int8), torch.ones(4),
                                                      torch.zeros(4), 0.1, 0.1), 0, 0, 0.1, 0, None) is None  # C
    with native_kernels.disabled():
        assert prom_native.head(x, *pool, weights, 0, 0, 0.1, 0, None) is None


@_ONEDNN
@pytest.mark.parametrize(("flatten", "fused"), [
    (lambda y: torch.flatten(y, 1), True), (lambda y: y.flatten(1), True), (lambda y: y.flatten(start_dim=1), True),
    (lambda y: y.reshape(y.shape[0], -1), False),
])
@vnni_only
def test_direct_lowering_fuses_each_spelling_of_the_classifier_flatten(flatten, fused, monkeypatch):
    from torch import nn

    from fxslim.api import prepare
    from fxslim.ir import META_PROM_LOWERED
    from fxslim.passes.prom import calibrate
    from fxslim.passes.prom_convert import convert

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(flatten(self.pool(torch.relu(self.conv(x)))))

    torch.manual_seed(0)
    x = torch.randn(3, 3, 12, 12)
    x[1, 0, 2, 2] = float("nan")
    low = L.lower(convert(calibrate(prepare(Classifier().eval(), (x[:1],)), [x[[0, 2]]]), runtime="onednn"))
    assert low.meta[META_PROM_LOWERED].get("head", 0) == int(fused)
    with torch.no_grad():
        out = low(x)
        monkeypatch.setattr(prom_native, "head", lambda *args: None)
        assert out[1].isnan().all() and torch.equal(low(x).nan_to_num(), out.nan_to_num())
