"""Formatting: JSON, Markdown, CSV, rich tables and self-contained HTML for reports and comparisons."""

from __future__ import annotations

import csv
import html.parser
import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

import fxslim


def _report(**kw):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 64, 10)).eval()
    return fxslim.estimate(model, torch.randn(1, 3, 8, 8), **kw)


class _Checker(html.parser.HTMLParser):
    """Collects tags and every URL-valued attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def _check_self_contained(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert "http://" not in page and "https://" not in page
    assert all(u.startswith("data:image/png;base64,") for u in checker.urls)
    assert {"html", "head", "style", "body", "table"} <= set(checker.tags)
    assert "<link" not in page and "<script" not in page
    return checker


def test_json_has_totals_rows_and_conventions():
    report = _report()
    data = json.loads(report.to_json())
    assert data["total"]["macs"] == report.total.macs and data["total"]["flops"] == 2 * report.total.macs
    assert len(data["rows"]) == len(report.rows)
    assert data["energy_table"]["name"] == "horowitz45nm" and "Horowitz" in data["energy_table"]["citation"]
    assert data["rows"][0]["ops"] == {"mul:fp32": 3 * 8 * 9 * 64, "add:fp32": 3 * 8 * 9 * 64}
    assert "deploy=as in the graph" in data["conventions_text"]


def test_markdown_and_csv():
    report = _report(deploy="int8")
    md = report.to_markdown()
    assert md.startswith("# Cost of Sequential") and "| module (node) | kind | format |" in md and "| 4 | linear | int8 |" in md and "## By kind" in md
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert len(rows) == len(report.rows)
    assert rows[0]["format"] == "int8" and rows[0]["ops"] == "add:int32=13824; mul:int8=13824"


def test_rich_table_renders_total_and_conventions():
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(_report().table())
    text = console.export_text()
    assert "total" in text and "conventions: deploy=as in the graph" in text and "pointwise_conv" in text


def test_html_report_self_contained_with_embedded_plots():
    page = _report().to_html()
    checker = _check_self_contained(page)
    assert checker.tags.count("img") == 3  # MACs and energy by kind, MACs per layer


def test_symbolic_report_formats_as_expressions_without_plots():
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    report = fxslim.estimate(model, torch.randn(2, 3, 4, 4), symbolic={"batch": 0})
    assert json.loads(report.to_json())["total"]["macs"] == "192*batch"
    checker = _check_self_contained(report.to_html())
    assert "img" not in checker.tags


def test_comparison_formats():
    before, after = _report(), _report(deploy="prom")
    comp = fxslim.compare(before, after)
    assert comp.ratio("macs") == 1.0 and comp.ratio("energy_pj") > 1
    data = json.loads(comp.to_json())
    assert data["ratios"]["energy_pj"] == pytest.approx(before.total.energy_pj / after.total.energy_pj)
    assert "| module | kind before | kind after |" in comp.to_markdown()
    assert len(list(csv.reader(io.StringIO(comp.to_csv())))) == len(comp.rows) + 2  # header, rows, total
    assert _check_self_contained(comp.to_html()).tags.count("img") == 2
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(comp.table())
    assert "before / after" in console.export_text()


def test_comparison_ratio_names_the_measures_it_takes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    comp = fxslim.compare(fxslim.estimate(model, x), fxslim.estimate(model, x))
    assert comp.ratio("macs") == comp.ratio("storage_bytes") == 1.0
    with pytest.raises(ValueError, match=r"field_name must be one of \['macs', .*'storage_bytes'\], got 'foo'"):
        comp.ratio("foo")


def test_the_conditions_of_symbolic_formulas_appear_in_every_summary():
    # JSON, Markdown, HTML and the table gave formulas with none of the sizes they hold for
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, 3, stride=2)).eval()
    report = fxslim.estimate(model, torch.randn(1, 3, 16, 16), symbolic={"height": 2})
    assert report.valid_where
    condition = str(report.valid_where[0])
    assert json.loads(report.to_json())["valid_where"] == [str(c) for c in report.valid_where]
    assert condition in report.to_markdown()
    assert html.escape(condition) in report.to_html()
    assert fxslim.estimate(model, torch.randn(1, 3, 16, 16)).to_dict()["valid_where"] == []


def test_markdown_cells_keep_names_as_text():
    # a line break split the table; '<script>' went into the page as HTML
    model = nn.Sequential()
    model.add_module("a<script>x&y", nn.Conv2d(3, 4, 1))
    model.add_module("two\nlines|pipe", nn.Conv2d(4, 4, 1))
    text = fxslim.estimate(model.eval(), torch.randn(1, 3, 4, 4)).to_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| ") and ("script" in line or "lines" in line)]
    assert len(rows) == 2
    assert "a&lt;script>x&amp;y" in rows[0] and "<script>" not in text
    assert "two lines\\|pipe" in rows[1]
