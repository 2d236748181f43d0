"""PROM convert on models with ops outside conv/linear/add/pool chains: float islands (named in the
report, equal to fake quant), integer forms without islands (tables, max pool, cat, layout ops),
models prepared in parts, both runtimes, another batch, another resolution, NaN in one sample,
costs at float width."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.capture import trace
from fxslim.ir import META_PROM_CONVERT
from fxslim.passes.prom import calibrate
from fxslim.passes.prom_convert import code_agreement, convert, convert_report, prepared_parts
from fxslim.runtime.prom_onednn import onednn_available
from fxslim.runtime.prom_qat import ActFakeQuant, QConv2d

ops = torch.ops.fxslim
pytestmark = pytest.mark.usefixtures("one_thread_module")
_ONEDNN = pytest.mark.skipif(not onednn_available(),
                             reason="needs oneDNN quantized ops")
RUNTIMES = ["reference", pytest.param("onednn", marks=_ONEDNN)]


class _Island(nn.Module):
    """x → conv-BN-ReLU → maxpool → [1×1 conv, 3×3 conv] → cat → hardswish (tables per cat input) → conv → +
    → LayerNorm over channels (permute, float) → permute back → GELU → pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.MaxPool2d(3, 2, 1)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.mix, self.norm = nn.Conv2d(16, 16, 1), nn.LayerNorm(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(F.relu(self.bn(self.stem(x))))
        z = torch.cat([self.a(y), self.b(y)], 1)
        z = F.hardswish(z)
        z = z + self.mix(z)
        z = self.norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(F.gelu(z).mean((2, 3)))


def _prepared(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:  # noqa: F821
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():  # BN statistics of the data, so BN is not the identity
        bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bn:
            m.momentum = None
        model.train()(x)
    return calibrate(fxslim.prepare(model.eval(), x), [x])


@pytest.fixture(scope="module")
def island():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    return _prepared(_Island(), x), x


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_island_model_converts_with_islands_named_in_the_report(island, runtime):
    qat, x = island
    int_model = convert(qat, runtime=runtime)
    report = int_model.meta[META_PROM_CONVERT]
    kinds = sorted(report.integer.values())
    assert kinds.count("conv") == 4 and {"input", "max_pool", "cat", "add", "linear"} <= set(kinds)
    # the LayerNorm (its input permute runs on codes) and what follows it up to the next quantizer
    (only,) = report.islands
    assert only.ops == ("norm", "permute_1", "gelu", "mean")
    assert only.inputs == ("prom_quant.add",) and only.outputs == ("prom_quant.mean",)
    assert only.reasons == ("mean (mean): float input (no quantizer at its producer)",)
    targets = {n.target for n in int_model.graph.nodes if n.op == "call_function"}
    assert {ops.lut.default, ops.max_pool2d_codes.default, ops.dequantize.default} <= targets
    assert isinstance(int_model.get_submodule("norm"), nn.LayerNorm)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("batch,size", [(8, 16), (3, 16), (5, 24), (2, 10)])
def test_island_model_codes_within_one_lsb_of_fake_quant(island, runtime, batch, size):
    """Every quantizer's codes (integer ops and island outputs) within 1 LSB, at the calibration
    batch and resolution and at others (N(0, 1) images: beyond the calibrated ranges), also where a
    conv fused with its residual add (prom_fuse) saturates at the ends of its own grid."""
    qat, _ = island
    int_model = convert(qat, runtime=runtime)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * size))
    local = code_agreement(qat, int_model, x, mode="local")
    assert local.worst()[1] == 1.0
    with torch.no_grad():
        got, want = int_model(x), qat.eval()(x)
    assert got.shape == want.shape == (batch, 5)
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_island_outputs_equal_fake_quant_codes_exactly(island):
    """An island computes what the fake-quant model computes: its quantizer's codes are equal."""
    qat, x = island
    int_model = convert(qat)
    (only,) = int_model.meta[META_PROM_CONVERT].islands
    local = code_agreement(qat, int_model, x, mode="local")
    for name in only.outputs:
        elements, _, equal = local.layers[name]
        assert equal == elements


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_island_model_nan_in_one_sample_gives_nan_outputs_there_only(island, runtime):
    qat, x = island
    int_model = convert(qat, runtime=runtime)
    bad = x[:3].clone()
    bad[1, 2, 4, 4] = float("nan")
    with torch.no_grad():
        clean, y = int_model(x[:3]), int_model(bad)
    assert torch.isnan(y[1]).all()
    assert torch.equal(y[[0, 2]], clean[[0, 2]])


