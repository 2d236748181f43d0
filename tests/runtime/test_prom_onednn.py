"""Tests of PROM's fast oneDNN ops: within 1 LSB of the float model and of the fixed-point
reference ops (and mostly equal to them), the residual add bit-exact against fake quantization,
registration (opcheck) and argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from fxslim.runtime import prom_onednn as O
from fxslim.runtime import prom as P
from fxslim.runtime import prom_reference as R
from tests.runtime.conv_geometry import conv_geometries
from tests.runtime.cpu_isa import pretend_no_vnni

pytestmark = pytest.mark.skipif(not (O.onednn_available()),
                                reason="needs oneDNN quantized ops")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, gen) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


def _layer(c_out, c_in_g, k, gen, ternary):
    """int8 codes, positive per-channel weight scales, real bias."""
    low, high = (-1, 2) if ternary else (-127, 128)
    weight = torch.randint(low, high, (c_out, c_in_g, k, k), generator=gen).to(torch.int8)
    w_scale = (0.2 + torch.rand(c_out, generator=gen)) * (0.3 if ternary else 0.01)
    bias = torch.randn(c_out, generator=gen)
    return weight, w_scale, bias


# (name, c_in, c_out, kernel, stride, padding, groups, ternary): MobileNetV2's three conv kinds
_CONVS = [
    ("pointwise_ternary", 24, 40, 1, 1, 0, 1, True),
    ("depthwise", 16, 16, 3, 2, 1, 16, False),
    ("stem", 3, 8, 3, 2, 1, 1, False),
]


def _fixed_point(x, sx, zx, weight, w_scale, bias, so, zo, lo, hi, stride, padding, groups):
    """The same layer through the reference op's fixed-point requantization (convert_conv's folding)."""
    real = sx * w_scale.double() / so
    steps = bias.double() / (sx * w_scale.double())
    int_bias = torch.round(steps)
    multiplier = P.requant_multiplier(real, 23)
    offset = ((1 << 22) + torch.round((steps - int_bias) * multiplier.double())).to(torch.int32)
    return R.int8_conv2d_reference(x, zx, weight, int_bias.to(torch.int32), multiplier, 23, zo, lo, hi,
                                   [stride] * 2, [padding] * 2, [1, 1], groups, offset)


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize(("name", "c_in", "c_out", "k", "stride", "padding", "groups", "ternary"), _CONVS)
def test_qconv2d_within_one_lsb_of_float_model_and_fixed_point_reference(name, c_in, c_out, k, stride, padding, groups,
                                                                          ternary, activation):
    gen = _gen(len(name) + len(activation))
    x = _codes((2, c_in, 9, 9), gen).contiguous(memory_format=torch.channels_last)
    weight, w_scale, bias = _layer(c_out, c_in // groups, k, gen, ternary)
    sx, zx, so, zo = 0.05, 110, 0.03, 60  # relu6: codes 60..255 (6/0.03 = 200 steps: the clamp bites)
    lo, hi = {"none": (0, 255), "relu": (zo, 255), "relu6": (zo, min(255, zo + round(6 / so)))}[activation]
    out = O.qconv2d(x, sx, zx, weight, w_scale, bias, so, zo, lo, hi, [stride] * 2, [padding] * 2, [1, 1], groups)
    real_w = weight.double() * w_scale.double().view(-1, 1, 1, 1)
    floating = R.conv2d_float_reference(x, sx, zx, real_w, bias, so, zo, lo, hi, [stride] * 2, [padding] * 2, [1, 1], groups)
    fixed = _fixed_point(x, sx, zx, weight, w_scale, bias, so, zo, lo, hi, stride, padding, groups)
    assert out.shape == floating.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.int() - floating.int()).abs().max() <= 1
    assert (out.int() - fixed.int()).abs().max() <= 1
    assert (out == fixed).float().mean() >= 0.99  # 1-LSB differences only at near-ties
    assert int(out.min()) >= lo and int(out.max()) <= hi


@settings(max_examples=40, deadline=None)
@given(geometry=conv_geometries(max_side=9), clamp=st.sampled_from(["none", "relu", "hardtanh"]), seed=st.integers(0, 10_000))
def test_qconv2d_any_geometry_within_one_lsb_of_float_model(geometry, clamp, seed):
    """Every geometry the converter can emit, alone and fused with a residual add, through whichever
    kernel the clamp selects (ATen's quantized convs for none/relu, qconv_pointwise for a clamp short
    of 255; a residual add under such a clamp is clamped after the sum: oneDNN has no sum + hardtanh)."""
    n, c_in, c_out, h, w, kernel, stride, padding, dilation, groups = geometry
    gen = _gen(seed)
    x = _codes((n, c_in, h, w), gen)
    zx = int(torch.randint(0, 256, (1,), generator=gen))
    lo, hi = {"none": (0, 255), "relu": (_ZO, 255), "hardtanh": (_ZO, 200)}[clamp]
    _conv_and_add_within_one_lsb(x, c_out, kernel, (stride, padding, dilation, groups), zx, lo, hi, gen)


_ZO = 90  # the output zero point of _conv_and_add_within_one_lsb


def _conv_and_add_within_one_lsb(x, c_out, kernel, geometry, zx, out_min, out_max, gen):
    """``qconv2d`` of x (random int8 weight [c_out, C/groups, *kernel]) and the same conv fused with
    a residual add (the conv clipped to its grid ``sc``, ``zc``, plus the skip, then the clamp), each
    within 1 LSB of the float model; returns both outputs."""
    weight = torch.randint(-127, 128, (c_out, x.shape[1] // geometry[3], *kernel), generator=gen).to(torch.int8)
    w_scale, bias = 0.001 + 0.004 * torch.rand(c_out, generator=gen), torch.randn(c_out, generator=gen)
    sx, so = 0.05, 0.04
    out = O.qconv2d(x, sx, zx, weight, w_scale, bias, so, _ZO, out_min, out_max, *geometry)
    real_w = weight.double() * w_scale.double().view(-1, 1, 1, 1)
    floating = R.conv2d_float_reference(x, sx, zx, real_w, bias, so, _ZO, out_min, out_max, *geometry)
    assert out.shape == floating.shape and (out.int() - floating.int()).abs().max() <= 1
    skip, ss, zs = _codes(tuple(out.shape), gen), 0.03, 100
    sc, zc = 0.035, 80  # s_c ≤ s_out: the conv's rounding and the add's stay within 1 LSB together
    added = O.qconv2d_add(x, sx, zx, weight, w_scale, bias, so, _ZO, out_min, out_max, *geometry, skip, ss, zs, sc, zc)
    conv = torch.nn.functional.conv2d((x.double() - zx) * sx, real_w, bias.double(), *geometry)
    real = conv.clamp(-zc * sc, (255 - zc) * sc) + (skip.double() - zs) * ss
    assert added.shape == out.shape
    assert (added.int() - R.quantize_float_reference(real, so, _ZO).clamp(out_min, out_max).int()).abs().max() <= 1
    return out, added


@pytest.mark.parametrize(("out_min", "out_max"), [(0, 255), (3, 255), (3, 200)])
def test_qconv2d_dilated_one_by_one_kernel_runs_and_equals_undilated(out_min, out_max):
    """oneDNN crashes the process on a 1×1 kernel with stride 2, padding 1 and dilation 2 (an 8×1
    input); the dilation of a kernel side of 1 changes nothing, so the op drops it."""
    gen = _gen(6)
    x = _codes((1, 1, 8, 1), gen)
    weight, w_scale, bias = _layer(1, 1, 1, gen, ternary=False)
    args = (x, 0.1, 3, weight, w_scale, bias, 0.1, 3, out_min, out_max, [2, 2], [1, 1])
    out = O.qconv2d(*args, [2, 2], 1)
    assert out.shape == (1, 1, 5, 2) and torch.equal(out, O.qconv2d(*args, [1, 1], 1))


@pytest.mark.parametrize(("out_min", "out_max"), [(0, 255), (90, 255), (90, 200)])
@pytest.mark.parametrize(("h", "w", "kernel", "stride", "padding"), [
    (16, 2, (3, 3), (2, 2), (1, 1)),  # a tall, narrow map through a stride-2 3×3 conv
    (9, 5, (3, 5), (1, 3), (0, 0)),
    (16, 1, (3, 3), (1, 2), (1, 1)),  # the output column's window reaches into the right padding
])
def test_qconv2d_one_output_column_at_a_column_stride_within_one_lsb(h, w, kernel, stride, padding, out_min, out_max):
    """oneDNN gets a conv with one output column and a column stride above 1 wrong (codes off by up
    to 255); the op appends stride columns of the zero point and keeps the first output column."""
    gen = _gen(h * w)
    x = _codes((2, 4, h, w), gen)
    out, _ = _conv_and_add_within_one_lsb(x, 8, kernel, (list(stride), list(padding), [1, 1], 1), 100, out_min, out_max, gen)
    assert out.shape[3] == 1 and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("out_min", "out_max"), [(0, 255), (90, 255), (90, 200)])
@pytest.mark.parametrize(("c_in", "c_out", "groups", "h", "w", "kernel", "padding", "dilation"), [
    (1, 8, 1, 12, 12, (2, 2), (2, 2), (1, 1)),  # a grayscale stem whose padding passes the kernel
    (1, 1, 1, 12, 12, (3, 3), (3, 3), (1, 1)),
    (4, 8, 4, 12, 12, (2, 2), (2, 2), (1, 1)),  # depthwise with a channel multiplier
    (2, 4, 2, 1, 19, (2, 5), (1, 0), (2, 2)),  # one row under a dilated 2-row kernel: a window of padding only
])
def test_qconv2d_windows_of_padding_only_within_one_lsb(c_in, c_out, groups, h, w, kernel, padding, dilation,
                                                        out_min, out_max):
    """oneDNN gets the outputs whose window holds only padding wrong (codes off by up to 255) for
    convs with one input channel per group; the op writes that padding into the input."""
    gen = _gen(c_in * h + w)
    x = _codes((2, c_in, h, w), gen)
    _conv_and_add_within_one_lsb(x, c_out, kernel, ([1, 1], list(padding), list(dilation), groups), 100, out_min, out_max,
                                 gen)


@pytest.mark.parametrize(("out_min", "out_max"), [(0, 255), (90, 255), (90, 200)])
@pytest.mark.parametrize(("c_in", "c_out", "groups", "hw", "kernel", "padding"), [
    (4, 48, 2, 7, 3, 1),  # 2 groups of 2 → 24 channels: torch's oneDNN gave codes off by 255
    (2, 96, 2, 9, 3, 1),  # a depthwise conv with a channel multiplier of 48
    (24, 48, 2, 7, 7, 3),
    (6, 72, 3, 14, 5, 2),
])
def test_qconv2d_grouped_conv_torch_onednn_miscomputes_within_one_lsb(c_in, c_out, groups, hw, kernel, padding,
                                                                      out_min, out_max):
    gen = _gen(c_out + hw)
    weight = torch.zeros(c_out, c_in // groups, kernel, kernel, dtype=torch.int8)
    assert O.miscomputed_grouping(weight, groups)
    x = _codes((2, c_in, hw, hw), gen)
    _conv_and_add_within_one_lsb(x, c_out, (kernel, kernel), ([1, 1], [padding] * 2, [1, 1], groups), 100, out_min,
                                 out_max, gen)


def test_miscomputed_grouping_leaves_plain_convs_depthwise_and_pointwise_to_onednn():
    assert not O.miscomputed_grouping(torch.zeros(8, 4, 3, 3), 1)  # not grouped
    assert not O.miscomputed_grouping(torch.zeros(8, 1, 3, 3), 8)  # depthwise
    assert not O.miscomputed_grouping(torch.zeros(48, 2, 1, 1), 2)  # grouped 1×1
    assert O.miscomputed_grouping(torch.zeros(16, 1, 3, 3), 8)  # depthwise with a channel multiplier


def test_qconv2d_add_is_the_unfused_pair_and_clips_the_conv_to_its_grid():
    """The op computes what ``qconv2d`` onto the conv's grid then ``qadd`` compute, bit for bit: where the
    conv's values pass the ends of its grid (an input unlike the calibration's), they saturate there,
    as in the fake-quant model, rather than reach the sum."""
    gen = _gen(3)
    x = _codes((2, 32, 6, 6), gen).contiguous(memory_format=torch.channels_last)
    skip = _codes((2, 16, 6, 6), gen)
    weight, w_scale, bias = _layer(16, 32, 1, gen, True)
    sx, zx, ss, zs = 0.02, 100, 0.04, 120
    real = torch.nn.functional.conv2d((x.double() - zx) * sx, weight.double() * w_scale.double().view(-1, 1, 1, 1),
                                      bias.double())
    # the conv's grid covers the middle half of its values only
    low, high = real.quantile(0.25).item(), real.quantile(0.75).item()
    sc = (high - low) / 255
    zc = round(-low / sc)
    so, zo = sc * 1.4, 128  # s_c <= 1.5·s_out: the condition prom_fuse checks
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    before = skip.clone()
    out = O.qconv2d_add(x, sx, zx, weight, w_scale, bias, so, zo, 0, 255, *geometry, skip, ss, zs, sc, zc)
    conv = O.qconv2d(x, sx, zx, weight, w_scale, bias, sc, zc, 0, 255, *geometry)
    assert torch.equal(out, O.qadd(conv, sc, zc, skip, ss, zs, so, zo, 0, 255))
    clipped = R.quantize_float_reference(real.clamp(-zc * sc, (255 - zc) * sc) + (skip.double() - zs) * ss, so, zo)
    unclipped = R.quantize_float_reference(real + (skip.double() - zs) * ss, so, zo)
    assert (out.int() - clipped.int()).abs().max() <= 1
    assert (out.int() - unclipped.int()).abs().max() > 10  # the clip matters here
    assert torch.equal(skip, before)  # unchanged input (opcheck checks it too)


def test_qlinear_within_one_lsb_of_float_model():
    gen = _gen(4)
    x = _codes((5, 64), gen)
    weight = torch.randint(-127, 128, (10, 64), generator=gen).to(torch.int8)
    w_scale = 0.001 + 0.01 * torch.rand(10, generator=gen)
    bias = torch.randn(10, generator=gen)
    out = O.qlinear(x, 0.03, 7, weight, w_scale, bias, 0.1, 130, 0, 255)
    ref = R.linear_float_reference(x, 0.03, 7, weight.double() * w_scale.double()[:, None], bias, 0.1, 130, 0, 255)
    assert out.shape == (5, 10) and (out.int() - ref.int()).abs().max() <= 1


def test_qadd_bit_exact_against_fake_quantized_float_add():
    gen = _gen(5)
    a, b = _codes((3, 8, 5, 5), gen), _codes((3, 8, 5, 5), gen)
    sa, za, sb, zb, so, zo = 0.031, 120, 0.017, 90, 0.043, 101
    out = O.qadd(a, sa, za, b, sb, zb, so, zo, 0, 255)
    real = (a.float() - za) * torch.tensor(sa) + (b.float() - zb) * torch.tensor(sb)
    fake = torch.fake_quantize_per_tensor_affine(real, so, zo, 0, 255)
    assert torch.equal(out, (torch.round(fake / so) + zo).to(torch.uint8))


def _cases():
    gen = _gen(6)
    x = _codes((2, 6, 5, 5), gen)
    pw, pw_s, pw_b = _layer(4, 6, 1, gen, True)
    dw, dw_s, dw_b = _layer(6, 1, 3, gen, False)
    lin, lin_s, lin_b = _layer(4, 6, 1, gen, False)
    skip = _codes((2, 4, 5, 5), gen)
    return {
        "qconv2d": (torch.ops.fxslim.qconv2d.default, (x, 0.05, 3, pw, pw_s, pw_b, 0.1, 100, 100, 255, [1, 1], [0, 0], [1, 1], 1)),
        "qconv2d_depthwise": (torch.ops.fxslim.qconv2d.default,
                              (x, 0.05, 3, dw, dw_s, dw_b, 0.1, 100, 100, 160, [2, 2], [1, 1], [1, 1], 6)),
        "qconv2d_add": (torch.ops.fxslim.qconv2d_add.default,
                        (x, 0.05, 3, pw, pw_s, pw_b, 0.1, 100, 0, 255, [1, 1], [0, 0], [1, 1], 1, skip, 0.07, 50, 0.08,
                         110)),
        "qlinear": (torch.ops.fxslim.qlinear.default,
                    (x[:, :, 0, 0].contiguous(), 0.05, 3, lin.flatten(1).contiguous(), lin_s, lin_b, 0.1, 5, 0, 255)),
        "qadd": (torch.ops.fxslim.qadd.default, (x, 0.05, 3, x.flip(0), 0.02, 200, 0.06, 7, 0, 255)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_opcheck_passes(name):
    op, args = _cases()[name]
    opcheck(op, args)


@pytest.mark.parametrize(
    ("name", "index", "value", "match"),
    [
        ("qconv2d", 0, torch.zeros(2, 6, 5, 5), "x:"),
        ("qconv2d", 1, 0.0, "x_scale"),
        ("qconv2d", 3, torch.zeros(4, 6, 1, 1, dtype=torch.int32), "weight"),
        ("qconv2d", 4, torch.ones(3), "w_scale"),
        ("qconv2d", 8, 300, "out_min"),
        ("qconv2d", 13, 4, "groups"),
        ("qconv2d_add", 14, torch.zeros(2, 4, 4, 4, dtype=torch.uint8), "skip"),
        ("qlinear", 0, torch.zeros(2, 5, dtype=torch.uint8), "x:"),
        ("qadd", 3, torch.zeros(1, 6, 5, 5, dtype=torch.uint8), "b:"),
        ("qadd", 6, float("nan"), "out_scale"),
    ],
)
def test_bad_argument_raises_value_error_naming_it(name, index, value, match):
    op, args = _cases()[name]
    args = list(args)
    args[index] = value
    with pytest.raises(ValueError, match=match):
        op(*args)


def test_exact_sums_without_vnni_only_for_weights_whose_u8_pairs_fit_int16(monkeypatch):
    monkeypatch.setattr(O, "vnni_available", lambda: True)
    assert O.exact_sums(torch.full((8, 4, 3, 3), 127, dtype=torch.int8), 1)
    pretend_no_vnni(monkeypatch)
    assert O.exact_sums(torch.randint(-1, 2, (8, 4, 1, 1)).to(torch.int8), 1)  # ternary
    assert O.exact_sums(torch.full((8, 4, 3, 3), -64, dtype=torch.int8), 1)  # 2·255·64 < 2^15
    assert not O.exact_sums(torch.full((8, 4, 3, 3), 65, dtype=torch.int8), 1)
    assert O.exact_sums(torch.full((8, 1, 3, 3), 127, dtype=torch.int8), 8)  # depthwise: no pairs
    assert not O.exact_sums(torch.full((16, 1, 3, 3), 127, dtype=torch.int8), 8)  # a channel multiplier
    assert not O.exact_sums(torch.full((10, 20), -127, dtype=torch.int8), 1)  # a linear


@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize(("c_in", "c_out", "groups", "extreme"), [(3, 8, 1, True), (16, 16, 1, True), (16, 16, 1, False),
                                                                  (8, 8, 8, True), (24, 40, 1, False)])
def test_qconv2d_dense_int8_weights_within_one_lsb_with_and_without_vnni(monkeypatch, vnni, c_in, c_out, groups,
                                                                          extreme):
    """Codes 255 against weights ±127 overflow the int16 pair sums of oneDNN's AVX2 kernels (off by
    up to 99 on a 16-channel 3×3 conv): without VNNI the op sums such weights in float."""
    if vnni and not O.vnni_available():
        pytest.skip("this CPU has no VNNI/AMX: oneDNN's dense int8 sums saturate here")
    monkeypatch.setattr(O, "vnni_available", lambda: vnni)
    gen = _gen(c_in + c_out + groups)
    weight, w_scale, bias = _layer(c_out, c_in // groups, 3, gen, ternary=False)
    x = _codes((2, c_in, 9, 9), gen)
    if extreme:  # every product at its largest: 255 · 127 of one sign
        weight = torch.where(torch.rand(weight.shape, generator=gen) < 0.8, 127, -127).to(torch.int8)
        x = torch.where(torch.rand(x.shape, generator=gen) < 0.9, 255, 0).to(torch.uint8)
    sx, zx, so, zo = 0.05, 3, 2.0, 120
    out = O.qconv2d(x, sx, zx, weight, w_scale, bias, so, zo, 0, 255, [1, 1], [1, 1], [1, 1], groups)
    real_w = weight.double() * w_scale.double().view(-1, 1, 1, 1)
    floating = R.conv2d_float_reference(x, sx, zx, real_w, bias, so, zo, 0, 255, [1, 1], [1, 1], [1, 1], groups)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.uint8
    assert (out.int() - floating.int()).abs().max() <= 1
    assert 0 < int(out.float().std())  # the grid is not saturated flat: the sums are compared


@pytest.mark.parametrize("vnni", [True, False])
def test_qlinear_int8_weights_within_one_lsb_with_and_without_vnni(monkeypatch, vnni):
    if vnni and not O.vnni_available():
        pytest.skip("this CPU has no VNNI/AMX: oneDNN's dense int8 sums saturate here")
    monkeypatch.setattr(O, "vnni_available", lambda: vnni)
    gen = _gen(5)
    weight = torch.where(torch.rand(13, 300, generator=gen) < 0.7, 127, -127).to(torch.int8)
    x = torch.where(torch.rand(3, 300, generator=gen) < 0.9, 255, 0).to(torch.uint8)
    w_scale, bias = 0.001 + 0.01 * torch.rand(13, generator=gen), torch.randn(13, generator=gen)
    sx, zx, so, zo = 0.02, 7, 60.0, 100
    out = O.qlinear(x, sx, zx, weight, w_scale, bias, so, zo, 0, 255)
    real = sx * (x.double() - zx) @ (weight.double() * w_scale.double().view(-1, 1)).T + bias.double()
    expected = torch.round(real / so + zo).clamp(0, 255)
    assert out.shape == (3, 13) and (out.double() - expected).abs().max() <= 1


def test_exact_conv_in_slices_of_the_batch_equals_it_whole_and_any_batch(monkeypatch):
    """The float sums are computed a few samples at a time (``_EXACT_CHUNK``): the codes are those of
    the whole batch at once, and of each sample alone; an empty batch gives an empty output."""
    pretend_no_vnni(monkeypatch)
    gen = _gen(11)
    weight, w_scale, bias = _layer(8, 3, 3, gen, ternary=False)
    x = _codes((5, 3, 10, 10), gen)
    args = (0.05, 3, weight, w_scale, bias, 0.7, 120, 0, 255, [2, 2], [1, 1], [1, 1], 1)
    whole = O.qconv2d(x, *args)
    monkeypatch.setattr(O, "_EXACT_CHUNK", 2 * 8 * 5 * 5)  # two samples per slice: slices of 1 (first), 2, 2
    sliced = O.qconv2d(x, *args)
    assert torch.equal(sliced, whole) and sliced.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(O.qconv2d(x[i : i + 1], *args), whole[i : i + 1]) for i in range(5))
    assert O.qconv2d(x[:0], *args).shape == (0, 8, 5, 5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch's own, from mkldnn.flags
def test_exact_path_takes_code_minus_128_the_winograd_convs_and_a_huge_out_scale(monkeypatch):
    """Three edges of the float sums: int8 abs() leaves −128 at −128 (it passed for pair-safe, and oneDNN
    saturated: 150 for 100); ATen runs float32 convs of 16+ samples as NNPACK's inexact Winograd convs
    when oneDNN's are switched off; a clamp bound of 512·out_scale overflows float32 past 6.6e35."""
    pretend_no_vnni(monkeypatch)
    weight = torch.full((4, 8, 3, 3), -128, dtype=torch.int8)
    assert not O.exact_sums(weight, 1)
    x = torch.full((1, 8, 5, 5), 255, dtype=torch.uint8)
    ones, zeros = torch.ones(4), torch.zeros(4)
    args = ([1, 1], [1, 1], [1, 1], 1)
    out = O.qconv2d(x, 1.0, 0, weight, ones, zeros, 2 * 255 * 128 * 72 / 200, 0, 0, 255, *args)
    real_w = weight.double()
    assert torch.equal(out, R.conv2d_float_reference(x, 1.0, 0, real_w, zeros, 2 * 255 * 128 * 72 / 200, 0, 0, 255,
                                                     *args))
    gen = _gen(3)
    weight = torch.where(torch.rand(8, 32, 3, 3, generator=gen) < 0.5, 127, -127).to(torch.int8)
    w_scale, bias = torch.full((8,), 0.01), torch.zeros(8)
    x = _codes((17, 32, 12, 12), gen)
    with torch.backends.mkldnn.flags(enabled=False):
        out = O.qconv2d(x, 0.05, 128, weight, w_scale, bias, 0.5, 128, 0, 255, *args)
    floating = R.conv2d_float_reference(x, 0.05, 128, weight.double() * 0.01, bias, 0.5, 128, 0, 255, *args)
    assert (out.int() - floating.int()).abs().max() <= 1
    for huge in (1e36, 3e38):
        assert int(O.qconv2d(x[:1], 0.05, 128, weight, w_scale, bias, huge, 7, 0, 255, *args).max()) == 7
        assert O.qlinear(torch.ones(1, 2, dtype=torch.uint8), 1.0, 0, torch.full((2, 2), 127, dtype=torch.int8),
                         torch.ones(2), torch.zeros(2), huge, 7, 0, 255).tolist() == [[7, 7]]


