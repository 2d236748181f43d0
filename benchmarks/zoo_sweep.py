"""Robustness sweep: every zoo model through every capture IR, every matcher, the cost model and
each applicable pass, at its exact limit (outputs equal to the original) and at its default
(finite outputs, same shapes). Records a model × step table (ok / skipped: reason / failed: reason)
in benchmarks/results/zoo_sweep.json, rendered to .md (both written again after every model).

Models have random weights (seed 0) with BN statistics estimated on their input. Steps:
symbolic/export/dynamo capture; matchers (same counts in every IR); estimate (= FlopCounterMode);
haste_exact (L=48 dense planes: every call whose buckets are all singletons equals the dense conv,
and the output equals the original's when no call merged) and haste_default (finite, same shapes);
prom_prepare (calibrated fake-quant model finite, same shapes) and prom_convert (integer model
finite, same shapes, its integer ops and float islands counted, every quantizer's uint8 codes
within 1 LSB of the fake-quant model's); httm_exact (q=kv=1:
output equals the original's) and httm_default (finite, same shapes); haste_diff, prom_diff and
httm_diff (the exact-limit model against its reference on another batch, half and double the
spatial size and a NaN in one sample, tests/differential.py: "same", "refused" with the error
that names what differs, "n/a" where the original model does not take the input; a silent
difference fails). Every pass step also checks
that the caller's model was not modified. A step over ``STEP_SECONDS`` fails as a timeout.

    python -m benchmarks.zoo_sweep            # the whole zoo
    python -m benchmarks.zoo_sweep --subset   # the ~6 models make test runs
"""

from __future__ import annotations

import argparse
import copy
import signal
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import records
from benchmarks.command import command_line
from benchmarks.records import Results, Section, Table
from benchmarks.zoo import SUBSET, ZOO, ZooModel, by_name
from tests.differential import outputs

__all__ = ["Outcome", "ModelRun", "STEPS", "sweep_model", "to_results", "run", "main"]


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
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's state before any step
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


# ----------------------------------------------------------------------------------------------
# Passes: each at its exact limit (outputs equal the original model's within tolerance) and at its
# default (finite outputs, shapes unchanged). A pass that finds nothing to rewrite is a skip that
# names the reasons the pass reported.

HASTE_EXACT = "haste:L=48,sparsity=0"  # 48 dense planes: every bucket a singleton (docs/methods/HASTE.md)
HTTM_EXACT = "httm:q=1,kv=1,outliers=0"  # keeps every query and key: outputs equal SDPA's


def _optimized(run: ModelRun, spec: str) -> nn.Module:
    """``fxslim.optimize(model, inputs, [spec]).module``; a Skip naming the pass's reasons when it
    rewrote nothing; an AssertionError when it modified the caller's model."""
    import fxslim

    res = fxslim.optimize(run.model, run.inputs, passes=[spec])
    _assert_unchanged(run, spec)
    name = res.passes[0].name
    if res.report.rewritten(name) == 0:
        raise Skip(f"nothing to rewrite ({_reasons(res.report.skipped(name))})")
    return res.module


def _same_candidates_as(run: ModelRun, exact_step: str) -> None:
    """A pass's default finds the candidates its exact setting found (matching does not read the
    ratios): when the exact step had nothing to rewrite, skip with its reason instead of capturing again."""
    outcome = run.outcomes.get(exact_step)
    if outcome is not None and outcome.status == "skipped" and outcome.detail.startswith("nothing to rewrite"):
        raise Skip(outcome.detail)


def _reasons(skipped: Counter) -> str:
    if not skipped:
        return "no candidates"
    return ", ".join(f"{reason} ×{count}" for reason, count in skipped.most_common())


def _assert_unchanged(run: ModelRun, what: str) -> None:
    state = run.model.state_dict()
    if state.keys() != run.snapshot.keys() or any(not torch.equal(state[k], v) for k, v in run.snapshot.items()):
        raise AssertionError(f"{what}: the caller's model was modified")


