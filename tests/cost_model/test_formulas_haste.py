"""Cost of fxslim::haste_conv2d: the terms of docs/methods/HASTE.md, data-free / calibrated / measured
bucket counts, and predicted next to measured in a before/after comparison."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxslim
from fxslim.models.resnet_cifar import resnet18
from fxslim.runtime.haste import make_planes, patch_shape, record_buckets
from fxslim.runtime.haste_counts import HasteBuckets, HasteLayer, expected_buckets

pytestmark = pytest.mark.usefixtures("one_thread")


class _One(nn.Module):
    """One HASTE conv C=8 -> O=6, 3×3, stride 1, padding 1, tile 4, layer key "one"."""

    def __init__(self, L: int = 5, sparsity: float = 2 / 3, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 6, 3, padding=1, bias=bias)
        th, tw = patch_shape((3, 3), (1, 1), (1, 1), 4)
        self.register_buffer("planes", make_planes(L, th * tw, sparsity, seed=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return torch.ops.fxslim.haste_conv2d(x, c.weight, c.bias, self.planes, [1, 1], [1, 1], [1, 1], 4, True, "one")


def _row(report):
    (row,) = [r for r in report.rows if r.op.startswith("fxslim.haste_conv2d")]
    return row


def _input(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, 8, 8, generator=torch.Generator().manual_seed(seed)).relu()


def test_haste_cost_data_free_prediction_follows_the_method_terms():
    model, x = _One(L=5).eval(), _input()
    row = _row(fxslim.estimate(model, x))
    nnz = int((model.planes != 0).sum())
    tiles, pixels, d = 2 * 2 * 2, 2 * 8 * 8, 6 * 6  # 2 samples × 2×2 tiles of 4×4; patch 6×6
    b = 32 * (1 - (1 - 1 / 32) ** 8)  # occupied buckets of 8 independent uniform 5-bit codes
    assert abs(expected_buckets(8, 5) - b) < 1e-12
    conv = 6 * 9 * b * pixels  # O·B·k²·p
    overhead = (2 * 8 * d + 8 * nnz + 8 * d + b * d + 6 * 9 * (8 - b)) * tiles  # centre, hash, merge, ÷, filters
    assert row.kind == "conv" and row.macs == round(conv) and row.elementwise == round(overhead)
    assert row.info["dense_macs"] == 6 * 8 * 9 * pixels and row.info["buckets"] == "independent_codes"
    assert row.measured_macs is None and row.params == 6 * 8 * 9  # the planes are not parameters


def test_haste_cost_calibrated_prediction_equals_measured_on_the_calibration_run():
    model, x = _One(L=4).eval(), _input(4)
    with torch.no_grad(), record_buckets() as rec:
        model(x)
    stats = rec["one"]
    assert stats.buckets < 8 * stats.tiles  # L=4 on post-ReLU inputs merges channels
    row = _row(fxslim.estimate(model, x, haste_buckets=HasteBuckets(calibration=rec, measured=rec)))
    assert row.measured_macs == 6 * 9 * stats.bucket_pixels  # O·k²·Σ B_τ·p_τ
    assert row.macs == row.measured_macs and row.info["buckets"] == "calibrated"
    assert row.info["predicted_ops"] == row.info["measured_ops"] == row.macs + row.info["measured_overhead"]


def test_haste_cost_measured_is_the_mean_per_sample_times_the_batch():
    model = _One(L=4).eval()
    with torch.no_grad(), record_buckets() as rec:
        model(_input(4))
    given = HasteBuckets(measured=rec)
    row = _row(fxslim.estimate(model, _input(1), haste_buckets=given))
    assert row.measured_macs == round(6 * 9 * rec["one"].bucket_pixels / 4)
    # other tiles per sample: the stats do not apply
    with pytest.warns(UserWarning, match="'one': measured stats recorded at 4 tiles") as caught:
        assert _row(fxslim.estimate(model, torch.randn(1, 8, 12, 12), haste_buckets=given)).measured_macs is None
    assert [w.filename for w in caught] == [__file__]  # the user's call, not the cost model's walker
    assert _row(fxslim.estimate(model, _input(1))).measured_macs is None  # nothing given: nothing measured


def test_haste_cost_stats_of_another_size_are_not_used_even_with_as_many_tiles():
    """ResNet18's last stage has one tile per sample at 64 px and at 80x72 px, of 4 and 9 output
    pixels: the other size's stats were applied, and its measured MACs exceeded the dense ones."""
    model = _One(L=4).eval()
    with torch.no_grad(), record_buckets() as rec:
        model(torch.randn(2, 8, 3, 3).relu())  # one tile of 3x3 outputs per sample
    with pytest.warns(UserWarning, match="recorded at 1 tiles and 9 output pixels per sample, the call has 1 and 4"):
        row = _row(fxslim.estimate(model, torch.randn(2, 8, 2, 2), haste_buckets=HasteBuckets(measured=rec)))
    assert row.measured_macs is None and row.info["measured"].startswith("not used")


