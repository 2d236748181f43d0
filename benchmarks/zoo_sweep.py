"""Robustness sweep: every zoo model through every capture IR, every matcher, the cost model and
each applicable pass, at its exact limit (outputs equal to the original) and at its default
(finite outputs, same shapes). Writes a model × step table (ok / skipped: reason / failed: reason)
to benchmarks/results/zoo_sweep.md.

    python -m benchmarks.zoo_sweep            # the whole zoo
    python -m benchmarks.zoo_sweep --subset   # the ~6 models make test runs
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks.zoo import SUBSET, ZOO, ZooModel, by_name

__all__ = ["Outcome", "ModelRun", "STEPS", "sweep_model", "to_markdown", "main"]

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "skipped" | "failed"
    detail: str = ""

    def cell(self) -> str:
        if self.status == "ok":
            return "ok" + (f" ({self.detail})" if self.detail else "")
        return f"{self.status}: {self.detail}"


class Skip(Exception):
    """A step does not apply to this model; the message is the reason."""


@dataclass
class ModelRun:
    zoo: ZooModel
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    reference: object
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    state: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


Step = Callable[[ModelRun], str]
STEPS: dict[str, Step] = {}


def step(name: str) -> Callable[[Step], Step]:
    def deco(fn: Step) -> Step:
        STEPS[name] = fn
        return fn

    return deco


def _counts(graphs: list, batch: object) -> tuple[int, int, int, int]:
    from fxslim.passes.matchers import match_all

    kinds = Counter(m.kind for g in graphs for m in match_all(g.gm, batch))
    convs = sum(v for k, v in kinds.items() if k.endswith("conv"))
    return convs, kinds["pointwise_conv"], kinds["global_attention"], kinds["local_attention"]


@step("symbolic")
def _symbolic(run: ModelRun) -> str:
    from fxslim.capture import capture

    cap = capture(run.model, run.inputs)
    run.state["symbolic"] = cap
    with torch.no_grad():
        out = cap.module(*run.inputs)
    _assert_close(out, run.reference, "symbolic capture output")
    return "whole" if cap.whole else f"{len(cap.graphs)} parts"


@step("export")
def _export(run: ModelRun) -> str:
    from fxslim.capture import capture

    run.state["export"] = capture(run.model, run.inputs, method="export")
    return ""


@step("dynamo")
def _dynamo(run: ModelRun) -> str:
    from fxslim.capture import capture_dynamo

    graphs = capture_dynamo(run.model, run.inputs)
    run.state["dynamo"] = graphs
    return f"{len(graphs)} graph{'s' if len(graphs) != 1 else ''}"


@step("matchers")
def _matchers(run: ModelRun) -> str:
    batch = run.inputs[0].shape[0]
    found = {}
    if "symbolic" in run.state and run.state["symbolic"].whole:
        found["symbolic"] = _counts(run.state["symbolic"].graphs, batch)
    if "export" in run.state:
        found["export"] = _counts(run.state["export"].graphs, batch)
    if "dynamo" in run.state:
        found["dynamo"] = _counts(run.state["dynamo"], batch)
    if not found:
        raise Skip("no IR captured")
    if len(set(found.values())) != 1:
        raise AssertionError(f"counts differ across IRs: {found}")
    convs, pointwise, global_attn, local_attn = next(iter(found.values()))
    return f"{convs} conv/{pointwise} pw/{global_attn}+{local_attn} global+local attn, {len(found)} IRs"


def _meta_flops(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """FlopCounterMode's count on a meta copy (CPU SDPA counts 0 on real tensors); None if the
    model cannot run on meta tensors (data-dependent Python)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = copy.deepcopy(model).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta(*[x.to("meta") for x in inputs])
    except Exception:  # a model that needs real values cannot be cross-checked this way
        return None
    return counter.get_total_flops()


