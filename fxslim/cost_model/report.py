"""Cost reports as data: one ``CostRow`` per node, ``CostTotals``, and before/after ``Comparison``.

Nothing here prints or formats; ``fxslim.cost_model.format`` turns reports into tables, JSON,
Markdown, CSV and HTML, and the ``to_*`` methods below only delegate to it. Counts are ints, or
sympy expressions when the estimate was symbolic (``CostReport.symbols`` names the sizes);
``evaluate(frames=8)`` substitutes sizes and ``scaling(frames=[...])`` tabulates a range.

Imports go one way: this module imports format and graph, which name the report types for type
checking only, and ``with_conventions`` asks the report's captured state (made by ``estimate``,
which imports this module) to cost the model again.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy

from fxslim.cost_model import format as fmt
from fxslim.cost_model.conventions import Conventions, merge_conventions
from fxslim.cost_model.energy import EnergyTable, table_for
from fxslim.cost_model.graph import to_networkx

__all__ = ["CostRow", "CostTotals", "CostReport", "Comparison", "ComparisonRow", "ScalingTable", "compare"]


def _sum(values: Iterable[Any]) -> Any:
    total: Any = 0
    for v in values:
        if v is not None:
            total = total + v
    return total


def _size(what: str, value: Any) -> int:
    """A size a formula is evaluated at: a positive whole number (-3 gave negative MACs; 2.7 was taken as 2)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value) or value < 1:
        raise ValueError(f"{what}: expected a positive whole number, got {value!r}")
    return int(value)


def _subs(value: Any, sizes: Mapping[sympy.Symbol, int]) -> Any:
    if isinstance(value, sympy.Basic):
        out = value.subs(sizes)
        if out.is_Integer:
            return int(out)
        if out.is_Number:
            return float(out)
        return out
    return value


class _DerivedUnits:
    """FLOPs and bytes from the MACs and bits a row or a total holds."""

    macs: Any
    storage_bits: Any

    @property
    def flops(self) -> Any:
        return 2 * self.macs

    @property
    def storage_bytes(self) -> Any:
        return self.storage_bits / 8


@dataclass(frozen=True)
class CostRow(_DerivedUnits):
    """The cost of one graph node (an attention chain is one row, at its softmax/SDPA node)."""

    graph: str
    node: str
    op: str
    kind: str
    fqn: str
    input_shapes: tuple
    output_shape: tuple | None
    dtype: str | None
    format: str | None
    macs: Any = 0
    elementwise: Any = 0
    ops: Mapping[tuple[str, str], Any] = field(default_factory=dict)
    energy_pj: Any = 0.0
    params: Any = 0
    storage_bits: Any = 0
    activation_bytes: Any = 0
    bytes_read: Any = 0
    bytes_written: Any = 0
    measured_macs: Any = None
    unknown: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)


    def substitute(self, sizes: Mapping[sympy.Symbol, int]) -> CostRow:
        changes = {f.name: _subs(getattr(self, f.name), sizes) for f in dataclasses.fields(self)
                   if f.name in ("macs", "elementwise", "energy_pj", "params", "storage_bits", "activation_bytes",
                                 "bytes_read", "bytes_written", "measured_macs")}
        changes["ops"] = {k: _subs(v, sizes) for k, v in self.ops.items()}
        changes["info"] = {k: _subs(v, sizes) for k, v in self.info.items()}
        changes["output_shape"] = None if self.output_shape is None else tuple(_subs(s, sizes) for s in self.output_shape)
        changes["input_shapes"] = tuple(tuple(_subs(s, sizes) for s in shape) for shape in self.input_shapes)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CostTotals(_DerivedUnits):
    """Sums over all rows; ``peak_activation_bytes`` comes from liveness over the execution order."""

    macs: Any = 0
    elementwise: Any = 0
    energy_pj: Any = 0.0
    params: Any = 0
    storage_bits: Any = 0
    activation_bytes: Any = 0
    ops: Mapping[tuple[str, str], Any] = field(default_factory=dict)
    measured_macs: Any = None
    peak_activation_bytes: Any = None


    @property
    def energy_uj(self) -> Any:
        return self.energy_pj / 1e6

    @classmethod
    def of(cls, rows: Sequence[CostRow], peak: Any = None) -> CostTotals:
        ops: Counter = Counter()
        for r in rows:
            for k, v in r.ops.items():
                ops[k] = ops[k] + v
        measured = [r.measured_macs for r in rows if r.measured_macs is not None]
        if any(r.measured_macs is None and "measured" in r.info for r in rows):
            measured = []  # a sum over some of the measurable rows would pass for all of them
        return cls(
            macs=_sum(r.macs for r in rows), elementwise=_sum(r.elementwise for r in rows),
            energy_pj=_sum(r.energy_pj for r in rows), params=_sum(r.params for r in rows),
            storage_bits=_sum(r.storage_bits for r in rows), activation_bytes=_sum(r.activation_bytes for r in rows),
            ops=dict(ops), measured_macs=_sum(measured) if measured else None, peak_activation_bytes=peak,
        )


