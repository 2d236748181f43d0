"""How long ``fxslim.estimate`` takes on torchvision ResNet-50 at 1×3×224×224, capture included.

Side by side, in the same run and interleaved: FlopCounterMode on a meta copy of the model (counts
FLOPs only) and one eager forward pass on the CPU. Records the medians over the repeats in
``benchmarks/results/estimate_speed.json`` and renders ``estimate_speed.md`` from them.

    python -m benchmarks.estimate_speed [--repeats 7]
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxslim
from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.app.timing import interleaved_medians

__all__ = ["run", "main"]

LIMIT_S = 2.0  # the requirement: an estimate of ResNet-50, capture included, under 2 s


def _flop_counter_meta(model: torch.nn.Module, x: torch.Tensor) -> int:
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x.to("meta"))
    return counter.get_total_flops()


def _forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def run(repeats: int = 7, command: str = "python -m benchmarks.estimate_speed") -> Results:
    """Time the three side by side and record the medians."""
    torch.manual_seed(0)
    model, x = torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)
    report = fxslim.estimate(model, x)
    flops = _flop_counter_meta(model, x)
    medians = interleaved_medians({
        "fxslim.estimate": lambda: fxslim.estimate(model, x),
        "FlopCounterMode (meta copy)": lambda: _flop_counter_meta(model, x),
        "eager forward (CPU)": lambda: _forward(model, x),
    }, repeats)
    est = medians["fxslim.estimate"]
    table = Table(["what", "median (s)", "time / estimate"], [[name, m, m / est] for name, m in medians.items()],
                  ["", ".3f", ".2f"])
    return Results("estimate_speed", "fxslim.estimate speed", command, [Section(
        text=[f"torchvision resnet50, input 1×3×224×224, median of {repeats} interleaved repeats (one warm-up "
              "call each)."],
        table=table,
        after=[f"estimate: {report.total.macs:,} MACs (FLOPs {report.total.flops:,}; FlopCounterMode {flops:,}), "
               f"{report.total.params:,} parameters, {len(report.rows)} rows.",
               f"Requirement: under {LIMIT_S:g} s including capture: {'met' if est < LIMIT_S else 'NOT met'} "
               f"({est:.3f} s)."])])


def main(argv: list[str] | None = None) -> int:
    parser = records.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    return records.run_and_write("benchmarks.estimate_speed", parser, lambda args, command: run(args.repeats, command),
                                 argv)


if __name__ == "__main__":
    raise SystemExit(main())