class _HasteVersusDense(TorchDispatchMode):
    """Runs every ``fxslim::haste_conv2d`` call next to the dense conv on the same input and keeps,
    per call, (buckets merged, max error relative to the dense output's scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        from fxslim.runtime.haste import record_buckets

        kwargs = kwargs or {}
        if func is not torch.ops.fxslim.haste_conv2d.default:
            return func(*args, **kwargs)
        with record_buckets() as rec:
            out = func(*args, **kwargs)
        x, weight, bias, _, stride, padding, dilation = args[:7]
        dense = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
        merged = sum(st.channels * st.tiles - st.buckets for st in rec.values())
        scale = max(1.0, dense.abs().max().item()) if dense.numel() else 1.0
        error = (out - dense).abs().max().item() / scale if dense.numel() else 0.0
        self.calls.append((args[9] if len(args) > 9 else kwargs.get("layer", ""), merged, error))
        return out


@step("haste_exact")
def _haste_exact(run: ModelRun) -> str:
    """At L=48 dense planes every bucket is a singleton unless channel patches are (near) parallel,
    as sparse post-ReLU patches of tiny maps can be: every call whose buckets are all singletons
    must equal the dense conv, and the model's output must equal the original's when no call merged."""
    module = _optimized(run, HASTE_EXACT)
    run.state["haste_exact"] = module
    with torch.no_grad(), _HasteVersusDense() as check:
        out = module(*run.inputs)
    singleton = [(layer, err) for layer, merged, err in check.calls if merged == 0]
    wrong = [(layer, err) for layer, err in singleton if err > 1e-4]
    if wrong:
        raise AssertionError(f"all-singleton calls differ from the dense conv: {wrong[:3]}")
    collided = sorted({layer for layer, merged, _ in check.calls if merged})
    if not collided:
        _assert_close_scaled(out, run.reference, HASTE_EXACT)
        return f"{len(check.calls)} calls all-singleton, output = original"
    return (f"{len(singleton)}/{len(check.calls)} calls all-singleton = dense conv; "
            f"collisions in {len(collided)} layers ({collided[0]}, ...)")


@step("haste_default")
def _haste_default(run: ModelRun) -> str:
    from fxslim.runtime.haste import record_buckets

    _same_candidates_as(run, "haste_exact")
    module = _optimized(run, "haste")
    with torch.no_grad(), record_buckets() as rec:
        out = module(*run.inputs)
    _assert_finite_same_shape(out, run.reference, "haste")
    kept = sum(s.buckets for s in rec.values()) / max(1, sum(s.channels * s.tiles for s in rec.values()))
    return f"{len(rec)} convs, {kept:.0%} channels kept"


@step("prom_prepare")
def _prom_prepare(run: ModelRun) -> str:
    import fxslim
    from fxslim.runtime.prom_qat import ActFakeQuant

    qat = fxslim.prepare(run.model, run.inputs)
    _assert_unchanged(run, "prom prepare")
    report = next(m.meta["fxslim_report"] for m in qat.modules()
                  if isinstance(m, torch.fx.GraphModule) and "fxslim_report" in m.meta)
    if report.rewritten("prom") == 0:
        raise Skip(f"nothing to rewrite ({_reasons(report.skipped('prom'))})")
    fxslim.calibrate(qat, [run.inputs])
    with torch.no_grad():
        out = qat.eval()(*run.inputs)
    _assert_finite_same_shape(out, run.reference, "prom fake-quant model")
    run.state["prom"] = qat
    quantizers = sum(isinstance(m, ActFakeQuant) for m in qat.modules())
    return f"{report.rewritten('prom')} layers/adds, {quantizers} quantizers"


@step("prom_convert")
def _prom_convert(run: ModelRun) -> str:
    import fxslim
    from fxslim.passes.prom_convert import code_agreement

    qat = run.state.get("prom")
    if qat is None:
        raise Skip("no prepared model (prom_prepare did not succeed)")
    int_model = fxslim.convert(qat)
    run.state["prom_integer"] = int_model
    with torch.no_grad():
        out = int_model(*run.inputs)
    _assert_finite_same_shape(out, run.reference, "prom integer model")
    report = fxslim.convert_report(int_model)
    local = code_agreement(qat, int_model, *run.inputs, mode="local")
    worst, share = local.worst()
    if share < 0.999:  # the method's guarantee, per quantizer: codes within 1 LSB of the fake-quant model's
        raise AssertionError(f"only {share:.4%} of {worst}'s uint8 codes within 1 LSB of the fake-quant model")
    parts = f" in {len(report.parts)} parts" if report.parts else ""
    return (f"{report.integer_ops} integer ops{parts}, {len(report.islands)} float islands ({report.float_ops} float ops), "
            f"{local.within_one:.2%} codes within 1 LSB, worst quantizer {share:.2%}")


@step("httm_exact")
def _httm_exact(run: ModelRun) -> str:
    module = _optimized(run, HTTM_EXACT)
    run.state["httm_exact"] = module
    with torch.no_grad():
        out = module(*run.inputs)
    _assert_close_scaled(out, run.reference, HTTM_EXACT)
    return ""


@step("httm_default")
def _httm_default(run: ModelRun) -> str:
    _same_candidates_as(run, "httm_exact")
    module = _optimized(run, "httm")
    with torch.no_grad():
        out = module(*run.inputs)
    _assert_finite_same_shape(out, run.reference, "httm")
    return ""


# ----------------------------------------------------------------------------------------------
# Differential steps: each exact-limit model of the steps above against its reference on another
# batch, other spatial sizes and a NaN in one sample (tests/differential.py). A silent difference
# fails the step; clear refusals are named in the cell.


def _differential(run: ModelRun, source: str, key: str, reference: nn.Module, compare: Callable | None = None) -> str:
    """The model step ``source`` left in ``run.state[key]`` against ``reference``."""
    from tests.differential import differential, summary

    module = run.state.get(key)
    if module is None:
        outcome = run.outcomes.get(source)
        raise Skip(f"no model from {source}" + (f" ({outcome.cell()})" if outcome else " (step not run)"))
    verdicts = differential(module, reference, run.inputs, **({"compare": compare} if compare else {}))
    text = summary(verdicts)
    if any(v.status == "differs" for v in verdicts):
        raise AssertionError(text)
    return text


def _haste_per_call(got: object, want: object, module: nn.Module, reference: nn.Module, inputs: tuple) -> None:
    """HASTE at L=48: every all-singleton call equals the dense conv; the output equals the
    reference's when no call merged (as in haste_exact)."""
    with torch.no_grad(), _HasteVersusDense() as check:
        module(*inputs)
    wrong = [(layer, err) for layer, merged, err in check.calls if merged == 0 and err > 1e-4]
    if wrong:
        raise AssertionError(f"all-singleton calls differ from the dense conv: {wrong[:3]}")
    if not any(merged for _, merged, _ in check.calls):
        _assert_close_scaled(got, want, HASTE_EXACT)