@dataclass
class CostReport:
    """Per-node costs of a model under ``conventions`` and an ``energy_table``.

    ``unknown_ops`` maps each op without a formula to the nodes where it occurred (never a silent 0);
    ``energy_missing`` lists (operation, format) pairs the table has no energy for, with counts;
    ``untraced`` lists modules that did not trace whole; their own eager code is one
    "(eager) <module>" row each. ``valid_where``: of a symbolic report, the conditions on the named
    sizes under which the model takes the path its formulas count (``evaluate`` and ``scaling``
    refuse sizes outside them).
    """

    rows: list[CostRow]
    total: CostTotals
    conventions: Conventions
    energy_table: EnergyTable
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)
    energy_missing: dict[tuple[str, str], Any] = field(default_factory=dict)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    symbols: dict[str, sympy.Symbol] = field(default_factory=dict)
    model: str = ""
    inputs: list[tuple] = field(default_factory=list)
    captured: Any = field(default=None, repr=False, compare=False)
    state: Any = field(default=None, repr=False, compare=False)
    valid_where: tuple[Any, ...] = ()

    def with_conventions(self, conventions: Conventions | Mapping[str, Any] | None = None, *,
                         table: Any = None, **options: Any) -> CostReport:
        """The same model costed under other conventions, without capturing it again.

        ``options`` change single fields of this report's conventions, e.g.
        ``report.with_conventions(deploy="prom", accumulator_bits=8)``.
        """
        if self.state is None:
            raise ValueError("with_conventions: this report was not made by estimate() (no captured state)")
        conv = merge_conventions(conventions if conventions is not None else self.conventions, options)
        return self.state.cost(conv, table_for(conv, table if table is not None else self.energy_table))

    # ------------------------------------------------------------------------------------------ views

    def by_kind(self) -> dict[str, CostTotals]:
        """Totals per row kind (conv kinds, linear, attention, matmul, norm, elementwise, ...)."""
        groups: dict[str, list[CostRow]] = defaultdict(list)
        for r in self.rows:
            groups[r.kind].append(r)
        return {k: CostTotals.of(v) for k, v in groups.items()}

    def by_module(self) -> dict[str, CostTotals]:
        """Totals per module path (rows of one module, e.g. a conv and its bias, summed)."""
        groups: dict[str, list[CostRow]] = defaultdict(list)
        for r in self.rows:
            groups[r.fqn].append(r)
        return {k: CostTotals.of(v) for k, v in groups.items()}

    # ------------------------------------------------------------------------------------------ symbolic

    @property
    def is_symbolic(self) -> bool:
        return bool(self.symbols)

    def _sizes(self, sizes: Mapping[str, int]) -> dict[sympy.Symbol, int]:
        unknown = set(sizes) - set(self.symbols)
        if unknown:
            raise ValueError(f"evaluate: unknown size names {sorted(unknown)}; this report has {sorted(self.symbols)}")
        subs = {self.symbols[k]: _size(f"evaluate: {k}", v) for k, v in sizes.items()}
        self._check_valid(subs)
        return subs

    def _check_valid(self, subs: Mapping[sympy.Symbol, int]) -> None:
        """Raise when the sizes break a condition the formulas hold under (``valid_where``)."""
        for condition in self.valid_where:
            if condition.xreplace(dict(subs)) is sympy.false:
                given = ", ".join(f"{symbol}={value}" for symbol, value in subs.items())
                raise ValueError(f"symbolic: the formulas of this report hold where {condition}, and {given} "
                                 "breaks it (the model takes another path there, e.g. a ceil_mode pool's extra "
                                 "row or a branch on a size, or a size is 1 at the example and fixes the "
                                 "formulas after it): estimate that size on its own")

    def evaluate(self, **sizes: int) -> CostReport:
        """A numeric report with the named sizes substituted (e.g. ``evaluate(frames=8)``). The
        formulas count the path the model took at the example's sizes: sizes that change that path
        (a ``ceil_mode`` pool at odd sizes, a branch on a size in eager code: ``valid_where``) are
        refused with a ValueError; estimate such a size on its own."""
        subs = self._sizes(sizes)
        rows = [r.substitute(subs) for r in self.rows]
        left = {k: v for k, v in self.symbols.items() if k not in sizes}
        return dataclasses.replace(
            self, rows=rows, total=CostTotals.of(rows), symbols=left, state=None,
            valid_where=tuple(c for c in (condition.xreplace(subs) for condition in self.valid_where) if c is not sympy.true),
            energy_missing={k: _subs(v, subs) for k, v in self.energy_missing.items()},
            inputs=[tuple(_subs(s, subs) for s in shape) for shape in self.inputs],
        )

    def scaling(self, **ranges: Sequence[int]) -> ScalingTable:
        """Totals over a range of one size (e.g. ``scaling(frames=[1, 2, 4, 8])``)."""
        if len(ranges) != 1:
            raise ValueError(f"scaling: expected exactly one size name with a list of values, got {sorted(ranges)}")
        ((name, values),) = ranges.items()
        if name not in self.symbols:
            raise ValueError(f"scaling: unknown size name {name!r}; this report has {sorted(self.symbols)}")
        totals = []
        values = [_size(f"scaling: {name}", value) for value in values]
        for value in values:
            subs = {self.symbols[name]: value}
            self._check_valid(subs)
            totals.append({"macs": _subs(self.total.macs, subs), "flops": _subs(self.total.flops, subs),
                           "elementwise": _subs(self.total.elementwise, subs),
                           "energy_pj": _subs(self.total.energy_pj, subs),
                           "activation_bytes": _subs(self.total.activation_bytes, subs)})
        return ScalingTable(name, values, totals, self.model)

    # ------------------------------------------------------------------------------------------ output

    def to_dict(self) -> dict[str, Any]:
        return fmt.report_dict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, nonzero: bool = True) -> str:
        return fmt.to_markdown(self, nonzero=nonzero)

    def to_csv(self) -> str:
        return fmt.to_csv(self)

    def to_html(self, plots: bool = True) -> str:
        return fmt.to_html(self, plots=plots)

    def table(self, nonzero: bool = True) -> Any:
        """A ``rich.table.Table`` (print it with a rich Console)."""
        return fmt.rich_table(self, nonzero=nonzero)

    def graph(self) -> Any:
        """A networkx DiGraph of the captured graph(s) with per-node costs (see ``graph.to_networkx``)."""
        return to_networkx(self)


