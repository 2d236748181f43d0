"""PROM energy and storage of torchvision MobileNetV2 (224×224) against fp16, beside the paper's numbers.

    python -m benchmarks.prom_energy_storage

The paper (MobileNetV2 on ImageNet, vs float16) reports 23.9× less energy and 2.7× less storage;
its accounting conventions are unknown (docs/methods/PROM.md), so every named convention is
printed. Each number comes two ways from the cost model (``fxslim.estimate``, 45 nm table):

- via the converted model: the integer GraphModule of ``fxslim.convert`` (its ops declare their
  formats: ternary convs are additions only, int8 layers int8 MACs);
- as deployed: the float model with ``Conventions.deploy="prom..."`` (formats assigned per layer).

The fp16 baseline is the float model with ``deploy="fp16"`` (1 fp16 mul + 1 fp16 add per MAC,
all parameters 16 bit). Also: the real size of the saved converted state dict next to the fp16 and
fp32 ones. Records in benchmarks/results/prom_energy_storage.json, rendered to .md, and the
plot as .png.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import fxslim
from benchmarks import records
from benchmarks.prom_common import converted_mobilenet_v2, photo_batch, random_mobilenet_v2
from benchmarks.records import Results, Section, Table
from fxslim.cost_model import CostReport
from fxslim.passes.prom import PROM

__all__ = ["run", "main"]

PAPER_ENERGY, PAPER_STORAGE = 23.9, 2.7

# (name, conventions, last 1×1 format, classifier format)
ENERGY = [
    ("A: every add 8 bit", dict(accumulator_bits=8), "ternary", "int8"),
    ("every add 16 bit", dict(accumulator_bits=16), "ternary", "int8"),
    ("E: every add 32 bit", dict(accumulator_bits=32), "ternary", "int8"),
    ("B: ternary adds 8 bit, int8 MACs into 32 bit", dict(accumulator_bits=32, ternary_accumulator_bits=8), "ternary", "int8"),
    ("C: as A, last 1×1 at 8 bit", dict(accumulator_bits=8), "int8", "int8"),
    ("as 16 bit, last 1×1 at 8 bit", dict(accumulator_bits=16), "int8", "int8"),
    ("as E, last 1×1 at 8 bit", dict(accumulator_bits=32), "int8", "int8"),
    ("D: as B, last 1×1 at 8 bit", dict(accumulator_bits=32, ternary_accumulator_bits=8), "int8", "int8"),
    ("A, classifier fp16", dict(accumulator_bits=8), "ternary", "fp16"),
    ("A + requantization (int32 mul per output)", dict(accumulator_bits=8, include_requant=True), "ternary", "int8"),
    ("A + requantization (fp16 mul per output)", dict(accumulator_bits=8, include_requant=True, requant_format="fp16"),
     "ternary", "int8"),
]
PACKINGS = [("2bit", "2 bit (4 per byte)"), ("base3", "1.6 bit (5 per byte)"), ("int8", "int8 containers")]


def _deploy(last: str, classifier: str) -> str:
    options = [f"last_pointwise={last}"] if last != "ternary" else []
    options += [f"classifier={classifier}"] if classifier != "int8" else []
    return "prom" + (":" + ",".join(options) if options else "")


def _saved_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def _ratio(base: float, value: float | None) -> float | None:
    return None if value is None else base / value


def _energy_rows(fp16: CostReport, converted: dict[str, CostReport]) -> tuple[Table, list[tuple[str, float]]]:
    base = fp16.total.energy_pj
    rows, bars = [], []
    for name, options, last, classifier in ENERGY:
        deployed = fp16.with_conventions(deploy=_deploy(last, classifier), **options).total.energy_pj
        ours = converted[last].with_conventions(**options).total.energy_pj if classifier == "int8" else None
        rows.append([name, None if ours is None else ours / 1e6, _ratio(base, ours), deployed / 1e6,
                     _ratio(base, deployed), PAPER_ENERGY])
        label = name.split(":")[0] if ":" in name else name
        bars.append((label if ours is not None else f"{label} (as deployed)", base / (ours if ours is not None else deployed)))
    return Table(["convention", "via converted model (µJ)", "ratio", "as deployed (µJ)", "ratio", "paper"], rows,
                 ["", ".2f", ".2f}×", ".2f", ".2f}×", "}×"]), bars


def _storage_rows(fp16: CostReport, converted: dict[str, CostReport]) -> tuple[Table, list[tuple[str, float]]]:
    base = fp16.total.storage_bytes
    rows, bars = [], []
    for packing, label in PACKINGS:
        for last in ("ternary", "int8"):
            for classifier in ("int8", "fp16"):
                deploy = _deploy(last, classifier)
                scaled = fp16.with_conventions(deploy=deploy, ternary_packing=packing).total.storage_bytes
                bare = fp16.with_conventions(deploy=deploy, ternary_packing=packing, metadata_bits=0).total.storage_bytes
                ours = (converted[last].with_conventions(ternary_packing=packing).total.storage_bytes
                        if classifier == "int8" else None)
                rows.append([label, last, classifier, None if ours is None else ours / 1e6, _ratio(base, ours),
                             scaled / 1e6, _ratio(base, scaled), bare / 1e6, _ratio(base, bare), PAPER_STORAGE])
                bars.append((f"{packing}/{last}/{classifier}" + ("" if ours is not None else " (as deployed)"),
                             base / (ours if ours is not None else scaled)))
    return Table(["ternary packing", "last 1×1", "classifier", "via converted model (MB)", "ratio",
                  "as deployed, 16-bit scales (MB)", "ratio", "as deployed, no scales (MB)", "ratio", "paper"], rows,
                 ["", "", "", ".3f", ".2f}×", ".3f", ".2f}×", ".3f", ".2f}×", "}×"], [False] * 3 + [True] * 7), bars


def _plot(energy: list[tuple[str, float]], storage: list[tuple[str, float]]) -> Figure:
    fig = Figure(figsize=(13, 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, bars, paper, title in ((axes[0], energy, PAPER_ENERGY, "energy vs fp16"),
                                   (axes[1], storage, PAPER_STORAGE, "storage vs fp16")):
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
        ax.axvline(paper, color="tab:red", linestyle="--", label=f"paper {paper}×")
        ax.set_title(f"PROM MobileNetV2: {title} (converted model)")
        ax.set_xlabel("reduction (×)" + ("; bars: packing/last 1×1/classifier" if bars is storage else ""))
        ax.invert_yaxis()
        ax.legend()
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace,
        command: str = "python -m benchmarks.prom_energy_storage") -> tuple[Results, dict[str, Any]]:
    """Energy and storage under every convention, the real file sizes, and the bar plot."""
    images = photo_batch()
    model = random_mobilenet_v2(images)
    x = images[:1]
    fp16 = fxslim.estimate(model, x, deploy="fp16")
    int_models = {last: converted_mobilenet_v2(model, images, PROM(last_pointwise=last))[1] for last in ("ternary", "int8")}
    converted = {last: fxslim.estimate(m, x) for last, m in int_models.items()}
    energy, energy_bars = _energy_rows(fp16, converted)
    storage, storage_bars = _storage_rows(fp16, converted)

    fp32_state = model.state_dict()
    fp16_state = {k: v.half() if v.is_floating_point() else v for k, v in fp32_state.items()}
    real = {"converted (last 1×1 ternary)": int_models["ternary"].state_dict(),
            "converted (last 1×1 int8)": int_models["int8"].state_dict(), "float16": fp16_state, "float32": fp32_state}
    sizes = {name: _saved_bytes(state) for name, state in real.items()}
    files = Table(["saved state dict (torch.save)", "bytes", "vs float16"],
                  [[name, size, sizes["float16"] / size] for name, size in sizes.items()], ["", ",d", ".2f}×"])
    intro = Section(text=[
        "Random weights (BN statistics estimated on the scikit-image photos); counts do not depend on the weights "
        f"except the real file sizes. Cost model: `fxslim.estimate`, energy table {fp16.energy_table.name}. fp16 "
        f"baseline {fp16.total.energy_pj / 1e6:.2f} µJ, {fp16.total.storage_bytes / 1e6:.3f} MB "
        f"({fp16.total.macs:,} MACs, {fp16.total.params:,} parameters).",
        "",
        "'via converted model' costs the integer GraphModule of `fxslim.convert` (ternary convs are additions only "
        "at the ternary accumulator width; int8 layers an int8 multiply and an add at the int8 accumulator width; "
        "it stores its weight codes and, per output channel, an int32 bias, multiplier and rounding offset). "
        "'as deployed' costs the float model under `deploy=\"prom...\"` (weights at their format, one 16-bit scale "
        "per output channel or none, BN and biases at 16 bit). The converted classifier is int8, so fp16-classifier "
        "rows exist only as deployed."])
    row_a = converted["ternary"].with_conventions(accumulator_bits=8).conventions.describe()
    results = Results("prom_energy_storage", "PROM energy and storage, torchvision MobileNetV2 at 224×224 (per image)",
                      command, [intro, Section("Energy (arithmetic only)", table=energy,
                                               after=[f"Conventions of row A: {row_a}."]),
                                Section("Storage", table=storage), Section("Real file sizes", table=files)])
    return results, {"": _plot(energy_bars, storage_bars)}


def _parser() -> argparse.ArgumentParser:
    return records.parser(__doc__)


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_energy_storage", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
