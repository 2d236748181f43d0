"""Copy benchmark results into README.md, so every number there comes from a results file.

README.md marks each quoted result with a pair of comments::

    <!-- results: prom_accuracy.md -->
    ... (replaced by the file's content, minus its title line) ...
    <!-- /results -->

Run ``python -m benchmarks.update_readme`` after the benchmarks; ``--check`` exits 1 when README
is out of date (a test runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_BLOCK = re.compile(r"(<!-- results: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

__all__ = ["render", "main"]


def _body(name: str) -> str:
    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"README quotes benchmarks/results/{name}, which does not exist")
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip() + "\n"


def render(readme: str) -> str:
    """README text with every marked block replaced by its results file."""
    return _BLOCK.sub(lambda m: m.group(1) + _body(m.group("name")) + m.group(4), readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    current = path.read_text()
    updated = render(current)
    if args.check:
        if updated != current:
            print("README.md is out of date: run python -m benchmarks.update_readme", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
