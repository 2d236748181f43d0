"""Layers a pass must leave alone although they look like its targets.

- A module whose class overrides the forward of its torch.nn base (timm's Conv2dSame pads by the
  input's size at run time) says by its attributes only what the base would compute; when it is a
  graph node (a leaf: it did not trace), a rewrite built from those attributes computed something
  else, and at another resolution crashed. Traced through instead (StdConv2d), its ops are matched.
- HASTE on a 1×1 output map (a conv after global pooling) never saves and hashes a 1×1 conv's
  channels into two buckets whatever L: it is skipped.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

import fxslim


class Net(nn.Module):
    def __init__(self, middle: type[nn.Conv2d]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.middle = middle(8, 8, 3, stride=2)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.middle(torch.relu(self.stem(x)))))


def _optimize(model, x, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, x, passes=[spec])


@pytest.mark.parametrize("spec", ["haste:L=53", "prom"])
def test_a_leaf_conv_with_its_own_forward_is_skipped_and_keeps_its_padding(spec):
    torch.manual_seed(0)
    model = Net(Conv2dSame).eval()
    result = _optimize(model, torch.randn(2, 3, 32, 32), spec)
    assert dict(result.report.skipped()).get("custom_forward") == 1
    entry = next(e for e in result.report.entries() if e.fqn == "middle")
    assert entry.reason == "custom_forward"
    other = torch.randn(1, 3, 48, 48)  # 24×24 maps: whole 4×4 tiles, where L = 53 is exact
    with torch.no_grad():
        out, ref = result.module(other), model(other)
    assert out.shape == ref.shape
    if spec.startswith("haste"):
        assert result.report.rewritten() == 1  # the plain 3×3 conv
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_a_conv_subclass_that_traces_is_rewritten_on_its_computed_weight():
    torch.manual_seed(0)
    model = Net(StdConv2d).eval()  # forward standardises the weight, then F.conv2d: traced through
    result = _optimize(model, torch.randn(2, 3, 32, 32), "haste:L=53")
    assert result.report.rewritten() == 2
    other = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(result.module(other), model(other), atol=1e-4, rtol=1e-4)


class PooledHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 64, 1)  # MobileNetV3's conv_head: 1×1 after global pooling

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3), keepdim=True)).flatten(1)


def test_haste_skips_a_conv_with_a_one_pixel_output():
    torch.manual_seed(0)
    model = PooledHead().eval()
    x = torch.randn(2, 3, 16, 16)
    result = _optimize(model, x, "haste:L=53")
    entry = next(e for e in result.report.entries() if e.fqn == "head")
    assert (entry.status, entry.reason) == ("skipped", "one_pixel_output")
    assert result.report.rewritten() == 1
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)
    before, after = ([r.macs for r in c.rows if r.fqn == "head"] for c in (result.cost_before, result.cost_after))
    assert after == before == [2 * 32 * 64]  # counted as the dense conv it still is


def test_a_forward_set_on_the_instance_is_skipped():
    torch.manual_seed(0)
    model = Net(nn.Conv2d).eval()
    plain = model.conv.forward
    model.conv.forward = lambda x: plain(x) * 2.0  # a wrapper set on the instance, not the class
    x = torch.randn(1, 3, 32, 32)
    for spec in ("haste:L=53,sparsity=0", "prom"):
        result = _optimize(model, x, spec)
        entry = next(e for e in result.report.entries() if e.fqn == "conv")
        assert (entry.status, entry.reason) == ("skipped", "custom_forward"), spec
    with torch.no_grad():
        torch.testing.assert_close(_optimize(model, x, "haste:L=53,sparsity=0").module(x), model(x),
                                   atol=1e-4, rtol=1e-4)


def test_haste_runs_the_dense_conv_where_a_call_has_a_one_pixel_output():
    """Rewritten at 16 px, called at 1 px: one output pixel per sample (0.49 off before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)).eval()
    result = _optimize(model, torch.randn(2, 3, 16, 16), "haste:L=53,sparsity=0")
    assert result.report.rewritten() == 1
    tiny = torch.randn(2, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(result.module(tiny), model(tiny), atol=1e-6, rtol=1e-6)
    dense = fxslim.estimate(model, tiny).rows[1]
    rewritten = fxslim.estimate(result.module, tiny).rows[1]
    assert (rewritten.macs, rewritten.elementwise) == (dense.macs, 0)  # counted as what runs
    assert rewritten.info["one_pixel_output"] == "runs the dense conv"


def test_prom_does_not_fold_a_batch_norm_subclass_with_its_own_forward():
    """timm's BatchNormAct2d in train mode: its forward counts batches, so it is a leaf, and it is a
    BatchNorm2d that applies its activation too. PROM folded it as a plain BN and dropped the SiLU:
    the integer model was 1.5 off the fake-quant model on timm's mobilevit_xxs."""
    from timm.layers import BatchNormAct2d

    from fxslim.passes.prom import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU),
                          nn.Conv2d(8, 16, 1), BatchNormAct2d(16, act_layer=nn.SiLU), nn.Conv2d(16, 4, 3))
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = calibrate(fxslim.prepare(model.train(), x[:2]), [x]).eval()
        integer = fxslim.convert(qat)
    with torch.no_grad():
        out, ref = integer(x), qat(x)
    assert (out - ref).norm() / ref.norm() < 0.05
