"""``fxslim report``: every output format, plots, deployed conventions, before/after with passes."""

from __future__ import annotations

import csv
import html.parser
import io
import json

import pytest

from fxslim.app.cli import main
from tests.toy_pass import ToyScalePointwise  # noqa: F401  (registers the "toy" pass)

MODEL = ["torchvision:mobilenet_v2", "--input", "1x3x32x32"]


@pytest.mark.parametrize("fmt", ["table", "json", "md", "csv", "html"])
def test_cli_report_writes_every_format(tmp_path, fmt):
    out, plot = tmp_path / f"report.{fmt}", tmp_path / "kinds.png"
    assert main(["report", *MODEL, "--format", fmt, "--out", str(out), "--plot", str(plot)]) == 0
    text = out.read_text()
    assert plot.read_bytes().startswith(b"\x89PNG")
    if fmt == "table":
        assert "MobileNetV2 cost" in text and "total" in text
    elif fmt == "json":
        assert json.loads(text)["total"]["params"] == 3_504_872
    elif fmt == "md":
        assert text.startswith("# Cost of MobileNetV2")
    elif fmt == "csv":
        assert len(list(csv.DictReader(io.StringIO(text)))) > 100
    else:
        parser = html.parser.HTMLParser()
        parser.feed(text)
        assert "https://" not in text and "http://" not in text and "data:image/png;base64," in text


def test_cli_report_deploy_and_conventions_to_stdout(capsys):
    assert main(["report", *MODEL, "--format", "json", "--deploy", "prom:last_pointwise=int8",
                 "--conventions", "accumulator_bits=8,include_requant=true"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["conventions"]["deploy"] == "prom:last_pointwise=int8"
    assert data["conventions"]["accumulator_bits"] == 8 and data["conventions"]["include_requant"] is True
    assert set(data["total"]["ops"]) == {"add:int8", "mul:int8", "mul:int32"}


def test_cli_report_with_passes_compares_before_and_after(tmp_path, capsys):
    plot = tmp_path / "layers.png"
    assert main(["report", "torchvision:resnet18", "--input", "1x3x32x32", "--passes", "toy:scale=2",
                 "--format", "json", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["before"]["total"]["macs"] == data["after"]["total"]["macs"]
    assert data["ratios"]["macs"] == 1.0
    downsample = next(r for r in data["rows"] if r["module"] == "layer2.0.downsample.0")
    assert downsample["kind_before"] == downsample["kind_after"] == "pointwise_conv"
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_cli_report_bad_options_exit_2(capsys):
    assert main(["report", *MODEL, "--deploy", "int3"]) == 2
    assert "deploy: expected a preset" in capsys.readouterr().err
    assert main(["report", *MODEL, "--conventions", "accumulator_bits=9"]) == 2
    assert "Conventions.accumulator_bits: expected one of (8, 16, 32), got 9" in capsys.readouterr().err
    assert main(["report", *MODEL, "--table", "nope"]) == 2
    assert "table: expected one of" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["table", "json", "md", "csv", "html"])
def test_cli_report_with_passes_lists_every_candidate(tmp_path, fmt):
    out = tmp_path / f"report.{fmt}"
    assert main(["report", "torchvision:resnet18", "--input", "1x3x32x32", "--passes", "haste:L=14",
                 "--format", fmt, "--out", str(out)]) == 0
    text = out.read_text()
    if fmt == "json":
        candidates = json.loads(text)["candidates"]
        statuses = {(c["module"], c["status"], c["reason"]) for c in candidates}
        assert ("conv1", "skipped", "stem") in statuses and ("layer1.0.conv1", "rewritten", "") in statuses
        assert len(candidates) == 20  # every conv of ResNet18
    else:
        assert "What the passes did" in text or text.splitlines()[0].endswith(",passes")
        assert "stem" in text and "layer1.0.conv1" in text and "rewritten" in text


def test_cli_report_passes_prom_costs_the_integer_model(capsys):
    """--passes prom shows what PROM exists for: the deployed integer model's energy and storage."""
    assert main(["report", "torchvision:mobilenet_v2", "--input", "1x3x32x32", "--passes", "prom",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ratios"]["energy_pj"] > 10 and data["ratios"]["storage_bytes"] > 4
    assert not data["unknown_ops"]["after"]


def test_cli_report_with_passes_csv_is_one_table_with_a_total(tmp_path):
    """The candidates were a second table after a blank line: a CSV reader took them as module rows
    (pandas summed numbers as strings). Now a ``passes`` column and a ``total`` row."""
    out = tmp_path / "report.csv"
    assert main(["report", "torchvision:resnet18", "--input", "1x3x32x32", "--passes", "haste:L=14",
                 "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert all(None not in row and None not in row.values() for row in rows)  # every row has every column
    by_module = {row["module"]: row for row in rows}
    assert by_module["conv1"]["passes"] == "haste: skipped (stem)"
    assert by_module["layer1.0.conv1"]["passes"] == "haste: rewritten"
    total = rows[-1]
    assert total["module"] == "total"
    assert int(total["macs_before"]) == sum(int(r["macs_before"]) for r in rows[:-1] if r["macs_before"])


def test_cli_report_refuses_an_unwritable_out_before_any_work(tmp_path, capsys, monkeypatch):
    import fxslim.app.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("worked before checking --out"))
    plot = tmp_path / "p.png"
    for out, why in (("/proc/fxslim-report.txt", "No such file"), (str(tmp_path / "ro" / "r.txt"), "does not exist")):
        assert main(["report", *MODEL, "--out", out, "--plot", str(plot)]) == 2
        assert "--out: " in capsys.readouterr().err and not plot.exists()
    monkeypatch.undo()
    assert main(["report", *MODEL, "--format", "json", "--out", "/dev/full"]) == 2  # the disk fills while writing
    assert "--out: cannot write '/dev/full' (No space left on device)" in capsys.readouterr().err


def test_cli_report_says_which_pass_rewrote_nothing(capsys):
    assert main(["report", *MODEL, "--format", "json", "--passes", "httm"]) == 0
    assert "pass 'httm' rewrote nothing (skipped: no candidates)" in capsys.readouterr().err
