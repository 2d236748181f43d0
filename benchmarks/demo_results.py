"""The end-to-end demo's summary table as a results file (``make bench`` runs this).

Runs ``fxslim demo`` at its full size and writes ``benchmarks/results/demo.md`` and ``demo.png``
(the demo's own HTML report goes to ``benchmarks/.cache/demo``), so docs/results/demo.md can quote the table.

    python -m benchmarks.demo_results [--threads N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fxslim.app import cli

_HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    # paths relative to the working directory: the results file quotes the command line
    return cli.main(["demo", "--out", os.path.relpath(_HERE / ".cache" / "demo"), "--threads", str(args.threads),
                     "--results-md", os.path.relpath(_HERE / "results" / "demo.md")])


if __name__ == "__main__":
    raise SystemExit(main())
