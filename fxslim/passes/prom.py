"""PROM prepare: fake quantization for quantization-aware training (docs/methods/PROM.md).

Matches every ``call_module`` conv and linear and every residual add (two float tensors of one
shape) in a symbolic-traced graph (module IR). Emits: a ``QConv2d``/``QLinear`` at the layer's own
name wrapping the original module, with ternary weights (TWN or absmean) for 1×1 groups-1 unpadded
convs and 8-bit symmetric weights for every other conv and every linear; one ``ActFakeQuant``
(uint8, EMA observer) per tensor producer: whatever feeds a conv/linear (the model input, the
pooled tensor), every conv(+BN+ReLU/ReLU6) output and every add output. BN stays a float module.

``fxslim.optimize(model, x, passes=["prom"])`` returns this prepared QAT model (as does
``fxslim.prepare``, in ``fxslim.api``: a pass never calls back into the API); turning it into integer ops is the separate, explicit ``convert`` step
(``fxslim.passes.prom_convert``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxslim.capture import is_input_guard
from fxslim.config import check_choice, check_range
from fxslim.export_parts import call_with
from fxslim.ir import ConvView, LinearView, META_PASS, meta_val, node_fqn, set_submodule, views
from fxslim.passes.base import Candidate, Pass, PassContext, PassReport, register_pass, replace_fields
from fxslim.passes.matchers import hooked
from fxslim.passes.prom_graph import float_tensor, is_activation, is_quant, is_residual_add, is_shape_op, layer_of, module_of
from fxslim.runtime.prom_qat import (
    TERNARY_METHODS, WEIGHT_QUANTS, ActFakeQuant, QConv2d, QLinear, int8_weight_codes, int8_weight_fake_quant,
    ternary_codes, ternary_fake_quant,
)

__all__ = ["PROM", "PerTensorQConv2d", "PerTensorQLinear", "calibrate"]

_QUANT_PREFIX = "prom_quant"


def _producer(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Where a tensor is made: walk back through value-preserving ops (flatten, dropout, ...)."""
    while is_shape_op(gm, node):
        node = node.args[0]
    return node


def _chain_end(gm: fx.GraphModule, node: fx.Node, with_bn: bool) -> fx.Node:
    """The last node of ``node → [BN] → [ReLU|ReLU6]`` when each step is the only user."""
    if with_bn and len(node.users) == 1 and isinstance(layer_of(gm, next(iter(node.users))), nn.BatchNorm2d):
        node = next(iter(node.users))
    if len(node.users) == 1 and is_activation(gm, next(iter(node.users))):
        node = next(iter(node.users))
    return node


class _PerTensorMixin:
    """One weight scale per tensor instead of per output channel (``PROM.per_channel=False``)."""

    def _weight(self) -> Tensor:
        return self.conv.weight if isinstance(self, QConv2d) else self.linear.weight

    def quantized_weight(self) -> Tensor:
        w = self._weight()
        if getattr(self, "weight_quant", "int8") == "ternary":
            return ternary_fake_quant(w.reshape(1, -1), self.ternary_method).reshape(w.shape)
        return int8_weight_fake_quant(w.reshape(1, -1)).reshape(w.shape)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        w = self._weight()
        if getattr(self, "weight_quant", "int8") == "ternary":
            codes, scale = ternary_codes(w.reshape(1, -1), self.ternary_method)
        else:
            codes, scale = int8_weight_codes(w.reshape(1, -1))
        return codes.reshape(w.shape), scale.expand(w.shape[0]).clone()


class PerTensorQConv2d(_PerTensorMixin, QConv2d):
    """``QConv2d`` with one weight scale (ternary α or int8 step) for the whole tensor."""


class PerTensorQLinear(_PerTensorMixin, QLinear):
    """``QLinear`` with one int8 weight step for the whole tensor."""


_OTHER_PASS_CONVS = (torch.ops.fxslim.haste_conv2d.default, torch.ops.fxslim.haste_conv2d)


