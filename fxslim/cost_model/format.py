"""Formatting of cost reports and comparisons: rich tables, JSON, Markdown, CSV, self-contained HTML.

Every function takes a report (data) and returns a string or a ``rich.table.Table``; nothing
prints. HTML reports inline their CSS and embed plots as base64 PNG data URIs, so a report is one
file that needs no network. Symbolic counts appear as their sympy expressions.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sympy

if TYPE_CHECKING:  # the report module imports this one: types only, so the imports stay one-way
    from fxslim.cost_model.report import Comparison, CostReport, CostRow, CostTotals

__all__ = [
    "report_dict", "comparison_dict", "to_markdown", "to_csv", "to_html", "rich_table",
    "comparison_markdown", "comparison_csv", "comparison_html", "comparison_html_body", "comparison_rich_table",
    "human", "html_page", "html_table", "html_image",
]


def _plain(value: Any) -> Any:
    """JSON-friendly: ints/floats as numbers, sympy expressions as strings."""
    if isinstance(value, sympy.Basic):
        if value.is_Integer:
            return int(value)
        if value.is_Number:
            return float(value)
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def human(value: Any, digits: int = 3) -> str:
    """12,345,678 -> '12.3M'; expressions as text."""
    if value is None:
        return ""
    if isinstance(value, sympy.Basic) and not value.is_Number:
        return str(value)
    value = float(value)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{unit}"
    return f"{value:.{digits}g}"


def _ops_text(ops: dict) -> str:
    return "; ".join(f"{op}:{fmt}={_plain(v)}" for (op, fmt), v in sorted(ops.items()))


def _totals_dict(t: CostTotals) -> dict[str, Any]:
    return _plain({
        "macs": t.macs, "flops": t.flops, "elementwise": t.elementwise, "energy_pj": t.energy_pj,
        "energy_uj": t.energy_uj, "params": t.params, "storage_bits": t.storage_bits,
        "storage_bytes": t.storage_bytes, "activation_bytes": t.activation_bytes,
        "peak_activation_bytes": t.peak_activation_bytes, "measured_macs": t.measured_macs,
        "ops": {f"{op}:{fmt}": v for (op, fmt), v in t.ops.items()},
    })


def _row_dict(r: CostRow) -> dict[str, Any]:
    return _plain({
        "graph": r.graph, "node": r.node, "op": r.op, "kind": r.kind, "module": r.fqn,
        "input_shapes": [list(s) for s in r.input_shapes], "output_shape": list(r.output_shape or ()),
        "dtype": r.dtype, "format": r.format, "macs": r.macs, "flops": r.flops, "elementwise": r.elementwise,
        "ops": {f"{op}:{fmt}": v for (op, fmt), v in r.ops.items()}, "energy_pj": r.energy_pj,
        "params": r.params, "storage_bits": r.storage_bits, "activation_bytes": r.activation_bytes,
        "bytes_read": r.bytes_read, "bytes_written": r.bytes_written, "measured_macs": r.measured_macs,
        "unknown": list(r.unknown), "info": dict(r.info),
    })


def report_dict(report: CostReport) -> dict[str, Any]:
    """The whole report as plain data."""
    conv = report.conventions.to_dict()
    return {
        "model": report.model,
        "inputs": _plain([list(s) for s in report.inputs]),
        "conventions": _plain({k: (dict(v) if hasattr(v, "items") else v) for k, v in conv.items()}),
        "conventions_text": report.conventions.describe(),
        "energy_table": {"name": report.energy_table.name, "citation": report.energy_table.citation},
        "symbols": sorted(report.symbols),
        "valid_where": [str(c) for c in report.valid_where],
        "total": _totals_dict(report.total),
        "by_kind": {k: _totals_dict(v) for k, v in report.by_kind().items()},
        "unknown_ops": report.unknown_ops,
        "energy_missing": _plain({f"{op}:{fmt}": v for (op, fmt), v in report.energy_missing.items()}),
        "untraced": [list(u) for u in report.untraced],
        "rows": [_row_dict(r) for r in report.rows],
    }


def comparison_dict(comp: Comparison) -> dict[str, Any]:
    """A comparison as plain data (totals, ratios before/after, per module)."""
    return {
        "model": comp.before.model,
        "before": {"conventions_text": comp.before.conventions.describe(), "total": _totals_dict(comp.before.total)},
        "after": {"conventions_text": comp.after.conventions.describe(), "total": _totals_dict(comp.after.total)},
        "ratios": {k: comp.ratio(k) for k in ("macs", "energy_pj", "storage_bytes", "params")},
        "rows": [{"module": r.fqn, "kind_before": r.kind_before, "kind_after": r.kind_after,
                  "before": _totals_dict(r.before), "after": _totals_dict(r.after)} for r in comp.rows],
        "unknown_ops": {"before": comp.before.unknown_ops, "after": comp.after.unknown_ops},
        "candidates": comp.candidates,
        "saved_state_dict_bytes": None if comp.saved_bytes is None else dict(zip(("before", "after"), comp.saved_bytes)),
    }


_CANDIDATE_COLUMNS = ("pass", "module", "kind", "status", "reason")


def _candidate_rows(comp: Comparison) -> list[list[str]]:
    """One row per candidate a pass looked at: rewritten, or skipped with its reason (and detail)."""
    return [[c["pass"], c["module"], c["kind"], c["status"],
             c["reason"] + (f" ({c['detail']})" if c.get("detail") else "")] for c in comp.candidates]


def candidates_rich_table(comp: Comparison) -> Any:
    from rich.table import Table

    table = Table(title="What the passes did")
    for col in _CANDIDATE_COLUMNS:
        table.add_column(col, overflow="fold")
    for row in _candidate_rows(comp):
        table.add_row(*row)
    return table


# ----------------------------------------------------------------------------------------------
# Tables

_COLUMNS = ("module (node)", "kind", "format", "output", "MACs", "FLOPs", "elementwise", "energy (pJ)", "params",
            "storage (B)")
_FIRST_NUMERIC = 4


def _cells(r: CostRow) -> list[str]:
    out = "×".join(str(_plain(d)) for d in r.output_shape) if r.output_shape else ""
    node = f"{r.graph}/{r.node}" if r.graph else r.node
    same = r.fqn.replace(".", "_").lstrip("_") == node.lstrip("_")  # fx names nodes after their module
    name = r.fqn if r.fqn and same else (f"{r.fqn} ({node})" if r.fqn else f"({node})")
    return [name, r.kind, r.format or "", out, _int(r.macs), _int(r.flops), _int(r.elementwise),
            _float(r.energy_pj), _int(r.params), _float(r.storage_bytes)]


def _int(v: Any) -> str:
    v = _plain(v)
    return f"{v:,}" if isinstance(v, int) else (f"{v:,.0f}" if isinstance(v, float) else str(v))


def _float(v: Any) -> str:
    v = _plain(v)
    if isinstance(v, (int, float)):
        return f"{v:,.2f}" if v != int(v) and abs(v) < 1000 else f"{round(v):,}"
    return str(v)


def _shown(report: CostReport, nonzero: bool) -> list[CostRow]:
    if not nonzero:
        return list(report.rows)
    return [r for r in report.rows if not (r.macs == 0 and r.elementwise == 0 and r.params == 0 and not r.unknown)]


def _summary_lines(report: CostReport) -> list[str]:
    t = report.total
    lines = [
        f"MACs {_int(t.macs)} (FLOPs {_int(t.flops)}), elementwise {_int(t.elementwise)}",
        f"energy {_float(t.energy_pj)} pJ ({_float(t.energy_uj)} µJ), table {report.energy_table.name}",
        f"parameters {_int(t.params)}, storage {_float(t.storage_bytes)} bytes",
        f"peak activations {_int(t.peak_activation_bytes)} bytes" if t.peak_activation_bytes is not None else "",
        f"conventions: {report.conventions.describe()}",
    ]
    if report.valid_where:
        lines.append("the formulas hold where " + " and ".join(str(c) for c in report.valid_where))
    if report.unknown_ops:
        lines.append("ops without a cost formula (not counted): " + ", ".join(
            f"{op} ×{len(nodes)}" for op, nodes in report.unknown_ops.items()))
    if report.energy_missing:
        lines.append("no energy in the table for: " + ", ".join(f"{op}:{fmt}" for op, fmt in report.energy_missing))
    if report.untraced:
        lines.append("did not trace whole (their eager code is costed from the aten ops it ran): "
                     + ", ".join(p or "<root>" for p, _ in report.untraced))
    return [line for line in lines if line]


def rich_table(report: CostReport, nonzero: bool = True) -> Any:
    """A ``rich.table.Table`` with one row per costed node and the totals as caption."""
    from rich.table import Table

    table = Table(title=f"{report.model} cost", caption="\n".join(_summary_lines(report)), caption_justify="left")
    t = report.total
    rows = [_cells(r) for r in _shown(report, nonzero)]
    total = ["total", "", "", "", _int(t.macs), _int(t.flops), _int(t.elementwise), _float(t.energy_pj),
             _int(t.params), _float(t.storage_bytes)]
    for i, col in enumerate(_COLUMNS):
        # every column but the module's as wide as its longest cell: a narrow terminal folds the names
        # and never cuts a number short (10,838 for 10,838,016)
        widest = max((len(str(row[i])) for row in [*rows, total]), default=0)
        table.add_column(col, justify="right" if i >= _FIRST_NUMERIC else "left", no_wrap=i >= 1,
                         overflow="fold", min_width=min(widest, 24) if i == 0 else max(widest, len(col)))
    for row in rows:
        table.add_row(*row)
    table.add_row(*total, style="bold")
    return table


def _md_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    """A table cell that stays one cell and shows as text: '|' escaped, a line break as a space,
    '<' and '&' as entities (a module named '<script>' is not HTML in a rendered page)."""
    return " ".join(text.splitlines()).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")


def to_markdown(report: CostReport, nonzero: bool = True) -> str:
    """Summary, totals by kind and the per-node table in Markdown."""
    kinds = report.by_kind()
    kind_rows = [[k, _int(t.macs), _int(t.elementwise), _float(t.energy_pj), _int(t.params)] for k, t in kinds.items()]
    parts = [
        f"# Cost of {report.model}",
        "",
        "\n".join(f"- {line}" for line in _summary_lines(report)),
        f"- energy table citation: {report.energy_table.citation}",
        "",
        "## By kind",
        "",
        _md_table(("kind", "MACs", "elementwise", "energy (pJ)", "params"), kind_rows),
        "",
        "## Per node",
        "",
        _md_table(_COLUMNS, [_cells(r) for r in _shown(report, nonzero)]),
        "",
    ]
    return "\n".join(parts)


_CSV_FIELDS = ("graph", "node", "op", "kind", "module", "dtype", "format", "input_shapes", "output_shape", "macs",
               "flops", "elementwise", "ops", "energy_pj", "params", "storage_bits", "activation_bytes",
               "bytes_read", "bytes_written", "measured_macs", "unknown")


def to_csv(report: CostReport) -> str:
    """One CSV line per node (every node, zero-cost ones included)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_FIELDS)
    for r in report.rows:
        d = _row_dict(r)
        d["ops"] = _ops_text(r.ops)
        d["unknown"] = ";".join(r.unknown)
        d["input_shapes"] = " ".join("x".join(map(str, s)) for s in d["input_shapes"])
        d["output_shape"] = "x".join(map(str, d["output_shape"]))
        writer.writerow([d[f] for f in _CSV_FIELDS])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.8em}th,td{border:1px solid #ccc;padding:2px 6px}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:bold;background:#fafafa}ul{line-height:1.5}img{max-width:100%;height:auto}
.note{color:#666;font-size:.85em}.scroll{overflow-x:auto;max-width:100%}
@media (max-width:700px){body{margin:.8em}}
""".strip()


def html_image(png: bytes, alt: str = "plot") -> str:
    """An ``<img>`` carrying the PNG inline, so the page is one self-contained file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _img(fig: Any) -> str:
    from fxslim.cost_model.plots import png_bytes

    return html_image(png_bytes(fig))


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int | None = None,
               total: Sequence[str] | None = None) -> str:
    """A table that scrolls inside the page when wide; columns from ``numeric_from`` on are
    right-aligned numbers; ``total`` is a bold last row."""
    numeric_from = len(header) if numeric_from is None else numeric_from
    rows = list(rows)
    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows + ([total] if total else []):
        cls = ' class="total"' if total is not None and row is total else ""
        cells = "".join(f'<td{" class=n" if i >= numeric_from else ""}>{html.escape(c)}</td>' for i, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table></div>")  # wide tables scroll inside the page, never the page itself
    return "\n".join(out)


def html_page(title: str, body: Sequence[str]) -> str:
    """A complete HTML page (the style every fxslim page shares) around ``body``."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        *body, "</body>", "</html>", "",
    ])


def _numeric(report: CostReport) -> bool:
    return not report.is_symbolic


def to_html(report: CostReport, plots: bool = True) -> str:
    """A self-contained HTML page: summary, plots (embedded PNG), totals by kind, per-node table."""
    body = [f"<h1>Cost of {html.escape(report.model)}</h1>", "<ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in _summary_lines(report)]
    body += [f'<li class="note">energy table: {html.escape(report.energy_table.citation)}</li>', "</ul>"]
    if plots and _numeric(report):
        from fxslim.cost_model.plots import plot_breakdown, plot_layers

        body += ["<h2>Breakdown</h2>", _img(plot_breakdown(report, "macs")), _img(plot_breakdown(report, "energy_pj")),
                 "<h2>Per layer</h2>", _img(plot_layers(report, "macs"))]
    kinds = [[k, _int(t.macs), _int(t.elementwise), _float(t.energy_pj), _int(t.params)] for k, t in report.by_kind().items()]
    body += ["<h2>By kind</h2>", html_table(("kind", "MACs", "elementwise", "energy (pJ)", "params"), kinds, 1)]
    t = report.total
    total = ["total", "", "", "", _int(t.macs), _int(t.flops), _int(t.elementwise), _float(t.energy_pj),
             _int(t.params), _float(t.storage_bytes)]
    body += ["<h2>Per node</h2>", html_table(_COLUMNS, [_cells(r) for r in _shown(report, True)], _FIRST_NUMERIC, total)]
    return html_page(f"Cost of {report.model}", body)


# ----------------------------------------------------------------------------------------------
# Comparisons

_CMP_COLUMNS = ("module", "kind before", "kind after", "MACs before", "MACs after", "energy before (pJ)",
                "energy after (pJ)", "storage before (B)", "storage after (B)")


def _cmp_cells(fqn: str, kb: str, ka: str, b: CostTotals, a: CostTotals) -> list[str]:
    return [fqn or "<root>", kb, ka, _int(b.macs), _int(a.macs), _float(b.energy_pj), _float(a.energy_pj),
            _float(b.storage_bytes), _float(a.storage_bytes)]


def _cmp_rows(comp: Comparison) -> list[list[str]]:
    rows = [r for r in comp.rows if not (r.before.macs == 0 and r.after.macs == 0 and r.before.energy_pj == 0
                                         and r.after.energy_pj == 0 and r.before.params == 0 and r.after.params == 0)]
    return [_cmp_cells(r.fqn, r.kind_before, r.kind_after, r.before, r.after) for r in rows]


def _cmp_summary(comp: Comparison) -> list[str]:
    lines = []
    # elementwise work beside the MACs: what a rewrite adds there (HASTE's hashing and merging) shows
    for name, label in (("macs", "MACs"), ("elementwise", "elementwise ops"), ("energy_pj", "energy (pJ)"),
                        ("storage_bytes", "storage (bytes)"), ("params", "parameters")):
        ratio = comp.ratio(name)
        b, a = getattr(comp.before.total, name), getattr(comp.after.total, name)
        lines.append(f"{label}: {_float(b)} -> {_float(a)}" + (f" (before/after {ratio:.2f}×)" if ratio else ""))
    if comp.saved_bytes is not None:  # what a file holds: containers, names and torch.save's framing included
        b, a = comp.saved_bytes
        lines.append(f"saved state dict (torch.save, bytes): {b:,} -> {a:,}" + (f" (before/after {b / a:.2f}×)" if a else ""))
    lines.append(f"conventions before: {comp.before.conventions.describe()}")
    lines.append(f"conventions after: {comp.after.conventions.describe()}")
    for label, rep in (("before", comp.before), ("after", comp.after)):
        if rep.unknown_ops:
            lines.append(f"ops without a cost formula ({label}): " + ", ".join(rep.unknown_ops))
        if rep.energy_missing:  # their energy counts as 0: say so, or "0 -> 0" reads as no energy
            lines.append(f"no energy in the table for ({label}, counted as 0): "
                         + ", ".join(f"{op}:{fmt}" for op, fmt in rep.energy_missing))
    if any(c["pass"] == "haste" and c["status"] == "rewritten" for c in comp.candidates):
        lines.append("HASTE's saving depends on the input: the 'after' MACs are a data-free prediction "
                     "(channels hashed as independent random vectors); real activations, whose channels "
                     "are alike, merge more: record them with fxslim.record_buckets and pass "
                     "haste_buckets=fxslim.HasteBuckets(measured=...) to estimate or compare")
    return lines


def comparison_rich_table(comp: Comparison) -> Any:
    from rich.table import Table

    table = Table(title=f"{comp.before.model}: before / after", caption="\n".join(_cmp_summary(comp)),
                  caption_justify="left")
    for col in _CMP_COLUMNS:
        table.add_column(col, justify="left" if col in ("module", "kind before", "kind after") else "right", overflow="fold")
    for row in _cmp_rows(comp):
        table.add_row(*row)
    table.add_row(*_cmp_cells("total", "", "", comp.before.total, comp.after.total), style="bold")
    return table


def comparison_markdown(comp: Comparison) -> str:
    rows = _cmp_rows(comp) + [_cmp_cells("**total**", "", "", comp.before.total, comp.after.total)]
    parts = [f"# {comp.before.model}: before / after", "",
             "\n".join(f"- {line}" for line in _cmp_summary(comp)), "", _md_table(_CMP_COLUMNS, rows), ""]
    if comp.candidates:
        parts += ["## What the passes did", "", _md_table(_CANDIDATE_COLUMNS, _candidate_rows(comp)), ""]
    return "\n".join(parts)


def comparison_csv(comp: Comparison) -> str:
    """One table: a row per module, what the passes did to it (``passes``: "haste: rewritten", "prom:
    skipped (reason)"; candidates without a costed row of their own get one), and a ``total`` row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = ("macs", "elementwise", "energy_pj", "params", "storage_bits")
    writer.writerow(["module", "kind_before", "kind_after"] + [f"{f}_{w}" for f in fields for w in ("before", "after")]
                    + ["passes"])
    done: dict[str, list[str]] = {}
    for c in comp.candidates:
        reason = c["reason"] + (f" ({c['detail']})" if c.get("detail") else "")
        done.setdefault(c["module"], []).append(f"{c['pass']}: {c['status']}" + (f" ({reason})" if reason else ""))
    for r in comp.rows:
        writer.writerow([r.fqn, r.kind_before, r.kind_after]
                        + [_plain(getattr(x, f)) for f in fields for x in (r.before, r.after)]
                        + ["; ".join(done.pop(r.fqn, []))])
    for module, what in done.items():
        writer.writerow([module, "", ""] + [""] * 2 * len(fields) + ["; ".join(what)])
    writer.writerow(["total", "", ""] + [_plain(getattr(x, f)) for f in fields for x in (comp.before.total, comp.after.total)]
                    + [""])
    return buf.getvalue()


def comparison_html(comp: Comparison, plots: bool = True) -> str:
    return html_page(f"{comp.before.model}: before / after", comparison_html_body(comp, plots))


def comparison_html_body(comp: Comparison, plots: bool = True, level: int = 1) -> list[str]:
    """The body of ``comparison_html``, its headings starting at ``<h{level}>`` (to nest in a page)."""
    body = [f"<h1>{html.escape(comp.before.model)}: before / after</h1>", "<ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in _cmp_summary(comp)]
    body += [f'<li class="note">energy table: {html.escape(comp.before.energy_table.citation)}</li>', "</ul>"]
    if plots and _numeric(comp.before) and _numeric(comp.after):
        from fxslim.cost_model.plots import plot_comparison

        body += ["<h2>Per layer</h2>", _img(plot_comparison(comp, "macs")), _img(plot_comparison(comp, "energy_pj"))]
    total = _cmp_cells("total", "", "", comp.before.total, comp.after.total)
    body += ["<h2>Per module</h2>", html_table(_CMP_COLUMNS, _cmp_rows(comp), 3, total)]
    if comp.candidates:
        body += ["<h2>What the passes did</h2>", html_table(_CANDIDATE_COLUMNS, _candidate_rows(comp), 5)]
    if level == 1:
        return body
    shift = {f"h{i}>": f"h{min(i + level - 1, 6)}>" for i in (1, 2)}
    return [re.sub(r"h[12]>", lambda m: shift[m.group(0)], line) for line in body]
