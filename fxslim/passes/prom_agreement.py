"""PROM convert's yardstick: the uint8 codes of a converted model against its fake-quant model's,
per quantizer (docs/methods/PROM.md: within 1 LSB; float islands and lookup tables: equal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from fxslim.capture import compiled_original
from fxslim.export_parts import call_with
from fxslim.ir import META_PROM_QUANT
from fxslim.runtime.prom_qat import ActFakeQuant

__all__ = ["Agreement", "code_agreement"]



@dataclass(frozen=True)
class Agreement:
    """Per quantizer (ActFakeQuant name): (elements, elements within 1 LSB, elements equal)."""

    layers: dict[str, tuple[int, int, int]]

    @property
    def within_one(self) -> float:
        return sum(v[1] for v in self.layers.values()) / sum(v[0] for v in self.layers.values())

    @property
    def exact(self) -> float:
        return sum(v[2] for v in self.layers.values()) / sum(v[0] for v in self.layers.values())

    def worst(self) -> tuple[str, float]:
        """The quantizer with the smallest share of codes within 1 LSB, and that share."""
        shares = {name: v[1] / v[0] for name, v in self.layers.items() if v[0]}
        name = min(shares, key=shares.__getitem__)
        return name, shares[name]


@torch.no_grad()
def code_agreement(qat_model: nn.Module, int_model: nn.Module, *inputs: Any,
                   mode: Literal["local", "end_to_end"] = "local") -> Agreement:
    """Compare the uint8 codes of every converted op with the fake-quant model's codes (eval mode).

    ``local``: each integer op reads the fake-quant model's codes of its inputs, so a difference is
    that op's own rounding; ``end_to_end``: the integer model runs on its own, so 1-LSB differences
    propagate and can grow from layer to layer. Models converted in parts are compared part by
    part (quantizer names include the part's path).
    """
    qat_model = compiled_original(qat_model)  # its quantizers' names, not ``_orig_mod.``'s
    fake: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: fake.__setitem__(n, torch.round(o / m.scale) + m.zero_point))
             for n, m in qat_model.named_modules() if isinstance(m, ActFakeQuant)]
    modes = [(m, m.training) for m in qat_model.modules()]  # each module's own: a frozen BN stays in eval mode
    try:
        call_with(qat_model.eval(), inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    ours: dict[str, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def __init__(self, part: fx.GraphModule, prefix: str) -> None:
            super().__init__(part)
            self.prefix = prefix

        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            name = node.meta.get(META_PROM_QUANT)
            if name is not None:
                name = self.prefix + name
                ours[name] = out
                if mode == "local":
                    out = torch.empty_like(out).copy_(fake[name].view(out.shape))
            return out

    parts = {path: m for path, m in int_model.named_modules()
             if isinstance(m, fx.GraphModule) and any(META_PROM_QUANT in n.meta for n in m.graph.nodes)}
    if list(parts) == [""]:
        _Recorder(int_model, "").run(*inputs)
    else:  # a model converted in parts: each part records while the model runs
        for path, part in parts.items():
            prefix = f"{path}." if path else ""  # the root is a part too when parts sit inside its leaves
            part.forward = lambda *args, part=part, prefix=prefix: _Recorder(part, prefix).run(*args)
        try:
            call_with(int_model, inputs)
        finally:
            for part in parts.values():
                del part.forward  # the instance attribute: the class's forward again
    layers = {}
    for name, codes in ours.items():
        diff = (codes.to(torch.float32) - fake[name].view(codes.shape)).abs()
        layers[name] = (diff.numel(), int((diff <= 1).sum()), int((diff == 0).sum()))
    return Agreement(layers)