@register_pass("prom")
@dataclass(frozen=True)
class PROM(Pass):
    """Fake-quantize a CNN for PROM QAT.

    ``ternary``: the ternary rule, "twn" (Δ = 0.7·mean|W_c|) or "absmean". ``pointwise``: weights
    of the matched 1×1 groups-1 convs ("ternary"; "int8" keeps one at 8 bit via an override).
    ``last_pointwise``: the last such conv in graph order (MobileNetV2's 320→1280) "ternary" or
    "int8". ``per_channel``: weight scales per output channel (False: one per tensor).
    ``momentum``: EMA momentum of the activation observers.
    """

    ternary: Literal["twn", "absmean"] = "twn"
    pointwise: Literal["ternary", "int8"] = "ternary"
    last_pointwise: Literal["ternary", "int8"] = "ternary"
    per_channel: bool = True
    momentum: float = 0.9

    kinds: ClassVar[tuple[str, ...]] = ("pointwise_conv", "depthwise_conv", "grouped_conv", "conv", "linear", "residual_add")

    def validate(self) -> None:
        check_choice(self, "ternary", TERNARY_METHODS)
        check_choice(self, "pointwise", WEIGHT_QUANTS)
        check_choice(self, "last_pointwise", WEIGHT_QUANTS)
        check_choice(self, "per_channel", (True, False))
        check_range(self, "momentum", 0.0, 1.0, high_open=True)

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if ctx.ir != "module":
            raise ValueError(f"PROM: expected a symbolic-traced graph (IR 'module', call_module convs), got IR {ctx.ir!r}")

    def match(self, gm: fx.GraphModule, ctx: PassContext, report: PassReport) -> list[Candidate]:
        """1. skip layers already wrapped; 2. find the last ternary-shaped conv (``last_pointwise``);
        3. every conv/linear view: reject, or resolve its config; 4. residual adds."""
        calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        for node in gm.graph.nodes:
            if isinstance(module_of(gm, node), (QConv2d, QLinear)):
                report.skip(node, node_fqn(node, gm), "quantized_layer", "already_rewritten")
            elif node.op == "call_function" and node.target in _OTHER_PASS_CONVS:
                report.skip(node, node_fqn(node, gm), "conv", "other_pass",
                            f"{node.target} (another pass's conv) stays in float: PROM quantizes dense convs, "
                            "so run PROM before it or alone")
        layers: list[Candidate] = []
        weighted = [v for v in views(gm) if isinstance(v, (ConvView, LinearView))]
        last = next((v.node for v in reversed(weighted) if _ternary_shaped(gm, v) and not _reject(gm, v, calls)), None)
        for view in weighted:
            kind = view.conv_kind if isinstance(view, ConvView) else "linear"
            reason = _reject(gm, view, calls)
            if reason == "not_a_module" and ctx.path and view.fqn == ctx.path:
                reason = "traced_alone"  # a layer whose caller's forward did not trace: the part is the layer
            if reason:
                report.skip(view.node, view.fqn, kind, reason)
                continue
            cfg = self.resolve(ctx, view.node, view.fqn, kind, report)
            if cfg is not None and view.node is last and self.last_pointwise == "int8":
                cfg = replace_fields(cfg, pointwise="int8")
            if cfg is not None:
                layers.append(Candidate(view.node, view, view.fqn, kind, cfg))
        adds = []
        for node in gm.graph.nodes:
            if not is_residual_add(node) or any(float_tensor(a) is None for a in node.args):
                continue
            fqn = node_fqn(node, gm)
            end = _chain_end(gm, node, with_bn=False)
            if len(end.users) == 1 and is_quant(gm, next(iter(end.users))):
                report.skip(node, fqn, "residual_add", "already_rewritten")
            elif float_tensor(node.args[0]).shape != float_tensor(node.args[1]).shape:
                report.skip(node, fqn, "residual_add", "broadcast")
            else:
                cfg = self.resolve(ctx, node, fqn, "residual_add", report)
                if cfg is not None:
                    adds.append(Candidate(node, None, fqn, "residual_add", cfg))
        return layers + adds

    def rewrite(self, gm: fx.GraphModule, cand: Candidate, ctx: PassContext) -> dict[str, Any]:
        cfg: PROM = cand.config  # type: ignore[assignment]
        node = cand.anchor
        if cand.kind == "residual_add":
            # a + b  →  q(q(a) + q(b)): both operands and the sum on uint8 grids
            for arg in node.args:
                _maybe_quantize(gm, _producer(gm, arg), cfg.momentum)
            _maybe_quantize(gm, _chain_end(gm, node, with_bn=False), cfg.momentum)
            return {"activations": "uint8"}
        # conv(x) → BN → act  →  q(act(BN(Qconv(q(x))))): fake-quantized weights, input and output
        module = gm.get_submodule(str(node.target))
        weights = "ternary" if _ternary_shaped(gm, cand.view) and cfg.pointwise == "ternary" else "int8"
        if isinstance(module, nn.Conv2d):
            cls = QConv2d if cfg.per_channel else PerTensorQConv2d
            wrapped: nn.Module = cls(module, weights, ternary_method=cfg.ternary)
        else:
            wrapped = (QLinear if cfg.per_channel else PerTensorQLinear)(module)
        set_submodule(gm, str(node.target), wrapped.train(module.training))  # as the layer was, not train
        _redirect_attributes(gm, str(node.target), "conv" if isinstance(module, nn.Conv2d) else "linear")
        node.meta[META_PASS] = self.name
        _maybe_quantize(gm, _producer(gm, cand.view.input), cfg.momentum)
        _maybe_quantize(gm, _chain_end(gm, node, with_bn=isinstance(module, nn.Conv2d)), cfg.momentum)
        return {"weights": weights}