def test_convert_leaves_the_prepared_model_unchanged(island):
    qat, x = island
    before = copy.deepcopy(qat.state_dict())
    graph = str(qat.graph)
    convert(qat)
    after = qat.state_dict()
    assert graph == str(qat.graph)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_conv_then_silu_is_an_integer_conv_and_a_table():
    """prepare quantizes the conv output before SiLU (no clamp form): convert makes that grid's
    codes the table's input, so no island."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 1))
    x = torch.randn(4, 3, 6, 6)
    qat = calibrate(fxslim.prepare(net.eval(), x), [x])
    int_model = convert(qat)
    report = int_model.meta[META_PROM_CONVERT]
    assert report.islands == () and report.integer["prom_quant._1"] == "lut"
    assert code_agreement(qat, int_model, torch.randn(3, 3, 9, 9)).exact == 1.0


class _HandQAT(nn.Module):
    """q → QConv2d → tanh → q, written by hand (no quantizer between conv and tanh): an island."""

    def __init__(self) -> None:
        super().__init__()
        self.q_in, self.conv, self.q_out = ActFakeQuant(), QConv2d(nn.Conv2d(3, 4, 3), "int8"), ActFakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_out(torch.tanh(self.conv(self.q_in(x))))


def test_conv_inside_an_island_runs_in_float_with_frozen_fake_quant_weights():
    x = torch.randn(8, 3, 6, 6)
    qat = calibrate(trace(_HandQAT(), leaf_modules=(QConv2d, ActFakeQuant)), [x])
    next(iter(qat.graph.nodes)).meta["val"] = x  # the input shape convert propagates from (prepare sets it)
    int_model = convert(qat)
    (only,) = int_model.meta[META_PROM_CONVERT].islands
    assert only.ops == ("conv", "tanh") and only.inputs == ("q_in",) and only.outputs == ("q_out",)
    assert only.reasons == ("tanh (tanh): after a conv/linear with no quantizer between (only ReLU/ReLU6 fold into it)",)
    conv = int_model.get_submodule("conv")
    assert type(conv) is nn.Conv2d and torch.equal(conv.weight, qat.get_submodule("conv").quantized_weight())
    assert code_agreement(qat, int_model, x).worst()[1] == 1.0
    assert qat.get_submodule("conv").conv.weight is not conv.weight  # a copy: the QAT model keeps its latent weights


class _Layout(nn.Module):
    """conv → ReLU → permute/transpose/reshape/flatten/slice of the codes → linear: no island."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x)).permute(0, 2, 3, 1)
        y = y.transpose(1, 2).reshape(y.shape[0], -1, 6)[:, 1:]
        return self.fc(y).flatten(1)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_layout_ops_run_on_the_integer_tensor(runtime):
    x = torch.randn(4, 3, 7, 7)
    qat = calibrate(fxslim.prepare(_Layout().eval(), x), [x])
    int_model = convert(qat, runtime=runtime)
    assert int_model.meta[META_PROM_CONVERT].islands == ()
    assert not any(n.target is ops.dequantize.default for n in int_model.graph.nodes if n.op == "call_function"
                   and n.users and all(u.op != "output" for u in n.users))
    for batch, size in ((4, 7), (2, 9)):
        assert code_agreement(qat, int_model, torch.randn(batch, 3, size, size)).worst()[1] == 1.0


