"""benchmarks.headlines: README's headline table is rendered from the results files as they are."""

from __future__ import annotations

from benchmarks import headlines


def test_headlines_file_matches_the_results_it_is_read_from():
    committed = (headlines.RESULTS / "headlines.md").read_text(encoding="utf-8")
    assert headlines.render() == committed, "run python -m benchmarks.headlines"


def test_headlines_name_a_source_for_every_row():
    rows = [line for line in headlines.render().splitlines() if line.startswith("| ") and "method" not in line]
    # PROM's CPU latency once more when a CPU without VNNI has its own page
    assert len(rows) == 4 + (headlines.RESULTS / "prom_vs_peers_avx2.json").is_file()
    assert all(line.rstrip(" |").endswith(".md") for line in rows)
