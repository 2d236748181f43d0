"""Plots: breakdown by kind, per-layer bars, before/after bars and scaling curves render to PNG."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import fxslim
from fxslim.cost_model.plots import plot_breakdown, plot_comparison, plot_layers, plot_scaling, png_bytes, save_figure


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_plots_render_png(tmp_path):
    report = fxslim.estimate(_model(), torch.randn(1, 3, 8, 8))
    comp = fxslim.compare(report, report.with_conventions(deploy="int8"))
    for fig in (plot_breakdown(report), plot_layers(report, "energy_pj"), plot_comparison(comp)):
        assert isinstance(fig, Figure)
        assert png_bytes(fig).startswith(b"\x89PNG")
    path = save_figure(plot_breakdown(report), tmp_path / "kinds.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_scaling_plot_overlays_tables_and_rejects_expressions():
    report = fxslim.estimate(_model(), torch.randn(2, 3, 8, 8), symbolic={"batch": 0})
    tables = [report.scaling(batch=[1, 2, 4]), report.with_conventions(deploy="fp16").scaling(batch=[1, 2, 4])]
    fig = plot_scaling(tables, "energy_pj", labels=["fp32", "fp16"])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["fp32", "fp16"]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 4]
    with pytest.raises(ValueError, match="evaluate\\(\\) the report first"):
        plot_breakdown(report)


def test_energy_axis_is_in_joules():
    """Engineering prefixes on picojoules read "5 MpJ"; the axis gives joules (5 µJ)."""
    report = fxslim.estimate(_model(), torch.randn(1, 3, 8, 8))
    fig = plot_layers(report, "energy_pj")
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert labels and not any(label.endswith(("kpJ", "MpJ", "GpJ")) for label in labels)
    assert labels[-1].endswith(("nJ", "µJ", "mJ"))


def test_a_metric_name_that_is_no_total_is_a_value_error_naming_the_allowed_ones():
    # 'flop' and 'energy' gave AttributeError, a scaling table's 'params' a KeyError
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    report = fxslim.estimate(model, torch.randn(2, 16))
    table = fxslim.estimate(model, torch.randn(2, 16), symbolic={"batch": 0}).scaling(batch=[1, 2])
    for draw in (lambda: plot_breakdown(report, "flop"), lambda: plot_layers(report, "energy"),
                 lambda: plot_comparison(fxslim.compare(report, report), "energy"),
                 lambda: plot_scaling(table, "params")):
        with pytest.raises(ValueError, match=r"metric: expected one of \(.*'macs'"):
            draw()
    for metric in ("flops", "storage_bytes", "energy_pj"):
        plot_breakdown(report, metric)


def test_symbolic_names_are_checked():
    model, x = nn.Sequential(nn.Linear(16, 4)).eval(), torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"symbolic\['batch'\]: expected a dim of the first input"):
        fxslim.estimate(model, x, symbolic={"batch": "0"})
    with pytest.raises(ValueError, match=r"'a' and 'b' name the same dim"):
        fxslim.estimate(model, x, symbolic={"a": 0, "b": (0, 0)})


def test_names_with_dollars_are_drawn_as_they_are():
    # matplotlib took 'price_$\frac{a$' for maths and failed to draw ("\frac{a"): --plot and html died
    model = nn.Sequential()
    model.add_module("price_$\\frac{a$", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("x$^$", nn.Conv2d(8, 8, 3, padding=1))
    report = fxslim.estimate(model.eval(), torch.randn(1, 3, 8, 8))
    fig = plot_layers(report, "macs")
    assert png_bytes(fig).startswith(b"\x89PNG")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["price_\\$\\frac{a\\$", "x\\$^\\$"]  # escaped: drawn as the name itself


def test_an_all_zero_comparison_says_so_and_its_energy_axis_has_no_unit_in_the_label():
    report = fxslim.estimate(_model(), torch.randn(1, 3, 8, 8), deploy="bf16")  # the table has no bf16 energy
    assert report.total.energy_pj == 0
    fig = plot_comparison(fxslim.compare(report, report), "energy_pj")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["every layer's energy is 0"] and fig.axes[0].get_xlabel() == "energy"
    assert plot_layers(report, "elementwise").axes[0].get_xlabel() == "elementwise ops"
    assert "no energy in the table for (after, counted as 0): mul:bf16" in fxslim.compare(report, report).to_markdown()
