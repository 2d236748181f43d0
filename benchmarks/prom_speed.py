"""Wall-clock of the PROM-converted torchvision MobileNetV2 next to fp32 eager and fp32 torch.compile.

    python -m benchmarks.prom_speed [--batches 1 32] [--threads 1 2] [--rounds 7]

Variants, all on 224×224 ImageNet-normalised photos (the six scikit-image photos, repeated to the
batch size), under ``torch.no_grad``:

- fp32 eager: torchvision ``mobilenet_v2`` (random weights, BN statistics estimated on the photos);
- fp32 compiled: ``torch.compile(model)`` (inductor, default mode), compiled per batch size;
- PROM integer: ``fxslim.convert`` of the prepared model (observers calibrated on the photos),
  eager, i.e. one ``torch.ops.fxslim`` call per layer;
- PROM integer compiled: the same under ``torch.compile(backend="fxslim")`` (no passes, inductor).

Each round runs every variant once, in turn (interleaved); the table gives the median over rounds
and the speed-ups against fp32 eager and fp32 compiled, per thread count. The machine is shared, so
only these side-by-side ratios mean anything. Records in benchmarks/results/prom_speed.json, rendered
to .md.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import records
from benchmarks.prom_common import converted_mobilenet_v2, photo_batch, random_mobilenet_v2
from benchmarks.records import Results, Section, Table
from fxslim.app.timing import interleaved_medians

__all__ = ["run", "main"]

TARGET = 1.5  # PROM integer vs fp32 eager at batch 32


def run(args: argparse.Namespace, command: str = "python -m benchmarks.prom_speed") -> Results:
    """The four variants side by side, per batch size and thread count."""
    images = photo_batch()
    model = random_mobilenet_v2(images)
    _, int_model = converted_mobilenet_v2(model, images)
    names = ["fp32 eager", "fp32 compiled", "PROM integer", "PROM integer compiled"]
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            x = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch].contiguous()
            torch._dynamo.reset()
            compiled = torch.compile(model)
            int_compiled = torch.compile(int_model, backend="fxslim")
            fns = dict(zip(names, (lambda: model(x), lambda: compiled(x), lambda: int_model(x),
                                   lambda: int_compiled(x)), strict=True))
            for threads in args.threads:
                torch.set_num_threads(threads)
                med = interleaved_medians(fns, args.rounds)
                eager, comp = med["fp32 eager"], med["fp32 compiled"]
                rows.append([threads, batch, *(1e3 * med[k] for k in names), eager / med["PROM integer"],
                             comp / med["PROM integer"], eager / med["PROM integer compiled"]])
    text = [
        f"Medians over {args.rounds} interleaved rounds, milliseconds per batch. fp32 compiled: `torch.compile(model)` "
        "(inductor). PROM integer: `fxslim.convert` output (34 ternary 1×1 convs, 18 int8 convs, 1 int8 linear, "
        "integer adds and pool), eager and under `torch.compile(backend=\"fxslim\")`. Target: PROM integer ≥ "
        f"{TARGET}× faster than fp32 eager at batch 32."]
    table = Table(["threads", "batch", *names, "PROM vs fp32 eager", "PROM vs fp32 compiled",
                   "PROM compiled vs fp32 eager"], rows,
                  ["d", "d", ".1f", ".1f", ".1f", ".1f", ".2f}×", ".2f}×", ".2f}×"])
    return Results("prom_speed", "PROM integer MobileNetV2 vs fp32 (eager and torch.compile), 224×224", command,
                   [Section(text=text, table=table)])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_speed", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
