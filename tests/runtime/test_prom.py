"""Tests of the PROM integer ops: fast kernels bit-exact against their int64 oracles, within 1 LSB
of the float model, the ternary oracle free of multiplications, registration and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fxslim.runtime import prom as P
from fxslim.runtime import prom_reference as R
from tests.runtime.conv_geometry import conv_geometries

SETTINGS = settings(max_examples=25, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, gen, low=0, high=256) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


def _ternary(shape, gen) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=gen).to(torch.int8)


def _multipliers(channels: int, gen, regime: str) -> tuple[torch.Tensor, int]:
    """Multipliers for each requantization kernel: int32 (shift 23, real <= 1), int32 with a final
    clamp (shift 22, real > 1), int64 (large shift)."""
    if regime == "int32":
        real = torch.rand(channels, generator=gen, dtype=torch.float64) ** 3
        return P.requant_multiplier(real, 23), 23
    if regime == "wide":  # real > 1 at shift 22: int32 kernel with a final clamp
        real = 1 + 50 * torch.rand(channels, generator=gen, dtype=torch.float64)
        return P.requant_multiplier(real, 22), 22
    if regime == "large":  # shift 28: int64 kernel
        real = 1 + 3 * torch.rand(channels, generator=gen, dtype=torch.float64)
        return P.requant_multiplier(real, 28), 28
    real = torch.rand(channels, generator=gen, dtype=torch.float64) * 1e-3  # tiny: long shift
    return P.requant_multiplier(real, 40), 40


def _offset(multiplier: torch.Tensor, shift: int, gen, use: bool) -> torch.Tensor | None:
    """None (round half up) or per-channel rounding offsets in [0, 2^shift]."""
    if not use:
        return None
    return torch.randint(0, (1 << shift) + 1, multiplier.shape, generator=gen, dtype=torch.int64).to(torch.int32)


def _out_range(gen) -> tuple[int, int, int]:
    zp = int(torch.randint(0, 256, (1,), generator=gen))
    lo = int(torch.randint(0, 128, (1,), generator=gen))
    hi = int(torch.randint(128, 256, (1,), generator=gen))
    return zp, lo, hi


# ----------------------------------------------------------------------------------------------
# Packing


@SETTINGS
@given(c_out=st.integers(1, 9), c_in=st.integers(1, 21), seed=st.integers(0, 1000))
def test_pack_ternary_round_trip_returns_codes(c_out, c_in, seed):
    codes = _ternary((c_out, c_in), _gen(seed))
    packed = P.pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (c_out, (c_in + 3) // 4)
    assert torch.equal(P.unpack_ternary(packed, c_in), codes)


def test_pack_ternary_four_codes_per_byte_layout():
    packed = P.pack_ternary(torch.tensor([[1, -1, 0, 1, -1]], dtype=torch.int8))
    # byte 0: +1 at bits 0-1 (01), -1 at bits 2-3 (10), 0, +1 at bits 6-7 (01); byte 1: -1 (10)
    assert packed.tolist() == [[0b01_00_10_01, 0b10]]


def test_unpack_ternary_invalid_code_raises():
    with pytest.raises(ValueError, match="0b11"):
        P.unpack_ternary(torch.tensor([[0b11]], dtype=torch.uint8), 1)


def test_pack_ternary_value_two_raises():
    with pytest.raises(ValueError, match="codes"):
        P.pack_ternary(torch.tensor([[2, 0]], dtype=torch.int8))


# ----------------------------------------------------------------------------------------------
# Fixed-point multipliers


@SETTINGS
@given(real=st.floats(1e-6, 64.0), shift=st.integers(0, 24))
def test_requant_multiplier_error_within_half_step(real, shift):
    if real * 2**shift > 2**31 - 1:
        with pytest.raises(ValueError, match="shift"):
            P.requant_multiplier(real, shift)
        return
    m = int(P.requant_multiplier(real, shift))
    assert abs(m / 2**shift - real) <= 2.0 ** -(shift + 1)


def test_requant_multiplier_negative_raises():
    with pytest.raises(ValueError, match="real multipliers"):
        P.requant_multiplier(torch.tensor([-0.5]))


def test_requant_tables_use_int32_for_unit_and_wide_multipliers():
    unit = P._requant_tables(P.requant_multiplier(torch.tensor([0.3, 1.0], dtype=torch.float64), 23), None, 23, 5, 0, 255, 1 << 24)
    wide = P._requant_tables(P.requant_multiplier(torch.tensor([0.3, 100.0], dtype=torch.float64), 22), None, 22, 5, 0, 255, 1 << 24)
    assert unit is not None and unit[4] is False  # no final clamp needed
    assert wide is not None and wide[4] is True
    assert P._requant_tables(P.requant_multiplier(torch.tensor([0.3]), 30), None, 30, 5, 0, 255, 1 << 24) is None


def test_requantize_matches_rounded_real_product_within_one():
    gen = _gen(0)
    acc = torch.randint(-100_000, 100_000, (4, 8, 5), generator=gen, dtype=torch.int32)
    real = torch.rand(8, generator=gen, dtype=torch.float64) * 0.01
    out = P.requantize(acc, P.requant_multiplier(real, 23), 23, 128, 0, 255)
    expected = (torch.round(acc.double() * real.view(1, -1, 1)) + 128).clamp(0, 255)
    assert (out.double() - expected).abs().max() <= 1


# ----------------------------------------------------------------------------------------------
# Fast kernels against the int64 oracles (bit-exact)


@SETTINGS
@given(
    n=st.integers(1, 3), c_in=st.integers(1, 20), c_out=st.integers(1, 12), h=st.integers(1, 7), w=st.integers(1, 7),
    stride=st.sampled_from([(1, 1), (2, 2), (1, 2), (3, 1)]), regime=st.sampled_from(["int32", "wide", "large", "tiny"]),
    with_offset=st.booleans(), seed=st.integers(0, 10_000),
)
def test_ternary_conv2d_equals_add_sub_oracle(n, c_in, c_out, h, w, stride, regime, with_offset, seed):
    gen = _gen(seed)
    x = _codes((n, c_in, h, w), gen)
    packed = P.pack_ternary(_ternary((c_out, c_in), gen))
    bias = torch.randint(-3000, 3000, (c_out,), generator=gen, dtype=torch.int32)
    mult, shift = _multipliers(c_out, gen, regime)
    zx = int(torch.randint(0, 256, (1,), generator=gen))
    args = (x, zx, packed, bias, mult, shift, *_out_range(gen), list(stride), _offset(mult, shift, gen, with_offset))
    out = P.ternary_conv2d(*args)
    assert torch.equal(out, R.ternary_conv2d_reference(*args))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_ternary_conv2d_without_onednn_equals_oracle(monkeypatch):
    monkeypatch.setattr(P, "_onednn_available", lambda x: False)
    gen = _gen(1)
    x = _codes((2, 11, 5, 6), gen)
    packed = P.pack_ternary(_ternary((7, 11), gen))
    bias = torch.randint(-500, 500, (7,), generator=gen, dtype=torch.int32)
    mult, shift = _multipliers(7, gen, "int32")
    args = (x, 17, packed, bias, mult, shift, 90, 0, 255, [2, 1])
    assert torch.equal(P.ternary_conv2d(*args), R.ternary_conv2d_reference(*args))


def test_ternary_conv2d_extreme_inputs_equal_oracle():
    """All codes 255 (or 0) with one sign per channel: the largest accumulators, 960 inputs."""
    x = torch.full((1, 960, 2, 2), 255, dtype=torch.uint8)
    codes = torch.ones(4, 960, dtype=torch.int8)
    codes[2:] = -1
    packed = P.pack_ternary(codes)
    bias = torch.tensor([0, -5, 7, 0], dtype=torch.int32)
    mult = P.requant_multiplier(torch.full((4,), 1e-3, dtype=torch.float64))
    for zx in (0, 255):
        args = (x, zx, packed, bias, mult, 23, 128, 0, 255)
        assert torch.equal(P.ternary_conv2d(*args), R.ternary_conv2d_reference(*args))


def test_ternary_accumulate_reference_never_multiplies():
    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gen = _gen(2)
    x = _codes((2, 10, 4, 4), gen)
    packed = P.pack_ternary(_ternary((6, 10), gen))
    bias = torch.randint(-50, 50, (6,), generator=gen, dtype=torch.int32)
    with Recorder() as recorder:
        R.ternary_accumulate_reference(x, 3, packed, bias)
    forbidden = {"mul", "mm", "bmm", "addmm", "matmul", "convolution", "conv2d", "einsum", "dot", "mv", "addcmul"}
    assert recorder.ops and not forbidden.intersection(recorder.ops)


@SETTINGS
@given(geometry=conv_geometries(), regime=st.sampled_from(["int32", "wide", "large", "tiny"]), with_offset=st.booleans(),
       seed=st.integers(0, 10_000))
def test_int8_conv2d_equals_oracle(geometry, regime, with_offset, seed):
    n, c_in, c_out, h, w, kernel, stride, padding, dilation, groups = geometry
    gen = _gen(seed)
    x = _codes((n, c_in, h, w), gen)
    weight = torch.randint(-127, 128, (c_out, c_in // groups, *kernel), generator=gen).to(torch.int8)
    bias = torch.randint(-20_000, 20_000, (c_out,), generator=gen, dtype=torch.int32)
    mult, shift = _multipliers(c_out, gen, regime)
    zx = int(torch.randint(0, 256, (1,), generator=gen))
    args = (x, zx, weight, bias, mult, shift, *_out_range(gen), stride, padding, dilation, groups,
            _offset(mult, shift, gen, with_offset))
    out = P.int8_conv2d(*args)
    assert torch.equal(out, R.int8_conv2d_reference(*args))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_int8_conv2d_dilated_one_by_one_kernel_equals_oracle():
    """A 1×1 kernel with stride 2, padding 1 and dilation 2 on an 8×1 input crashed the process inside
    oneDNN (found by a sweep of the property above): a dilation along a kernel side of 1 is now 1."""
    gen = _gen(5)
    x = _codes((1, 1, 8, 1), gen)
    weight = torch.randint(-127, 128, (1, 1, 1, 1), generator=gen).to(torch.int8)
    bias = torch.randint(-20_000, 20_000, (1,), generator=gen, dtype=torch.int32)
    mult, shift = _multipliers(1, gen, "tiny")
    args = (x, 3, weight, bias, mult, shift, *_out_range(gen), [2, 2], [1, 1], [2, 2], 1, None)
    out = P.int8_conv2d(*args)
    assert out.shape == (1, 1, 5, 2) and torch.equal(out, R.int8_conv2d_reference(*args))


@pytest.mark.parametrize("groups", [1, 8])
def test_int8_conv2d_extreme_inputs_equal_oracle(groups):
    """Codes 255 against weights ±127 everywhere (the int16 saturation case of non-VNNI kernels)."""
    x = torch.full((2, 8, 6, 6), 255, dtype=torch.uint8)
    weight = torch.full((8, 8 // groups, 3, 3), 127, dtype=torch.int8)
    weight[::2] = -127
    bias = torch.zeros(8, dtype=torch.int32)
    mult = P.requant_multiplier(torch.full((8,), 1e-4, dtype=torch.float64))
    for zx in (0, 128):
        args = (x, zx, weight, bias, mult, 23, 128, 0, 255, [1, 1], [1, 1], [1, 1], groups)
        assert torch.equal(P.int8_conv2d(*args), R.int8_conv2d_reference(*args))


def test_int8_conv2d_large_bias_uses_exact_f64_kernel():
    gen = _gen(3)
    x = _codes((1, 4, 5, 5), gen)
    weight = torch.randint(-127, 128, (3, 4, 3, 3), generator=gen).to(torch.int8)
    bias = torch.tensor([1 << 25, -(1 << 25), 12345], dtype=torch.int32)  # |acc| >= 2^24: not f32-exact
    mult = P.requant_multiplier(torch.tensor([1e-6, 1e-6, 1e-3], dtype=torch.float64), 40)
    args = (x, 0, weight, bias, mult, 40, 100, 0, 255, [1, 1], [1, 1], [1, 1], 1)
    assert torch.equal(P.int8_conv2d(*args), R.int8_conv2d_reference(*args))


@SETTINGS
@given(rows=st.integers(1, 6), k=st.integers(1, 40), out=st.integers(1, 12), lead=st.booleans(),
       regime=st.sampled_from(["int32", "wide", "large", "tiny"]), with_offset=st.booleans(), seed=st.integers(0, 10_000))
def test_int8_linear_equals_oracle(rows, k, out, lead, regime, with_offset, seed):
    gen = _gen(seed)
    x = _codes((2, rows, k) if lead else (rows, k), gen)
    weight = torch.randint(-127, 128, (out, k), generator=gen).to(torch.int8)
    bias = torch.randint(-20_000, 20_000, (out,), generator=gen, dtype=torch.int32)
    mult, shift = _multipliers(out, gen, regime)
    args = (x, int(torch.randint(0, 256, (1,), generator=gen)), weight, bias, mult, shift, *_out_range(gen),
            _offset(mult, shift, gen, with_offset))
    result = P.int8_linear(*args)
    assert result.shape == (*x.shape[:-1], out)
    assert torch.equal(result, R.int8_linear_reference(*args))


@SETTINGS
@given(shape=st.sampled_from([(3, 5, 4, 4), (2, 7), (9,)]), shift=st.sampled_from([0, 5, 20, 22, 23, 31, 45]),
       scale=st.sampled_from([0.0, 1e-6, 1e-3, 0.5, 1.0, 3.0, 100.0]), per_channel=st.booleans(), with_offset=st.booleans(),
       seed=st.integers(0, 10_000))
def test_requantize_equals_oracle(shape, shift, scale, per_channel, with_offset, seed):
    gen = _gen(seed)
    acc = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64)
    acc[..., :1] = torch.randint(-3000, 3000, acc[..., :1].shape, generator=gen)  # small ones too
    acc = acc.to(torch.int32)
    channels = shape[1] if (per_channel and len(shape) >= 2) else 1
    real = scale * torch.rand(channels, generator=gen, dtype=torch.float64)
    if real.max() * 2**shift > 2**31 - 1:
        return
    mult = P.requant_multiplier(real, shift)
    args = (acc, mult, shift, *_out_range(gen), _offset(mult, shift, gen, with_offset))
    assert torch.equal(P.requantize(*args), R.requantize_reference(*args))


@SETTINGS
@given(shape=st.sampled_from([(2, 6, 5, 5), (3, 10)]), ma=st.integers(0, 2**31 - 1), mb=st.integers(0, 2**22),
       shift=st.sampled_from([0, 13, 20, 30]), seed=st.integers(0, 10_000))
def test_int8_add_equals_oracle(shape, ma, mb, shift, seed):
    gen = _gen(seed)
    a, b = _codes(shape, gen), _codes(shape, gen)
    za, zb = (int(v) for v in torch.randint(0, 256, (2,), generator=gen))
    args = (a, za, ma, b, zb, mb, shift, *_out_range(gen))
    assert torch.equal(P.int8_add(*args), R.int8_add_reference(*args))


@SETTINGS
@given(n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 9), w=st.integers(1, 9),
       real=st.floats(1e-4, 2.0), seed=st.integers(0, 10_000))
def test_int8_global_avg_pool2d_equals_oracle(n, c, h, w, real, seed):
    gen = _gen(seed)
    x = _codes((n, c, h, w), gen)
    shift = 23 if real <= 1 else 28
    args = (x, int(torch.randint(0, 256, (1,), generator=gen)), int(P.requant_multiplier(real, shift)), shift,
            *_out_range(gen))
    out = P.int8_global_avg_pool2d(*args)
    assert out.shape == (n, c, 1, 1)
    assert torch.equal(out, R.int8_global_avg_pool2d_reference(*args))


def test_weight_updated_in_place_is_not_served_from_cache():
    gen = _gen(4)
    x = _codes((1, 4, 5, 5), gen)
    weight = torch.randint(-127, 128, (4, 1, 3, 3), generator=gen).to(torch.int8)
    bias = torch.zeros(4, dtype=torch.int32)
    mult = P.requant_multiplier(torch.full((4,), 1e-2, dtype=torch.float64))
    args = (x, 9, weight, bias, mult, 23, 100, 0, 255, [1, 1], [1, 1], [1, 1], 4)
    first = P.int8_conv2d(*args)
    weight.neg_()
    second = P.int8_conv2d(*args)
    assert torch.equal(second, R.int8_conv2d_reference(*args)) and not torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# Boundaries: quantize / dequantize


@SETTINGS
@given(scale=st.floats(1e-3, 1.0), zp=st.integers(0, 255), seed=st.integers(0, 10_000))
def test_quantize_per_tensor_matches_fake_quantize(scale, zp, seed):
    x = torch.randn(3, 4, 5, 6, generator=_gen(seed)) * 200 * scale
    x[0, 0, 0, :2] = torch.tensor([0.5, 2.5]) * scale  # ties round half to even
    codes = P.quantize_per_tensor(x, scale, zp)
    fake = torch.fake_quantize_per_tensor_affine(
        x, torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32), 0, 255
    )
    assert torch.equal(P.dequantize(codes, scale, zp), fake)


def test_quantize_per_tensor_keeps_channels_last_layout():
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert P.quantize_per_tensor(x, 0.1, 3).is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Within 1 LSB of the float model (dequantize -> float op -> quantize)


def _real_params(gen, c_out, w_scale_max, k_eff):
    x_scale = 0.01 + 0.05 * float(torch.rand(1, generator=gen))
    w_scale = w_scale_max * (0.2 + torch.rand(c_out, generator=gen, dtype=torch.float64))
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    # output grid sized for the typical output range (so multipliers are < 1, as after calibration)
    out_scale = x_scale * float(w_scale.max()) * 128 * k_eff**0.5 / 255 * 4
    return x_scale, w_scale, bias, out_scale


def _int_params(x_scale, w_scale, bias, out_scale):
    """int32 bias (accumulator steps), multiplier, and the rounding offset carrying the rest of the bias."""
    s = x_scale * w_scale
    mult = P.requant_multiplier(s / out_scale, 23)
    steps = bias / s
    offset = (1 << 22) + torch.round((steps - torch.round(steps)) * mult.double())
    return torch.round(steps).to(torch.int32), mult, offset.to(torch.int32)


@SETTINGS
@given(n=st.integers(1, 2), c_in=st.integers(1, 32), c_out=st.integers(1, 8), h=st.integers(1, 6),
       stride=st.sampled_from([(1, 1), (2, 2)]), seed=st.integers(0, 10_000))
def test_ternary_conv2d_within_one_lsb_of_float_model(n, c_in, c_out, h, stride, seed):
    gen = _gen(seed)
    x = _codes((n, c_in, h, h), gen)
    codes = _ternary((c_out, c_in), gen)
    x_scale, alpha, bias, out_scale = _real_params(gen, c_out, 0.1, c_in)
    int_bias, mult, offset = _int_params(x_scale, alpha, bias, out_scale)
    zx, (zy, lo, hi) = 128, _out_range(gen)
    out = P.ternary_conv2d(x, zx, P.pack_ternary(codes), int_bias, mult, 23, zy, lo, hi, list(stride), offset)
    real_w = (alpha.view(-1, 1) * codes).view(c_out, c_in, 1, 1)
    ref = R.conv2d_float_reference(x, x_scale, zx, real_w, bias, out_scale, zy, lo, hi, stride)
    assert (out.int() - ref.int()).abs().max() <= 1


@SETTINGS
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), depthwise=st.booleans(), seed=st.integers(0, 10_000))
def test_int8_conv2d_within_one_lsb_of_float_model(c_in, c_out, depthwise, seed):
    gen = _gen(seed)
    groups, c_out = (c_in, c_in) if depthwise else (1, c_out)
    x = _codes((2, c_in, 7, 7), gen)
    codes = torch.randint(-127, 128, (c_out, c_in // groups, 3, 3), generator=gen).to(torch.int8)
    x_scale, w_scale, bias, out_scale = _real_params(gen, c_out, 0.01, 9 * c_in // groups)
    int_bias, mult, offset = _int_params(x_scale, w_scale, bias, out_scale)
    zy, lo, hi = _out_range(gen)
    out = P.int8_conv2d(x, 77, codes, int_bias, mult, 23, zy, lo, hi, [1, 1], [1, 1], [1, 1], groups, offset)
    real_w = w_scale.view(-1, 1, 1, 1) * codes
    ref = R.conv2d_float_reference(x, x_scale, 77, real_w, bias, out_scale, zy, lo, hi, (1, 1), (1, 1), (1, 1), groups)
    assert (out.int() - ref.int()).abs().max() <= 1


@SETTINGS
@given(k=st.integers(1, 64), out=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_int8_linear_within_one_lsb_of_float_model(k, out, seed):
    gen = _gen(seed)
    x = _codes((5, k), gen)
    codes = torch.randint(-127, 128, (out, k), generator=gen).to(torch.int8)
    x_scale, w_scale, bias, out_scale = _real_params(gen, out, 0.01, k)
    int_bias, mult, offset = _int_params(x_scale, w_scale, bias, out_scale)
    zy, lo, hi = _out_range(gen)
    result = P.int8_linear(x, 30, codes, int_bias, mult, 23, zy, lo, hi, offset)
    ref = R.linear_float_reference(x, x_scale, 30, w_scale.view(-1, 1) * codes, bias, out_scale, zy, lo, hi)
    assert (result.int() - ref.int()).abs().max() <= 1


@SETTINGS
@given(sa=st.floats(0.005, 0.1), sb=st.floats(0.005, 0.1), seed=st.integers(0, 10_000))
def test_int8_add_within_one_lsb_of_float_model(sa, sb, seed):
    gen = _gen(seed)
    a, b = _codes((2, 4, 6, 6), gen), _codes((2, 4, 6, 6), gen)
    za, zb, zy = 100, 30, 120
    so = (sa + sb) * 255 / 255 * 1.2
    ma, mb = (int(m) for m in P.requant_multiplier(torch.tensor([sa / so, sb / so], dtype=torch.float64), P.ADD_SHIFT))
    out = P.int8_add(a, za, ma, b, zb, mb, P.ADD_SHIFT, zy, 0, 255)
    ref = R.add_float_reference(a, sa, za, b, sb, zb, so, zy, 0, 255)
    assert (out.int() - ref.int()).abs().max() <= 1


@SETTINGS
@given(h=st.integers(1, 9), sx=st.floats(0.005, 0.1), seed=st.integers(0, 10_000))
def test_int8_global_avg_pool2d_within_one_lsb_of_float_model(h, sx, seed):
    gen = _gen(seed)
    x = _codes((2, 5, h, h), gen)
    so = sx * 0.8
    m = int(P.requant_multiplier(sx / so, 28))
    out = P.int8_global_avg_pool2d(x, 60, m, 28, 40, 0, 255)
    ref = R.global_avg_pool2d_float_reference(x, sx, 60, so, 40, 0, 255)
    assert (out.int() - ref.int()).abs().max() <= 1


def test_int8_global_avg_pool2d_divides_by_run_time_size():
    """One multiplier (s_x/s_out, no 1/(H·W)) serves every input size: the mean of a constant map
    is that constant at 2×2, 5×5 and 16×16 alike."""
    m = int(P.requant_multiplier(1.0, 28))
    for size in (2, 5, 16):
        x = torch.full((1, 3, size, size), 200, dtype=torch.uint8)
        x[0, 1] = 17
        out = P.int8_global_avg_pool2d(x, 10, m, 28, 10, 0, 255)
        assert out.flatten().tolist() == [200, 17, 200]


def test_integer_ops_rarely_differ_from_float_model():
    """Beyond "within 1 LSB": with the bias remainder in the rounding offset and 20-23 fractional
    bits, an output differs from the float model only when that sits within ~1e-4 of a rounding
    tie, so mismatches are rare (a coarse bias or multiplier shows up here as percents)."""
    gen = _gen(7)
    x = _codes((8, 64, 12, 12), gen)
    shares = {}
    codes = _ternary((96, 64), gen)
    x_scale, alpha, bias, out_scale = _real_params(gen, 96, 0.1, 64)
    int_bias, mult, offset = _int_params(x_scale, alpha, bias, out_scale / 6)  # multipliers near 1
    out = P.ternary_conv2d(x, 128, P.pack_ternary(codes), int_bias, mult, 23, 0, 0, 255, [1, 1], offset)
    ref = R.conv2d_float_reference(x, x_scale, 128, (alpha.view(-1, 1) * codes).view(96, 64, 1, 1), bias, out_scale / 6, 0, 0, 255)
    shares["ternary"] = (out.int() - ref.int())
    w_dw = torch.randint(-127, 128, (64, 1, 3, 3), generator=gen).to(torch.int8)
    x_scale, w_scale, bias, out_scale = _real_params(gen, 64, 0.01, 9)
    int_bias, mult, offset = _int_params(x_scale, w_scale, bias, out_scale)
    out = P.int8_conv2d(x, 128, w_dw, int_bias, mult, 23, 0, 0, 255, [1, 1], [1, 1], [1, 1], 64, offset)
    ref = R.conv2d_float_reference(x, x_scale, 128, w_scale.view(-1, 1, 1, 1) * w_dw, bias, out_scale, 0, 0, 255,
                                   (1, 1), (1, 1), (1, 1), 64)
    shares["depthwise"] = (out.int() - ref.int())
    b = _codes(x.shape, gen)
    sa, sb, so = 0.0613, 0.0447, 0.1054  # not round numbers: exact ties (half up vs half even) stay rare
    ma, mb = (int(m) for m in P.requant_multiplier(torch.tensor([sa / so, sb / so], dtype=torch.float64), P.ADD_SHIFT))
    out = P.int8_add(x, 100, ma, b, 20, mb, P.ADD_SHIFT, 60, 0, 255)
    shares["add"] = out.int() - R.add_float_reference(x, sa, 100, b, sb, 20, so, 60, 0, 255).int()
    for name, diff in shares.items():
        assert diff.abs().max() <= 1, name
        assert (diff != 0).float().mean() < 2e-3, name


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, FlopCounterMode


def _op_cases():
    gen = _gen(5)
    x = _codes((2, 6, 5, 5), gen)
    packed = P.pack_ternary(_ternary((4, 6), gen))
    bias4 = torch.randint(-100, 100, (4,), generator=gen, dtype=torch.int32)
    bias6 = torch.randint(-100, 100, (6,), generator=gen, dtype=torch.int32)
    m4 = P.requant_multiplier(torch.full((4,), 0.01, dtype=torch.float64))
    m6 = P.requant_multiplier(torch.full((6,), 0.01, dtype=torch.float64))
    w_dense = torch.randint(-127, 128, (4, 6, 3, 3), generator=gen).to(torch.int8)
    w_dw = torch.randint(-127, 128, (6, 1, 3, 3), generator=gen).to(torch.int8)
    w_lin = torch.randint(-127, 128, (4, 6), generator=gen).to(torch.int8)
    acc = torch.randint(-5000, 5000, (2, 4, 3, 3), generator=gen, dtype=torch.int32)
    xf = torch.randn(2, 3, 4, 4, generator=gen)
    return {
        "ternary_conv2d": (torch.ops.fxslim.ternary_conv2d.default, (x, 3, packed, bias4, m4, 23, 100, 0, 255, [2, 1])),
        "ternary_conv2d_offset": (torch.ops.fxslim.ternary_conv2d.default,
                                  (x, 3, packed, bias4, m4, 23, 100, 0, 255, [1, 1], torch.full((4,), 1 << 21, dtype=torch.int32))),
        "int8_conv2d": (torch.ops.fxslim.int8_conv2d.default,
                        (x, 3, w_dense, bias4, m4, 23, 100, 0, 255, [1, 2], [1, 1], [1, 1], 1)),
        "int8_conv2d_depthwise": (torch.ops.fxslim.int8_conv2d.default,
                                  (x, 3, w_dw, bias6, m6, 23, 100, 0, 255, [2, 2], [1, 1], [1, 1], 6)),
        "int8_linear": (torch.ops.fxslim.int8_linear.default, (x[:, :, 0, 0].contiguous(), 3, w_lin, bias4, m4, 23, 5, 0, 255)),
        "requantize": (torch.ops.fxslim.requantize.default, (acc, m4, 23, 50, 3, 250)),
        "int8_add": (torch.ops.fxslim.int8_add.default, (x, 3, 500_000, x.flip(0), 200, 900_000, 20, 7, 0, 255)),
        "int8_global_avg_pool2d": (torch.ops.fxslim.int8_global_avg_pool2d.default, (x, 3, 123456, 23, 7, 0, 255)),
        "quantize_per_tensor": (torch.ops.fxslim.quantize_per_tensor.default, (xf, 0.05, 100)),
        # dense, neither contiguous nor channels-last: the kernel's codes come out contiguous
        "quantize_per_tensor_transposed": (torch.ops.fxslim.quantize_per_tensor.default, (xf.transpose(2, 3), 0.05, 100)),
        "dequantize": (torch.ops.fxslim.dequantize.default, (x, 0.05, 100)),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck_passes(name):
    op, args = _op_cases()[name]
    opcheck(op, args)


@pytest.mark.parametrize("name", list(_op_cases()))
def test_op_output_is_fresh_tensor(name):
    op, args = _op_cases()[name]
    out = op(*args)
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)


def test_flop_counter_counts_conv_and_linear_ops_as_two_macs():
    cases = _op_cases()
    with FlopCounterMode(display=False) as counter:
        for name in ("ternary_conv2d", "int8_conv2d", "int8_linear"):
            op, args = cases[name]
            op(*args)
    flops = counter.get_flop_counts()["Global"]
    # ternary: [2, 6, 5, 5] -> stride (2, 1) -> [2, 4, 3, 5]: MACs = 2·4·6·3·5
    assert flops[torch.ops.fxslim.ternary_conv2d] == 2 * (2 * 4 * 6 * 3 * 5)
    # int8 3x3, pad 1, stride (1, 2): [2, 4, 5, 3]: MACs = 2·4·6·9·5·3
    assert flops[torch.ops.fxslim.int8_conv2d] == 2 * (2 * 4 * 6 * 9 * 5 * 3)
    assert flops[torch.ops.fxslim.int8_linear] == 2 * (2 * 6 * 4)


# ----------------------------------------------------------------------------------------------
# Bad inputs


def _with(args, index, value):
    args = list(args) + [None] * (index + 1 - len(args))  # trailing optional arguments
    args[index] = value
    return tuple(args)


@pytest.mark.parametrize(
    ("name", "index", "value", "match"),
    [
        ("ternary_conv2d", 0, torch.zeros(2, 6, 5, 5), "x:"),
        ("ternary_conv2d", 1, 256, "x_zero_point"),
        ("ternary_conv2d", 2, torch.zeros(4, 3, dtype=torch.uint8), "weight_packed"),
        ("ternary_conv2d", 3, torch.zeros(4, dtype=torch.int64), "bias"),
        ("ternary_conv2d", 4, torch.zeros(3, dtype=torch.int32), "multiplier"),
        ("ternary_conv2d", 4, torch.full((4,), -1, dtype=torch.int32), "multiplier"),
        ("ternary_conv2d", 5, 63, "shift"),
        ("ternary_conv2d", 7, 300, "out_min"),
        ("ternary_conv2d", 8, -1, "out_max"),
        ("ternary_conv2d", 9, [0, 1], "stride"),
        ("requantize", 6, torch.zeros(3, dtype=torch.int32), "offset"),
        ("int8_conv2d", 2, torch.zeros(4, 6, 3, 3, dtype=torch.int16), "weight"),
        ("int8_conv2d", 2, torch.full((4, 6, 3, 3), -128, dtype=torch.int8), "weight"),
        ("int8_conv2d", 12, 4, "groups"),
        ("int8_conv2d", 10, [-1, 0], "padding"),
        ("int8_linear", 0, torch.zeros(2, 5, dtype=torch.uint8), "x:"),
        ("int8_add", 3, torch.zeros(1, 6, 5, 5, dtype=torch.uint8), "b:"),
        ("int8_add", 2, -1, "a_multiplier"),
        ("requantize", 0, torch.zeros(2, 4, 3, 3), "acc"),
        ("int8_global_avg_pool2d", 2, 2**31, "multiplier"),
        ("quantize_per_tensor", 1, 0.0, "scale"),
        ("dequantize", 0, torch.zeros(2, dtype=torch.int8), "q:"),
    ],
)
def test_bad_argument_raises_value_error_naming_it(name, index, value, match):
    op, args = _op_cases()[name]
    with pytest.raises(ValueError, match=match):
        op(*_with(args, index, value))


def test_conv_on_another_channel_count_names_x():
    """A converted model called on an image of another channel count said "groups: expected a divisor
    of C_in=4 and C_out=16 ...", about a conv that was right."""
    op, args = _op_cases()["int8_conv2d"]
    with pytest.raises(ValueError, match=r"x: expected 6 channels .*got shape \(2, 5, 5, 5\)"):
        op(*_with(args, 0, torch.zeros(2, 5, 5, 5, dtype=torch.uint8)))


