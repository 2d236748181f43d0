"""What each matcher finds in a model: the data behind ``fxslim inspect``.

One row per conv, linear and attention node with its kind, shape, and, for each matcher family
(pointwise conv, groups-1 conv, global attention), whether the node qualifies or why not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fxslim.capture import Captured, Graph
from fxslim.ir import AttentionView, ConvView, LinearView
from fxslim.passes.matchers import match_all, match_attention, match_convs, match_pointwise_convs

__all__ = ["InspectRow", "inspect_graphs", "summarize"]


@dataclass(frozen=True)
class InspectRow:
    graph: str
    node: str
    fqn: str
    kind: str
    shape: str
    matched: tuple[str, ...]
    skipped: tuple[str, ...]


def _shape(view: object) -> str:
    if isinstance(view, (ConvView, LinearView)):
        shape = view.output_shape
        return "x".join(map(str, shape)) if shape is not None else "?"
    assert isinstance(view, AttentionView)
    return f"B={view.batch} H={view.heads} Lq={view.q_len} Lk={view.kv_len} d={view.head_dim}"


def _rows(graph: Graph, batch_size: object) -> list[InspectRow]:
    families = {
        "pointwise": {m.view.node: m for m in match_pointwise_convs(graph.gm)},
        "conv": {m.view.node: m for m in match_convs(graph.gm)},
        "global_attention": {m.view.node: m for m in match_attention(graph.gm, batch_size)},
    }
    rows = []
    for m in match_all(graph.gm, batch_size):
        matched, skipped = [], []
        for family, found in families.items():
            hit = found.get(m.view.node)
            if hit is None:
                continue
            (matched if hit.ok else skipped).append(family if hit.ok else f"{family}: {hit.reason}")
        rows.append(InspectRow(graph.path, m.view.node.name, m.view.fqn, m.kind, _shape(m.view),
                               tuple(matched), tuple(skipped)))
    return rows


def inspect_graphs(captured: Captured) -> list[InspectRow]:
    """Rows for every graph of a captured model, in graph order."""
    return [row for graph in captured.graphs for row in _rows(graph, captured.batch_size)]


def summarize(rows: list[InspectRow]) -> dict[str, int]:
    """Counts: convs, pointwise, depthwise, linear, attention, global attention."""
    kinds = Counter(r.kind for r in rows)
    convs = sum(v for k, v in kinds.items() if k.endswith("conv"))
    attention = sum(v for k, v in kinds.items() if k.endswith("attention"))
    return {
        "convs": convs,
        "pointwise_convs": kinds["pointwise_conv"],
        "depthwise_convs": kinds["depthwise_conv"],
        "linears": kinds["linear"],
        "attention": attention,
        "global_attention": kinds["global_attention"],
    }



