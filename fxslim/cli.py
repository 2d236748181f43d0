"""The ``fxslim`` command.

    fxslim inspect MODEL --input 1x3x224x224 [--ir symbolic|export|dynamo] [--format table|json]

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``fxslim:NAME`` or ``path/to/file.py:factory``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from fxslim.capture import Captured, capture, capture_dynamo
from fxslim.inspection import inspect_graphs, summarize
from fxslim.modelspec import load_model, make_inputs

__all__ = ["main", "build_parser"]

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _captured(model_spec: str, inputs: list[str], ir: str) -> Captured:
    model = load_model(model_spec)
    example = make_inputs(inputs)
    if ir == "dynamo":
        graphs = capture_dynamo(model, example)
        batch = example[0].shape[0] if example and example[0].dim() else None
        return Captured(model, graphs, [], "dynamo", batch)
    return capture(model, example, method=ir)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    captured = _captured(args.model, args.input, args.ir)
    rows = inspect_graphs(captured)
    counts = summarize(rows)
    if args.format == "json":
        print(json.dumps({"model": args.model, "ir": args.ir, "summary": counts,
                          "untraced": captured.untraced, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return 0
    table = Table(title=f"{args.model} ({args.ir})")
    for col in ("node", "module", "kind", "shape", "matched by", "skipped (why)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        node = f"{r.graph}/{r.node}" if r.graph else r.node
        table.add_row(node, r.fqn, r.kind, r.shape, ", ".join(r.matched), "; ".join(r.skipped))
    console = Console(width=args.width)
    console.print(table)
    for path, reason in captured.untraced:
        console.print(f"[yellow]not traced whole:[/] {path or '<root>'} ({reason})")
    console.print(
        f"{counts['convs']} convs, of which {counts['pointwise_convs']} pointwise and "
        f"{counts['depthwise_convs']} depthwise; {counts['linears']} linear; "
        f"{counts['attention']} attention, of which {counts['global_attention']} global"
    )
    return 0


_COMMANDS["inspect"] = _cmd_inspect


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxslim", description="Graph passes that make vision models cheaper, and their cost.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what each matcher finds in a model")
    p.add_argument("model", help="torchvision:NAME, timm:NAME, fxslim:NAME or path/to/file.py:factory")
    p.add_argument("--input", action="append", required=True, help="input shape such as 1x3x224x224 (repeat for more inputs)")
    p.add_argument("--ir", choices=("symbolic", "export", "dynamo"), default="symbolic")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--width", type=int, default=160, help="table width in characters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, TypeError) as exc:
        print(f"fxslim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