class _PointwiseAfterCodes(nn.Module):
    """conv → quant → sigmoid → maxpool → quant (max pool on codes, then a table); with GELU, which
    decreases below about −0.75, the max does not commute with the table: an island."""

    def __init__(self, decreasing: bool) -> None:
        super().__init__()
        self.decreasing = decreasing
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.gelu(y) if self.decreasing else torch.sigmoid(y)
        return self.head(F.max_pool2d(y, 2))


@pytest.mark.parametrize("decreasing,kind,islands", [(False, "max_pool", 0), (True, None, 1)])
def test_max_pool_runs_on_codes_only_after_non_decreasing_ops(decreasing, kind, islands):
    x = torch.randn(4, 3, 8, 8)
    qat = calibrate(fxslim.prepare(_PointwiseAfterCodes(decreasing).eval(), x), [x])
    int_model = convert(qat)
    report = int_model.meta[META_PROM_CONVERT]
    assert len(report.islands) == islands
    if kind:
        assert kind in report.integer.values()
    else:
        assert "decreasing" in report.islands[0].reasons[0]
    assert code_agreement(qat, int_model, torch.randn(3, 3, 10, 10)).worst()[1] == 1.0


class _FunctionalBatchNorm(nn.Module):
    """conv → quant → F.batch_norm (timm's BatchNormAct2d) → hardswish → · γ (per channel) → quant:
    one table per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        y = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        return self.head(F.hardswish(y) * self.gamma.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_functional_batch_norm_and_per_channel_scale_become_one_table_per_channel(runtime):
    x = torch.randn(4, 3, 8, 8)
    model = _FunctionalBatchNorm().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    qat = calibrate(fxslim.prepare(model, x), [x])
    int_model = convert(qat, runtime=runtime)
    report = int_model.meta[META_PROM_CONVERT]
    assert report.islands == () and "channel_lut" in report.integer.values()
    (table,) = [t for name, t in int_model.named_buffers() if "table" in name]
    assert table.shape == (6, 256)
    for batch, size in ((4, 8), (2, 11)):
        assert code_agreement(qat, int_model, torch.randn(batch, 3, size, size)).exact == 1.0


class _BatchNormAct(nn.Module):
    """timm's BatchNormAct2d: conv → quant → F.batch_norm → ReLU6 → quant (no SiLU: a clamp)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        y = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        return self.head(F.relu6(y))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_batch_norm_with_clamp_on_codes_is_a_unit_depthwise_conv(runtime):
    """Per-channel affine + clamp: the conv machinery (within 1 LSB, 13 bytes per channel) instead
    of a table per channel (256 bytes per channel)."""
    x = torch.randn(4, 3, 8, 8)
    model = _BatchNormAct().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3, -1.5, 0.8]))  # negative gains flip codes
    qat = calibrate(fxslim.prepare(model, x), [x])
    int_model = convert(qat, runtime=runtime)
    report = int_model.meta[META_PROM_CONVERT]
    assert report.islands == () and report.integer["prom_quant.relu6"] == "bn"
    depthwise = [n for n in int_model.graph.nodes if n.op == "call_function" and n.args
                 and n.target in (ops.int8_conv2d.default, ops.qconv2d.default) and 6 in n.args]
    assert depthwise  # groups = 6: the batch norm's conv
    for batch, size in ((4, 8), (2, 11)):
        assert code_agreement(qat, int_model, torch.randn(batch, 3, size, size)).worst()[1] == 1.0


