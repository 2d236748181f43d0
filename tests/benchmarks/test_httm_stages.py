"""benchmarks.httm_stages at a tiny size: records per frame count, shares that add up, a baseline beside."""

from __future__ import annotations

import re

from benchmarks import httm_stages, records


def test_httm_stages_writes_records_and_puts_the_baseline_first(tmp_path, one_thread):
    assert httm_stages.main(["--frames", "1", "2", "--repeats", "1", "--label", "base", "--out", str(tmp_path)]) == 0
    base = httm_stages.stages_of(records.load("httm_stages_base", tmp_path))
    assert [r["frames"] for r in base] == [1, 2]
    for r in base:
        assert r["rounds"] == 1 and set(r["ms"]) == {"dense SDPA", "op", "plan", "matching", "apply", "merged SDPA"}
        parts = httm_stages._breakdown(r["ms"])
        assert sum(parts.values()) == r["ms"]["plan"] + r["ms"]["apply"]
    httm_stages.main(["--frames", "2", "--repeats", "1", "--label", "new", "--baseline", "base",
                      "--out", str(tmp_path)])
    text = (tmp_path / "httm_stages_new.md").read_text()
    assert text.index("### base") < text.index("### new")
    assert len(re.findall(r"^\| 2 \| 522 \| 1 \|", text, flags=re.M)) == 3  # both runs' shares, this run's records
