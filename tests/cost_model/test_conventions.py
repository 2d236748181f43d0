"""Conventions: the PROM energy and storage ratios of background/prom.md §3.3 and §3.5 reproduced
from a float torchvision MobileNetV2 by choosing conventions; deploy precedence; validation.

MobileNetV2 at 224×224 has 300,774,272 MACs, 267,939,840 of them in the 34 pointwise convs
(32,834,432 elsewhere: stem, 17 depthwise, classifier). fp16 baseline: 1.5 pJ per MAC.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxslim
from fxslim.cost_model import Conventions, deploy_preset, parse_deploy

PW, OTHER, LAST_PW = 267_939_840, 32_834_432, 20_070_400


@pytest.fixture(scope="module")
def mobilenet_v2():
    torch.manual_seed(0)
    report = fxslim.estimate(torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 224, 224))
    return report, report.with_conventions(deploy="fp16")


# variant -> conventions, ternary pJ/MAC · ternary MACs + 8-bit pJ/MAC · 8-bit MACs, ratio in prom.md §3.3
VARIANTS = {
    "A": (dict(deploy="prom", accumulator_bits=8), 0.03 * PW + 0.23 * OTHER, 28.94),
    "B": (dict(deploy="prom", accumulator_bits=32, ternary_accumulator_bits=8), 0.03 * PW + 0.30 * OTHER, 25.22),
    "C": (dict(deploy="prom:last_pointwise=int8", accumulator_bits=8),
          0.03 * (PW - LAST_PW) + 0.23 * (OTHER + LAST_PW), 23.01),
    "D": (dict(deploy="prom:last_pointwise=int8", accumulator_bits=32, ternary_accumulator_bits=8),
          0.03 * (PW - LAST_PW) + 0.30 * (OTHER + LAST_PW), 19.36),
    "E": (dict(deploy="prom", accumulator_bits=32), 0.1 * PW + 0.30 * OTHER, 12.31),
    "int8": (dict(deploy="int8", accumulator_bits=8), 0.23 * (PW + OTHER), 6.52),
    "int8_acc32": (dict(deploy="int8"), 0.30 * (PW + OTHER), 5.00),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prom_energy_variants_reproduce_prom_md_ratios(mobilenet_v2, variant):
    report, fp16 = mobilenet_v2
    options, energy, ratio = VARIANTS[variant]
    deployed = report.with_conventions(**options)
    assert deployed.total.energy_pj == pytest.approx(energy)
    assert round(fp16.total.energy_pj / deployed.total.energy_pj, 2) == ratio


# packing/assignment -> conventions, bytes, ratio in prom.md §3.5. Weights: 1×1 2,124,672 (of which
# the last 409,600), stem + depthwise + classifier 1,345,088 at 8 bit, BN and classifier bias 35,112 at 16 bit.
STORAGE = {
    "2bit": (dict(deploy="prom"), 2_124_672 // 4 + 1_345_088 + 2 * 35_112, 3.60),
    "log2_3": (dict(deploy="prom", ternary_packing="log2_3"), None, 3.82),
    "last_1x1_8bit": (dict(deploy="prom:last_pointwise=int8"), 1_715_072 // 4 + 1_754_688 + 2 * 35_112, 3.11),
    "nibble": (dict(deploy="prom", ternary_packing="nibble"), 2_124_672 // 2 + 1_345_088 + 2 * 35_112, 2.83),
    "classifier_fp16": (dict(deploy="prom:classifier=fp16"), 2_124_672 // 4 + 65_088 + 2 * 1_280_000 + 2 * 35_112, 2.17),
    "int8_containers": (dict(deploy="prom", ternary_packing="int8"), 2_124_672 + 1_345_088 + 2 * 35_112, 1.98),
}


@pytest.mark.parametrize("case", list(STORAGE))
def test_prom_storage_conventions_reproduce_prom_md_ratios(mobilenet_v2, case):
    report, fp16 = mobilenet_v2
    options, size, ratio = STORAGE[case]
    deployed = report.with_conventions(metadata_bits=0, **options)  # §3.5 counts no per-channel scales
    if size is not None:
        assert deployed.total.storage_bytes == size
    assert round(fp16.total.storage_bytes / deployed.total.storage_bytes, 2) == ratio


def test_storage_default_counts_one_16bit_scale_per_quantized_output_channel(mobilenet_v2):
    report, _ = mobilenet_v2
    prom = report.with_conventions(deploy="prom")
    # 52 convs with 17,056 output channels in all + 1,000 classifier outputs, 2 bytes each
    assert prom.total.storage_bytes == 2_124_672 // 4 + 1_345_088 + 2 * 35_112 + 2 * (17_056 + 1_000)


def test_requant_charges_one_multiply_per_quantized_output(mobilenet_v2):
    report, _ = mobilenet_v2
    base = report.with_conventions(deploy="prom", accumulator_bits=8)
    requant = report.with_conventions(deploy="prom", accumulator_bits=8, include_requant=True)
    # 6,679,112 conv and classifier output elements, one int32 multiply (3.1 pJ) each
    assert requant.total.ops[("mul", "int32")] == 6_679_112
    assert requant.total.energy_pj - base.total.energy_pj == pytest.approx(6_679_112 * 3.1)


def test_skip_zero_weights_with_fixed_fraction_scales_ternary_adds(mobilenet_v2):
    report, _ = mobilenet_v2
    skip = report.with_conventions(deploy="prom", accumulator_bits=8, skip_zero_weights=True, zero_fraction=0.4)
    assert skip.total.ops[("add", "int8")] == pytest.approx(0.6 * PW + OTHER)
    measured = report.with_conventions(deploy="prom", accumulator_bits=8, skip_zero_weights=True)
    assert 0 < measured.total.ops[("add", "int8")] < PW + OTHER  # TWN zeros of the actual weights


def test_bias_adds_off_by_default_and_switchable():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5)).eval(), torch.randn(2, 3, 8, 8)
    report = fxslim.estimate(model, x)
    with_bias = report.with_conventions(include_bias=True)
    assert with_bias.total.macs == report.total.macs  # never part of MACs/FLOPs
    # conv: 2·4·6·6 outputs, linear: 2·5 outputs, one fp32 add each
    extra = with_bias.total.ops[("add", "fp32")] - report.total.ops[("add", "fp32")]
    assert extra == 2 * 4 * 36 + 2 * 5


class _Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


def test_deploy_precedence_module_name_then_last_then_kind_then_default():
    report = fxslim.estimate(_Three().eval(), torch.randn(1, 4, 4, 4))
    deployed = report.with_conventions(deploy={"b": "fp16", "last:pointwise_conv": "int8", "pointwise_conv": "ternary",
                                               "c": "bf16", "default": "int4"})
    formats = {r.fqn: r.format for r in deployed.rows if r.macs}
    assert formats == {"a": "ternary", "b": "fp16", "c": "bf16", "head": "int4"}
    globbed = report.with_conventions(deploy={"[ab]": "fp16", "default": "int8"})
    assert {r.fqn: r.format for r in globbed.rows if r.macs} == {"a": "fp16", "b": "fp16", "c": "int8", "head": "int8"}


def test_missing_table_entries_are_listed_not_priced():
    report = fxslim.estimate(_Three().eval(), torch.randn(1, 4, 4, 4), deploy="bf16")
    assert set(report.energy_missing) == {("mul", "bf16"), ("add", "bf16")}
    assert report.total.energy_pj == 0


def test_deploy_presets_and_strings_parse_to_mappings():
    assert deploy_preset("prom", classifier="fp16") == {
        "kind:pointwise_conv": "ternary", "kind:attention": "fp32", "kind:matmul": "fp32", "default": "int8",
        "params": "fp16", "last:linear": "fp16"}
    assert parse_deploy("prom:last_pointwise=int8")["last:pointwise_conv"] == "int8"
    assert parse_deploy("pointwise_conv=ternary,default=int8") == {"kind:pointwise_conv": "ternary", "default": "int8"}
    assert parse_deploy("fp16") == {"default": "fp16", "params": "fp16"}


@pytest.mark.parametrize("kwargs, message", [
    ({"accumulator_bits": 12}, r"Conventions.accumulator_bits: expected one of \(8, 16, 32\), got 12"),
    ({"ternary_accumulator_bits": 4}, r"Conventions.ternary_accumulator_bits: expected one of \(None, 8, 16, 32\)"),
    ({"zero_fraction": 1.5}, r"Conventions.zero_fraction: expected None or 0 <= zero_fraction <= 1, got 1.5"),
    ({"ternary_packing": "3bit"}, r"Conventions.ternary_packing: expected one of \('2bit', 'base3', 'log2_3'"),
    ({"requant_format": "int3"}, r"Conventions.requant_format: expected one of \('fp64'"),
    ({"metadata_bits": -1}, r"Conventions.metadata_bits: expected 0 <= metadata_bits <= 64, got -1"),
    ({"include_bias": "yes"}, r"Conventions.include_bias: expected one of \(False, True\), got 'yes'"),
    ({"deploy": "prom:classifier=int3"}, r"deploy option classifier: expected a format in"),
    ({"deploy": "prom:head=int8"}, r"deploy: unknown option 'head' for preset 'prom'"),
    ({"deploy": {"last:conv3d": "int8"}}, r"deploy: 'last:conv3d' names no kind"),
])
def test_conventions_bad_values_raise_value_error_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Conventions(**kwargs)


def test_conventions_round_trip_and_describe():
    conv = Conventions(deploy="prom", accumulator_bits=8, include_requant=True)
    assert Conventions.from_dict(conv.to_dict()) == conv
    assert Conventions.from_string("conventions:accumulator_bits=8,include_requant=true") == Conventions(
        accumulator_bits=8, include_requant=True)
    text = conv.describe()
    assert "deploy=prom" in text and "int accumulator 8 bit" in text and "requant int32 mul" in text


def test_deploy_prom_prices_attention_as_the_converted_model_runs_it():
    """PROM's convert keeps attention (two activations multiplied) a float island: the preset priced it
    int8, 15 % under the converted ViT's energy."""
    model, x = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    predicted = fxslim.estimate(model, x).with_conventions(deploy="prom")
    attention = [r for r in predicted.rows if r.kind == "attention"]
    assert attention and all(r.format == "fp32" for r in attention)


