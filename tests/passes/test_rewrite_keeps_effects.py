"""A rewrite keeps what the model ran for its effect alone and the hooks of the modules it would
replace: an ``out=`` write, a wrapped input check, forward hooks and pre-hooks (spectral norm)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.fx
import torch.nn.utils.prune
from torch import nn

import fxslim
import fxslim.ir


@torch.fx.wrap
def check_width(x):
    if x.shape[-1] % 8:
        raise ValueError(f"width must be a multiple of 8, got {x.shape[-1]}")


class Effects(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        check_width(x)
        y = self.conv(torch.relu(self.stem(x)))
        out = torch.zeros_like(y)
        torch.mul(y, 2.0, out=out)
        return out


def _haste(model, x, capture="symbolic"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, x, passes=["haste:L=53"], capture=capture)


def test_out_writes_and_wrapped_checks_survive_the_rewrite():
    torch.manual_seed(0)
    model = Effects().eval()
    x = torch.randn(1, 3, 8, 8)
    result = _haste(model, x)
    assert result.report.rewritten("haste") == 1
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)  # L = 53: singleton buckets
    with pytest.raises(ValueError, match="multiple of 8"):
        result.module(torch.randn(1, 3, 8, 9))


def _clamp_output(module, inputs, output):
    return output.clamp(max=0.1)


def test_convs_with_hooks_are_left_to_run_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    model[2].register_forward_hook(_clamp_output)
    nn.utils.spectral_norm(model[4])
    x = torch.randn(2, 3, 12, 12)
    result = _haste(model, x)
    skipped = dict(result.report.skipped("haste"))
    assert skipped.get("module_hooks") == 2
    # shape propagation ran spectral_norm's hook on fake tensors: the module keeps its real weight
    assert type(result.module.get_submodule("4").weight) is torch.Tensor
    torch.save(result.module, io.BytesIO())
    with torch.no_grad():
        out = result.module(x)
        assert type(out) is torch.Tensor
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)


class NormalisesInPlace(nn.Module):
    """Normalises its input in place, then branches on data: forward does not trace whole, so
    capture runs it on the example to find its parts' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x.sub_(0.5)
        if x.sum() > 0:
            x = x * 1.0
        return self.conv(torch.relu(self.stem(x)))


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_the_callers_example_is_not_written_by_optimize(capture):
    x = torch.rand(1, 3, 8, 8)
    before = x.clone()
    _haste(NormalisesInPlace().eval(), x, capture)
    assert torch.equal(x, before)


def test_prom_leaves_hooked_layers_to_their_hooks_so_a_pruned_conv_still_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x)  # the pruning hook sets a plain weight, which deepcopy accepts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxslim.prepare(model, x)
    skipped = {e.fqn: e.reason for e in qat.meta[fxslim.ir.META_REPORT].entries("prom") if e.status == "skipped"}
    assert skipped.get("2") == "module_hooks"
    qat(x).sum().backward()
    assert qat.get_submodule("2").weight_orig.grad is not None


def test_capture_in_train_mode_leaves_batch_norm_counters_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Conv2d(8, 8, 1)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxslim.prepare(model, torch.randn(2, 3, 8, 8))
    counters = [b for name, b in qat.named_buffers() if name.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 0 for c in counters)
    assert int(model[1].num_batches_tracked) == 0
