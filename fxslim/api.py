"""``fxslim.optimize``: capture a model, run passes on every graph, report what happened.

``fxslim.prepare`` (PROM's QAT model) is ``optimize`` with one PROM config; it lives here, not in
the pass, because a pass never calls back into the API layer.

The input may be an ``nn.Module`` (captured by symbolic trace, or ``capture="export"``), a
``torch.fx.GraphModule`` (symbolic or dynamo) or a ``torch.export.ExportedProgram``. The caller's
object is never modified: capture works on a copy, and ``OptimizeResult.module`` is that copy
with its graphs rewritten.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves

from fxslim.capture import Captured, as_example, capture as capture_graphs, compiled_original
from fxslim.cost_model import compare, estimate, state_dict_bytes
from fxslim.ir import META_FROZEN_MODE, META_REPORT
from fxslim.modes import outside_inference_mode
from fxslim.passes.base import (
    Pass, PassContext, PassReport, parse_overrides, parse_pass, pass_list, registered_passes, run_passes,
)
from fxslim.passes.prom import PROM, calibrate
from fxslim.passes.prom_convert import convert
from fxslim.policy import Policy
from fxslim.runtime.prom_qat import ActFakeQuant, QConv2d, QLinear
from fxslim.warn import warn_user

__all__ = ["OptimizeReport", "OptimizeResult", "optimize", "parse_passes", "prepare"]

_log = logging.getLogger(__name__)


@dataclass
class OptimizeReport:
    """Per pass and graph: what was rewritten and what was skipped (with reasons); plus which
    modules could not be traced and stayed eager."""

    passes: list[PassReport] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    graphs: list[str] = field(default_factory=list)
    capture: str = "symbolic"

    def rewritten(self, pass_name: str | None = None) -> int:
        return sum(r.rewritten for r in self.passes if pass_name in (None, r.pass_name))

    def skipped(self, pass_name: str | None = None) -> Counter:
        total: Counter = Counter()
        for r in self.passes:
            if pass_name in (None, r.pass_name):
                total.update(r.skipped)
        return total

    def entries(self, pass_name: str | None = None) -> list:
        return [e for r in self.passes if pass_name in (None, r.pass_name) for e in r.entries]

    def candidates(self) -> list[dict[str, str]]:
        """Every candidate as plain data (pass, module, kind, status, reason, detail), for reports."""
        return [{"pass": r.pass_name, "module": e.fqn or e.node, "kind": e.kind, "status": e.status,
                 "reason": e.reason, "detail": e.detail} for r in self.passes for e in r.entries]


@dataclass
class OptimizeResult:
    """``module``: the rewritten copy; ``report``: what each pass did; ``captured``: the graphs;
    ``cost_before``/``cost_after``: cost reports (computed on first use, default conventions) of the
    model and of what the passes deliver (``deployed``: PROM's integer model)."""

    module: nn.Module
    report: OptimizeReport
    captured: Captured
    passes: tuple[Pass, ...]
    example_inputs: tuple | None = None
    source: Any = field(default=None, repr=False)  # the caller's model (never modified)

    @functools.cached_property
    def cost_before(self) -> Any:
        return self._estimate("before")

    @functools.cached_property
    def cost_after(self) -> Any:
        return self._estimate("after")

    def compare(self, **estimate_options: Any) -> Any:
        """Before/after ``Comparison`` per module; options go to ``fxslim.estimate`` (e.g. ``deploy="fp16"``)."""
        candidates = self.report.candidates()
        if not estimate_options:
            return compare(self.cost_before, self.cost_after, candidates, self.saved_bytes)
        return compare(self._estimate("before", **estimate_options), self._estimate("after", **estimate_options),
                       candidates, self.saved_bytes)

    @functools.cached_property
    def saved_bytes(self) -> tuple[int, int] | None:
        """(bytes ``torch.save`` writes for the state dict of the caller's model, of ``deployed``'s):
        the real size beside the storage the cost model counts; None without the caller's model."""
        after = self.deployed.module if isinstance(self.deployed, Captured) else self.deployed
        sizes = [_saved_size(m) for m in (self.source, after)]
        return None if None in sizes else (sizes[0], sizes[1])

    @functools.cached_property
    def deployed(self) -> Any:
        """What the passes exist for, as ``cost_after`` costs it: after PROM, the integer model
        converted from a copy of ``module`` calibrated on the example (counts do not depend on the
        ranges; the fake-quant graph would be costed as float work plus its fake quantizers);
        otherwise, or where convert refuses the model (with a warning), the rewritten graphs."""
        if not any(p.name == "prom" for p in self.passes) or self.report.rewritten("prom") == 0:
            return self.captured
        try:
            return convert(calibrate(copy.deepcopy(self.module), [self.example_inputs]).eval())
        except (ValueError, TypeError) as exc:
            warn_user(f"OptimizeResult: costing the fake-quant model; the integer one is not possible: "
                      f"{str(exc).splitlines()[0]}")
            return self.captured

    def _estimate(self, which: str, **options: Any) -> Any:
        if which == "after":  # fxslim ops counted through the cost registry
            return estimate(self.deployed, self.example_inputs, **options)
        if self.source is None:
            raise ValueError("OptimizeResult: the original model is not available (source=None)")
        method = "export" if self.report.capture == "export" else "symbolic"
        return estimate(self.source, self.example_inputs, capture=method, **options)


def _saved_size(model: Any) -> int | None:
    """``state_dict_bytes`` of a module or an exported program; None for anything else, and for a
    model on the meta device (its file would hold no data)."""
    state = model.state_dict if isinstance(model, torch.export.ExportedProgram) else (
        model.state_dict() if isinstance(model, nn.Module) else None)
    if state is None or any(isinstance(t, torch.Tensor) and t.is_meta for t in state.values()):
        return None
    return state_dict_bytes(state)


def parse_passes(passes: Sequence[Pass | str] | Pass | str) -> tuple[Pass, ...]:
    """Pass objects from objects or strings ("haste:L=14"); raises ValueError for unknown names."""
    parsed = tuple(parse_pass(p) for p in pass_list(passes))
    if not parsed:
        raise ValueError(f"passes: expected at least one pass, e.g. one of {sorted(registered_passes())}")
    return parsed


@outside_inference_mode
def optimize(
    model: nn.Module | fx.GraphModule | torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    passes: Sequence[Pass | str] | Pass | str = (),
    *,
    capture: str = "symbolic",
    filter_fn: Callable[[fx.Node, str], bool] | None = None,
    overrides: Mapping[str, Any] | None = None,
    leaf_modules: Sequence[type] = (),
    strict: bool = False,
) -> OptimizeResult:
    """Rewrite ``model`` with ``passes``; returns the rewritten copy and a report.

    ``filter_fn(node, fqn)`` and ``overrides`` ({module name or glob or "kind:<kind>": config or
    None}) choose which nodes each pass touches (see ``fxslim.policy``). A pass that rewrites
    nothing warns (``strict=True``: raises ValueError) with the skip reasons it recorded.
    """
    parsed = parse_passes(passes)
    model = compiled_original(model, returns="fxslim.optimize")
    example_inputs = as_example(example_inputs, model)
    if not isinstance(strict, bool):
        raise ValueError(f"strict: expected True or False, got {strict!r}")
    policy = Policy(filter_fn=filter_fn, overrides=parse_overrides(overrides or {}))
    captured = capture_graphs(model, example_inputs, method=capture, leaf_modules=leaf_modules)
    report = OptimizeReport(untraced=list(captured.untraced), capture=captured.method,
                            graphs=[g.path for g in captured.graphs])
    _warn_frozen_modes(captured.graphs, trains=any(p.name == "prom" for p in parsed))
    for graph in captured.graphs:
        ctx = PassContext(ir=graph.ir, batch_size=captured.batch_size, input_shapes=_tensor_shapes(example_inputs),
                          input_views=_list_views(example_inputs),
                          placeholder_values=graph.placeholder_values, policy=policy, path=graph.path)
        for result in run_passes(graph.gm, parsed, ctx):
            report.passes.append(result.report)
    _containers_follow_parents(captured.module)
    if policy.unmatched():
        warn_user(f"fxslim.optimize: overrides {policy.unmatched()} named no module or kind a pass considered "
                  f"(module names as in model.named_modules(), globs like 'layer4.*', or 'kind:<kind>')")
    alone = sorted({e.fqn for r in report.passes for e in r.entries if e.reason == "traced_alone"})
    if alone:
        warn_user(f"fxslim.optimize: {', '.join(map(repr, alone))} stay float: each was traced alone, as a layer "
                  "PROM cannot wrap" + _untraced_hint(model, report.untraced, captured.method))
    for p in parsed:
        if report.rewritten(p.name) == 0:
            reasons = dict(report.skipped(p.name)) or "no candidates"
            message = (f"fxslim.optimize: pass {p.name!r} rewrote nothing in {type(model).__name__} (skipped: {reasons})"
                       + _untraced_hint(model, report.untraced, captured.method))
            if strict:
                raise ValueError(message)
            warn_user(message)
    return OptimizeResult(captured.module, report, captured, parsed,
                          tuple(example_inputs) if example_inputs is not None else None, source=model)


def _tensor_shapes(example_inputs: Sequence[Any] | None) -> tuple[tuple[int, ...], ...]:
    """The shapes of the example's tensor inputs, also those in a dict, list or tuple (what HTTM reads
    a [B, S, C, H, W] frame dim from, what HASTE tells the image by)."""
    return tuple(tuple(x.shape) for x in tree_leaves(tuple(example_inputs or ())) if isinstance(x, torch.Tensor))


def _list_views(example_inputs: Sequence[Any] | None) -> int:
    """The length of the longest list or tuple input whose items are alike (tensors of one shape, or
    containers of the same structure and shapes): the views of a model fed per-view images as
    DUSt3R and Fast3R take them, e.g. ``[{"img": [B, 3, H, W]}, ...]``; 0 without one."""
    def signature(item: Any) -> Any:
        leaves, spec = tree_flatten(item)
        return spec, tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else type(x) for x in leaves)

    views = 0
    for value in example_inputs or ():
        if isinstance(value, (list, tuple)) and len(value) > 1 and len({signature(v) for v in value}) == 1:
            if any(isinstance(x, torch.Tensor) for x in tree_leaves(value[0])):
                views = max(views, len(value))
    return views