def test_onednn_engine_from_overlapping_threads_gives_back_the_callers_engine():
    """Each thread restored the engine it saw on the way in: the second saw the first's oneDNN, and
    left it as the process's engine after both were done."""
    import threading

    engine = torch.backends.quantized.engine
    other = next((e for e in torch.backends.quantized.supported_engines if e not in ("onednn", "none")), None)
    if other is None:
        pytest.skip("no quantized engine other than oneDNN to tell apart")
    torch.backends.quantized.engine = other
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with O.onednn_engine():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with O.onednn_engine():
            second_in.set()
            first_out.wait(5)
            assert torch.backends.quantized.engine == "onednn"  # still inside

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = engine


def test_onednn_engine_takes_the_engine_the_user_chose_while_a_call_was_inside():
    """A call entering while another was inside kept the engine the user had just set (its weights
    were packed under it, 1 LSB off), and the last one out restored the engine from before."""
    engine = torch.backends.quantized.engine
    other = next((e for e in torch.backends.quantized.supported_engines if e not in ("onednn", "none")), None)
    if other is None:
        pytest.skip("no quantized engine other than oneDNN to tell apart")
    try:
        with O.onednn_engine():
            torch.backends.quantized.engine = other  # the user, meanwhile
            with O.onednn_engine():
                assert torch.backends.quantized.engine == "onednn"
        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = engine


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` (1-d), at stride 2."""
    big = torch.zeros(t.numel() * 2, dtype=t.dtype)
    big[::2] = t
    return big[::2]


@pytest.mark.parametrize("layout", ["weight", "w_scale", "bias"])
def test_constants_in_any_layout_give_the_codes_of_contiguous_ones(layout):
    # oneDNN read them as dense arrays: a converted model given a transposed or strided tensor by
    # load_state_dict(assign=True) got other codes (255 apart), silently
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 8, 9, 9), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w, s, b = torch.randint(-127, 128, (6, 8, 3, 3), dtype=torch.int8), torch.rand(6) * 0.01 + 0.001, torch.randn(6)
    args = {"weight": w, "w_scale": s, "bias": b}
    other = dict(args, **{layout: w.contiguous(memory_format=torch.channels_last) if layout == "weight"
                          else _strided(args[layout])})
    conv = lambda a: O.qconv2d(x, 0.02, 3, a["weight"], a["w_scale"], a["bias"], 0.05, 128, 0, 255, [1, 1], [1, 1],
                               [1, 1], 1)
    assert torch.equal(conv(other), conv(args))
    x2 = torch.randint(0, 256, (4, 32), dtype=torch.uint8)
    lw = torch.randint(-127, 128, (10, 32), dtype=torch.int8)
    args = {"weight": lw, "w_scale": torch.rand(10) * 0.01 + 0.001, "bias": torch.randn(10)}
    other = dict(args, **{layout: lw.t().contiguous().t() if layout == "weight" else _strided(args[layout])})
    linear = lambda a: O.qlinear(x2, 0.02, 3, a["weight"], a["w_scale"], a["bias"], 0.05, 128, 0, 255)
    assert torch.equal(linear(other), linear(args))