@dataclass(frozen=True)
class ScalingTable:
    """Totals of a symbolic report at several values of one size."""

    size: str
    values: list[int]
    totals: list[dict[str, Any]]
    model: str = ""

    def column(self, name: str) -> list[Any]:
        return [t[name] for t in self.totals]


@dataclass(frozen=True)
class ComparisonRow:
    """One module before and after (rows of the same module path summed)."""

    fqn: str
    kind_before: str
    kind_after: str
    before: CostTotals
    after: CostTotals


@dataclass
class Comparison:
    """Before/after per module and in total; ratios are before/after (> 1 means cheaper)."""

    rows: list[ComparisonRow]
    before: CostReport
    after: CostReport
    # what the passes did, one dict per candidate: pass, module, kind, status, reason, detail
    candidates: list[dict[str, str]] = field(default_factory=list)
    # bytes torch.save writes for the state dicts of the two models (before, after), where they were at hand
    saved_bytes: tuple[int, int] | None = None

    def ratio(self, field_name: str) -> float | None:
        """before / after of one total (None where after is 0)."""
        measures = [f.name for f in dataclasses.fields(self.before.total) if f.name not in ("ops", "measured_macs")]
        measures.append("storage_bytes")
        if field_name not in measures:
            raise ValueError(f"ratio: field_name must be one of {measures}, got {field_name!r}")
        b, a = getattr(self.before.total, field_name), getattr(self.after.total, field_name)
        return float(b / a) if a else None

    def to_dict(self) -> dict[str, Any]:
        return fmt.comparison_dict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        return fmt.comparison_markdown(self)

    def to_csv(self) -> str:
        return fmt.comparison_csv(self)

    def to_html(self, plots: bool = True) -> str:
        return fmt.comparison_html(self, plots=plots)

    def table(self) -> Any:
        return fmt.comparison_rich_table(self)


