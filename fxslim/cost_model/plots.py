"""matplotlib figures of cost reports: per-layer bars (before/after), breakdown by kind, scaling curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot state,
no display, nothing global changed. ``png_bytes(fig)`` renders one for embedding (HTML reports).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter

SCALING_METRICS = ("macs", "flops", "elementwise", "energy_pj", "activation_bytes")  # a ScalingTable's columns

if TYPE_CHECKING:  # format (imported by the report module) imports this one: types only
    from fxslim.cost_model.report import Comparison, CostReport, ScalingTable

__all__ = ["plot_breakdown", "plot_layers", "plot_comparison", "plot_scaling", "png_bytes", "save_figure"]

_TICK_PT = 9  # tick labels: 9 pt at 100 dpi is 12.5 px, readable when the page shows the PNG at full width
_UNITS = {"macs": "MAC", "flops": "FLOP", "elementwise": "op", "storage_bits": "bit",
          "params": "", "activation_bytes": "B"}
# axis labels; energy's ticks carry their unit (5 µJ), so its label has none
_LABELS = {"macs": "MACs", "flops": "FLOPs", "energy_pj": "energy", "elementwise": "elementwise ops",
           "storage_bits": "storage (bits)", "params": "parameters", "activation_bytes": "activation bytes"}


def _number(value: Any) -> float:
    try:
        return float(value)
    except TypeError:
        raise ValueError(f"plots: expected numeric counts, got the expression {value}; "
                         "evaluate() the report first") from None


def _plain(text: str) -> str:
    """A module or model name as matplotlib shows it verbatim: '$' would start maths ('a$b$c')."""
    return str(text).replace("$", r"\$")


def _nothing_to_show(ax: Any, label: str) -> None:
    """Say so on an empty chart (every layer 0: an energy table without the format's entries)."""
    ax.text(0.5, 0.5, f"every layer's {label} is 0", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _figure(width: float = 8.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_breakdown(report: CostReport, metric: str = "macs") -> Figure:
    """Bar chart of ``metric`` summed per op kind."""
    _check_metric(metric, report.total)
    kinds = report.by_kind()
    items = sorted(((k, _number(getattr(t, metric))) for k, t in kinds.items()), key=lambda kv: -kv[1])
    items = [(k, v) for k, v in items if v > 0] or items
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_ylabel(_LABELS.get(metric, metric))
    _value_axis(ax.yaxis, metric)
    ax.set_title(f"{_plain(report.model)}: {_LABELS.get(metric, metric)} by kind")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def _check_metric(metric: str, allowed: Sequence[str] | Any) -> None:
    """A ValueError naming ``metric`` and the allowed ones (a misspelt name gave an AttributeError):
    ``allowed`` is a list of names or a report's totals, whose fields and properties are the metrics."""
    if dataclasses.is_dataclass(allowed):
        kind = type(allowed)
        allowed = [f.name for f in dataclasses.fields(kind) if f.name not in ("ops", "peak_activation_bytes")]
        allowed += sorted(n for n in dir(kind) if isinstance(getattr(kind, n), property))  # flops, ...
    allowed = tuple(allowed)
    if metric not in allowed:
        raise ValueError(f"metric: expected one of {allowed}, got {metric!r}")


def _value_axis(axis: Any, metric: str) -> None:
    """Engineering prefixes with the unit on the tick labels (10 M, 1.5 G), never a bare "1e7"; energy
    in joules (5 µJ, not "5 MpJ")."""
    if metric == "energy_pj":
        joules = EngFormatter(unit="J")
        axis.set_major_formatter(FuncFormatter(lambda value, pos: joules(value * 1e-12, pos)))
    else:
        axis.set_major_formatter(EngFormatter(unit=_UNITS.get(metric, "")))


def _layer_figure(names: list[str], per_row: float) -> tuple[Figure, Any]:
    """A figure with one horizontal band per layer, names on the y axis at a readable size."""
    fig = _figure(8.0, max(3.0, 1.2 + per_row * len(names)))
    ax = fig.add_subplot()
    ax.set_yticks(range(len(names)), [_plain(n) for n in names], fontsize=_TICK_PT)
    ax.invert_yaxis()  # execution order, top to bottom
    ax.tick_params(axis="x", labelsize=_TICK_PT)
    ax.grid(True, axis="x", alpha=0.3)
    return fig, ax


def plot_layers(report: CostReport, metric: str = "macs", top: int = 40) -> Figure:
    """Horizontal bars of ``metric`` per module (the ``top`` largest, in execution order)."""
    _check_metric(metric, report.total)
    mods = [(m, _number(getattr(t, metric))) for m, t in report.by_module().items()]
    keep = {m for m, _ in sorted(mods, key=lambda kv: -kv[1])[:top]}
    mods = [(m or "<root>", v) for m, v in mods if m in keep and v > 0]
    fig, ax = _layer_figure([m for m, _ in mods], 0.22)
    ax.barh(range(len(mods)), [v for _, v in mods], color="#4c72b0")
    ax.set_xlabel(_LABELS.get(metric, metric))
    _value_axis(ax.xaxis, metric)
    ax.set_title(f"{_plain(report.model)}: {_LABELS.get(metric, metric)} per layer")
    if not mods:
        _nothing_to_show(ax, _LABELS.get(metric, metric))
    fig.tight_layout()
    return fig


def plot_comparison(comparison: Comparison, metric: str = "energy_pj", top: int = 40) -> Figure:
    """Horizontal bars of ``metric`` per module, before and after side by side."""
    _check_metric(metric, comparison.before.total)
    rows = [(r.fqn or "<root>", _number(getattr(r.before, metric)), _number(getattr(r.after, metric)))
            for r in comparison.rows]
    rows = [r for r in rows if r[1] > 0 or r[2] > 0]
    keep = {r[0] for r in sorted(rows, key=lambda r: -max(r[1], r[2]))[:top]}
    rows = [r for r in rows if r[0] in keep]
    fig, ax = _layer_figure([r[0] for r in rows], 0.3)
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="before", color="#4c72b0")
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="after", color="#dd8452")
    ax.set_xlabel(_LABELS.get(metric, metric))
    _value_axis(ax.xaxis, metric)
    ax.set_title(f"{_plain(comparison.before.model)}: {_LABELS.get(metric, metric)} per layer, before and after",
                 fontsize=_TICK_PT + 1, pad=24)
    if not rows:
        _nothing_to_show(ax, _LABELS.get(metric, metric))
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, fontsize=_TICK_PT)  # above the bars
    fig.tight_layout()
    return fig


def plot_scaling(tables: ScalingTable | Sequence[ScalingTable], metric: str = "macs",
                 labels: Sequence[str] | None = None) -> Figure:
    """Cost against one input size (e.g. frames); several tables (with/without a pass) overlay."""
    tables = list(tables) if isinstance(tables, Sequence) else [tables]
    _check_metric(metric, SCALING_METRICS)
    labels = [_plain(label) for label in (labels if labels is not None else [t.model for t in tables])]
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for table, label in zip(tables, labels):
        ax.plot(table.values, [_number(v) for v in table.column(metric)], marker="o", label=label)
    ax.set_xlabel(tables[0].size)
    ax.set_ylabel(_LABELS.get(metric, metric))
    _value_axis(ax.yaxis, metric)
    ax.set_title(f"{_LABELS.get(metric, metric)} against {tables[0].size}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure rendered as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure (format from the file suffix) and return the path."""
    path = Path(path)
    fig.savefig(path)
    return path
