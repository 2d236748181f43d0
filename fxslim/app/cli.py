"""The ``fxslim`` command.

    fxslim [--version] [--debug] inspect MODEL --input 1x3x224x224 [--ir symbolic|export|dynamo] [--format table|json]
    fxslim report MODEL --input 1x3x224x224 [--passes P ...] [--format table|json|md|csv|html]
                  [--out PATH] [--plot out.png] [--deploy fp16|int8|prom[:...]] [--conventions k=v,...]
    fxslim demo [--out DIR] [--quick] [--threads N] [--parts prom haste httm] [--results-md PATH]

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``fxslim:NAME`` or ``path/to/file.py:factory``, before
or after the options. Every mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from fxslim.capture import Captured, capture, capture_dynamo
from fxslim.app.inspection import inspect_graphs, summarize
from fxslim.app.modelspec import FXSLIM_MODELS, load_model, make_inputs, parse_input

__all__ = ["main", "build_parser"]

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


@contextlib.contextmanager
def _status(message: str, after: float = 5.0) -> Iterator[None]:
    """Say on stderr what is running when a step takes longer than ``after`` seconds (also when
    the output is piped), so a long capture or benchmark never looks like a hang."""
    timer = threading.Timer(after, lambda: print(f"fxslim: {message} ...", file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _model_and_inputs(model_spec: str, inputs: list[str]) -> tuple[Any, tuple]:
    """The model and random inputs of the ``--input`` shapes, run once: a model that does not take
    them gets an error that names ``--input``, not one from deep inside a capture."""
    import torch

    model, example = load_model(model_spec), make_inputs(inputs)
    names = {m: name for name, m in model.named_modules()}
    running: list[str] = []  # the modules entered and not yet left: the last one raised
    def left(module: Any, args: Any, output: Any) -> None:  # returns None: the output stays the module's
        running.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(lambda m, a: running.append(names[m])),
                                          m.register_forward_hook(left))]
    try:
        with torch.no_grad():
            model(*example)
    except Exception as exc:
        where = f" in {running[-1]}" if running and running[-1] else ""
        raise ValueError(f"--input {' '.join(inputs)}: {type(model).__name__} does not run on inputs of these "
                         f"shapes{where} ({_one_line(exc)})") from None
    finally:
        for h in handles:
            h.remove()
    return model, example


def _captured(model_spec: str, inputs: list[str], ir: str) -> Captured:
    model, example = _model_and_inputs(model_spec, inputs)
    if ir == "dynamo":
        graphs = capture_dynamo(model, example)
        batch = example[0].shape[0] if example and example[0].dim() else None
        return Captured(model, graphs, [], "dynamo", batch)
    return capture(model, example, method=ir)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _status(f"capturing {args.model} ({args.ir})"):
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
        console.print(f"[yellow]not traced whole:[/] {path or '<root>'} ({reason})", soft_wrap=True)
    console.print(
        f"{counts['convs']} convs, of which {counts['pointwise_convs']} pointwise and "
        f"{counts['depthwise_convs']} depthwise; {counts['linears']} linear; "
        f"{counts['attention']} attention, of which {counts['global_attention']} global", soft_wrap=True,
    )
    return 0


_COMMANDS["inspect"] = _cmd_inspect


def _cmd_report(args: argparse.Namespace) -> int:
    from fxslim.cost_model import Conventions, compare, estimate
    from fxslim.cost_model import format as fmt
    from fxslim.cost_model import plots

    model, example = _model_and_inputs(args.model, args.input)
    conventions = Conventions.from_string(f"conventions:{args.conventions}") if args.conventions else Conventions()
    options = {"deploy": args.deploy} if args.deploy else {}
    if args.passes:
        from fxslim.api import optimize

        with _status(f"running {' '.join(args.passes)} on {args.model}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "rewrote nothing": one line each below, not a Python warning
            res = optimize(model, example, passes=args.passes, capture=args.ir)
        for p in res.passes:
            if res.report.rewritten(p.name) == 0:
                skipped = dict(res.report.skipped(p.name)) or "no candidates"
                print(f"fxslim report: pass {p.name!r} rewrote nothing (skipped: {skipped})", file=sys.stderr)
        with _status("costing the model before and after"):
            before = estimate(model, example, capture=args.ir, table=args.table, conventions=conventions, **options)
            after = estimate(res.deployed, example, table=args.table, conventions=conventions, **options)
        result: Any = compare(before, after, res.report.candidates(), res.saved_bytes)
        figure = plots.plot_comparison(result, "energy_pj") if args.plot else None
    else:
        with _status(f"costing {args.model}"):
            result = estimate(model, example, capture=args.ir, table=args.table, conventions=conventions, **options)
        figure = plots.plot_breakdown(result, "macs") if args.plot else None
    if figure is not None:
        plots.save_figure(figure, args.plot)
    is_report = not args.passes
    if args.format == "table":
        from rich.console import Console

        table = result.table(nonzero=not args.all_rows) if is_report else result.table()
        with _output(args.out) as stream:
            terminal = stream is sys.stdout and sys.stdout.isatty()
            width = args.width or (None if terminal else _FILE_WIDTH)  # a file or a pipe has no terminal
            console = Console(file=stream, width=width)
            # narrower than the table's columns need: wider lines (a terminal wraps them) rather than
            # numbers cut short or columns cropped away
            console.width = max(console.width, Console(width=1 << 14).measure(table).minimum)
            if not is_report and result.candidates:  # what the passes did, then what it costs
                console.print(fmt.candidates_rich_table(result))
            console.print(table)
        return 0
    text = {
        "json": result.to_json,
        "md": lambda: result.to_markdown(nonzero=not args.all_rows) if is_report else result.to_markdown(),
        "csv": result.to_csv,
        "html": result.to_html,
    }[args.format]()
    with _output(args.out) as stream:
        stream.write(text if text.endswith("\n") else text + "\n")
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    try:
        with open(path, "w", encoding="utf-8") as stream:
            yield stream
    except OSError as exc:  # also while writing: a full disk (/dev/full)
        raise ValueError(f"--out: cannot write {path!r} ({exc.strerror or type(exc).__name__})") from None


_COMMANDS["report"] = _cmd_report


def _cmd_demo(args: argparse.Namespace) -> int:
    from fxslim.app.demo import demo_command

    return demo_command(args.out, args.parts, args.quick, args.threads, args.results_md)


_COMMANDS["demo"] = _cmd_demo


_FILE_WIDTH = 160  # table width in characters when written to --out
_MODEL_HELP = "torchvision:NAME, timm:NAME, fxslim:NAME or path/to/file.py:factory"
_MODEL_ARG_HELP = (f"required: {_MODEL_HELP} (fxslim: {', '.join(sorted(FXSLIM_MODELS))}), before or after the "
                   "options")
_PASSES_HELP = ("passes to run first, as NAME[:key=value,...] with NAME haste, httm or prom (e.g. haste:L=14 "
                "httm:q=0.2,kv=0.3); the report then shows before and after")
_MODEL_SOURCES = ("torchvision:", "timm:", "fxslim:")


def _is_model_spec(text: str) -> bool:
    return text.startswith(_MODEL_SOURCES) or ".py:" in text


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line and exit code 2, as every other mistake (argparse printed its usage
    block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fxslim import __version__

    parser = _Parser(prog="fxslim", description="Graph passes that make vision models cheaper, and their cost.",
                     epilog="e.g. fxslim report torchvision:mobilenet_v2 --input 1x3x224x224 --passes haste:L=14")
    parser.add_argument("--version", action="version", version=f"fxslim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what each matcher finds in a model")
    p.add_argument("model", nargs="?", help=_MODEL_ARG_HELP)
    p.add_argument("--input", action="append", required=True, help="input shape such as 1x3x224x224 (repeat for more inputs)")
    p.add_argument("--ir", choices=("symbolic", "export", "dynamo"), default="symbolic",
                   help="graph to read: symbolic trace, torch.export or dynamo (default: symbolic)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument("--width", type=int, help="table width in characters (default: the terminal's)")

    r = sub.add_parser("report", help="cost of a model (MACs, energy, storage), or before/after passes")
    r.add_argument("model", nargs="?", help=_MODEL_ARG_HELP)
    r.add_argument("--input", action="append", required=True, help="input shape such as 1x3x224x224 (repeat for more inputs)")
    r.add_argument("--passes", nargs="+", action="extend", help=_PASSES_HELP)
    r.add_argument("--format", choices=("table", "json", "md", "csv", "html"), default="table",
                   help="output format (default: table)")
    r.add_argument("--out", help="write the report to this file instead of stdout")
    r.add_argument("--plot", help="also write a plot (PNG): breakdown by kind, or per-layer before/after energy")
    r.add_argument("--deploy", help="count the float model as deployed: fp16, int8, "
                                    "prom[:last_pointwise=int8,...] or kind=format,...")
    r.add_argument("--conventions", help="other conventions as key=value,... e.g. accumulator_bits=8,include_requant=true")
    r.add_argument("--table", default="horowitz45nm", help="energy table: horowitz45nm (bundled, the default) or a "
                                                            "JSON file")
    r.add_argument("--ir", choices=("symbolic", "export"), default="symbolic",
                   help="graph to cost: symbolic trace or torch.export (default: symbolic)")
    r.add_argument("--all-rows", action="store_true", help="list zero-cost nodes too")
    r.add_argument("--width", type=int, help="table width in characters (default: the terminal's)")

    d = sub.add_parser("demo", help="each pass on its reference model: quality, cost and latency before/after")
    d.add_argument("--out", default="fxslim-demo", help="folder for index.html, the plots and summary.json")
    d.add_argument("--quick", action="store_true", help="tiny sizes (for tests): fewer digits, frames, QAT steps")
    d.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a busy machine)")
    d.add_argument("--parts", nargs="+", default=["prom", "haste", "httm"], help="subset of: prom haste httm")
    d.add_argument("--results-md", help="also write the summary table as Markdown to this file")
    return parser


_PLOT_SUFFIXES = (".png", ".svg", ".pdf")  # what the figure is written as, from the name's suffix


def _check(args: argparse.Namespace) -> None:
    """Mistakes found before any work: the model argument (before or after options), input
    shapes, output folders."""
    if args.command not in ("inspect", "report"):
        return
    if args.model is None:  # `--passes haste:L=14 MODEL ...`: --passes took the model
        spec = next((p for p in args.passes or () if _is_model_spec(p)), None) if args.command == "report" else None
        if spec is None:
            raise ValueError(f"MODEL: missing; expected {_MODEL_HELP}")
        args.passes.remove(spec)
        args.model = spec
    for text in args.input:
        parse_input(text)
    if args.width is not None and args.width < 20:
        raise ValueError(f"--width: expected a table width of at least 20 characters, got {args.width}")
    for option in ("out", "plot"):
        path = getattr(args, option, None)
        if path and (Path(path).is_dir() or path.endswith(("/", os.sep))):
            raise ValueError(f"--{option}: {path!r} is a folder; give a file name in it")
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{option}: folder {str(Path(path).parent)!r} does not exist")
        if path:
            _check_writable(option, Path(path))
    plot = getattr(args, "plot", None)
    if plot and Path(plot).suffix.lower() not in _PLOT_SUFFIXES:
        raise ValueError(f"--plot: expected a file name ending in one of {', '.join(_PLOT_SUFFIXES)}, got {plot!r}")


def _check_writable(option: str, path: Path) -> None:
    """Raise (naming the option) where ``path`` cannot be written, before any work: a file that
    exists is opened to append nothing, a new one is created and removed."""
    try:
        if path.exists():
            with open(path, "a", encoding="utf-8"):
                pass
        else:
            with open(path, "x", encoding="utf-8"):
                pass
            path.unlink()
    except OSError as exc:
        raise ValueError(f"--{option}: cannot write {str(path)!r} ({exc.strerror or type(exc).__name__})") from None


def _one_line(exc: BaseException) -> str:
    """The error's first line, and the graph node it names (fx's "While executing %conv1 : ...")."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    node = next((line.split(":")[0].strip() for line in lines[1:] if line.startswith("While executing %")), None)
    if node is not None:
        text = f"{text} ({node.lower()})"
    return text if isinstance(exc, (ValueError, TypeError)) else f"{type(exc).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; any error ends as one line on stderr and exit code 2 (``--debug``: the
    traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader left (``| head``): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 1
    except Exception as exc:  # a command-line tool answers every mistake with one line
        if args.debug:
            raise
        print(f"fxslim {args.command}: error: {_one_line(exc)} (fxslim --debug {args.command} ... shows the "
              "traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