def _containers_follow_parents(root: nn.Module) -> None:
    """Give the empty containers fx and the passes make for dotted paths (``layer1`` holding
    ``layer1.0.conv1``, ``prom_quant``) their parent's train/eval flag: made in train mode, they
    left a model optimized in eval mode with modules in train mode, which ``model.training`` checks
    and ``.modules()`` walks see."""
    for parent in root.modules():
        for child in parent.children():
            if type(child) is nn.Module:
                child.training = parent.training


def _warn_frozen_modes(graphs: list, trains: bool) -> None:
    """Warn for each traced graph whose forward branches on self.training in a way the graph cannot
    follow (``capture.trace``): it stays in the mode traced. That matters when the model will train
    (PROM's QAT) or when it was traced in train mode; an inference rewrite of an eval model is fine."""
    for graph in graphs:
        mode = graph.gm.meta.get(META_FROZEN_MODE)
        if mode is not None and (trains or mode == "train"):
            warn_user(
                f"{type(graph.gm).__name__}: its forward branches on self.training, so the traced graph follows "
                f"{mode} mode (the mode the model was in) whatever .train()/.eval() is called later. Call "
                ".train() or .eval() on the model before fxslim.prepare/optimize so that it is traced in the mode "
                "it will run in.")


def _untraced_hint(model: nn.Module, untraced: list[tuple[str, str]], method: str) -> str:
    """Why modules went unrewritten when part of the model could not be traced, and the fix."""
    if not untraced:
        return ""
    path, reason = untraced[0]
    where = f"{type(model).__name__}.forward" if not path else f"{path} ({type(model.get_submodule(path)).__name__})"
    more = f" and {len(untraced) - 1} more" if len(untraced) > 1 else ""
    other = "capture='export' or " if method != "export" else ""
    return (f"; {where}{more} could not be traced ({reason}), so only submodules that traced on their own "
            "were searched and ops in that forward were not. Fix: make it traceable (e.g. torch._assert "
            "instead of assert, no Python branch on tensor values), mark the failing module a leaf "
            f"(leaf_modules=...), or use {other}torch.compile(backend='fxslim')")


