"""fxslim.estimate: the exact MobileNetV2 numbers, every input type, the caller's model untouched,
re-costing under other conventions, and clear errors for bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxslim
from fxslim.capture import capture


@pytest.fixture(scope="module")
def mobilenet_v2():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    return model, fxslim.estimate(model, torch.randn(1, 3, 224, 224))


def test_estimate_mobilenet_v2_exact_macs_params_and_pointwise_share(mobilenet_v2):
    _, report = mobilenet_v2
    assert report.total.macs == 300_774_272
    assert report.total.flops == 2 * 300_774_272
    assert report.total.params == 3_504_872
    pointwise = [r for r in report.rows if r.kind == "pointwise_conv"]
    assert len(pointwise) == 34
    assert sum(r.macs for r in pointwise) == 267_939_840
    kinds = [r.kind for r in report.rows if r.macs]
    assert (kinds.count("depthwise_conv"), kinds.count("conv"), kinds.count("linear")) == (17, 1, 1)
    assert not report.unknown_ops


def test_estimate_mobilenet_v2_fp16_energy_is_451_16_uj(mobilenet_v2):
    _, report = mobilenet_v2
    fp16 = report.with_conventions(deploy="fp16")
    # one fp16 multiply (1.1 pJ) and one fp16 add (0.4 pJ) per MAC
    assert fp16.total.ops == {("mul", "fp16"): 300_774_272, ("add", "fp16"): 300_774_272}
    assert fp16.total.energy_pj == pytest.approx(300_774_272 * 1.5)
    assert round(fp16.total.energy_uj, 2) == 451.16
    assert fp16.total.storage_bytes == 3_504_872 * 2


def test_estimate_float32_graph_counts_in_fp32(mobilenet_v2):
    _, report = mobilenet_v2
    assert report.total.ops == {("mul", "fp32"): 300_774_272, ("add", "fp32"): 300_774_272}
    assert report.total.energy_pj == pytest.approx(300_774_272 * (3.7 + 0.9))
    assert report.total.storage_bytes == 3_504_872 * 4


def test_estimate_leaves_callers_model_untouched():
    model = torchvision.models.resnet18().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxslim.estimate(model, torch.randn(1, 3, 32, 32))
    assert all(v.device.type == "cpu" for v in model.state_dict().values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()


@pytest.mark.parametrize("kind", ["module", "graph_module", "exported", "captured"])
def test_estimate_accepts_every_input_type_same_totals(kind):
    model, x = _net(), torch.randn(2, 3, 6, 6)
    source = {
        "module": lambda: model,
        "graph_module": lambda: fx.symbolic_trace(model),
        "exported": lambda: torch.export.export(model, (x,)),
        "captured": lambda: capture(model, (x,)),
    }[kind]()
    report = fxslim.estimate(source, x)
    # conv 2·8·3·9·36, linear 2·288·5
    assert report.total.macs == 2 * 8 * 3 * 9 * 36 + 2 * 288 * 5
    assert report.total.params == sum(p.numel() for p in model.parameters())
    assert report.total.elementwise == 2 * (2 * 288) + 2 * 288  # batch norm (2 per element) + relu


def test_with_conventions_equals_a_fresh_estimate(mobilenet_v2):
    model, report = mobilenet_v2
    again = report.with_conventions(deploy="prom", accumulator_bits=8)
    assert again.conventions == fxslim.Conventions(deploy="prom", accumulator_bits=8)
    fresh = fxslim.estimate(model, torch.randn(1, 3, 224, 224), deploy="prom", accumulator_bits=8)
    assert again.total == fresh.total


def test_estimate_bad_arguments_raise_value_errors_naming_them():
    model, x = _net(), torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"table: expected one of \['horowitz45nm'\]"):
        fxslim.estimate(model, x, table="horowitz7nm")
    with pytest.raises(ValueError, match=r"Conventions.accumulator_bits: expected one of \(8, 16, 32\), got 12"):
        fxslim.estimate(model, x, accumulator_bits=12)
    with pytest.raises(ValueError, match="Conventions: unknown option 'acumulator_bits'; allowed:"):
        fxslim.estimate(model, x, acumulator_bits=8)
    with pytest.raises(ValueError, match=r"deploy: expected a preset \('fp32', 'fp16', 'bf16', 'int8', 'prom'\).*got 'int3'"):
        fxslim.estimate(model, x, deploy="int3")
    with pytest.raises(ValueError, match=r"deploy\['kind:linear'\]: expected a format in"):
        fxslim.estimate(model, x, deploy={"linear": "int3"})
    with pytest.raises(ValueError, match=r"memory_level: expected one of \('sram_8kb', 'sram_32kb'"):
        fxslim.estimate(model, x, include_memory=True, memory_level="l2")
    with pytest.raises(ValueError, match="capture: expected 'symbolic' or 'export', got 'jit'"):
        fxslim.estimate(model, x, capture="jit")
    with pytest.raises(TypeError, match="conventions: expected a Conventions, a dict or None"):
        fxslim.estimate(model, x, conventions="fp16")


class _LeafWithInsides(torch.nn.Module):
    """Its own code does not trace (a value branch) and it runs a conv of its own plus a child."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = self.inner(x)
        return torch.nn.functional.conv2d(x, self.weight) if x.sum() > -1e9 else x