def compare(before: CostReport, after: CostReport, candidates: list[dict[str, str]] | None = None,
            saved_bytes: tuple[int, int] | None = None) -> Comparison:
    """Before/after per module path (in the before report's order, new modules last) and in total;
    ``candidates``: what the passes did (``OptimizeReport.candidates()``), listed by every format;
    ``saved_bytes``: the real size of the two models' saved state dicts (``state_dict_bytes``), printed
    beside the counted storage."""
    if not isinstance(before, CostReport) or not isinstance(after, CostReport):
        raise TypeError(f"compare: expected two CostReports, got {type(before).__name__} and {type(after).__name__}")
    if before.is_symbolic != after.is_symbolic:
        symbolic, numeric = ("before", "after") if before.is_symbolic else ("after", "before")
        raise ValueError(f"compare: {symbolic} has formulas in {sorted((before if before.is_symbolic else after).symbols)} "
                         f"and {numeric} numbers; evaluate the formulas at the sizes first ({symbolic}.evaluate(...))")
    kinds_b = _main_kinds(before)
    kinds_a = _main_kinds(after)
    mods_b, mods_a = before.by_module(), after.by_module()
    order = list(mods_b) + [m for m in mods_a if m not in mods_b]
    rows = [ComparisonRow(m, kinds_b.get(m, ""), kinds_a.get(m, ""), mods_b.get(m, CostTotals()),
                          mods_a.get(m, CostTotals())) for m in order]
    if saved_bytes is not None and (not isinstance(saved_bytes, (tuple, list)) or len(saved_bytes) != 2
                                    or not all(isinstance(n, int) and n >= 0 for n in saved_bytes)):
        raise ValueError(f"compare: saved_bytes must be (bytes before, bytes after), got {saved_bytes!r}")
    return Comparison(rows, before, after, list(candidates or ()), None if saved_bytes is None else tuple(saved_bytes))


def _main_kinds(report: CostReport) -> dict[str, str]:
    """Per module: the kind of its most expensive row (MACs, then elementwise)."""
    best: dict[str, tuple[Any, str]] = {}
    for r in report.rows:
        key = (r.macs, r.elementwise)
        if r.fqn not in best or _gt(key, best[r.fqn][0]):
            best[r.fqn] = (key, r.kind)
    return {k: v[1] for k, v in best.items()}


def _gt(a: tuple, b: tuple) -> bool:
    try:
        return bool(a > b)
    except TypeError:  # symbolic counts: keep the first row's kind
        return False
