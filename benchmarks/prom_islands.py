"""PROM on models with ops outside conv/linear/add/pool: integer ops, float islands, and their energy and storage.

    python -m benchmarks.prom_islands
    python -m benchmarks.prom_islands --models tv:googlenet timm:convnext_atto

Each zoo model (random weights, seed 0, BN statistics estimated on its input, as in the zoo sweep)
is prepared, calibrated on its example input and converted (``fxslim.convert``, reference runtime).
The cost model (``fxslim.estimate``, 45 nm table, default conventions) prices the converted model:
float islands and their dequantize/quantize borders at their float width (fp32), everything else
at its integer format. The fp16 baseline is the float model with ``deploy="fp16"``. Agreement is
the local code agreement with the fake-quant model, per quantizer (the worst one is shown).
Records in benchmarks/results/prom_islands.json, rendered to .md.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

import fxslim
from benchmarks import records
from benchmarks.records import Results, Section, Table
from benchmarks.zoo import by_name
from benchmarks.zoo_sweep import _bn_statistics_from
from fxslim.cost_model import CostReport
from fxslim.passes.prom_convert import code_agreement

__all__ = ["MODELS", "run", "main"]

MODELS = ("tv:mobilenet_v2", "tv:resnet18", "tv:googlenet", "tv:mobilenet_v3_small", "tv:efficientnet_b0",
          "tv:regnet_y_400mf", "timm:mobilenetv2_100", "timm:convnext_atto", "tv:vit_small_mha")
_FLOAT = ("fp32", "fp16", "bf16")


def _float_share(report: CostReport, field: str) -> float:
    total = sum(getattr(r, field) for r in report.rows)
    return sum(getattr(r, field) for r in report.rows if r.format in _FLOAT) / total if total else 0.0


def _row(name: str) -> list[Any]:
    zoo = by_name(name)
    torch.manual_seed(0)
    model, x = zoo.build().eval(), zoo.inputs()
    _bn_statistics_from(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxslim.calibrate(fxslim.prepare(model, x), [x])
        int_model = fxslim.convert(qat)
        fp16 = fxslim.estimate(model, x, deploy="fp16")
        ours = fxslim.estimate(int_model, x)
        fp16_all, ours_all = (r.with_conventions(include_elementwise=True) for r in (fp16, ours))
    report = fxslim.convert_report(int_model)
    _, share = code_agreement(qat, int_model, *x).worst()
    # reasons read "node (op): why"; the ops name the islands here, the convert report lists every op
    islands = ", ".join(sorted({r.split(" (", 1)[1].split(")", 1)[0] for i in report.islands for r in i.reasons
                                if " (" in r})) or "—"
    return [name, report.integer_ops, len(report.islands), report.float_ops, islands, ours.total.energy_uj,
            _float_share(ours, "energy_pj"), fp16.total.energy_pj / ours.total.energy_pj,
            _float_share(ours_all, "energy_pj"), fp16_all.total.energy_pj / ours_all.total.energy_pj,
            ours.total.storage_bytes / 1e6, _float_share(ours, "storage_bits"),
            fp16.total.storage_bytes / ours.total.storage_bytes, share]


def run(args: argparse.Namespace, command: str = "python -m benchmarks.prom_islands") -> Results:
    """One row per zoo model."""
    start = time.perf_counter()
    rows = [_row(name) for name in args.models]
    text = [
        f"Run time {time.perf_counter() - start:.0f} s. 'why (op)' names the ops whose chains had no integer form "
        "(`convert_report(int_model)` lists every island op); 'float' shares are of the converted model's energy and "
        "storage, priced at fp32 (energy: arithmetic of MACs only, the default convention, then with elementwise "
        "work, where island ops such as pools, norms and products of activations count, and the dequantize/quantize "
        "borders); ratios are the fp16 float model's over the converted model's; the last column is the worst "
        "quantizer's share of uint8 codes within 1 LSB of the fake-quant model's."]
    table = Table(["model", "integer ops", "float islands", "float ops", "why (op)", "energy (µJ)", "float share",
                   "vs fp16", "with elementwise: float share", "vs fp16", "storage (MB)", "float share", "vs fp16",
                   "worst quantizer within 1 LSB"], rows,
                  ["", "d", "d", "d", "", ".2f", ".1%", ".2f}×", ".1%", ".2f}×", ".3f", ".1%", ".2f}×", ".2%"])
    return Results("prom_islands", "PROM: float islands, energy and storage", command,
                   [Section(text=text, table=table)])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="zoo names")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_islands", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
