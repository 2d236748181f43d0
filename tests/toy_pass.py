"""A minimal pass for testing the pass infrastructure on every IR.

It rewrites each pointwise conv into ``torch.conv2d(x, w, b, ...)`` scaled by ``scale`` (so a
rewrite is visible in the outputs), skipping what the pointwise matcher rejects and what it has
already rewritten (``meta['fxslim_pass']``), which makes a second run a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxslim.config import check_range
from fxslim.passes.base import Candidate, Pass, PassContext, PassReport, register_pass
from fxslim.passes.matchers import match_pointwise_convs
from fxslim.propagate import propagate_node


@register_pass("toy")
@dataclass(frozen=True)
class ToyScalePointwise(Pass):
    scale: float = 1.0
    label: str = "x"

    def validate(self) -> None:
        check_range(self, "scale", 0.0, 10.0, low_open=True)

    def match(self, gm: fx.GraphModule, ctx: PassContext, report: PassReport) -> list[Candidate]:
        out = []
        for m in match_pointwise_convs(gm):
            node = m.view.node
            if node.meta.get("fxslim_pass") == self.name:
                report.skip(node, m.view.fqn, m.kind, "already_rewritten")
            elif not m.ok:
                report.skip(node, m.view.fqn, m.kind, m.reason)
            else:
                cfg = self.resolve(ctx, node, m.view.fqn, m.kind, report)
                if cfg is not None:
                    out.append(Candidate(node, m.view, m.view.fqn, m.kind, cfg))
        return out

    def rewrite(self, gm: fx.GraphModule, cand: Candidate, ctx: PassContext) -> dict:
        v = cand.view
        with gm.graph.inserting_before(cand.anchor):
            w = v.weight.as_node(gm)
            b = v.bias.as_node(gm) if v.bias is not None else None
            conv = gm.graph.call_function(torch.conv2d, (v.input, w, b, v.stride, v.padding, v.dilation, 1))
            conv.meta["fxslim_pass"] = self.name
            propagate_node(gm, conv)
            scaled = gm.graph.call_function(torch.mul, (conv, cand.config.scale))
            propagate_node(gm, scaled)
        cand.anchor.replace_all_uses_with(scaled)
        gm.graph.erase_node(cand.anchor)
        return {"scale": cand.config.scale}
