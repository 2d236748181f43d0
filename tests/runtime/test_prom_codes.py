"""fxslim::lut, fxslim::max_pool2d_codes and fxslim::mark_nan_samples against their float ops and
oracles: lookup-table activations equal the fake-quant model on all 256 codes, max pooling of codes
equals max pooling of the dequantized values, opcheck, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

from fxslim.runtime.prom_codes import is_monotone, lut_table
from fxslim.runtime.prom_reference import lut_reference
from fxslim.runtime.prom_qat import ActFakeQuant

ops = torch.ops.fxslim
CODES = torch.arange(256, dtype=torch.uint8)


def _grid(low: float, high: float) -> ActFakeQuant:
    quant = ActFakeQuant()
    quant(torch.tensor([low, high]))  # the first batch sets the range
    return quant.eval()


def _codes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


ACTIVATIONS = {
    "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "elu": F.elu, "mish": F.mish,
    "softplus": F.softplus, "scale_shift": lambda x: x * 0.5 + 1.0,
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("grids", [((-4.0, 4.0), (-1.0, 4.0)), ((-0.3, 7.5), (0.0, 2.0)), ((0.0, 1.0), (-3.0, 3.0))])
def test_lut_activation_equals_fake_quant_on_all_256_codes(name, grids):
    """quant_out(f(quant_in(x))) of the fake-quant model, for x on every code of the input grid."""
    fn = ACTIVATIONS[name]
    q_in, q_out = _grid(*grids[0]), _grid(*grids[1])
    (s_x, z_x), (s_y, z_y) = q_in.qparams(), q_out.qparams()
    table = lut_table(fn, s_x, z_x, s_y, z_y)
    real = (CODES.to(torch.float32) - z_x) * s_x
    with torch.no_grad():
        fake = q_out(fn(q_in(real)))
    expected = (torch.round(fake / q_out.scale) + q_out.zero_point).to(torch.uint8)
    assert torch.equal(ops.lut(CODES, table), expected)


def test_lut_requantization_alone_equals_fake_quant_of_the_dequantized_codes():
    q_in, q_out = _grid(-2.0, 6.0), _grid(-1.0, 3.0)
    table = lut_table(lambda x: x, *q_in.qparams(), *q_out.qparams())
    real = (CODES.to(torch.float32) - q_in.zero_point) * q_in.scale
    with torch.no_grad():
        expected = torch.round(q_out(real) / q_out.scale) + q_out.zero_point
    assert torch.equal(ops.lut(CODES, table), expected.to(torch.uint8))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_lut_matches_reference_and_keeps_shape(layout):
    x = _codes((3, 5, 4, 6), 0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.permute(0, 2, 1, 3)
    table = _codes((256,), 1)
    out = ops.lut(x, table)
    assert out.shape == x.shape and torch.equal(out, lut_reference(x, table))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dim,shape", [(1, (2, 5, 3, 4)), (2, (3, 4, 5)), (1, (6, 5))])
def test_per_channel_lut_batch_norm_equals_fake_quant_on_all_256_codes_of_every_channel(dim, shape):
    """A batch norm (per-channel scale and shift, negative gains included) then ReLU6: table[c, q]
    equals quant_out(relu6(bn(quant_in(x)))) for every code q in every channel c."""
    channels = shape[dim]
    gen = torch.Generator().manual_seed(dim)
    mean, var = torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.2
    weight, bias = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    view = [channels if i == dim else 1 for i in range(len(shape))]

    def fn(x):
        return F.relu6((x - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5) * weight.view(view) + bias.view(view))

    q_in, q_out = _grid(-3.0, 5.0), _grid(0.0, 6.0)
    table = lut_table(fn, *q_in.qparams(), *q_out.qparams(), channels=channels, dim=dim, ndim=len(shape))
    assert table.shape == (channels, 256)
    codes = CODES.view([256 if i == (0 if dim else 1) else 1 for i in range(len(shape))]).expand(
        [256 if i == (0 if dim else 1) else channels if i == dim else 1 for i in range(len(shape))]).contiguous()
    real = (codes.to(torch.float32) - q_in.zero_point) * q_in.scale
    with torch.no_grad():
        fake = q_out(fn(q_in(real)))
    expected = (torch.round(fake / q_out.scale) + q_out.zero_point).to(torch.uint8)
    assert torch.equal(ops.lut(codes, table, dim), expected)
    x = _codes(shape, 9)
    assert torch.equal(ops.lut(x, table, dim), lut_reference(x, table, dim))


def test_is_monotone_tells_increasing_from_decreasing_functions():
    assert is_monotone(F.silu, 0.01, 0)  # silu increases on [0, 2.55]
    assert not is_monotone(F.silu, 0.05, 200)  # ... but not below about −1.28
    assert not is_monotone(torch.neg, 0.01, 0)


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode",
                         [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False), ((3, 2), (2, 1), (1, 0), 1, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_codes_equals_max_pool_of_the_dequantized_values(kernel, stride, padding, dilation, ceil_mode,
                                                                    channels_last):
    x = _codes((2, 3, 9, 10), 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, zero_point = 0.05, 17
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    out = ops.max_pool2d_codes(x, pair(kernel), pair(stride), pair(padding), pair(dilation), ceil_mode)
    real = F.max_pool2d((x.to(torch.float32) - zero_point) * scale, kernel, stride, padding, dilation, ceil_mode)
    assert torch.equal(out, (torch.round(real / scale) + zero_point).to(torch.uint8))


def test_mark_nan_samples_marks_flagged_samples_only():
    x = torch.randn(3, 4)
    out = ops.mark_nan_samples(x, torch.tensor([False, True, False]))
    assert torch.isnan(out[1]).all() and torch.equal(out[[0, 2]], x[[0, 2]])
    assert torch.isnan(ops.mark_nan_samples(torch.randn(5), torch.tensor([False, True]))).all()  # dim 0 not the batch
    assert torch.equal(ops.mark_nan_samples(x, torch.zeros(3, dtype=torch.bool)), x)


def _cases():
    x = _codes((2, 3, 6, 6), 3)
    return {
        "lut": (ops.lut.default, (x, _codes((256,), 4))),
        "lut_channels_last": (ops.lut.default, (x.contiguous(memory_format=torch.channels_last), _codes((256,), 5))),
        "lut_per_channel": (ops.lut.default, (x.contiguous(memory_format=torch.channels_last), _codes((3, 256), 6), 1)),
        "max_pool2d_codes": (ops.max_pool2d_codes.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False)),
        # no flagged sample: opcheck compares outputs with NaN != NaN (the marking is tested above)
        "mark_nan_samples": (ops.mark_nan_samples.default, (torch.randn(2, 3), torch.tensor([False, False]))),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_opcheck_passes(name):
    op, args = _cases()[name]
    opcheck(op, args)


@pytest.mark.parametrize("name,index,value,match", [
    ("lut", 0, torch.zeros(4, dtype=torch.int8), "x:"),
    ("lut", 1, torch.zeros(255, dtype=torch.uint8), "table:"),
    ("lut", 1, torch.zeros(256, dtype=torch.int32), "table:"),
    ("lut", 1, torch.zeros(4, 256, dtype=torch.uint8), "table:"),  # 4 rows for 3 channels
    ("max_pool2d_codes", 0, torch.zeros(2, 3, 6, 6), "x:"),
    ("max_pool2d_codes", 0, torch.zeros(3, 6, 6, dtype=torch.uint8), "x:"),
    ("mark_nan_samples", 0, torch.zeros(2, 3, dtype=torch.uint8), "x:"),
    ("mark_nan_samples", 1, torch.tensor([1, 0]), "nan_samples:"),
])
def test_bad_argument_raises_value_error_naming_it(name, index, value, match):
    op, args = _cases()[name]
    args = (*args[:index], value, *args[index + 1:])
    with pytest.raises(ValueError, match=match):
        op(*args)


def test_lut_activation_module_in_a_model_is_the_same_table():
    """The table of nn.Hardswish equals the one of F.hardswish (what convert reads from a module)."""
    q_in, q_out = _grid(-3.0, 3.0), _grid(-0.5, 3.0)
    assert torch.equal(lut_table(nn.Hardswish(), *q_in.qparams(), *q_out.qparams()),
                       lut_table(F.hardswish, *q_in.qparams(), *q_out.qparams()))