def _prom_codes(got: object, want: object, int_model: nn.Module, qat: nn.Module, inputs: tuple) -> None:
    """PROM integer model: uint8 codes within 1 LSB of the fake-quant model's, layer by layer."""
    from fxslim.passes.prom_convert import code_agreement

    worst, share = code_agreement(qat, int_model, *inputs, mode="local").worst()
    if share < 0.999:
        raise AssertionError(f"only {share:.4%} of {worst}'s uint8 codes within 1 LSB of the fake-quant model")


@step("haste_diff")
def _haste_diff(run: ModelRun) -> str:
    return _differential(run, "haste_exact", "haste_exact", run.model, _haste_per_call)


@step("prom_diff")
def _prom_diff(run: ModelRun) -> str:
    return _differential(run, "prom_convert", "prom_integer", run.state.get("prom"), _prom_codes)


@step("httm_diff")
def _httm_diff(run: ModelRun) -> str:
    return _differential(run, "httm_exact", "httm_exact", run.model)


def _assert_close(out: object, ref: object, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    got, want = outputs(out), outputs(ref)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} outputs, expected {len(want)}")
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise AssertionError(f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        if not torch.allclose(g.float(), w.float(), rtol=rtol, atol=atol):
            err = (g.float() - w.float()).abs().max().item()
            raise AssertionError(f"{what}: max abs error {err:.3g}")


def _assert_close_scaled(out: object, ref: object, what: str, rel: float = 1e-4) -> None:
    """Equal within float rounding of a reordered sum: max error <= rel * max(1, max |reference|)."""
    got, want = outputs(out), outputs(ref)
    if [t.shape for t in got] != [t.shape for t in want]:
        raise AssertionError(f"{what}: output shapes changed")
    for g, w in zip(got, want):
        scale = max(1.0, w.float().abs().max().item()) if w.numel() else 1.0
        _assert_close(g, w, what, rtol=0.0, atol=rel * scale)


def _assert_finite_same_shape(out: object, ref: object, what: str) -> None:
    got, want = outputs(out), outputs(ref)
    if [t.shape for t in got] != [t.shape for t in want]:
        raise AssertionError(f"{what}: output shapes changed")
    if not all(torch.isfinite(t).all() for t in got):
        raise AssertionError(f"{what}: non-finite outputs")


STEP_SECONDS = 600  # a step running longer than this is recorded as failed (timeout)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout()


def _bn_statistics_from(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """BN running statistics estimated on ``inputs`` (one train-mode forward, cumulative average):
    with the default statistics of random weights BN is the identity, activations shrink layer by
    layer and quantization grids and hashes see only rounding noise."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train()(*inputs)
    model.eval()


def sweep_model(zoo: ZooModel, steps: list[str], *, step_seconds: int = STEP_SECONDS) -> ModelRun:
    """Build ``zoo`` (seed 0, BN statistics from its input) and run ``steps`` on it in order; a
    step that raises ``Skip`` is skipped with that reason, any other exception is a failure."""
    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = zoo.build().eval()
        inputs = zoo.inputs()
        _bn_statistics_from(model, inputs)
        with torch.no_grad():
            reference = model(*inputs)
    except Exception as exc:  # the model itself cannot be built or run: every step fails
        run = ModelRun(zoo, nn.Identity(), (), None)
        run.outcomes = {name: Outcome("failed", f"build: {type(exc).__name__}: {str(exc)[:120]}") for name in steps}
        return run
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    run = ModelRun(zoo, model, inputs, copy.deepcopy(reference), snapshot)
    timed = hasattr(signal, "SIGALRM") and step_seconds > 0 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _alarm) if timed else None
    try:
        for name in steps:
            run.outcomes[name] = _run_step(run, name, step_seconds if timed else 0)
    finally:
        if timed:
            signal.signal(signal.SIGALRM, previous)
    run.seconds = time.perf_counter() - start
    return run


def _run_step(run: ModelRun, name: str, seconds: int) -> Outcome:
    try:
        if seconds:
            signal.alarm(seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detail = STEPS[name](run)
        return Outcome("ok", detail)
    except Skip as reason:
        return Outcome("skipped", str(reason))
    except _Timeout:
        return Outcome("failed", f"timeout: longer than {seconds} s")
    except Exception as exc:  # a sweep records failures instead of stopping
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome("failed", f"{type(exc).__name__}: {str(exc)[:160]} ({Path(last.filename).name}:{last.lineno})")
    finally:
        if seconds:
            signal.alarm(0)


def to_results(runs: list[ModelRun], steps: list[str], command: str) -> Results:
    """The model × step table of ``runs``, and the count of each outcome."""
    rows = [[run.zoo.name, *(run.outcomes[s].cell().replace("|", "/") for s in steps), run.seconds] for run in runs]
    totals = Counter(o.status for r in runs for o in r.outcomes.values())
    return Results("zoo_sweep", "Zoo sweep", command, [Section(
        text=[__doc__.split("\n\n")[1]], table=Table(["model", *steps, "s"], rows, ["", *("" for _ in steps), ".0f"]),
        after=[f"{len(runs)} models × {len(steps)} steps: {totals['ok']} ok, {totals['skipped']} skipped, "
               f"{totals['failed']} failed."])])


def run(args: argparse.Namespace, command: str = "python -m benchmarks.zoo_sweep") -> Results:
    """Every step on every chosen model; the records are written after each model, so a partial table survives."""
    from rich.progress import Progress

    models = [by_name(n) for n in args.models] if args.models else [m for m in ZOO if not args.subset or m.name in SUBSET]
    steps = list(STEPS)
    runs = []
    with Progress() as bar:
        task = bar.add_task("zoo sweep", total=len(models))
        for zoo in models:
            bar.update(task, description=f"zoo sweep: {zoo.name}")
            runs.append(sweep_model(zoo, steps))
            records.write(to_results(runs, steps, command), directory=args.out)
            bar.advance(task)
    return to_results(runs, steps, command)


def main(argv: list[str] | None = None) -> int:
    parser = records.parser(__doc__)
    parser.add_argument("--subset", action="store_true", help="only the models make test sweeps")
    parser.add_argument("--models", nargs="*", help="zoo names to sweep")
    args = parser.parse_args(argv)
    results = run(args, command_line("benchmarks.zoo_sweep", argv))
    print(records.write(results, directory=args.out).read_text(encoding="utf-8"))
    failed = any(cell.startswith("failed") for row in results.sections[0].table.rows for cell in row[1:-1])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
