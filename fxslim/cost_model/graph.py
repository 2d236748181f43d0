"""Graph analyses of a costed model: a networkx view and peak activation memory by liveness.

Peak activation memory walks each graph in execution order. A tensor is allocated when its node
runs and freed after its last user ran (graph outputs live to the end); a node whose output aliases
an input (views, in-place ops, getitem of a tuple) allocates nothing and extends its source's life.
Parameters and buffers are not activations. Tensor sizes are those of the cost rows (so "as
deployed" formats apply), else numel × dtype size. Graphs of a partly traced model run one after
another, so the model's peak is the largest graph peak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from fxslim.capture import Captured
from fxslim.ir import META_PLACEHOLDER_FQNS, meta_val

if TYPE_CHECKING:
    import networkx as nx

    from fxslim.cost_model.report import CostReport, CostRow

__all__ = ["to_networkx", "peak_activation_bytes", "graph_peak_bytes"]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _storage_id(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _is_weight(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    gm = node.graph.owning_module
    return node.op == "placeholder" and gm is not None and node.name in gm.meta.get(META_PLACEHOLDER_FQNS, {})


def graph_peak_bytes(gm: fx.GraphModule, sizes: dict[str, Any] | None = None) -> Any:
    """Peak bytes of live activations over ``gm``'s execution order (``sizes``: node name -> bytes)."""
    sizes = sizes or {}
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    root: dict[fx.Node, fx.Node] = {}
    storage_owner: dict[int, fx.Node] = {}
    weight_storage: set[int] = set()
    size: dict[fx.Node, Any] = {}
    for n in nodes:
        if n.op == "output":
            continue
        tensors = _tensors(meta_val(n))
        ids = [_storage_id(t) for t in tensors]
        if _is_weight(n):
            weight_storage.update(i for i in ids if i is not None)
            continue
        if not tensors or all(i in weight_storage for i in ids):
            continue  # not a tensor, or a view of a weight
        owners = {storage_owner[i] for i in ids if i is not None and i in storage_owner}
        if owners and all(i in storage_owner for i in ids if i is not None):
            root[n] = min(owners, key=index.__getitem__)  # an alias: no new memory
            continue
        root[n] = n
        for i in ids:
            if i is not None:
                storage_owner.setdefault(i, n)
        size[n] = sizes.get(n.name, sum(t.numel() * t.element_size() for t in tensors))
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        if n not in root:
            continue
        end = max((index[u] for u in n.users), default=index[n])
        r = root[n]
        last_use[r] = max(last_use.get(r, index[r]), end)
    frees: dict[int, list[fx.Node]] = {}
    for r, end in last_use.items():
        frees.setdefault(end, []).append(r)
    live: Any = 0
    peak: Any = 0
    for i, n in enumerate(nodes):
        if root.get(n) is n:
            live = live + size[n]
            peak = live if _greater(live, peak) else peak
        for r in frees.get(i, ()):
            live = live - size[r]
    return peak


def _greater(a: Any, b: Any) -> bool:
    return bool(a > b)


def peak_activation_bytes(captured: Captured, rows: list[CostRow]) -> Any:
    """The largest per-graph peak (see the module docstring)."""
    peaks = []
    for graph in captured.graphs:
        sizes = {r.node: r.activation_bytes for r in rows if r.graph == graph.path}
        peaks.append(graph_peak_bytes(graph.gm, sizes))
    return max(peaks, default=0)


def to_networkx(report: CostReport) -> nx.DiGraph:
    """A DiGraph with one vertex per graph node ("graph/node" ids, attributes from its cost row)
    and an edge from each node to each of its users."""
    import networkx as nx

    g = nx.DiGraph()
    captured = report.captured
    if captured is None:
        raise ValueError("to_networkx: the report carries no captured graphs")
    rows = {(r.graph, r.node): r for r in report.rows}
    for graph in captured.graphs:
        def vid(node: fx.Node, _path: str = graph.path) -> str:
            return f"{_path}/{node.name}" if _path else node.name

        for order, node in enumerate(graph.gm.graph.nodes):
            row = rows.get((graph.path, node.name))
            attrs: dict[str, Any] = {"op": node.op, "target": str(node.target), "order": order, "graph": graph.path}
            if row is not None:
                attrs.update(kind=row.kind, fqn=row.fqn, macs=row.macs, energy_pj=row.energy_pj,
                             activation_bytes=row.activation_bytes)
            g.add_node(vid(node), **attrs)
            for arg in node.all_input_nodes:
                g.add_edge(vid(arg), vid(node))
    return g
