"""``fxslim demo --quick`` end to end (in process through the cli), and its input checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fxslim.app.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    code = main(["demo", "--quick", "--threads", "1", "--out", str(out), "--results-md", str(out / "demo.md")])
    assert torch.get_num_threads() == threads  # the demo restores the caller's thread count
    assert code == 0
    return out


@pytest.fixture(scope="module")
def summary(demo_dir):
    return json.loads((demo_dir / "summary.json").read_text())


def test_demo_quick_summary_has_three_parts_with_finite_numbers(summary):
    assert set(summary["parts"]) == {"prom", "haste", "httm"}
    for part in summary["parts"].values():
        for side in ("before", "after"):
            assert set(part[side]) == {"macs", "energy_pj", "storage_bytes", "latency_ms"}
            assert all(math.isfinite(v) and v > 0 for v in part[side].values())
        assert math.isfinite(part["quality_before"]) and math.isfinite(part["quality_after"])


def test_demo_quick_passes_make_models_cheaper(summary):
    parts = summary["parts"]
    assert parts["haste"]["after"]["macs"] < parts["haste"]["before"]["macs"]
    assert parts["httm"]["after"]["macs"] < parts["httm"]["before"]["macs"]
    assert parts["prom"]["after"]["storage_bytes"] < parts["prom"]["before"]["storage_bytes"] / 4
    assert parts["prom"]["after"]["energy_pj"] < parts["prom"]["before"]["energy_pj"]


def test_demo_quick_quality_is_plausible(summary):
    parts = summary["parts"]
    assert parts["prom"]["quality_before"] > 90  # float checkpoint, top-1 in percent
    assert parts["haste"]["quality_before"] > 90
    assert 0 <= parts["prom"]["quality_after"] <= 100
    assert parts["httm"]["quality_before"] == 0.0  # the dense depth is the reference
    assert 0.0 < parts["httm"]["quality_after"] < 0.5  # relative error of the merged depth map


def test_demo_quick_index_html_embeds_plots_and_tables(demo_dir):
    page = (demo_dir / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 6  # relative, summary, quality, one per-layer plot per part
    for word in ("PROM", "HASTE", "HTTM", "energy (pJ)", "latency (ms)", "<table>"):
        assert word in page
    for name in ("relative", "summary", "quality", "prom_layers", "haste_layers", "httm_layers"):
        assert (demo_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_quick_results_markdown_has_table(demo_dir):
    text = (demo_dir / "demo.md").read_text()
    assert "| pass | measure | before | after | before/after |" in text
    assert "| HTTM |" in text


def test_demo_unknown_part_errors_naming_argument_and_choices(tmp_path, capsys):
    code = main(["demo", "--quick", "--parts", "prom", "quantize", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--parts" in err and "quantize" in err
    assert all(p in err for p in ("prom", "haste", "httm"))
    assert not (tmp_path / "summary.json").exists()


def test_demo_threads_below_one_errors(tmp_path, capsys):
    assert main(["demo", "--quick", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err