class _CatPool(nn.Module):
    """Two ReLU convs → cat → max pool (googlenet, squeezenet): tables, cat, max pool on codes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1), 3, 2, ceil_mode=True))


def test_cat_then_max_pool_runs_on_codes():
    x = torch.randn(4, 3, 9, 9)
    qat = calibrate(fxslim.prepare(_CatPool().eval(), x), [x])
    int_model = convert(qat)
    report = int_model.meta[META_PROM_CONVERT]
    assert report.islands == () and "cat" in report.integer.values()
    targets = [n.target for n in int_model.graph.nodes if n.op == "call_function"]
    assert ops.max_pool2d_codes.default in targets and torch.cat in targets
    assert code_agreement(qat, int_model, torch.randn(3, 3, 12, 12)).exact == 1.0


class _Dense(nn.Module):
    """DenseNet's pattern: stem → max pool (no quantizer after it) → cat with a conv output → BN → ReLU
    → conv: the pooled codes keep the stem's grid, the BN becomes per-channel tables for each cat input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2)
        self.grow, self.norm, self.head = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(7), nn.Conv2d(7, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.stem(x))
        return self.head(F.relu(self.norm(torch.cat([y, self.grow(y)], 1))))


def test_batch_norm_after_cat_of_pooled_codes_is_per_channel_tables():
    x = torch.randn(6, 3, 8, 8)
    qat = _prepared(_Dense(), x)
    int_model = convert(qat)
    report = int_model.meta[META_PROM_CONVERT]
    assert report.islands == () and report.integer["prom_quant.relu"] == "cat"
    tables = sorted(tuple(t.shape) for name, t in int_model.named_buffers() if "table" in name)
    assert tables == [(3, 256), (4, 256)]  # the BN's 7 channels split between the two cat inputs
    for batch, size in ((6, 8), (3, 10)):
        assert code_agreement(qat, int_model, torch.randn(batch, 3, size, size)).exact == 1.0


class _LayerScale(nn.Module):
    """ConvNeXt's pattern: conv → permute → linear → permute back → · γ[C, 1, 1] → + x: the
    per-channel scale comes after the layout ops, so its tables index the permuted-back channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.1]).view(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.gamma * y


def test_per_channel_scale_after_layout_ops_is_tables_on_the_permuted_codes():
    x = torch.randn(4, 4, 6, 6)
    qat = calibrate(fxslim.prepare(_LayerScale().eval(), x), [x])
    int_model = convert(qat)
    report = int_model.meta[META_PROM_CONVERT]
    assert report.islands == () and "channel_lut" in report.integer.values()
    for batch, size in ((4, 6), (2, 9)):
        assert code_agreement(qat, int_model, torch.randn(batch, 4, size, size)).worst()[1] == 1.0


def test_converted_island_model_costs_island_ops_at_float_width(island):
    """Energy/storage report: island ops are fp32 rows, the rest integer; the LayerNorm's affine
    parameters are stored at 32 bit."""
    qat, x = island
    report = fxslim.estimate(convert(qat), x[:1])
    assert not report.unknown_ops
    formats = {r.format for r in report.rows if r.macs}
    assert formats <= {"int8", "ternary"}  # every conv and the linear stay integer here
    norm = [r for r in report.rows if r.node == "norm"]
    assert norm and all(r.format == "fp32" for r in norm)
    assert sum(r.storage_bits for r in norm) == 2 * 16 * 32  # weight and bias, 16 channels, fp32

    x = torch.randn(8, 3, 6, 6)
    qat = calibrate(trace(_HandQAT(), leaf_modules=(QConv2d, ActFakeQuant)), [x])
    next(iter(qat.graph.nodes)).meta["val"] = x
    converted = fxslim.estimate(convert(qat), x)
    float_conv = [r for r in converted.rows if r.macs and r.format == "fp32"]
    # the island conv: 4·3·3·3 MACs per output pixel, 4×4 pixels, 8 samples, at fp32 (1 mul + 1 add)
    assert [r.macs for r in float_conv] == [4 * 3 * 3 * 3 * 4 * 4 * 8]
    assert float_conv[0].ops == {("mul", "fp32"): float_conv[0].macs, ("add", "fp32"): float_conv[0].macs}
    assert converted.total.energy_pj > 0


class _Parts(nn.Module):
    """head → a data-dependent branch (the model does not trace whole) → tail: prepared in two parts."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        if y.sum() > -1e9:  # Python control flow on a value
            y = y * 1.0
        return self.tail(y)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_model_prepared_in_parts_converts_part_by_part_with_float_between(runtime):
    x = torch.randn(4, 3, 8, 8)
    qat = calibrate(fxslim.prepare(_Parts().eval(), x), [x])
    assert set(prepared_parts(qat)) == {"head", "tail"}
    before = copy.deepcopy(qat.state_dict())
    int_model = convert(qat, runtime=runtime)
    assert all(torch.equal(before[k], v) for k, v in qat.state_dict().items())  # the prepared model is untouched
    assert type(int_model) is _Parts and not int_model.training
    report = convert_report(int_model)
    assert report.parts == ("head", "tail") and report.islands == ()
    assert report.integer["tail.prom_quant._4"] == "linear"
    assert not any(isinstance(m, ActFakeQuant) for m in int_model.modules())
    for batch, size in ((4, 8), (2, 12)):
        xb = torch.randn(batch, 3, size, size)
        assert code_agreement(qat, int_model, xb).worst()[1] == 1.0
        with torch.no_grad():
            assert int_model(xb).shape == (batch, 4)
    bad = x[:3].clone()
    bad[2, 1, 3, 3] = float("nan")
    with torch.no_grad():
        clean, y = int_model(x[:3]), int_model(bad)
    assert torch.isnan(y[2]).all() and torch.equal(y[:2], clean[:2])