class _Attends(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, bias=bias, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_include_bias_counts_an_mha_projections_biases_in_every_ir(capture, bias):
    """The symbolic IR's attention view carried no bias: a ViT's q, k, v and out-projection biases went
    uncounted there (9.2 M of vit_b_16's 16.5 M), and were counted from torch.export's linears."""
    x = torch.randn(2, 5, 16)
    report = fxslim.estimate(_Attends(bias).eval(), (x,), capture=capture)
    extra = report.with_conventions(include_bias=True).total.ops.get(("add", "fp32"), 0) - report.total.ops.get(
        ("add", "fp32"), 0)
    assert extra == (4 * 2 * 5 * 16 if bias else 0)  # q, k, v and out: one add per output element


class _EinsumAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(torch.einsum("bls,bsd->bld", torch.einsum("bld,bsd->bls", q, k).softmax(-1), v))


def test_the_prom_preset_prices_products_of_activations_as_convert_keeps_them():
    # einsum attention (rows of kind matmul) was priced int8 by deploy="prom"; convert keeps it fp32
    torch.manual_seed(0)
    model, x = _EinsumAttention().eval(), torch.randn(2, 10, 16)
    predicted = fxslim.estimate(model, x, deploy="prom")
    converted = fxslim.estimate(fxslim.convert(fxslim.calibrate(fxslim.prepare(model, x), [(x,)]).eval()), x)
    for report in (predicted, converted):
        assert {row.format for row in report.rows if row.kind == "matmul"} == {"fp32"}
    assert predicted.total.energy_pj == converted.total.energy_pj


def test_deploy_keys_that_name_nothing_are_refused_and_kind_keys_parse_from_strings():
    # 'pointwise' (not a kind, no module) was ignored: the no-deploy energy, with no word; and the
    # documented last:/kind: keys raised in the string form --deploy takes
    model, x = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(1), nn.Linear(8 * 16, 4)).eval(), torch.randn(1, 3, 4, 4)
    for spec in ("pointwise=ternary", {"linaer": "int8"}):
        with pytest.raises(ValueError, match=r"name no module of Sequential and no kind"):
            fxslim.estimate(model, x, deploy=spec)
    assert parse_deploy("last:linear=fp16,default=int8") == {"last:linear": "fp16", "default": "int8"}
    assert parse_deploy("kind:linear=int8") == {"kind:linear": "int8"}
    report = fxslim.estimate(model, x, deploy="last:linear=fp16,default=int8")
    assert [row.format for row in report.rows if row.macs] == ["int8", "fp16"]
    assert fxslim.estimate(model, x, deploy={"0": "ternary", "2*": "fp16"}).total.macs == report.total.macs


@pytest.mark.parametrize("spec", ["int8,", "fp16,int8", "fp16,conv=int8", "", "  "])
def test_a_preset_inside_a_list_or_an_empty_deploy_is_refused(spec):
    # these were dropped silently: the fp32 costs came out labelled deploy=int8,
    with pytest.raises(ValueError, match=r"deploy: expected a preset .*'preset:key=value,...'"):
        parse_deploy(spec)


@pytest.mark.parametrize("spec", ["conv=int8,conv=fp16", "conv=int8,kind:conv=fp16", "prom:classifier=fp16,classifier=int8"])
def test_a_deploy_key_given_twice_is_refused(spec):
    with pytest.raises(ValueError, match="is given twice"):
        parse_deploy(spec)