def test_spatial_size_too_small_raises():
    op, args = _op_cases()["int8_conv2d"]
    with pytest.raises(ValueError, match="x:"):
        op(*_with(_with(args, 0, torch.zeros(1, 6, 1, 1, dtype=torch.uint8)), 10, [0, 0]))


def test_float_reference_agrees_with_torch_conv_when_unquantized():
    """Sanity of the float model itself: identity grids reproduce F.conv2d rounded."""
    x = torch.randint(0, 10, (1, 2, 4, 4), dtype=torch.uint8)
    w = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    out = R.conv2d_float_reference(x, 1.0, 0, w, None, 1.0, 0, 0, 255)
    assert torch.equal(out, F.conv2d(x.double(), w).clamp(0, 255).to(torch.uint8))


def test_int8_linear_reduced_fp32_matmul_precision_still_exact():
    """With TF32/bf16-style matmul allowed the kernels must not use f32 (they switch to f64)."""
    gen = _gen(6)
    x = _codes((7, 300), gen)
    weight = torch.randint(-127, 128, (5, 300), generator=gen).to(torch.int8)
    bias = torch.randint(-100, 100, (5,), generator=gen, dtype=torch.int32)
    mult = P.requant_multiplier(torch.full((5,), 1e-4, dtype=torch.float64))
    args = (x, 17, weight, bias, mult, 23, 128, 0, 255)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert torch.equal(P.int8_linear(*args), R.int8_linear_reference(*args))
    finally:
        torch.set_float32_matmul_precision(previous)


