"""Cost formulas of the PROM integer ops: ternary convs are additions only, int8 layers multiply and
add, requantization is an option, storage follows the packing; a converted MobileNetV2 costs what
the float model costs "as deployed" under the same conventions (background/prom.md §3.3)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxslim
from fxslim.api import prepare
from fxslim.passes.prom import PROM, calibrate
from fxslim.passes.prom_convert import convert
from fxslim.runtime.prom import unpack_ternary
from fxslim.runtime.prom_onednn import onednn_available

PW, OTHER, LAST_PW = 267_939_840, 32_834_432, 20_070_400  # MobileNetV2 MACs at 224×224 (prom.md §3.2)
ops = torch.ops.fxslim


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _converted(model: nn.Module, x: torch.Tensor, config: PROM | None = None):
    return convert(calibrate(prepare(model.eval(), x[:1], config), [x]))


class _Block(nn.Module):
    """stem 3×3 (int8) → 1×1 16→32 (ternary) → + stem-shaped residual via 1×1 32→16 → pool → linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.expand, self.project = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        s = a + self.project(torch.relu(self.expand(a)))
        return self.fc(s.mean((2, 3)))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    report = fxslim.estimate(_converted(_Block(), x), x[:1])
    return {r.fqn: r for r in report.rows if r.fqn}, report


def test_ternary_conv_is_additions_only_at_the_accumulator_width(block):
    rows, report = block
    expand = rows["expand"]
    # [1, 16, 8, 8] -> [1, 32, 8, 8]: 32·16·64 MACs, one int32 add each, no multiply
    assert expand.format == "ternary" and expand.kind == "pointwise_conv" and expand.macs == 32 * 16 * 64
    assert expand.ops == {("add", "int32"): 32 * 16 * 64}
    narrow = {r.fqn: r for r in report.with_conventions(ternary_accumulator_bits=8).rows}["expand"]
    assert narrow.ops == {("add", "int8"): 32 * 16 * 64}
    assert narrow.energy_pj == pytest.approx(32 * 16 * 64 * 0.03)


def test_int8_conv_and_linear_multiply_and_add(block):
    rows, report = block
    stem, fc = rows["stem"], rows["fc"]
    assert stem.format == "int8" and stem.kind == "conv" and stem.macs == 16 * 3 * 9 * 64
    assert stem.ops == {("mul", "int8"): 16 * 3 * 9 * 64, ("add", "int32"): 16 * 3 * 9 * 64}
    assert fc.kind == "linear" and fc.ops == {("mul", "int8"): 160, ("add", "int32"): 160}
    assert not report.unknown_ops and not report.energy_missing


def test_requantization_is_charged_only_when_asked(block):
    _, report = block
    rows = {r.node: r for r in report.with_conventions(include_requant=True).rows}
    expand = next(r for r in rows.values() if r.fqn == "expand")
    assert expand.ops[("mul", "int32")] == 32 * 64  # one rescale per output element
    add = next(r for r in rows.values() if r.op == "fxslim.int8_add.default")
    assert add.ops == {("mul", "int32"): 2 * 16 * 64}  # both inputs rescaled to the output grid
    pool = next(r for r in rows.values() if r.op == "fxslim.int8_global_avg_pool2d.default")
    assert pool.elementwise == 16 * 64 and pool.ops == {("mul", "int32"): 16}
    assert ("mul", "int32") not in report.total.ops


@pytest.mark.parametrize("packing, bits", [("2bit", 2), ("base3", 1.6), ("int8", 8)])
def test_storage_of_packed_ternary_weights_follows_the_packing(block, packing, bits):
    _, report = block
    rows = {r.fqn: r for r in report.with_conventions(ternary_packing=packing).rows}
    # 32×16 ternary codes + int32 bias, multiplier and offset per output channel
    assert rows["expand"].storage_bits == pytest.approx(32 * 16 * bits + 32 * 96)
    assert rows["expand"].params == 32 * 16 + 3 * 32
    assert rows["stem"].storage_bits == 16 * 27 * 8 + 16 * 96  # int8 codes are 8 bit whatever the packing


def test_stored_bits_match_the_buffers_of_the_converted_op(block):
    rows, _ = block
    # the default 2-bit packing is how the op stores its codes: 16 inputs = 4 bytes per output channel
    assert rows["expand"].storage_bits == 8 * (32 * 4 + 3 * 4 * 32)


