"""A forward argument with a None default that the example gave is traced with a value, so the
graph holds only the branch for a given value: a later call that leaves it out passed None into
that branch and failed with unrelated errors (``'NoneType' object has no attribute 'numel'``) in
every rewritten model. Each now refuses with a ValueError naming the argument."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import fxslim
from fxslim.runtime.prom_onednn import onednn_available


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 16, 1)

    def forward(self, x, bias=None):
        h = torch.relu(self.stem(x))
        if bias is not None:
            h = h + bias
        return self.pw(torch.relu(self.conv(h)))


def _models():
    torch.manual_seed(0)
    model = Net().eval()
    x, bias = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        haste = fxslim.optimize(model, (x, bias), passes=["haste:L=14"]).module
    qat = fxslim.prepare(model, (x, bias))
    fxslim.calibrate(qat, [(x, bias)])
    qat.eval()
    models = {"haste": haste, "prom_qat": qat, "prom_reference": fxslim.convert(qat)}
    if onednn_available():
        models["prom_onednn"] = fxslim.convert(qat, runtime="onednn")
    return models, x, bias


def test_leaving_out_an_argument_the_example_gave_is_refused_by_name():
    models, x, bias = _models()
    for name, model in models.items():
        with torch.no_grad():
            assert model(x, bias).shape == (2, 16, 16, 16), name  # given: runs
            with pytest.raises(ValueError, match="bias: the model was captured with bias given"):
                model(x)


class _LearnedShift(nn.Module):
    """``shift=None`` falls back to a learned shift that starts at zero: with the weights of the
    capture, the graph called with None (which adds None as the bias) agrees with the module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.shift = nn.Parameter(torch.zeros(8))

    def forward(self, x, shift=None):
        if shift is None:
            shift = self.shift
        return nn.functional.conv2d(self.conv(x), torch.eye(8)[:, :, None, None], shift)


def test_an_argument_whose_none_matches_only_by_a_zero_weight_is_still_guarded():
    """The guard was left out, and after a checkpoint set the shift to 5 a call without it was 5.0 off."""
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(_LearnedShift().eval(), (x, torch.randn(8)), passes=["haste:L=53"])
    with torch.no_grad(), pytest.raises(ValueError, match="shift: the model was captured with shift given"):
        result.module(x)


def test_the_guard_survives_a_save_and_load():
    models, x, _ = _models()
    buffer = io.BytesIO()
    torch.save(models["haste"], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad(), pytest.raises(ValueError, match="bias"):
        loaded(x)


class MaskedAttention(nn.Module):
    """The optional argument goes straight into an op that takes None (an attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, attn_mask=None):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def test_an_argument_the_graph_takes_as_none_too_is_not_guarded():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 1, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxslim.optimize(model, (x, mask), passes=["haste"]).module  # nothing to rewrite: the captured graph
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        torch.testing.assert_close(gm(x, mask), model(x, mask))


class Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, y, mask=None):
        y = self.conv(y)
        if mask is not None:
            y = y * mask
        return y


class UntraceableParent(nn.Module):
    """The root does not trace (it branches on a value), so its child is traced apart, with the
    mask the example's branch gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.child = nn.Conv2d(3, 8, 3, padding=1), Child()

    def forward(self, x, flag):
        y = self.stem(x)
        if flag.item():
            return self.child(y)
        return self.child(y, torch.sigmoid(y))


def test_a_submodule_traced_apart_refuses_a_call_without_the_argument_its_example_gave():
    torch.manual_seed(0)
    model = UntraceableParent().eval()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model, (x, torch.tensor(False)), passes=["haste:L=53,sparsity=0"])
    assert result.report.rewritten() == 1
    with torch.no_grad():
        torch.testing.assert_close(result.module(x, torch.tensor(False)), model(x, torch.tensor(False)),
                                   atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="mask: the model was captured with mask given"):
            result.module(x, torch.tensor(True))


def test_checking_the_none_branch_prints_nothing(capfd):
    _models()
    assert capfd.readouterr().err == ""  # fx prints the failing line when a GraphModule call raises


class _Refine(nn.Module):
    """``forward(x, prev=None)`` whose ``prev`` branch never reads ``prev``'s value."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.refine = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, prev=None, scale=1.0):
        h = torch.relu(self.stem(x))
        if prev is not None:
            h = h + self.refine(h)
        return self.conv(h) * scale


@pytest.mark.parametrize("after", [(), (2.0,)])
@pytest.mark.parametrize("passes", [["haste:L=48,sparsity=0"], ["prom"]])
def test_an_argument_the_example_gives_as_none_is_traced_as_none(passes, after):
    # traced as an input, None passed `if prev is not None` and the graph always ran the refine
    # branch: 0.69 off the model on (x, None), without a word
    torch.manual_seed(0)
    model, x = _Refine().eval(), torch.randn(2, 3, 16, 16)
    inputs = (x, None, *after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model, inputs, passes=passes)
    assert "refine" not in result.module.code
    with torch.no_grad():
        tolerance = 1e-5 if passes[0].startswith("haste") else 0.05  # PROM's QAT model is an 8-bit model
        torch.testing.assert_close(result.module(*inputs), model(*inputs), atol=tolerance, rtol=0)
        with pytest.raises(ValueError, match="prev: the model was captured with prev=None"):
            result.module(x, torch.zeros(2, 8, 16, 16))


class _KeywordMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, *, mask):
        out = self.conv(x)
        return out if mask is None else out * mask


def test_a_keyword_only_argument_the_example_gives_as_none_is_traced_as_none():
    # traced as an input, `out * mask` failed on None: 'FakeTensor' and 'NoneType'
    model, x = _KeywordMask().eval(), torch.rand(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model, (x, None), passes=["haste:L=48,sparsity=0"])
    with torch.no_grad():
        torch.testing.assert_close(result.module(x, mask=None), model(x, mask=None), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="mask: the model was captured with mask=None"):
            result.module(x, mask=torch.zeros(1, 8, 8, 8))


class _MaskInTheMiddle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, mask, y):
        out = self.conv(x)
        return out + y if mask is None else out * mask + y


def test_capture_export_refuses_a_tensor_for_an_argument_exported_at_none():
    # torch's exported module takes the tensor and leaves it unused: 1.97 where the model gives 1.00
    model, x, y = _MaskInTheMiddle().eval(), torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model, (x, None, y), passes=["haste:L=48,sparsity=0"], capture="export")
    with torch.no_grad():
        torch.testing.assert_close(result.module(x, None, y), model(x, None, y), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="mask: the model was captured with mask=None"):
            result.module(x, torch.zeros(1, 8, 8, 8), y)