def test_convert_report_of_a_model_that_was_not_converted_raises():
    with pytest.raises(TypeError, match="convert_report: expected a model returned by fxslim.convert, got Sequential"):
        convert_report(nn.Sequential(nn.ReLU()))


class _Tail(nn.Module):
    """Takes a dict of tensors, as VGGT's heads take the aggregator's token lists."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(F.relu(self.conv(features["y"])).mean((2, 3)))


class _DictParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.tail = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), _Tail()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        if y.sum() > -1e9:  # Python control flow on a value: traced in parts
            y = y * 1.0
        return self.tail({"y": y})


def test_part_taking_a_dict_of_tensors_keeps_nan_per_sample():
    x = torch.randn(4, 3, 8, 8)
    qat = calibrate(fxslim.prepare(_DictParts().eval(), x), [x])
    int_model = convert(qat)
    assert set(convert_report(int_model).parts) == {"head", "tail"}
    bad = x[:3].clone()
    bad[1, 0, 2, 2] = float("nan")
    with torch.no_grad():
        clean, y = int_model(x[:3]), int_model(bad)
    assert torch.isnan(y[1]).all() and torch.equal(y[[0, 2]], clean[[0, 2]])


class _Optional(nn.Module):
    """An input with a default (timm's ViT blocks take attn_mask=None)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, shift: float = 0.5) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x) + shift).mean((2, 3)))


def test_converted_model_keeps_input_defaults():
    x = torch.randn(4, 3, 6, 6)
    qat = calibrate(fxslim.prepare(_Optional().eval(), (x,)), [x])
    int_model = convert(qat)
    with torch.no_grad():
        assert int_model(x).shape == (4, 2)
    assert code_agreement(qat, int_model, x).worst()[1] == 1.0


@pytest.mark.parametrize("mode, reason", [("reflect", "padding mode 'reflect'"), ("constant", None)])
def test_a_pad_island_names_its_padding_mode(mode, reason):
    """A reflect pad was reported as 'padding with a value that has no code'."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(F.pad(torch.relu(self.a(x)), (1, 1, 1, 1), mode=mode))

    x = torch.randn(2, 3, 8, 8)
    report = convert_report(convert(calibrate(fxslim.prepare(Padded().eval(), x), [x])))
    reasons = [r for island in report.islands for r in island.reasons]
    assert (reason is None and reasons == []) or any(reason in r for r in reasons), reasons


class _SharedConv(nn.Module):
    """One conv called on two inputs: prepare leaves it float (``shared_module``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.s, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x).relu()
        return self.fc(self.s(h).mean((2, 3)) + self.s(F.max_pool2d(h, 2)).mean((2, 3)))


def test_convert_report_names_the_module_prepare_left_float():
    """The island's only reason was a symptom downstream: "mean: float input (no quantizer at its producer)"."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    qat = fxslim.calibrate(fxslim.prepare(_SharedConv().eval(), x), [x]).eval()
    islands = fxslim.convert_report(fxslim.convert(qat)).islands
    assert islands and all(i.reasons[0].endswith("(Conv2d): left float by prepare (shared_module)") for i in islands)


class _WritesIntoAView(nn.Module):
    """Adds 1 to three channels of a conv's output through a view, then returns it (``then_conv``:
    a conv reads it after the write)."""

    def __init__(self, then_conv: bool = False) -> None:
        super().__init__()
        self.stem, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.then = nn.Conv2d(8, 4, 1) if then_conv else None

    def forward(self, x):
        y = self.out(F.relu(self.stem(x)))
        y.narrow(1, 0, 3).add_(1)
        return y if self.then is None else self.then(y)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_in_place_write_into_a_view_of_a_quantized_output_reaches_the_output(runtime):
    """The write ran on a dequantized copy of its own and the output dequantized the codes again (the
    lowering then dropped the write as dead code): channels 0-2 were 1.0 off the fake-quant model."""
    from fxslim.passes.prom_batching import micro_batched

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    qat = calibrate(fxslim.prepare(_WritesIntoAView().eval(), x), [torch.randn(16, 3, 16, 16)]).eval()
    int_model = convert(copy.deepcopy(qat), runtime=runtime)
    models = [int_model] + ([micro_batched(int_model, direct=d) for d in (True, False)] if runtime == "onednn" else [])
    with torch.no_grad():
        expected = qat(x)
        lsb = float(qat.prom_quant.out.scale)
        for model in models:
            assert (model(x) - expected).abs().max() <= lsb * 1.001


def test_an_in_place_write_an_integer_op_reads_past_is_refused():
    """A conv reading the value after the write reads codes from before it: refused, not computed."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    qat = calibrate(fxslim.prepare(_WritesIntoAView(then_conv=True).eval(), x), [x]).eval()
    with pytest.raises(ValueError, match="writes in place into prom_quant_out's value.*write it out of place"):
        convert(qat)