def test_ops_survive_torch_export_with_dynamic_batch():
    gen = _gen(8)

    class Converted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", P.pack_ternary(_ternary((6, 5), gen)))
            self.register_buffer("bias", torch.randint(-50, 50, (6,), generator=gen, dtype=torch.int32))
            self.register_buffer("mult", P.requant_multiplier(torch.full((6,), 0.05, dtype=torch.float64)))
            self.register_buffer("offset", torch.full((6,), 1 << 22, dtype=torch.int32))

        def forward(self, x):
            q = torch.ops.fxslim.quantize_per_tensor(x, 0.1, 128)
            q = torch.ops.fxslim.ternary_conv2d(q, 128, self.packed, self.bias, self.mult, 23, 10, 10, 255, [1, 1], self.offset)
            return torch.ops.fxslim.dequantize(q, 0.2, 10)

    model, x = Converted(), torch.randn(3, 5, 4, 4, generator=gen)
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.fxslim.ternary_conv2d.default in targets
    assert torch.equal(exported.module()(x), model(x))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch's own, from mkldnn.flags
def test_conv_sums_stay_exact_with_onednns_float_convs_switched_off():
    """Without oneDNN's float convs ATen takes NNPACK's Winograd convs for 16+ samples, whose float32
    sums of ±127 weights were off by 3.5: the reference runtime's sums then take float64."""
    g = torch.Generator().manual_seed(3)
    weight = torch.where(torch.rand(8, 32, 3, 3, generator=g) < 0.5, 127, -127).to(torch.int8)
    x = torch.randint(0, 256, (17, 32, 12, 12), generator=g).to(torch.uint8)
    bias = torch.zeros(8, dtype=torch.int32)
    exact = F.conv2d(x.double() - 128, weight.double(), None, 1, 1)
    with torch.backends.mkldnn.flags(enabled=False):
        acc = P._conv_acc(x, 128, weight, weight, bias, (1, 1), (1, 1), (1, 1), 1, onednn=False)
    assert torch.equal(acc.double(), exact)
