"""Module hooks survive a rewrite: a symbolic trace inlines a module's forward, so hooks on a module
traced through (feature extraction, Grad-CAM) silently stopped running after ``optimize`` and fired
with Proxies while it traced. Such modules are now traced apart and their GraphModules keep the
hooks; fxslim's own runs of its copies do not fire them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import fxslim
from tests.test_optional_inputs import Child


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _optimize(model, x, spec="haste:L=53"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, x, passes=[spec])


def test_hooks_on_traced_through_modules_keep_running_after_optimize():
    model = _resnet()
    seen: list[tuple[str, tuple[int, ...]]] = []
    model.layer3.register_forward_hook(lambda m, i, o: seen.append(("layer3", tuple(o.shape))))
    model.layer1[0].register_forward_pre_hook(lambda m, i: seen.append(("pre", tuple(i[0].shape))))
    model.register_forward_hook(lambda m, i, o: seen.append(("root", tuple(o.shape))))
    x = torch.randn(2, 3, 64, 64)
    result = _optimize(model, x)
    assert seen == []  # not fired by tracing, shape propagation or the example runs
    assert result.report.rewritten() == 19  # every conv but the stem, those inside layer3 too
    with torch.no_grad():
        result.module(torch.randn(1, 3, 96, 96))
    assert seen == [("pre", (1, 64, 24, 24)), ("layer3", (1, 256, 6, 6)), ("root", (1, 10))]


def test_a_hook_that_changes_the_output_still_changes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block()).eval()
    model[1].register_forward_hook(lambda m, i, o: o * 0.5)
    x = torch.randn(1, 3, 32, 32)
    result = _optimize(model, x, "haste:L=53,sparsity=0")
    assert result.report.rewritten() == 2
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)


def test_prom_keeps_hooks_in_the_qat_model_and_the_integer_model():
    model = _resnet()
    seen: list[str] = []
    model.layer3.register_forward_hook(lambda m, i, o: seen.append("layer3"))
    model.register_forward_hook(lambda m, i, o: seen.append("root"))
    x = torch.randn(2, 3, 64, 64)
    qat = fxslim.prepare(model, x)
    assert seen == []
    qat(x)
    assert seen == ["layer3", "root"]  # QAT feature distillation still reads layer3
    fxslim.calibrate(qat, [x])
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        int_model = fxslim.convert(qat.eval())
    assert seen == []  # convert's own runs (the NaN probe, shapes) fire none
    reasons = [r for island in fxslim.convert_report(int_model).islands for r in island.reasons]
    assert reasons == ["layer3 (Sequential): kept as a module for its hooks"]
    int_model(x)
    assert seen == ["layer3", "root"]  # float in, float out: the island's and the root's hooks run


def test_a_hooked_module_called_twice_is_traced_apart_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), nn.Identity()).eval()
    shared = model[1]
    model.append(shared)  # the same block at two places
    calls: list[int] = []
    shared.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(1, 3, 16, 16)
    result = _optimize(model, x, "haste:L=53,sparsity=0")
    assert result.report.rewritten() == 1  # the block's conv, one layer
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)
    assert len(calls) == 2 * 1 + 2  # the reference call's two, and the rewritten model's two


def halve(module, inputs, output):  # module level: picklable
    return output * 0.5


def _hooked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block()).eval()
    model[1].register_forward_hook(halve)
    return model


def test_hooks_survive_deepcopy_and_save_load_of_the_result():
    import copy
    import io

    model, x = _hooked_model(), torch.randn(2, 3, 16, 16)
    result = _optimize(model, x, "haste:L=53,sparsity=0")
    buffer = io.BytesIO()
    torch.save(result.module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    buffer = io.BytesIO()
    torch.save(loaded, buffer)  # and again: the loaded module keeps them for the next save
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = model(x)
        for copied in (copy.deepcopy(result.module), loaded, reloaded, copy.deepcopy(loaded)):  # the last recursed
            torch.testing.assert_close(copied(x), expected, atol=1e-4, rtol=1e-4)


def test_full_backward_hooks_keep_firing_in_the_qat_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    seen: list[str] = []
    model[1].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append("backward"))
    model[2].register_full_backward_pre_hook(lambda m, grad_out: seen.append("backward_pre"))
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    expected, seen[:] = list(seen), []
    qat = fxslim.prepare(model, x).train()
    qat(x).sum().backward()
    assert seen == expected == ["backward_pre", "backward"]


def test_export_capture_says_it_inlines_hooks():
    model, x = _hooked_model(), torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"capture='export': torch.export inlines the hooks of '1'") as caught:
        fxslim.optimize(model, x, passes=["haste"], capture="export")
    assert any(w.filename == __file__ for w in caught)


def test_the_cost_after_counts_a_hooked_module_once():
    x = torch.randn(1, 3, 64, 64)
    plain = _optimize(_resnet(), x, "haste:L=14")
    model = _resnet()
    model.layer1[0].register_forward_hook(lambda m, i, o: None)
    hooked = _optimize(model, x, "haste:L=14")
    assert hooked.cost_after.total.macs == plain.cost_after.total.macs == fxslim.estimate(hooked.module, x).total.macs


class MaskedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), Child()  # forward(y, mask=None)

    def forward(self, x, mask=None):
        return self.block(torch.relu(self.stem(x)), mask)


def test_a_hooked_module_with_an_optional_argument_is_captured_quietly(capfd):
    torch.manual_seed(0)
    model = MaskedNet().eval()
    model.block.register_forward_hook(lambda m, i, o: None)
    x, mask = torch.randn(1, 3, 16, 16), torch.rand(1, 8, 16, 16)
    result = _optimize(model, (x, mask), "haste:L=53,sparsity=0")
    assert capfd.readouterr().err == ""  # a failing GraphModule call inside the None check printed its line
    with torch.no_grad(), pytest.raises(ValueError, match="mask"):
        result.module(x)


def test_timm_feature_hook_net_returns_its_features_after_optimize():
    """timm's FeatureHookNet returns what hooks on its stages collect: traced, forward's read of them
    became a constant empty list (no error, no features); it stays eager now, its stages rewritten,
    and the hooks reach the FeatureHooks object it reads."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, features_only=True, feature_cls="hook").eval()
    x = torch.randn(1, 3, 64, 64)
    result = _optimize(model, x, "haste:L=53,sparsity=0")
    assert result.report.rewritten() == 19
    other = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got, expected = result.module(other), model(other)
    assert [t.shape for t in got] == [t.shape for t in expected] and len(got) == 5
    for a, b in zip(got[:3], expected[:3]):  # maps of 16 px and more: exact at L = 53 (few-pixel patches are not)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_micro_batched_runs_the_integer_models_root_hooks_once_per_call():
    from fxslim.runtime.prom_onednn import onednn_available

    if not onednn_available():
        pytest.skip("micro_batched needs the oneDNN runtime")
    model = _resnet()
    seen: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 64, 64)
    qat = fxslim.prepare(model, x)
    fxslim.calibrate(qat, [x])
    wrapped = fxslim.micro_batched(fxslim.convert(qat.eval(), runtime="onednn"), max_activation_bytes=1)
    seen.clear()
    with torch.no_grad():
        wrapped(torch.randn(4, 3, 64, 64))  # sliced into micro-batches: the hook still sees the whole call
    assert seen == [(4, 10)]