@pytest.fixture(scope="module")
def mobilenet_v2():
    torch.manual_seed(0)
    model, x = torchvision.models.mobilenet_v2().eval(), torch.randn(2, 3, 224, 224)
    fp16 = fxslim.estimate(model, x[:1], deploy="fp16")
    int_model = _converted(model, x)
    return model, x, fp16, fxslim.estimate(int_model, x[:1]), int_model


# (conventions, ratio vs fp16 in prom.md §3.3): variants A, B and E
@pytest.mark.parametrize("options, ratio", [
    (dict(accumulator_bits=8), 28.94),
    (dict(accumulator_bits=32, ternary_accumulator_bits=8), 25.22),
    (dict(accumulator_bits=32), 12.31),
])
def test_converted_mobilenet_v2_energy_equals_as_deployed_float_model(mobilenet_v2, options, ratio):
    _, _, fp16, converted, _ = mobilenet_v2
    ours = converted.with_conventions(**options)
    deployed = fp16.with_conventions(deploy="prom", **options)
    assert ours.total.macs == PW + OTHER
    assert sum(r.macs for r in ours.rows if r.format == "ternary") == PW
    assert ours.total.energy_pj == pytest.approx(deployed.total.energy_pj)
    assert round(fp16.total.energy_pj / ours.total.energy_pj, 2) == ratio


def test_converted_mobilenet_v2_last_pointwise_int8(mobilenet_v2):
    model, x, fp16, _, _ = mobilenet_v2
    converted = fxslim.estimate(_converted(model, x, PROM(last_pointwise="int8")), x[:1], accumulator_bits=8)
    assert sum(r.macs for r in converted.rows if r.format == "ternary") == PW - LAST_PW
    assert round(fp16.total.energy_pj / converted.total.energy_pj, 2) == 23.01  # variant C


def test_flop_counter_counts_the_converted_model_like_the_cost_model(mobilenet_v2):
    _, x, _, converted, int_model = mobilenet_v2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        int_model(x[:1])
    assert counter.get_total_flops() == converted.total.flops == 2 * (PW + OTHER)


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN quantized ops")
def test_onednn_runtime_costs_the_same_macs_and_formats_with_int8_container_storage():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qat = calibrate(prepare(_Block().eval(), x[:1]), [x])
    reference, fast = (fxslim.estimate(convert(qat, runtime=r), x[:1]) for r in ("reference", "onednn"))
    assert not fast.unknown_ops and not fast.energy_missing
    ref_rows, fast_rows = ({r.fqn: r for r in rep.rows if r.fqn} for rep in (reference, fast))
    for fqn in ("stem", "expand", "project", "fc"):
        assert (fast_rows[fqn].macs, fast_rows[fqn].format) == (ref_rows[fqn].macs, ref_rows[fqn].format)
    # the projection conv carries the fused residual add: one more int32 add per output element [1, 16, 8, 8]
    assert fast_rows["project"].ops[("add", "int32")] == ref_rows["project"].ops[("add", "int32")] + 16 * 64
    # expand 16→32 ternary in int8 containers: 8 bits a weight + float32 scale and bias per channel
    assert fast_rows["expand"].storage_bits == 32 * 16 * 8 + 32 * 64


@pytest.mark.parametrize("runtime", ["reference", "onednn"])
def test_skip_zero_weights_reads_the_ternary_codes_of_a_converted_model(runtime):
    """The zero fraction came from the TWN rule on the packed uint8 bytes (0.484 where the codes hold
    0.430 zeros): it is the share of zero codes, in both runtimes' containers."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    int_model = convert(calibrate(prepare(_Block().eval(), x[:1]), [x]), runtime=runtime)
    rows = {r.fqn: r for r in fxslim.estimate(int_model, x[:1], skip_zero_weights=True).rows}
    if runtime == "reference":
        codes = unpack_ternary(int_model.get_buffer("expand.weight_packed"), 16)
    else:
        codes = next(t for name, t in int_model.state_dict().items() if name.startswith("expand") and t.dtype == torch.int8)
    zeros = float((codes == 0).float().mean())
    assert 0 < zeros < 1
    assert rows["expand"].ops[("add", "int32")] == pytest.approx(32 * 16 * 64 * (1 - zeros))
