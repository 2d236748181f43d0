"""NaN samples in a PROM integer model's outputs: marked where the fake-quant model's NaN goes
(its rows, or the whole output), never a finite value from NaN garbage codes, never an output that
does not depend on the input; and the integer model stays in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim.passes.prom_nan import ALL, ROWS, nan_reach

RUNTIMES = ["reference"] + (["onednn"] if fxslim.passes.prom_convert.onednn_available() else [])


def _integer(model: nn.Module, *inputs: torch.Tensor, runtime: str = "reference"):
    qat = fxslim.calibrate(fxslim.prepare(model.eval(), inputs), [inputs]).eval()
    return qat, fxslim.convert(qat, runtime=runtime)


class Head(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.prototypes = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        y = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        if self.mode == "transposed":
            return y.t()
        if self.mode == "batch_mix":
            return y - y.mean(0)
        return y, self.prototypes * 1.0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_transposed_and_batch_mixing_outputs_are_nan_wherever_the_sample_may_reach(runtime):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    poisoned = torch.randn(4, 3, 12, 12)
    poisoned[1, 0, 3, 3] = float("nan")
    for mode in ("transposed", "batch_mix"):
        qat, integer = _integer(Head(mode), x, runtime=runtime)
        with torch.no_grad():
            reference, out = qat(poisoned), integer(poisoned)
        assert reference.isnan().any()
        # every value the fake-quant model makes NaN is NaN, and no clean value comes out finite-but-wrong
        assert out[reference.isnan()].isnan().all()
        assert out.isnan().all(), mode  # the sample reaches other rows: the whole output is marked


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rows_are_marked_per_sample_and_outputs_without_the_input_are_not(runtime):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 12, 12)
    qat, integer = _integer(Head("tuple"), x, runtime=runtime)
    poisoned = torch.randn(5, 3, 12, 12)  # another batch than the example
    poisoned[2, 1, 0, 0] = float("nan")
    with torch.no_grad():
        logits, prototypes = integer(poisoned)
        clean_logits, _ = integer(torch.where(poisoned.isnan(), 0.0, poisoned))
    assert logits[2].isnan().all()
    rest = [0, 1, 3, 4]
    assert not logits[rest].isnan().any()
    assert torch.equal(logits[rest], clean_logits[rest])
    assert not prototypes.isnan().any()


class TwoInputs(nn.Module):
    """Images [N, 3, H, W] scored against class embeddings [K, 6]: output [N, K]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.embed = nn.Linear(6, 6)

    def forward(self, images, classes):
        return torch.relu(self.conv(images)).mean((2, 3)) @ self.embed(classes).t()


def test_inputs_of_different_batch_length_convert_and_mark_their_own_way():
    torch.manual_seed(0)
    images, classes = torch.randn(2, 3, 10, 10), torch.randn(5, 6)
    qat, integer = _integer(TwoInputs(), images, classes)
    reach = nan_reach(qat)
    assert {name: dict(kinds) for name, kinds in reach.items() if kinds} == {
        next(iter(reach)): {"images": ROWS, "classes": ALL}}
    with torch.no_grad():
        out = integer(torch.randn(3, 3, 10, 10), classes)  # 3 images, 5 classes: no shape clash
        assert out.shape == (3, 5) and not out.isnan().any()
        bad_image = torch.randn(3, 3, 10, 10)
        bad_image[0, 0, 0, 0] = float("nan")
        out = integer(bad_image, classes)
        assert out[0].isnan().all() and not out[1:].isnan().any()
        bad_classes = classes.clone()
        bad_classes[1, 0] = float("nan")
        assert integer(torch.randn(3, 3, 10, 10), bad_classes).isnan().all()


def test_integer_model_stays_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 3))
    x = torch.randn(4, 3, 8, 8)
    _, integer = _integer(model, x)
    with torch.no_grad():
        before = integer(x)
        state = {k: v.clone() for k, v in integer.state_dict().items()}
        with pytest.warns(UserWarning, match="keeps it in eval mode"):
            integer.train()
        assert not any(m.training for m in integer.modules())
        assert torch.equal(integer(x), before)
    assert all(torch.equal(state[k], v) for k, v in integer.state_dict().items())


class _Deformable(nn.Module):
    """Offsets predicted from the features, as deformable detectors do: torchvision's CPU
    deform_conv2d reads memory at NaN offsets and kills the process (SIGSEGV)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.stem, self.offsets = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 18, 3, padding=1)
        self.deform = DeformConv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.deform(y, self.offsets(y))


def test_the_nan_probe_never_runs_torchvision_ops_on_nan():
    """convert's NaN probe fed a NaN sample through the model: a model with a DeformConv2d, which
    runs on every finite input, crashed convert (and ``optimize(...).cost_after``) with a segfault.
    NaN reaching such an op now reaches the whole output, as no run can say where it would go."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    qat, integer = _integer(_Deformable(), x)
    probe = fxslim.prepare(_Deformable().eval(), (x,))
    assert nan_reach(probe) == {"deform": {"x": ALL}}
    with torch.no_grad():
        clean = torch.randn(3, 3, 12, 12)
        assert (integer(clean) - qat(clean)).abs().max() < 0.1 * qat(clean).abs().max()
        assert integer(torch.full((2, 3, 12, 12), float("nan"))).isnan().all()


def test_torchvisions_python_ops_are_probed_on_nan():
    """Only the coordinate-reading C kernels are skipped: stochastic_depth (an identity in eval, in
    EfficientNet, ConvNeXt, Swin) made every NaN sample mark the whole batch."""
    from torchvision.ops import StochasticDepth

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), StochasticDepth(0.2, "row"), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(3, 3, 12, 12)
    qat, integer = _integer(model, x)
    poisoned = x.clone()
    poisoned[1, 0, 2, 2] = float("nan")
    with torch.no_grad():
        assert integer(poisoned).isnan().any(1).tolist() == qat(poisoned).isnan().any(1).tolist() == [False, True, False]