def test_leaf_kept_eager_inside_a_graph_is_counted_once():
    """The root graph calls the untraceable module as a leaf; its own ops come from the eager run and
    its child's from the child's graph: together exactly what FlopCounterMode counts."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), _LeafWithInsides()).eval()
    x = torch.randn(2, 3, 8, 8)
    report = fxslim.estimate(model, (x,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.total.flops == counter.get_total_flops()


@torch.fx.wrap
def _shrunk_window(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """Edits its list argument, as torchvision's swin3d ``_get_window_and_shift_size`` does."""
    for i, size in enumerate(x.shape[2:]):
        window[i] = min(window[i], size)
    return F.avg_pool2d(x, window)


class _EditsItsArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return _shrunk_window(self.conv(x), [4, 4])


@pytest.mark.parametrize("symbolic", [None, {"h": 2, "w": 3}])
def test_estimate_a_model_whose_function_edits_a_list_argument(symbolic):
    # fx's Interpreter passed the node's immutable_list: "does not support mutation" (swin3d_t)
    model, x = _EditsItsArgument().eval(), torch.randn(1, 3, 8, 8)
    report = fxslim.estimate(model, x, symbolic=symbolic)
    macs = report.total.macs if symbolic is None else report.evaluate(h=8, w=8).total.macs
    assert macs == 4 * 3 * 9 * 8 * 8


class _PointwiseThen3x3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw, self.k3 = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        return self.k3(torch.relu(self.pw(x)))


class _WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk, self.fc = _PointwiseThen3x3(), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blk(x).mean((2, 3)))


@pytest.mark.parametrize("deploy", ["prom", "pointwise_conv=ternary", "conv=int8"])
def test_a_leaf_module_row_prices_each_of_its_layers_in_its_own_format(deploy):
    # the row of a leaf took the format of its first MAC op: under deploy="prom" the 3x3 conv's
    # 9.4 M MACs were priced ternary with the 1x1 conv's (37x the ternary MACs, 640 int8 multiplies)
    model, x = _WithBlock().eval(), torch.randn(1, 16, 16, 16)
    traced = fxslim.estimate(model, x, deploy=deploy).total
    leaf = fxslim.estimate(model, x, deploy=deploy, leaf_modules=(_PointwiseThen3x3,))
    assert leaf.total.ops == traced.ops and leaf.total.energy_pj == pytest.approx(traced.energy_pj)
    assert leaf.total.storage_bits == traced.storage_bits  # each weight in its own layer's format
    (row,) = [r for r in leaf.rows if r.fqn == "blk"]
    assert row.format == "mixed"
    if deploy == "prom":
        assert leaf.total.ops[("mul", "int8")] == 64 * 64 * 9 * 256 + 64 * 10
