"""Storage: bits per format and packing, and the real size of a saved state dict."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fxslim
from fxslim.cost_model.storage import PACKINGS, format_bits, state_dict_bytes


def test_format_bits_and_ternary_packings():
    assert [format_bits(f) for f in ("fp32", "fp16", "bf16", "int8", "int4")] == [32, 16, 16, 8, 4]
    assert format_bits("ternary") == 2  # four weights per byte by default
    assert format_bits("ternary", "base3") == 1.6  # five per byte
    assert format_bits("ternary", "log2_3") == pytest.approx(1.58496, abs=1e-5)
    assert format_bits("ternary", "int8") == 8 and PACKINGS["nibble"] == 4
    with pytest.raises(ValueError, match="format: expected one of"):
        format_bits("fp8")


def test_state_dict_bytes_is_what_torch_save_writes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert state_dict_bytes(model) == len(buf.getvalue()) == state_dict_bytes(model.state_dict())
    report = fxslim.estimate(model.eval(), torch.randn(1, 3, 8, 8))
    # parameters only (no BN running stats), fp32: a lower bound of the file
    assert report.total.storage_bytes == 4 * (8 * 27 + 8 + 8 + 8) < state_dict_bytes(model)
    with pytest.raises(TypeError, match="state_dict_bytes: expected an nn.Module or a state dict"):
        state_dict_bytes([1, 2])


def test_storage_per_layer_deployed_int8_with_scales():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    report = fxslim.estimate(model, torch.randn(1, 3, 8, 8), deploy="int8")
    conv, linear = [r for r in report.rows if r.macs]
    # weights at 8 bit + one 16-bit scale per output channel; biases at the preset's fp16
    assert conv.storage_bits == 8 * 27 * 8 + 8 * 16 + 8 * 16
    assert linear.storage_bits == 4 * 288 * 8 + 4 * 16 + 4 * 16


def test_tied_weights_are_one_tensor_in_params_and_storage():
    """An embedding shared with the output layer was counted twice (2x params and storage)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(100, 16), nn.Linear(16, 100, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            return self.head(self.emb(tokens))

    model = Tied().eval()
    report = fxslim.estimate(model, (torch.randint(0, 100, (2, 5)),))
    assert report.total.params == 1600 == sum(p.numel() for p in model.parameters())
    assert report.total.storage_bytes == 4 * 1600


class _OwnForwardLinear(nn.Linear):
    """timm's Linear: an nn.Linear subclass with its own forward, which PROM leaves in float."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_weights_a_prom_integer_model_keeps_in_float_are_counted():
    """A float island's traced-through weights became buffers in the integer model, and the cost
    model counts parameters: the classifier kept its MACs but lost its 257,000 weights from params
    and storage (4.7 kB counted beside a 1 MB file)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 256, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), _OwnForwardLinear(256, 1000)).eval()
    res = fxslim.optimize(model, torch.randn(1, 3, 32, 32), passes=["prom"])
    assert [e.reason for e in res.report.entries() if e.fqn == "5"] == ["not_a_module"]
    integer = res.deployed
    weight = dict(integer.named_parameters())["5.weight"]
    assert not weight.requires_grad
    row = next(r for r in res.cost_after.rows if r.fqn == "5" and r.macs)
    assert row.params == 257_000 and row.storage_bits == 257_000 * 32
    assert res.cost_after.total.storage_bytes > 257_000 * 4
    assert res.saved_bytes[1] > res.cost_after.total.storage_bytes > 0.9 * res.saved_bytes[1]


def test_a_weight_standardised_in_forward_is_stored_in_its_convs_format():
    """timm's StdConv2d reads its weight through reshape and batch_norm: the weight was stored on the
    reshape's row, at the ``params`` format, so ``deploy='prom'`` priced a ternary 1×1 conv's weight
    as fp16 (2,048 bits where the plain conv's is 512)."""
    from timm.layers import StdConv2d

    x = torch.randn(1, 8, 20, 20)
    for k in (1, 3):
        plain = nn.Sequential(nn.Conv2d(8, 16, k, padding=k // 2, bias=False)).eval()
        standardised = nn.Sequential(StdConv2d(8, 16, k, padding=k // 2, bias=False)).eval()
        for deploy in ("int8", "prom"):
            want = fxslim.estimate(plain, (x,), deploy=deploy)
            got = fxslim.estimate(standardised, (x,), deploy=deploy)
            assert got.total.storage_bits == want.total.storage_bits and got.total.params == want.total.params
            assert [r.kind for r in got.rows if r.params] == [r.kind for r in want.rows if r.params]


def test_a_haste_conv_of_a_standardised_weight_counts_it_once():
    """The weight was counted on the reshape that standardises it and again by the HASTE op's
    formula: 21,706 parameters after HASTE for a model of 11,466 (9,216 of them twice)."""
    from timm.layers import StdConv2d

    model = nn.Sequential(StdConv2d(3, 32, 3, padding=1), nn.ReLU(), StdConv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    res = fxslim.optimize(model, torch.randn(2, 3, 16, 16), passes=["haste:L=48,s=0"])
    assert res.report.rewritten("haste") == 1
    assert res.cost_after.total.params == res.cost_before.total.params == sum(p.numel() for p in model.parameters())
