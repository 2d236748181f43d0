"""PROM convert: float islands and the convert report (docs/methods/PROM.md, "Float islands").

An op of a prepared PROM graph with no integer form runs in float in the converted model:
``fxslim::dequantize`` of its uint8 inputs with their observers' grids → the float op (the one the
fake-quant model runs; a QConv2d/QLinear as a float conv/linear with its fake-quantized weights
frozen) → ``fxslim::quantize_per_tensor`` to the grid of the quantizer that closes the chain. The
island computes what the fake-quant model computes, so its output codes equal the fake-quant
codes up to float reordering. ``ConvertReport`` (``int_model.meta[META_PROM_CONVERT]``) names every
island: its float ops, the quantizers it reads and writes, and why it had no integer form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxslim.runtime.prom_qat import QConv2d, QLinear

__all__ = ["Island", "ConvertReport", "float_module", "group_islands", "merge_reports", "format_report"]



@dataclass(frozen=True)
class Island:
    """Connected float ops: ``ops`` (prepared-graph node names), the quantizers it dequantizes
    (``inputs``) and quantizes to (``outputs``, "output" for a float model output), and the reasons
    the chains ending in those quantizers had no integer form."""

    ops: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class ConvertReport:
    """What convert made: ``integer`` maps each quantizer written by an integer op to the kind of
    its chain (input, conv, linear, add, pool, layout, lut, channel_lut, max_pool, cat); ``islands``
    lists the float islands in graph order."""

    integer: dict[str, str]
    islands: tuple[Island, ...]
    parts: tuple[str, ...] = ()  # a model converted in parts: their paths (float code between them)

    @property
    def integer_ops(self) -> int:
        return len(self.integer)

    @property
    def float_ops(self) -> int:
        return sum(len(i.ops) for i in self.islands)


def merge_reports(reports: dict[str, ConvertReport]) -> ConvertReport:
    """The reports of a model's converted parts as one, every name prefixed with its part's path."""
    def named(path: str, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n if n == "output" or not path else f"{path}.{n}" for n in names)

    integer = {f"{path}.{q}" if path else q: kind for path, r in reports.items() for q, kind in r.integer.items()}
    islands = tuple(Island(named(path, i.ops), named(path, i.inputs), named(path, i.outputs), i.reasons)
                    for path, r in reports.items() for i in r.islands)
    return ConvertReport(integer, islands, tuple(reports))


def format_report(report: ConvertReport) -> str:
    """Markdown: one line of totals, then one row per island."""
    parts = f", {len(report.parts)} parts with float code between them" if report.parts else ""
    lines = [f"{report.integer_ops} integer ops, {len(report.islands)} float islands ({report.float_ops} float ops){parts}",
             ""]
    if report.islands:
        lines += ["| float ops | reads | writes | why float |", "|---|---|---|---|"]
        lines += [f"| {', '.join(i.ops)} | {', '.join(i.inputs) or '—'} | {', '.join(i.outputs)} | {'; '.join(i.reasons)} |"
                  for i in report.islands]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def float_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for a float island; QConv2d/QLinear become the float layer with their
    fake-quantized weights frozen (what the fake-quant model computes, without re-quantizing per call)."""
    if isinstance(module, QConv2d):
        layer = copy.deepcopy(module.conv)
        layer.weight.copy_(module.quantized_weight())
    elif isinstance(module, QLinear):
        layer = copy.deepcopy(module.linear)
        layer.weight.copy_(module.quantized_weight())
    else:
        layer = copy.deepcopy(module)
    return layer.eval().requires_grad_(False)


def group_islands(float_ops: list[fx.Node], quant_reasons: dict[fx.Node, str], outputs: list[fx.Node],
                  dequantized: dict[fx.Node, list[fx.Node]]) -> tuple[Island, ...]:
    """Islands as connected components of ``float_ops`` (prepared nodes run in float, graph order).

    ``quant_reasons``: the quantizers closing a float chain, with the reason; ``outputs``: float ops
    whose value is a model output; ``dequantized``: per float op, the quantizers it reads as codes.
    """
    parent = {n: n for n in float_ops}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in float_ops:
        for arg in node.all_input_nodes:
            if arg in parent:
                parent[root(arg)] = root(node)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in float_ops:
        members.setdefault(root(node), []).append(node)
    writes: dict[fx.Node, list[tuple[str, str]]] = {}
    for quant, reason in quant_reasons.items():
        source = next((a for a in quant.all_input_nodes if a in parent), None)
        if source is not None:
            writes.setdefault(root(source), []).append((str(quant.target), reason))
    for node in outputs:
        writes.setdefault(root(node), []).append(("output", "a float model output"))
    islands = []
    for key, nodes in members.items():
        reads = dict.fromkeys(str(q.target) for n in nodes for q in dequantized.get(n, []))
        out = writes.get(key, [])
        islands.append(Island(tuple(n.name for n in nodes), tuple(reads), tuple(dict.fromkeys(o for o, _ in out)),
                              tuple(dict.fromkeys(r for _, r in out))))
    return tuple(islands)