@step("estimate")
def _estimate(run: ModelRun) -> str:
    import fxslim

    report = fxslim.estimate(run.model, run.inputs)
    if report.unknown_ops:
        raise AssertionError(f"ops without a cost formula: {sorted(report.unknown_ops)}")
    expected = _meta_flops(run.model, run.inputs)
    if expected is None:
        return f"{report.total.macs / 1e6:.1f} MMACs (no meta cross-check)"
    if report.total.flops != expected:
        raise AssertionError(f"FLOPs {report.total.flops} != FlopCounterMode {expected}")
    return f"{report.total.macs / 1e6:.1f} MMACs = FlopCounterMode"


def _flatten(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


def _assert_close(out: object, ref: object, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    got, want = _flatten(out), _flatten(ref)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} outputs, expected {len(want)}")
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise AssertionError(f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        if not torch.allclose(g.float(), w.float(), rtol=rtol, atol=atol):
            err = (g.float() - w.float()).abs().max().item()
            raise AssertionError(f"{what}: max abs error {err:.3g}")


def _assert_finite_same_shape(out: object, ref: object, what: str) -> None:
    got, want = _flatten(out), _flatten(ref)
    if [t.shape for t in got] != [t.shape for t in want]:
        raise AssertionError(f"{what}: output shapes changed")
    if not all(torch.isfinite(t).all() for t in got):
        raise AssertionError(f"{what}: non-finite outputs")


def sweep_model(zoo: ZooModel, steps: list[str]) -> ModelRun:
    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = zoo.build().eval()
        inputs = zoo.inputs()
        with torch.no_grad():
            reference = model(*inputs)
    except Exception as exc:  # the model itself cannot be built or run: every step fails
        run = ModelRun(zoo, nn.Identity(), (), None)
        run.outcomes = {name: Outcome("failed", f"build: {type(exc).__name__}: {str(exc)[:120]}") for name in steps}
        return run
    run = ModelRun(zoo, model, inputs, copy.deepcopy(reference))
    for name in steps:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                detail = STEPS[name](run)
            run.outcomes[name] = Outcome("ok", detail)
        except Skip as reason:
            run.outcomes[name] = Outcome("skipped", str(reason))
        except Exception as exc:  # a sweep records failures instead of stopping
            last = traceback.extract_tb(exc.__traceback__)[-1]
            run.outcomes[name] = Outcome("failed", f"{type(exc).__name__}: {str(exc)[:160]} ({Path(last.filename).name}:{last.lineno})")
    run.seconds = time.perf_counter() - start
    return run


def to_markdown(runs: list[ModelRun], steps: list[str]) -> str:
    lines = ["| model | " + " | ".join(steps) + " | s |", "|---" * (len(steps) + 2) + "|"]
    for run in runs:
        cells = [run.outcomes[s].cell().replace("|", "/") for s in steps]
        lines.append(f"| {run.zoo.name} | " + " | ".join(cells) + f" | {run.seconds:.0f} |")
    totals = Counter(o.status for r in runs for o in r.outcomes.values())
    lines.append("")
    lines.append(f"{len(runs)} models × {len(steps)} steps: {totals['ok']} ok, {totals['skipped']} skipped, {totals['failed']} failed.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from rich.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help="only the models make test sweeps")
    parser.add_argument("--models", nargs="*", help="zoo names to sweep")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo_sweep.md")
    args = parser.parse_args(argv)
    models = [by_name(n) for n in args.models] if args.models else [m for m in ZOO if not args.subset or m.name in SUBSET]
    steps = list(STEPS)
    runs = []
    with Progress() as bar:
        task = bar.add_task("zoo sweep", total=len(models))
        for zoo in models:
            bar.update(task, description=f"zoo sweep: {zoo.name}")
            runs.append(sweep_model(zoo, steps))
            bar.advance(task)
    table = to_markdown(runs, steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Zoo sweep\n\nRegenerate with `python -m benchmarks.zoo_sweep`.\n\n" + table)
    print(table)
    return 0 if all(o.status != "failed" for r in runs for o in r.outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