class _Keyed(_One):
    """``_One`` 8 -> 8 with the layer key ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(L=4)
        self.conv, self.key = nn.Conv2d(8, 8, 3, padding=1, bias=False), key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxslim.haste_conv2d(x, self.conv.weight, None, self.planes, [1, 1], [1, 1], [1, 1], 4, True,
                                             self.key)


class _Two(nn.Module):
    """Two HASTE convs 8 -> 8, layer keys "a" and "b"."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _Keyed("a"), _Keyed("b")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).relu())


def test_haste_cost_total_measured_is_none_unless_every_haste_conv_was_measured():
    model, x = _Two().eval(), _input(2)
    with torch.no_grad(), record_buckets() as rec:
        model(x)
    both = fxslim.estimate(model, x, haste_buckets=HasteBuckets(measured=rec))
    rows = [r for r in both.rows if r.op.startswith("fxslim.haste_conv2d")]
    assert len(rows) == 2 and both.total.measured_macs == sum(r.measured_macs for r in rows)
    one = {"a": rec["a"]}  # a sum over conv a alone would pass for both convs
    assert fxslim.estimate(model, x, haste_buckets=HasteBuckets(measured=one)).total.measured_macs is None


def test_haste_cost_all_singletons_exceed_dense_by_exactly_the_overhead():
    model, x = _One(L=48, sparsity=0.0).eval(), torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_buckets() as rec:
        model(x)
    stats = rec["one"]
    assert stats.buckets == 8 * stats.tiles
    counts = HasteLayer.of_stats(stats, nnz=48 * 36).measured(stats)
    assert counts.reduced_conv == counts.dense == 6 * 8 * 9 * 2 * 64 and counts.filter_merge == 0
    # per tile: centring 2·C·d, hashing C·nnz, merging C·d additions and B·d = C·d divisions
    assert counts.ops - counts.dense == (2 * 8 * 36 + 8 * 48 * 36 + 8 * 36 + 8 * 36) * stats.tiles


def test_haste_cost_bias_additions_follow_the_conventions():
    model, x = _One(bias=True).eval(), _input()
    with_bias = _row(fxslim.estimate(model, x, include_bias=True))
    without = _row(fxslim.estimate(model, x))
    assert with_bias.ops[("add", "fp32")] - without.ops[("add", "fp32")] == 2 * 6 * 8 * 8  # one per output


