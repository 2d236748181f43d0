"""README.md: up to date with the benchmark results, and every command it shows points at something real.

Static and cheap: nothing is run but argument parsing. Shell lines in README's non-Python code
blocks are checked by their first word: ``python -m benchmarks.X`` and ``python FILE`` need the
file, ``bash FILE`` too, ``fxslim ...`` must parse with the real CLI parser, ``make T`` needs the
Makefile target.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from benchmarks import update_readme
from fxslim.app.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
_FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)


def _shell_lines() -> list[str]:
    lines = []
    for block in _FENCE.finditer(README):
        if block.group("lang") in ("", "sh", "bash", "shell", "console"):
            for line in block.group("body").splitlines():
                line = line.split(" #", 1)[0].strip().removeprefix("$ ")
                if line:
                    lines.append(line)
    return lines


SHELL_LINES = _shell_lines()


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w.-]+):", text, re.M))


def test_readme_up_to_date_with_results():
    assert update_readme.main(["--check"]) == 0, "run python -m benchmarks.update_readme"


def test_readme_is_a_landing_page():
    assert len(README.encode("utf-8")) <= 15_000, "README.md over 15 KB: results belong in docs/results/"


def test_results_pages_quote_every_results_file():
    quoted = {name for page in update_readme.pages() for name in update_readme.quoted(page.read_text(encoding="utf-8"))}
    produced = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.md")}
    assert produced <= quoted, f"results files without a README section: {sorted(produced - quoted)}"


def test_readme_mentions_every_example():
    for path in sorted((ROOT / "examples").iterdir()):
        if path.suffix in (".py", ".sh"):
            assert f"examples/{path.name}" in README, f"README does not show examples/{path.name}"


def test_readme_has_commands_to_check():
    words = {shlex.split(line)[0] for line in SHELL_LINES}
    assert {"make", "python", "fxslim", "bash"} <= words


@pytest.mark.parametrize("line", SHELL_LINES)
def test_readme_command_names_existing_target(line: str):
    argv = shlex.split(line)
    tool, args = argv[0], argv[1:]
    if tool == "python":
        if args[0] == "-m":
            module = args[1]
            assert module.startswith(("benchmarks.", "fxslim.")), f"unexpected module in {line!r}"
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{line!r}: no module {module}"
        else:
            assert (ROOT / args[0]).is_file(), f"{line!r}: no file {args[0]}"
    elif tool == "bash":
        assert (ROOT / args[0]).is_file(), f"{line!r}: no file {args[0]}"
    elif tool == "fxslim":
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{line!r} does not parse with the fxslim CLI (exit {exc.code})")
    elif tool == "make":
        assert args[0] in _makefile_targets(), f"{line!r}: no Makefile target {args[0]}"
    else:
        pytest.fail(f"README shows a command this test does not know how to check: {line!r}")


_QUOTED = re.compile(r"<!-- results: .*? -->.*?<!-- /results -->", re.S)
_FIGURE = re.compile(r"(?<![\w.×])\d+(?:\.\d+)?\s?(?:%|×(?!\d)|ms\b|pp\b|s\b)")  # 4.3×, 12 %, 25 ms; not 1×1
_PAPER_FIGURES = {"1.25 pp"}  # HASTE's accuracy budget, quoted from the paper where the page says so


def test_no_measured_figure_is_typed_by_hand():
    """Outside the blocks copied from results files (and code), no page states a measured figure."""
    for page in update_readme.pages():
        text = page.read_text(encoding="utf-8")
        text = _FENCE.sub("", _QUOTED.sub("", text))
        text = re.sub(r"`[^`]*`", "", text)
        typed = set(_FIGURE.findall(text)) - _PAPER_FIGURES
        assert not typed, f"{page.name}: figures outside results blocks: {sorted(typed)}"
