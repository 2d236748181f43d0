"""The end-to-end demo's summary table as results records (``make bench`` runs this).

Runs ``fxslim demo`` at its full size (its HTML report goes to ``benchmarks/.cache/demo``) and
records its summary table in ``benchmarks/results/demo.json``, rendered to ``demo.md``, with the
"after as % of before" plot as ``demo.png``, so docs/results/demo.md can quote the table.

    python -m benchmarks.demo_results [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.app.demo import FULL, PARTS, SUMMARY_HEADER, relative_figure, run_demo, summary_rows, write_report

__all__ = ["run", "main"]

_REPORT = Path(__file__).resolve().parent / ".cache" / "demo"


def run(args: argparse.Namespace, command: str = "python -m benchmarks.demo_results") -> tuple[Results, dict[str, Any]]:
    """Every part of the demo at full size; the summary table as the demo prints it."""
    console = Console()
    start = time.perf_counter()
    parts = run_demo(PARTS, FULL, args.threads, console)
    seconds = time.perf_counter() - start
    console.print(f"report: {write_report(parts, _REPORT, args.threads, seconds).resolve()}")
    text = [f"Run time {seconds:.0f} s; latency is the median of interleaved repeats with {args.threads} thread(s), "
            "MACs / energy / storage per image (per sequence for HTTM) from the cost model (45 nm energy table)."]
    table = Table(list(SUMMARY_HEADER), summary_rows(parts), numeric=[False, False, True, True, True])
    notes = [f"- {r.part} ({r.model}): {r.change}; " + "; ".join(r.notes) for r in parts]
    results = Results("demo", "fxslim demo: each pass on its reference model", command,
                      [Section(text=text, table=table, after=notes)])
    return results, {"": relative_figure(parts)}


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.demo_results", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