class _BranchingBlock(nn.Module):
    """A block whose forward does not trace (a Python branch on a shape, as timm's MobileVitBlock):
    the model traces with it as a leaf, and its children are traced and prepared apart."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU())

    def forward(self, x):
        if x.shape[-1] > 1:
            x = self.kxk(x)
        return self.pw(x)


class _WithBranchingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = _BranchingBlock(8)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_parts_inside_a_leaf_of_a_traced_model_become_integer(runtime):
    # only the outermost part was converted: the block's prepared children ran as fake-quant float
    # layers inside the "integer" model, and the report named neither
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    qat = calibrate(fxslim.prepare(_WithBranchingBlock().eval(), x), [x]).eval()
    integer = convert(qat, runtime=runtime)
    report = convert_report(integer)
    assert report.parts == ("", "block.kxk", "block.pw")
    assert not any(isinstance(m, (QConv2d, ActFakeQuant)) for m in integer.modules())
    assert any(isinstance(m, QConv2d) for m in qat.block.modules())  # the prepared model is only read
    with torch.no_grad():
        torch.testing.assert_close(integer(x), qat(x), atol=0.05, rtol=0)


def test_code_agreement_of_parts_inside_a_leaf_of_a_traced_model():
    # the root is a part too: its quantizers were looked up as ".prom_quant.x" (KeyError)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    qat = calibrate(fxslim.prepare(_WithBranchingBlock().eval(), x), [x]).eval()
    agreement = code_agreement(qat, convert(qat), x)
    assert {name.rpartition("prom_quant")[0] for name in agreement.layers} == {"", "block.kxk.", "block.pw."}
    assert agreement.within_one == 1.0
