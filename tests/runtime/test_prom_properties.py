"""Property tests of the PROM integer ops over memory layouts, batch sizes and input dtypes.

tests/runtime/test_prom.py checks every op bit-exact against its int64 oracle on contiguous
inputs of batch >= 1 (groups, dilation, strides, padding, multiplier regimes included); here random
inputs also vary the layout (contiguous or channels_last codes) and the batch size (0, 1,
several): outputs are identical in every layout, equal the oracle, and a sample alone gives its
rows of the batch. The boundary ops take every float dtype (``quantize_per_tensor``: float32,
float64, bfloat16, float16 give the codes of the float32 value); integer ops given float tensors,
or quantize given integers, raise ValueError naming the argument.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslim.runtime import prom as P
from fxslim.runtime import prom_reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=25, deadline=None)
_LAYOUTS = st.sampled_from([torch.contiguous_format, torch.channels_last])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, gen, memory_format=torch.contiguous_format) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    return codes.contiguous(memory_format=memory_format) if codes.dim() == 4 else codes


def _requant(channels: int, gen) -> tuple[torch.Tensor, int]:
    return P.requant_multiplier(torch.rand(channels, generator=gen, dtype=torch.float64) * 1e-2, 23), 23


def _conv_args(kind, n, c_in, c_out, h, w, groups, fmt, seed):
    gen = _gen(seed)
    x = _codes((n, c_in, h, w), gen, fmt)
    bias = torch.randint(-2000, 2000, (c_out,), generator=gen, dtype=torch.int32)
    mult, shift = _requant(c_out, gen)
    if kind == "ternary":
        packed = P.pack_ternary(torch.randint(-1, 2, (c_out, c_in), generator=gen).to(torch.int8))
        return (x, 7, packed, bias, mult, shift, 128, 0, 255, [1, 1])
    weight = torch.randint(-127, 128, (c_out, c_in // groups, 3, 3), generator=gen).to(torch.int8)
    return (x, 7, weight, bias, mult, shift, 128, 0, 255, [1, 2], [1, 1], [2, 1], groups)


_OPS = {"ternary": (P.ternary_conv2d, R.ternary_conv2d_reference), "int8": (P.int8_conv2d, R.int8_conv2d_reference)}


@SETTINGS
@given(kind=st.sampled_from(list(_OPS)), n=st.integers(0, 3), c=st.integers(1, 6), h=st.integers(3, 7),
       w=st.integers(3, 7), grouped=st.booleans(), fmt=_LAYOUTS, seed=st.integers(0, 10_000))
def test_conv_ops_same_codes_in_every_layout_and_batch_size(kind, n, c, h, w, grouped, fmt, seed):
    groups = c if grouped and kind == "int8" else 1  # depthwise
    args = _conv_args(kind, n, c, c if groups > 1 else c + 1, h, w, groups, fmt, seed)
    op, reference = _OPS[kind]
    out = op(*args)
    assert out.dtype == torch.uint8 and out.shape[0] == n
    if n == 0:
        return
    assert out.is_contiguous(memory_format=torch.channels_last)  # conv outputs are channels_last codes
    other = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
    assert torch.equal(op(args[0].contiguous(memory_format=other), *args[1:]), out)
    assert torch.equal(out, reference(args[0].contiguous(), *args[1:]))
    for i in range(n):  # batch 1
        assert torch.equal(op(args[0][i:i + 1], *args[1:]), out[i:i + 1])


@SETTINGS
@given(n=st.integers(0, 3), c=st.integers(1, 6), h=st.integers(1, 6), w=st.integers(1, 6), fmt=_LAYOUTS,
       seed=st.integers(0, 10_000))
def test_add_and_pool_same_codes_in_every_layout_and_batch_size(n, c, h, w, fmt, seed):
    gen = _gen(seed)
    a, b = _codes((n, c, h, w), gen, fmt), _codes((n, c, h, w), gen, fmt)
    add_args = (a, 3, 500_000, b, 200, 900_000, 20, 7, 0, 255)
    added = P.int8_add(*add_args)
    pool_args = (a, 3, int(P.requant_multiplier(0.5 / (h * w), 23)), 23, 7, 0, 255)
    pooled = P.int8_global_avg_pool2d(*pool_args)
    assert added.shape == a.shape and pooled.shape == (n, c, 1, 1)
    if n == 0:
        return
    assert torch.equal(added, R.int8_add_reference(a.contiguous(), 3, 500_000, b.contiguous(), *add_args[4:]))
    assert torch.equal(pooled, R.int8_global_avg_pool2d_reference(a.contiguous(), *pool_args[1:]))
    for i in range(n):
        assert torch.equal(P.int8_add(a[i:i + 1], 3, 500_000, b[i:i + 1], *add_args[4:]), added[i:i + 1])


@SETTINGS
@given(rows=st.integers(0, 4), k=st.integers(1, 20), out=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_int8_linear_any_batch_size_equals_oracle(rows, k, out, seed):
    gen = _gen(seed)
    x = _codes((rows, k), gen)
    weight = torch.randint(-127, 128, (out, k), generator=gen).to(torch.int8)
    bias = torch.randint(-2000, 2000, (out,), generator=gen, dtype=torch.int32)
    mult, shift = _requant(out, gen)
    args = (x, 9, weight, bias, mult, shift, 100, 0, 255)
    result = P.int8_linear(*args)
    assert result.shape == (rows, out) and result.dtype == torch.uint8
    assert torch.equal(result, R.int8_linear_reference(*args))


@SETTINGS
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), fmt=_LAYOUTS,
       n=st.integers(0, 2), scale=st.floats(1e-3, 1.0), zp=st.integers(0, 255), seed=st.integers(0, 10_000))
def test_quantize_per_tensor_any_float_dtype_gives_codes_of_the_float32_value(dtype, fmt, n, scale, zp, seed):
    x = (torch.randn(n, 3, 4, 5, generator=_gen(seed)) * 100 * scale).to(dtype).contiguous(memory_format=fmt)
    codes = P.quantize_per_tensor(x, scale, zp)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(codes, P.quantize_per_tensor(x.float().contiguous(), scale, zp))
    if n:
        assert codes.is_contiguous(memory_format=fmt)
    back = P.dequantize(codes, scale, zp)
    assert back.dtype == torch.float32 and back.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.int32])
def test_integer_ops_non_uint8_codes_raise_value_error(dtype):
    args = list(_conv_args("int8", 1, 2, 3, 5, 5, 1, torch.contiguous_format, 0))
    args[0] = args[0].to(dtype)
    with pytest.raises(ValueError, match="expected uint8 activation codes"):
        P.int8_conv2d(*args)
    with pytest.raises(ValueError, match="expected uint8 activation codes"):
        P.dequantize(args[0], 0.1, 3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.bool])
def test_quantize_per_tensor_integer_input_raises_value_error(dtype):
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        P.quantize_per_tensor(torch.ones(2, 3, dtype=dtype), 0.1, 3)
