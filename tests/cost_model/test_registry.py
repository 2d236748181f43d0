"""The cost registry: key checks, duplicates, and a custom op counted end to end.

A test-only custom op (a ternary 1×1 conv) registers its formula with ``register_cost``; the same
formula then drives ``fxslim.estimate`` on every IR and ``FlopCounterMode``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

import fxslim
from fxslim.cost_model.registry import OpCall, OpCost, lookup, register_cost, registered_costs


@torch.library.custom_op("fxslim_test::ternary_pointwise", mutates_args=())
def ternary_pointwise(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """1×1 conv with int8 codes in {-1, 0, 1} and a per-channel scale."""
    return F.conv2d(x, codes.to(x.dtype)) * scale.view(1, -1, 1, 1)


@ternary_pointwise.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0], x.shape[2], x.shape[3])


@register_cost(torch.ops.fxslim_test.ternary_pointwise, kind="pointwise_conv")
def ternary_pointwise_cost(call: OpCall) -> OpCost:
    """[n, c_in, h, w] * ternary [c_out, c_in, 1, 1] -> [n, c_out, h, w]: one addition per MAC.
    Ignores: the per-channel rescale of the outputs."""
    codes = call.args[1]
    macs = call.out.numel * codes.shape[1]
    real = call.value(1)  # the codes themselves, when the weights are available
    zero = None if real is None else float((real == 0).float().mean())
    return OpCost(macs=macs, format="ternary", zero_fraction=zero)


class _TernaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 6 output channels × 4 inputs, a quarter of the codes zero
        self.register_buffer("codes", torch.tensor([1, 0, -1, 1] * 6, dtype=torch.int8).view(6, 4, 1, 1))
        self.register_buffer("scale", torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxslim_test.ternary_pointwise(x, self.codes, self.scale)


_X = torch.randn(2, 4, 8, 8)
_MACS = 2 * 6 * 8 * 8 * 4  # n·c_out·h·w·c_in


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_custom_op_formula_estimate_counts_additions_only(capture):
    report = fxslim.estimate(_TernaryNet().eval(), _X, capture=capture)
    (row,) = [r for r in report.rows if r.macs]
    assert (row.kind, row.format, row.macs) == ("pointwise_conv", "ternary", _MACS)
    assert row.ops == {("add", "int32"): _MACS}  # no multiplications, 32-bit accumulator by default
    assert row.energy_pj == pytest.approx(_MACS * 0.1)
    # the op's buffers are its weights: 24 int8 codes + 6 fp32 scales
    assert (row.params, row.storage_bits) == (30, 24 * 8 + 6 * 32)
    assert not report.unknown_ops


def test_custom_op_formula_measured_zero_fraction_used_when_skipping_zeros():
    report = fxslim.estimate(_TernaryNet().eval(), _X, skip_zero_weights=True, ternary_accumulator_bits=8)
    assert report.total.ops == {("add", "int8"): _MACS * 3 // 4}


def test_custom_op_formula_flop_counter_mode_counts_it():
    assert torch.ops.fxslim_test.ternary_pointwise in flop_registry
    with FlopCounterMode(display=False) as counter:
        _TernaryNet().eval()(_X)
    assert counter.get_total_flops() == 2 * _MACS


def test_register_cost_returns_function_unchanged_and_lookup_finds_overloads():
    assert lookup(torch.ops.fxslim_test.ternary_pointwise.default) is ternary_pointwise_cost
    assert lookup(torch.ops.fxslim_test.ternary_pointwise) is ternary_pointwise_cost
    assert registered_costs()[torch.ops.aten.mm] is lookup(torch.ops.aten.mm.default)
    assert lookup(F.relu) is None


def test_register_cost_non_op_key_raises_type_error():
    with pytest.raises(TypeError, match=r"expected torch.ops.<namespace>.<op> \(OpOverloadPacket or OpOverload\)"):
        register_cost(F.relu)
    with pytest.raises(TypeError, match="at least one op"):
        register_cost()


def test_register_cost_duplicate_raises_value_error():
    with pytest.raises(ValueError, match="aten.mm already has a cost formula"):
        register_cost(torch.ops.aten.mm)(lambda call: OpCost())


@torch.library.custom_op("fxslim_test::own_flops", mutates_args=())
def own_flops(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@own_flops.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@register_flop_formula(torch.ops.fxslim_test.own_flops)
def _own_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 7


def test_register_cost_keeps_an_existing_flop_counter_formula():
    register_cost(torch.ops.fxslim_test.own_flops)(lambda call: OpCost(macs=call.out.numel))
    with FlopCounterMode(display=False) as counter:
        torch.ops.fxslim_test.own_flops(torch.ones(3))
    assert counter.get_total_flops() == 7
