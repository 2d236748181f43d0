"""Reports as data: totals equal the sums of rows, per-kind and per-module views, before/after comparison."""

from __future__ import annotations

import html

import pytest
import torch
from torch import nn

import fxslim
from fxslim.cost_model import CostTotals


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_totals_are_sums_of_rows_and_groupings():
    report = fxslim.estimate(_model(), torch.randn(1, 3, 8, 8))
    assert report.total.macs == sum(r.macs for r in report.rows)
    assert report.total.energy_pj == pytest.approx(sum(r.energy_pj for r in report.rows))
    kinds = report.by_kind()
    assert set(kinds) == {"conv", "norm", "elementwise", "pointwise_conv"}
    assert sum(t.macs for t in kinds.values()) == report.total.macs
    assert report.by_module()["1"].elementwise == 2 * 8 * 64
    assert CostTotals.of([]).macs == 0


def test_compare_rows_per_module_and_ratios():
    before = fxslim.estimate(_model(), torch.randn(1, 3, 8, 8))
    after = before.with_conventions(deploy="prom", accumulator_bits=8)
    comp = fxslim.compare(before, after)
    assert [r.fqn for r in comp.rows] == ["0", "1", "2", "3"]
    pw = comp.rows[3]
    assert (pw.kind_before, pw.kind_after) == ("pointwise_conv", "pointwise_conv")
    # fp32 MAC (3.7 + 0.9 pJ) against a ternary int8 addition (0.03 pJ)
    assert pw.before.energy_pj / pw.after.energy_pj == pytest.approx(4.6 / 0.03)
    assert comp.ratio("energy_pj") == pytest.approx(before.total.energy_pj / after.total.energy_pj)
    with pytest.raises(TypeError, match="compare: expected two CostReports"):
        fxslim.compare(before, after.total)
    # elementwise work beside the MACs in every format's summary (HASTE's overhead was in the JSON only)
    line = f"elementwise ops: {before.total.elementwise:,} -> {after.total.elementwise:,}"
    assert line in comp.to_markdown() and html.escape(line) in comp.to_html()


def test_formulas_are_evaluated_at_positive_whole_sizes_only():
    # evaluate(batch=-3) gave negative MACs and 2.7 was taken as 2
    import numpy as np

    report = fxslim.estimate(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 4, 4), symbolic={"batch": 0})
    for bad in (-3, 0, 2.7, "2", True):
        with pytest.raises(ValueError, match=r"batch: expected a positive whole number"):
            report.evaluate(batch=bad)
        with pytest.raises(ValueError, match=r"scaling: batch: expected a positive whole number"):
            report.scaling(batch=[1, bad])
    assert report.evaluate(batch=np.int64(3)).total.macs == report.evaluate(batch=3.0).total.macs == 3 * 4 * 3 * 16


def test_compare_refuses_formulas_beside_numbers():
    # the comparison was made, and its Markdown raised "Cannot convert expression to float"
    model, x = nn.Sequential(nn.Linear(16, 4)).eval(), torch.randn(2, 16)
    numeric, symbolic = fxslim.estimate(model, x), fxslim.estimate(model, x, symbolic={"batch": 0})
    with pytest.raises(ValueError, match=r"compare: after has formulas in \['batch'\] and before numbers"):
        fxslim.compare(numeric, symbolic)
    assert fxslim.compare(numeric, symbolic.evaluate(batch=2)).ratio("macs") == 1
    assert "batch" in fxslim.compare(symbolic, symbolic).to_markdown()
