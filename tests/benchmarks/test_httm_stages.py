"""benchmarks.httm_stages at a tiny size: records per frame count, shares that add up, a baseline beside."""

from __future__ import annotations

import json
import re

from benchmarks import httm_stages


def test_httm_stages_writes_records_and_puts_the_baseline_first(tmp_path, one_thread):
    out = tmp_path / "stages.md"
    httm_stages.main(["--frames", "1", "2", "--repeats", "1", "--label", "base", "--output", str(out)])
    base = json.loads((tmp_path / "httm_stages_base.json").read_text())
    assert [r["frames"] for r in base["records"]] == [1, 2]
    for r in base["records"]:
        assert r["rounds"] == 1 and set(r["ms"]) == {"dense SDPA", "op", "plan", "matching", "apply", "merged SDPA"}
        parts = httm_stages._breakdown(r["ms"])
        assert sum(parts.values()) == r["ms"]["plan"] + r["ms"]["apply"]
    httm_stages.main(["--frames", "2", "--repeats", "1", "--label", "new", "--output", str(out),
                      "--baseline", str(tmp_path / "httm_stages_base.json")])
    text = out.read_text()
    assert text.index("#### base") < text.index("#### new")
    assert len(re.findall(r"^\| 2 \| 522 \| 1 \|", text, flags=re.M)) == 2  # 2 frames in both runs