@outside_inference_mode
def prepare(
    model: nn.Module, example_inputs: Any, config: PROM | None = None, *,
    filter_fn: Callable[[fx.Node, str], bool] | None = None, overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The PROM QAT model: a fake-quantized copy of ``model`` (an nn.Module or a symbolic GraphModule).

    Same as ``fxslim.optimize(model, example_inputs, passes=[config]).module``; the report is
    stored in ``prepared.meta[META_REPORT]`` (a GraphModule when the model traces whole).
    Train it like the float model (``fxslim.models.train.fit``/``train_step`` or any loop, also
    wrapped in DistributedDataParallel: observer state lives in buffers), or only ``fxslim.calibrate``
    it for post-training quantization; then ``fxslim.convert`` it.
    """
    config = PROM() if config is None else config
    model = compiled_original(model, returns="fxslim.prepare")
    if not isinstance(config, PROM):
        raise TypeError(f"prepare: config must be a PROM config, got {type(config).__name__}")
    result = optimize(model, example_inputs, [config], filter_fn=filter_fn, overrides=overrides,
                      leaf_modules=(QConv2d, QLinear, ActFakeQuant))
    for graph in result.captured.graphs:
        graph.gm.meta[META_REPORT] = result.report
    weights = Counter(e.info.get("weights", e.kind) for e in result.report.entries("prom") if e.status == "rewritten")
    _log.info("PROM prepare: rewrote %s; skipped %s", dict(weights), dict(result.report.skipped("prom")))
    return result.module
