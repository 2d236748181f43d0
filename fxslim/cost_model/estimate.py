"""``fxslim.estimate``: capture a model, cost every node, apply the conventions, return a CostReport.

1. Capture. An ``nn.Module`` is traced as a *meta twin* (the same modules with parameters on the
   meta device; the caller's model is untouched) and its shapes propagated on meta tensors, which is
   fast and allocates nothing. Models that do not trace whole, GraphModules (symbolic or dynamo),
   ExportedPrograms and ``Captured`` objects go through ``fxslim.capture`` as they are.
2. Count. Conv, linear and attention nodes are costed from their canonical views
   (``fxslim.cost_model.views``) in every IR; an attention chain is one row and its matmuls are not
   counted again. A node whose target has a registered formula is costed directly. Any other node
   (torch functions, tensor methods, leaf modules) runs once on meta tensors while the aten ops it
   dispatches are recorded and costed through the registry; ops without a formula are reported in
   ``CostReport.unknown_ops``. In a model that does not trace whole, the code of the modules that
   stayed eager is run once (on meta tensors, else with the real weights) and its own aten ops are
   costed the same way, one "(eager) <module>" row per module.
3. Apply conventions. Each MAC-bearing row gets an operand format (its node's dtype, the format an
   fxslim op declares, or the "as deployed" assignment), which fixes its arithmetic by bit width,
   energy and the storage of its weights.

With ``symbolic={"frames": (0, 1)}`` (size name -> dim of input 0, or (input index, dim)), shapes are
propagated with symbolic sizes and every count is a sympy expression in those names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxslim.capture import Captured, as_example, compiled_original
from fxslim.cost_model.apply import RowPricer
from fxslim.cost_model.conventions import KINDS, Conventions, merge_conventions
from fxslim.cost_model.energy import EnergyTable, table_for
from fxslim.cost_model.graph import peak_activation_bytes
from fxslim.cost_model.report import CostReport, CostTotals, ScalingTable
from fxslim.cost_model.shapes import Source, capture_for_cost, propagate_symbolic, record_eager, symbolic_dims, to_expr
from fxslim.cost_model.walk import RawRowCounter
from fxslim.modes import outside_inference_mode
from fxslim.runtime.haste_counts import HasteBuckets

__all__ = ["estimate", "sweep"]


@outside_inference_mode
def estimate(
    model: nn.Module | fx.GraphModule | torch.export.ExportedProgram | Captured,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    table: str | Mapping[str, Any] | EnergyTable = "horowitz45nm",
    conventions: Conventions | Mapping[str, Any] | None = None,
    capture: str = "symbolic",
    leaf_modules: Sequence[type] = (),
    symbolic: Mapping[str, int | tuple[int, int]] | None = None,
    haste_buckets: HasteBuckets | None = None,
    **options: Any,
) -> CostReport:
    """Cost of every node of ``model`` at ``example_inputs`` (see the module docstring).

    ``conventions``: a ``Conventions`` or a dict of its fields; keyword ``options`` (e.g.
    ``deploy="fp16"``, ``accumulator_bits=8``) override single fields. ``table``: an energy table
    name (``available_tables()``), a JSON path or a dict. ``symbolic``: size names -> input dims.
    ``haste_buckets``: bucket counts recorded on sample inputs, for HASTE convs' calibrated and
    measured counts (``fxslim.cost_model.formulas.haste``).
    """
    if haste_buckets is not None and not isinstance(haste_buckets, HasteBuckets):
        raise TypeError(f"haste_buckets: expected a HasteBuckets (fxslim.HasteBuckets), got {type(haste_buckets).__name__}")
    conv = merge_conventions(conventions, options)
    energy_table = table_for(conv, table)
    model = compiled_original(model)
    example_inputs = as_example(example_inputs, model)
    if capture not in ("symbolic", "export"):
        raise ValueError(f"capture: expected 'symbolic' or 'export', got {capture!r}")
    if symbolic:
        if example_inputs is None:
            raise ValueError("symbolic: example_inputs are needed to name input sizes")
        symbolic_dims(symbolic, example_inputs)
    source = capture_for_cost(model, example_inputs, capture, leaf_modules, symbolic)
    mode, rename, symbols, valid_where = None, {}, {}, ()
    if symbolic:
        if any(g.ir == "torch" for g in source.captured.graphs):
            raise ValueError("symbolic: not available for dynamo graphs; pass the nn.Module, a symbolic-traced "
                             "GraphModule or an ExportedProgram")
        if isinstance(model, Captured):  # never change the caller's graphs' shapes
            source = Source(copy.deepcopy(model))
        mode, rename, symbols, valid_where = propagate_symbolic(source, example_inputs, symbolic)
    else:
        record_eager(source, example_inputs)
    inputs = [tuple(to_expr(d, rename) for d in x.shape) for x in (example_inputs or ()) if isinstance(x, torch.Tensor)]
    state = _State(source, mode, rename, symbols, _model_name(model), inputs, haste_buckets, valid_where)
    return state.cost(conv, energy_table)


@dataclass(frozen=True)
class _State:
    """What a report keeps to be costed again under other conventions without capturing again.

    ``CostReport.with_conventions`` calls ``cost`` on it, so the report needs no import of this
    module (which imports the report): the dependency stays one-way.
    """

    source: Source
    mode: Any
    rename: Mapping[Any, Any]
    symbols: dict[str, Any]
    model: str
    inputs: list[tuple]
    haste_buckets: HasteBuckets | None = None
    valid_where: tuple[Any, ...] = ()

    def cost(self, conv: Conventions, energy_table: EnergyTable) -> CostReport:
        """The captured model costed under ``conv`` and ``energy_table``."""
        counter = RawRowCounter(self.source, conv, self.mode, self.haste_buckets)
        raws = counter.rows()
        pricer = RowPricer(conv, energy_table, self.rename)
        rows = pricer.rows(raws)
        unmatched = conv.unmatched_names(r.fqn for r in rows)
        if unmatched:
            raise ValueError(f"deploy: {unmatched} name no module of {self.model} and no kind; keys are module names "
                             f"(globs such as 'layer4.*'), kinds {KINDS}, 'last:<kind>', 'default' or 'params'")
        peak = None if self.symbols else peak_activation_bytes(self.source.captured, rows)
        return CostReport(
            rows=rows, total=CostTotals.of(rows, peak), conventions=conv, energy_table=energy_table,
            unknown_ops=counter.unknown, energy_missing=pricer.missing, untraced=list(self.source.captured.untraced),
            symbols=dict(self.symbols), model=self.model, inputs=list(self.inputs), captured=self.source.captured,
            state=self, valid_where=self.valid_where,
        )


def sweep(model: Any, make_inputs: Callable[[int], Any], size: str, values: Sequence[int],
          **estimate_options: Any) -> ScalingTable:
    """Numeric totals at several values of one input size: ``make_inputs(value)`` builds the example
    inputs. For costs that are not polynomials of the size (e.g. token merging with rounding per
    block), where ``estimate(..., symbolic=...)`` cannot apply; otherwise both agree."""
    totals = []
    name = ""
    for value in values:
        report = estimate(model, make_inputs(int(value)), **estimate_options)
        name = report.model
        t = report.total
        totals.append({"macs": t.macs, "flops": t.flops, "elementwise": t.elementwise, "energy_pj": t.energy_pj,
                       "activation_bytes": t.activation_bytes})
    return ScalingTable(size, [int(v) for v in values], totals, name)


def _model_name(model: Any) -> str:
    if isinstance(model, Captured):
        return type(model.module).__name__
    return type(model).__name__