def _hashed_resnet_and_its_buckets():
    """A small ResNet18 rewritten with HASTE L=6, and the bucket counts of one run on its example."""
    model, x = resnet18(in_channels=3, width=0.125).eval(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxslim.optimize(model, x, passes=["haste:L=6"])
    with torch.no_grad(), record_buckets() as rec:
        res.module(x)
    return res, rec


def test_haste_compare_report_shows_predicted_and_measured_per_module():
    res, rec = _hashed_resnet_and_its_buckets()
    comp = res.compare(haste_buckets=HasteBuckets(measured=rec))
    rows = {r.fqn: r for r in comp.rows}
    for layer, stats in rec.items():
        row = rows[layer]  # the HASTE row lines up with the conv it replaced
        assert row.kind_before == row.kind_after == ("pointwise_conv" if "downsample" in layer else "conv")
        k2 = stats.kernel_size[0] * stats.kernel_size[1]
        assert row.after.measured_macs == stats.out_channels * k2 * stats.bucket_pixels
        assert row.after.macs <= row.before.macs  # data-free prediction: at most the dense MACs
    assert len(rec) == 19
    measured = sum(s.out_channels * s.kernel_size[0] * s.kernel_size[1] * s.bucket_pixels for s in rec.values())
    assert comp.after.total.measured_macs == measured < comp.before.total.macs
    data = comp.to_dict()
    assert data["after"]["total"]["measured_macs"] == measured
    assert data["after"]["total"]["elementwise"] > data["before"]["total"]["elementwise"]  # hashing, merging


def test_haste_predictions_are_data_free_unless_stats_are_given_explicitly():
    res, rec = _hashed_resnet_and_its_buckets()
    rewritten = [e for e in res.report.entries("haste") if e.status == "rewritten"]
    assert rewritten and all(e.info["buckets"] == "independent_codes" for e in rewritten)  # the pass: data-free
    calibrated = {r.fqn: r for r in res.compare(haste_buckets=HasteBuckets(calibration=rec)).after.rows}
    plain = {r.fqn: r for r in res.compare().after.rows}
    for entry in rewritten:
        stats = rec[entry.info["layer"]]
        k2 = stats.kernel_size[0] * stats.kernel_size[1]
        row = calibrated[entry.info["layer"]]
        assert row.info["buckets"] == "calibrated" and row.macs == stats.out_channels * k2 * stats.bucket_pixels
        assert plain[entry.info["layer"]].macs == entry.info["predicted_macs"]  # report and cost model agree


def test_haste_buckets_bad_stats_raise():
    with pytest.raises(TypeError, match="measured must map layer names to HasteStats"):
        HasteBuckets(measured={"one": 3})
    with pytest.raises(TypeError, match="haste_buckets: expected a HasteBuckets"):
        fxslim.estimate(_One(L=4).eval(), _input(), haste_buckets={"one": 3})
    model, x = _One(L=4).eval(), _input()
    with torch.no_grad(), record_buckets() as rec:
        model(x)
    with pytest.raises(ValueError, match=r"calibration stats: expected \(C, O"):
        fxslim.estimate(_One(L=5).eval(), x, haste_buckets=HasteBuckets(calibration=rec))  # "one" now has other planes


def test_expected_buckets_limits():
    assert expected_buckets(1, 7) == pytest.approx(1.0)
    assert expected_buckets(64, 53) == pytest.approx(64.0)  # more codes than channels: all apart
    assert expected_buckets(1000, 3) == pytest.approx(8.0)  # more channels than codes: every code used


def test_haste_symbolic_cost_is_whole_and_dense_where_a_size_gives_one_output_pixel():
    """The formula froze the example's choice (reduced conv at 32 px) for every size, so at 8 px, where
    the last conv's output is 1×1 and the op runs the dense conv, it was 1.25 % off on resnet18; and its
    expected-bucket coefficients made it a non-integer everywhere."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2), nn.Conv2d(16, 16, 3, stride=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model.eval(), torch.randn(1, 3, 32, 32), passes=["haste:L=12"])
        formula = fxslim.estimate(result.module, torch.randn(1, 3, 32, 32), symbolic={"batch": 0, "height": 2, "width": 3})
    for shape in [(1, 3, 32, 32), (2, 3, 8, 8), (3, 3, 40, 24)]:  # 8 px: the last conv gives 1×1
        x = torch.randn(shape)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            result.module(x)
        macs = formula.evaluate(batch=shape[0], height=shape[2], width=shape[3]).total.macs
        assert macs == int(macs) == fxslim.estimate(result.module, x).total.macs == counter.get_total_flops() // 2
