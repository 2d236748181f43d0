"""Shared matchers: every conv, pointwise convs, linears and attention (global or local).

Each matcher returns one ``Match`` per node of its family, with an empty ``reason`` when the node
qualifies and a short stable reason string when it does not, so callers can report every skip.
They work on any IR because they read canonical views (``fxslim.ir``), never node targets.

Global attention: the attention's own batch (q's leading dims without heads) equals the model's
batch, so one sequence spans the whole input (all patches, all frames). Windowed attention (Swin,
MaxViT) and per-frame attention fold windows/frames into the batch and are local. Linear attention
has no softmax over a token-by-token score matrix and is not attention to these matchers at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch.fx as fx

from fxslim.ir import AttentionView, ConvView, LinearView, View, same_size, views

__all__ = [
    "Match", "attention_scope", "hooked", "match_convs", "match_pointwise_convs",
    "match_linears", "match_attention", "match_all",
]


@dataclass(frozen=True)
class Match:
    """A node of a matcher's family: ``reason`` is "" when it qualifies, else why not."""

    view: View
    kind: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def hooked(view: View, gm: fx.GraphModule) -> str:
    """Why a rewrite may not replace the module this node calls ("" when it may):

    - 'module_hooks': forward (pre-)hooks would stop running (spectral_norm and pruning set the
      weight in one);
    - 'custom_forward': the module's class overrides the forward of the torch.nn layer it derives
      from (timm's Conv2dSame pads by the input size, StdConv2d standardises its weight), so its
      attributes do not say what it computes. Such a module is a node only when it is a leaf (it
      did not trace, or the caller named it); traced through, its own ops are matched instead.
      A forward set on the instance (``conv.forward = wrapped``) counts as well.
    """
    node = view.node
    if node is None or node.op != "call_module":
        return ""
    module = gm.get_submodule(str(node.target))
    if module._forward_hooks or module._forward_pre_hooks:
        return "module_hooks"
    return "custom_forward" if custom_forward(module) else ""


def custom_forward(module: nn.Module) -> bool:
    """Whether ``module`` may compute something else than the torch.nn layer it derives from: its
    class replaces that layer's forward (or a conv's ``_conv_forward``), or the instance has its own
    ``forward``. timm's BatchNormAct2d is a BatchNorm2d that applies its activation too."""
    return "forward" in vars(module) or _overrides_forward(type(module))


def _overrides_forward(cls: type) -> bool:
    """True when ``cls`` replaces ``forward`` (or a conv's ``_conv_forward``) of its nearest
    torch.nn base class."""
    base = next((c for c in cls.__mro__ if c.__module__.startswith("torch.nn.")), None)
    if base is None or base is cls:
        return False
    return any(getattr(cls, name, None) is not getattr(base, name, None) for name in ("forward", "_conv_forward"))


def attention_scope(view: AttentionView, batch_size: Any) -> Literal["global", "local", "unknown"]:
    """'global' when one attention sequence spans the model's whole input, 'local' otherwise."""
    if view.form == "wrapped" and view.windows not in (None, 1):
        return "local"
    same = same_size(view.batch, batch_size)
    if same is None:
        return "unknown"
    return "global" if same else "local"


def _convs(gm: fx.GraphModule, found: Sequence[View] | None = None) -> Iterator[ConvView]:
    return (v for v in (views(gm) if found is None else found) if isinstance(v, ConvView))


def match_convs(gm: fx.GraphModule, found: Sequence[View] | None = None) -> list[Match]:
    """Every 2-D conv; qualifies when groups == 1 and not transposed (pointwise included).
    ``found``: the graph's views when the caller already has them (one scan of the graph)."""
    out = []
    for view in _convs(gm, found):
        kind = view.conv_kind
        reason = {"transposed_conv": "transposed", "depthwise_conv": "grouped", "grouped_conv": "grouped"}.get(kind, "")
        out.append(Match(view, kind, reason or hooked(view, gm)))
    return out


def match_pointwise_convs(gm: fx.GraphModule) -> list[Match]:
    """Every 2-D conv; qualifies when 1×1 with groups == 1 (any stride)."""
    out = []
    for view in _convs(gm):
        kind = view.conv_kind
        if kind == "pointwise_conv":
            reason = ""
        elif kind in ("depthwise_conv", "grouped_conv"):
            reason = "grouped"
        elif kind == "transposed_conv":
            reason = "transposed"
        else:
            reason = "kernel_not_1x1"
        out.append(Match(view, kind, reason or hooked(view, gm)))
    return out


def match_linears(gm: fx.GraphModule) -> list[Match]:
    """Every linear layer (all qualify)."""
    return [Match(v, "linear", hooked(v, gm)) for v in views(gm) if isinstance(v, LinearView)]


def match_attention(gm: fx.GraphModule, batch_size: Any, scope: Literal["global", "any"] = "global") -> list[Match]:
    """Every softmax attention; with ``scope='global'`` local ones get reason 'local_attention'."""
    out = []
    for view in views(gm):
        if not isinstance(view, AttentionView):
            continue
        where = attention_scope(view, batch_size)
        reason = ""
        if scope == "global" and where != "global":
            reason = "local_attention" if where == "local" else "unknown_batch"
        out.append(Match(view, f"{where}_attention", reason or hooked(view, gm)))
    return out


def match_all(gm: fx.GraphModule, batch_size: Any) -> list[Match]:
    """One Match per conv, linear and attention node, in graph order (for ``fxslim inspect``)."""
    out = []
    for view in views(gm):
        if isinstance(view, ConvView):
            out.append(Match(view, view.conv_kind))
        elif isinstance(view, LinearView):
            out.append(Match(view, "linear"))
        else:
            out.append(Match(view, f"{attention_scope(view, batch_size)}_attention"))
    return out