def _redirect_attributes(gm: fx.GraphModule, path: str, inner: str) -> None:
    """get_attr nodes reading the wrapped layer's parameters (``conv.weight.device`` in timm's
    EdgeNeXt) read them inside the wrapper (``path.inner.weight``): the same float tensors."""
    prefix = path + "."
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(prefix):
            node.target = f"{path}.{inner}.{str(node.target)[len(prefix):]}"


def _ternary_shaped(gm: fx.GraphModule, view: ConvView | LinearView) -> bool:
    """1×1, groups 1, no padding: what ``fxslim::ternary_conv2d`` computes."""
    return isinstance(view, ConvView) and view.is_pointwise and view.padding == (0, 0)


def _reject(gm: fx.GraphModule, view: ConvView | LinearView, calls: Counter) -> str:
    """Why a conv/linear cannot be wrapped ("" when it can)."""
    if view.node.op != "call_module":
        return "not_a_module"
    if calls[str(view.node.target)] > 1:
        return "shared_module"
    hooks = hooked(view, gm)  # the wrapper reads the weight itself: a pruning or spectral_norm hook would not run
    if hooks:
        return hooks
    if isinstance(view, LinearView):
        return ""
    if view.transposed:
        return "transposed"
    module = gm.get_submodule(str(view.node.target))
    if module.padding_mode != "zeros":
        return "padding_mode"
    if view.pads_asymmetrically:
        return "asymmetric_padding"
    return ""


def _has_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _maybe_quantize(gm: fx.GraphModule, node: fx.Node, momentum: float) -> fx.Node:
    """The ActFakeQuant of ``node``'s tensor: the existing one, or a new one all users then read."""
    if is_quant(gm, node):
        return node
    users = list(node.users)
    if len(users) == 1 and is_quant(gm, users[0]):
        return users[0]
    base = f"{_QUANT_PREFIX}.{node.name}"
    name, i = base, 1
    while _has_submodule(gm, name) or hasattr(nn.Module, name.rpartition(".")[2]):  # e.g. a node named "to"
        i += 1
        name = f"{base}_{i}"
    # in the graph's mode: a new module is in train mode, where an observer of an eval model would
    # move its range at every inference call
    gm.add_submodule(name, ActFakeQuant(momentum).train(gm.training))
    guards = [user for user in node.users if is_input_guard(user)]  # they check the input itself, first
    with gm.graph.inserting_after(guards[-1] if guards else node):
        quant = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(quant, delete_user_cb=lambda user: user is not quant and user not in guards)
    quant.meta["val"] = meta_val(node)
    return quant


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Observe activation ranges on ``batches`` (tensors or argument tuples) with everything else
    in eval mode (BN running statistics, no dropout), so the ranges fit the model convert folds.
    Every module's train/eval flag is put back afterwards, also when a batch fails. Refuses a model
    without observers (not from ``fxslim.prepare``) and one whose observers are frozen
    (``freeze_observers``): they would not observe."""
    if isinstance(batches, Tensor):
        raise ValueError("batches: expected an iterable of batches, e.g. [x] or a DataLoader, got a tensor (iterating "
                         "it would feed one sample at a time); pass [x] for one batch")
    observers = {name: m for name, m in model.named_modules() if isinstance(m, ActFakeQuant)}
    if not observers:
        raise ValueError(f"calibrate: {type(model).__name__} has no ActFakeQuant observers; calibrate the model "
                         "fxslim.prepare(model, example) returned")
    frozen = [name for name, m in observers.items() if not bool(m.observer_enabled)]
    if frozen:
        raise ValueError(f"calibrate: {len(frozen)} of {len(observers)} observers are frozen (freeze_observers), e.g. "
                         f"{frozen[0]!r}, and would not observe these batches; call "
                         "fxslim.runtime.prom_qat.unfreeze_observers(model) first, or convert without calibrating "
                         "to keep their ranges")
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in observers.values():
            m.train()
        for batch in batches:
            call_with(model, batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for m, training in modes:
            m.training = training
    return model
