"""benchmarks.update_readme: splicing results files into README, missing files, --check/--strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import update_readme

_README = """# x

<!-- results: a.md -->
stale
<!-- /results -->

<!-- results: later.md -->
<!-- /results -->
"""


@pytest.fixture
def tree(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "a.md").write_text("# Title\n\nsome text\n\n## Part\n\n| t |\n")
    (tmp_path / "README.md").write_text(_README)
    monkeypatch.setattr(update_readme, "ROOT", tmp_path)
    monkeypatch.setattr(update_readme, "RESULTS", tmp_path / "benchmarks" / "results")
    return tmp_path


def test_update_readme_render_drops_title_and_nests_headings(tree):
    text = update_readme.render(_README)
    assert "<!-- results: a.md -->\nsome text\n\n#### Part\n\n| t |\n<!-- /results -->" in text
    assert "# Title" not in text and "stale" not in text


def test_update_readme_missing_file_gets_note_and_is_listed(tree, capsys):
    text = update_readme.render(_README)
    assert "<!-- results: later.md -->\n" + update_readme.not_produced_note("later.md") + "<!-- /results -->" in text
    assert update_readme.missing(_README) == ["later.md"]
    assert update_readme.main([]) == 0
    assert "not produced yet: later.md" in capsys.readouterr().err
    assert update_readme.main(["--check"]) == 0  # README now current, the note included
    assert update_readme.main(["--check", "--strict"]) == 1


def test_update_readme_check_stale_readme_exits_1(tree, capsys):
    assert update_readme.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert (tree / "README.md").read_text() == _README  # --check never writes


def test_update_readme_new_results_replace_note(tree):
    assert update_readme.main([]) == 0
    (tree / "benchmarks" / "results" / "later.md").write_text("# Later\n\nnew numbers\n")
    assert update_readme.main(["--check"]) == 1
    assert update_readme.main([]) == 0
    assert "<!-- results: later.md -->\nnew numbers\n<!-- /results -->" in (tree / "README.md").read_text()


def test_every_relative_link_of_the_docs_resolves():
    """Plots quoted from a results file kept their path relative to benchmarks/results/: three broken
    images in docs/results/."""
    import re

    root = update_readme.ROOT
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
    broken = [f"{page.relative_to(root)}: {target}" for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
              for target in link.findall(page.read_text(encoding="utf-8"))
              if not re.match(r"^[a-z]+:", target) and not (page.parent / target).exists()]
    assert not broken
