"""Benchmark records: pages render from their JSON alone, and every committed page still does."""

from __future__ import annotations

import json

from benchmarks import records
from benchmarks.records import Results, Section, Table


def _results() -> Results:
    table = Table(["model", "ms", "speed-up"], [["dense", 12.3456, 1.0], ["fast", 3.2, 3.858], ["none", None, None]],
                  ["", ".1f", ".2f}x"])
    return Results("demo_bench", "A benchmark", "python -m benchmarks.demo_bench --rounds 3",
                   [Section("Speed", ["Medians of 3 rounds."], table, ["After the table."]), Section(text=["End."])],
                   {"torch": "2.14.1", "cpu_capability": "AVX512", "threads": 1, "load_average": 0.5})


def test_page_is_rendered_from_the_json_records(tmp_path):
    page = records.write(_results(), directory=tmp_path)
    data = json.loads((tmp_path / "demo_bench.json").read_text())
    assert data["sections"][0]["table"]["rows"][0] == ["dense", 12.3456, 1.0]  # raw values, not text
    text = page.read_text()
    assert "| dense | 12.3 | 1.00x |" in text and "| none | - | - |" in text
    assert "| --- | ---: | ---: |" in text and "### Speed" in text
    assert "`python -m benchmarks.demo_bench --rounds 3`" in text and "AVX512" in text
    assert records.render("demo_bench", tmp_path) == text == records.load("demo_bench", tmp_path).markdown()


def test_check_finds_a_page_edited_by_hand(tmp_path):
    page = records.write(_results(), directory=tmp_path)
    (tmp_path / "other.json").write_text('{"not": "a record"}')  # a benchmark's own data file: ignored
    assert records.main(["--check", "--dir", str(tmp_path)]) == 0
    page.write_text(page.read_text().replace("12.3", "11.0"))
    assert records.main(["--check", "--dir", str(tmp_path)]) == 1
    assert records.main(["--dir", str(tmp_path)]) == 0 and "12.3" in page.read_text()


def test_every_committed_page_renders_from_its_records():
    assert records.main(["--check"]) == 0
