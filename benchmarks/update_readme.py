"""Copy benchmark results into the results pages (docs/results/*.md) and README.md, so every number
there comes from a results file.

A page marks each quoted result with a pair of comments::

    <!-- results: prom_accuracy.md -->
    ... (replaced by the file's content, minus its title line) ...
    <!-- /results -->

Headings inside a results file move two levels down (``## x`` becomes ``#### x``) so they nest
under the README subsection that quotes the file. A quoted file that does not exist yet (its
benchmark has not run) gets a one-line "not produced yet" note instead, and is listed on stderr;
``--strict`` makes that an error.

Run ``python -m benchmarks.update_readme`` after the benchmarks; ``--check`` exits 1 when a page
is out of date (a test runs it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_BLOCK = re.compile(r"(<!-- results: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
_HEADING = re.compile(r"^(#{1,6}) ", re.M)
_SHIFT = 2  # README quotes results under a ### subsection
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")  # a markdown link or image: [text](target)

__all__ = ["pages", "render", "quoted", "missing", "not_produced_note", "main"]


def pages() -> list[Path]:
    """The pages that quote results: README.md and docs/results/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs" / "results").glob("*.md"))]


def not_produced_note(name: str) -> str:
    """What a block holds while its results file does not exist."""
    return f"*Not produced yet: `benchmarks/results/{name}` does not exist.*\n"


def _body(name: str, page: Path) -> str:
    path = RESULTS / name
    if not path.is_file():
        return not_produced_note(name)
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = "\n".join(lines).strip() + "\n"
    text = _LINK.sub(lambda m: m.group(1) + _from_page(m.group(2), path.parent, page) + m.group(3), text)
    return _HEADING.sub(lambda m: "#" * min(6, len(m.group(1)) + _SHIFT) + " ", text)


def _from_page(target: str, source_dir: Path, page: Path) -> str:
    """A relative link of a results file, as the page that quotes it must write it (a plot beside the
    results file was a broken image in docs/results/)."""
    if re.match(r"^([a-z]+:|#|/)", target):
        return target
    return os.path.relpath(source_dir / target, page.parent).replace(os.sep, "/")


def quoted(readme: str) -> list[str]:
    """Names of the results files README quotes, in order."""
    return [m.group("name") for m in _BLOCK.finditer(readme)]


def missing(readme: str) -> list[str]:
    """Quoted results files that do not exist yet."""
    return [name for name in quoted(readme) if not (RESULTS / name).is_file()]


def render(readme: str, page: Path = ROOT / "README.md") -> str:
    """The text of ``page`` with every marked block replaced by its results file (or the
    not-produced note), relative links made relative to ``page``."""
    return _BLOCK.sub(lambda m: m.group(1) + _body(m.group("name"), page) + m.group(4), readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a quoted results file does not exist")
    args = parser.parse_args(argv)
    status = 0
    for path in pages():
        current = path.read_text(encoding="utf-8")
        updated = render(current, path)
        absent = missing(current)
        name = path.relative_to(ROOT)
        if absent:
            print(f"{name} quotes results not produced yet: {', '.join(absent)}", file=sys.stderr)
            status = 1 if args.strict else status
        if args.check:
            if updated != current:
                print(f"{name} is out of date: run python -m benchmarks.update_readme", file=sys.stderr)
                status = 1
        else:
            path.write_text(updated, encoding="utf-8")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
