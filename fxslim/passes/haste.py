"""HASTE pass: 2-D convs (groups 1) -> ``fxslim::haste_conv2d`` (data-free LSH channel merging per tile).

Matches every 2-D conv in any IR (symbolic trace, dynamo, export) through the shared conv matcher and
skips grouped and transposed convs, the stem (a conv that reads the model input without a conv in
between) unless ``skip_stem=False``, 1×1 convs when ``include_pointwise=False``, padding modes other
than zeros and asymmetric 'same' padding. Emits the op with the layer's ternary hyperplanes as a
persistent buffer (drawn with ``seed`` + the layer's index among the graph's convs) read by a get_attr.
Weights keep their shape, values and memory layout, so user code that views them (``w.view(-1)``)
and serialisers that need contiguous tensors (safetensors) work on the rewritten model as before.
Needs node shapes (``fxslim.capture`` provides them). In a graph that holds only part of a model (after
a dynamo graph break, a submodule traced on its own) the graph's inputs count as the model input.
Method and defaults: docs/methods/HASTE.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from fxslim.config import check_choice, check_int, check_range
from fxslim.ir import ConvView, META_PLACEHOLDER_FQNS, attribute, meta_val, node_fqn, size_hint, view_of, views
from fxslim.passes.base import Candidate, Pass, PassContext, PassReport, register_pass
from fxslim.passes.matchers import match_convs
from fxslim.propagate import propagate_node
from fxslim.runtime.haste import MAX_PLANES, make_planes, patch_shape
from fxslim.runtime.haste_counts import HasteLayer

__all__ = ["HASTE"]

_OP = torch.ops.fxslim.haste_conv2d.default
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_TILE = 64  # output tiles beyond 64x64 only cost memory: the planes have one entry per patch pixel
MAX_SEED = 2**32 - 1  # plane seeds are seed + layer index, drawn by torch.Generator
_DETAILS = {
    "not_reached": "not reached by the example inputs (no shapes): call the model with inputs that reach it",
    "one_pixel_output": ("a 1x1 output map (a conv after global pooling): merging the filters costs what "
                         "merging the channels saves, so it never saves, and a 1x1 conv's 1-pixel patch hashes "
                         "every channel into one of two buckets (above or below the channel mean) whatever L"),
}


@dataclass(frozen=True)
class _HasteCandidate(Candidate):
    layer: str = ""  # the record_buckets key
    index: int = 0  # seed offset: the layer's position among the graph's convs


@register_pass("haste")
@dataclass(frozen=True)
class HASTE(Pass):
    """Hash every eligible conv's input channels per sample and output tile; merge equal codes.

    ``L`` hyperplanes per hash (more: more buckets, more accuracy, less saving); ``sparsity``: share
    of zero plane entries; ``tile``: output tile side T; ``seed``: planes of the i-th conv of a
    graph come from ``seed + i``; ``center``: subtract the channel mean before hashing (without it
    post-ReLU channels collide and accuracy collapses). With large L and ``sparsity=0`` every bucket
    holds one channel, and outputs equal the dense conv's up to float rounding, while a tile's patch
    tells the channels apart: ±1 planes cut a patch of few pixels into few cells whatever L (a 2×2
    map: about 100 codes for 512 channels), and a sign hash cannot tell channels whose centred
    patches point the same way, such as channels constant over a flat region (letterbox bars,
    blank or saturated areas, an all-zero input: two buckets whatever L, 0.065 off the dense conv
    on a half-flat image where random pixels are 3e-7 off), or channels dominated by their own
    offset (a bias or BN shift well above the channel's variation over the patch leaves it near
    ±(1, .., 1) once centred: common after a BN, so whole models with random weights are not exact
    at L = 48 even on random images); there channels still share buckets.
    """

    L: int = 14
    sparsity: float = 2 / 3
    tile: int = 4
    seed: int = 0
    skip_stem: bool = True
    include_pointwise: bool = True
    center: bool = True

    kinds = ("conv", "pointwise_conv")
    aliases = {"l": "L", "s": "sparsity"}

    def validate(self) -> None:
        check_int(self, "L", 1, MAX_PLANES)
        check_range(self, "sparsity", 0.0, 1.0, high_open=True)
        check_int(self, "tile", 1, MAX_TILE)
        check_int(self, "seed", 0, MAX_SEED)
        for name in ("skip_stem", "include_pointwise", "center"):
            check_choice(self, name, (False, True))

    def match(self, gm: fx.GraphModule, ctx: PassContext, report: PassReport) -> list[Candidate]:
        # 1. earlier rewrites are reported, never matched again (the op is no conv view)
        done = [n for n in gm.graph.nodes if _is_haste(n)]
        for node in done:
            report.skip(node, node_fqn(node, gm), _rewritten_kind(gm, node), "already_rewritten")
        # 2. layers in graph order, rewritten ones included: the seed offset of each conv
        found = list(views(gm))
        matches = match_convs(gm, found)
        params = gm.meta.get(META_PLACEHOLDER_FQNS, {})
        convs = {m.view.node: m.view for m in matches}
        layers: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node in convs or _is_haste(node):
                key = _weight_key(node.args[1], node, params) if _is_haste(node) else _view_key(convs[node], params)
                layers.setdefault(key, len(layers))
        weighted = {v.node for v in found} | set(done)
        geometries: dict[str, list[tuple]] = {}  # record key -> the geometries using it, in graph order
        out: list[Candidate] = []
        for m in matches:
            view = m.view
            # 3. structural limits of the op, 4. the user's policy, 5. this config's scope
            reason = m.reason or _unsupported(gm, view)
            cfg = None if reason else self.resolve(ctx, view.node, view.fqn, m.kind, report)
            if reason:
                report.skip(view.node, view.fqn, m.kind, reason, _DETAILS.get(reason, ""))
            elif cfg is not None:
                if cfg.skip_stem and _reads_model_input(view.input, weighted, params, _image_shapes(ctx)):
                    report.skip(view.node, view.fqn, m.kind, "stem")
                elif _one_pixel_output(view):
                    report.skip(view.node, view.fqn, m.kind, "one_pixel_output", _DETAILS["one_pixel_output"])
                elif not cfg.include_pointwise and view.kernel == (1, 1):
                    report.skip(view.node, view.fqn, m.kind, "pointwise_excluded")
                else:
                    key = _view_key(view, params)
                    layer = _record_key(_layer_name(key, view, ctx), view, cfg, geometries)
                    out.append(_HasteCandidate(view.node, view, view.fqn, m.kind, cfg, (view.node,), layer, layers[key]))
        return out

    def rewrite(self, gm: fx.GraphModule, cand: Candidate, ctx: PassContext) -> dict[str, Any]:
        # conv2d(x, W, b, σ, π, δ) -> [N, O, H', W'];  per tile Σ_c x_c ⋆ W_c
        # haste_conv2d(x, W, b, R[L, t_h·t_w], σ, π, δ, T, center, layer) -> same;  per tile Σ_b mean(x_b) ⋆ Σ W_b
        assert isinstance(cand, _HasteCandidate) and isinstance(cand.view, ConvView)
        # the view as the graph is now: an earlier rewrite may have replaced the conv feeding this one
        view = view_of(cand.anchor, gm, cand.view.ir)
        assert isinstance(view, ConvView)
        cfg, graph = cand.config, gm.graph
        th, tw = patch_shape(view.kernel, view.stride, view.dilation, cfg.tile)
        seed = cfg.seed + cand.index
        planes = make_planes(cfg.L, th * tw, cfg.sparsity, seed)
        attr = _register_planes(gm, view, cand.layer, planes)
        with graph.inserting_before(cand.anchor):
            weight = view.weight.as_node(gm)
            bias = view.bias.as_node(gm) if view.bias is not None else None
            planes_node = graph.get_attr(attr)
            args = (view.input, weight, bias, planes_node, list(view.stride), list(view.padding), list(view.dilation),
                    cfg.tile, cfg.center, cand.layer)
            new = graph.call_function(_OP, args)
            _copy_module_meta(gm, cand.anchor, new)
            propagate_node(gm, new)
        cand.anchor.replace_all_uses_with(new)
        graph.erase_node(cand.anchor)
        nnz = int((planes != 0).sum())
        info: dict[str, Any] = {"layer": cand.layer, "L": cfg.L, "sparsity": cfg.sparsity, "tile": cfg.tile,
                                "patch": (th, tw), "d": th * tw, "seed": seed, "nnz": nnz, "center": cfg.center}
        return info | _predictions(view, cfg, HasteLayer(
            view.in_channels, view.out_channels, view.kernel, cfg.L, th * tw, nnz, cfg.center))


# ----------------------------------------------------------------------------------------------
# Matching helpers


def _is_haste(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_OP, torch.ops.fxslim.haste_conv2d)


def _rewritten_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """'pointwise_conv' or 'conv' for a HASTE node, from its weight's kernel size."""
    weight: Any = node.args[1]
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        weight = attribute(gm, weight.target)
    else:
        weight = meta_val(weight)
    return "pointwise_conv" if isinstance(weight, torch.Tensor) and tuple(weight.shape[2:]) == (1, 1) else "conv"


def _unsupported(gm: fx.GraphModule, view: ConvView) -> str:
    """Why the op cannot compute this conv ("" when it can)."""
    if view.node.op == "call_module" and gm.get_submodule(str(view.node.target)).padding_mode != "zeros":
        return "padding_mode"
    if view.pads_asymmetrically:
        return "asymmetric_padding"
    if meta_val(view.input) is None:
        return "not_reached"  # the example inputs never call this conv: its shapes are unknown
    if view.dtype not in _DTYPES:
        return "unsupported_dtype"
    if view.input_shape is None or len(view.input_shape) != 4:
        return "unbatched_input"
    x = meta_val(view.input)
    if isinstance(x, torch.Tensor) and x.device.type not in ("cpu", "meta"):
        return "unsupported_device"  # the op has a CPU kernel only
    return ""


def _one_pixel_output(view: ConvView) -> bool:
    """True when the example gives this conv a 1×1 output map (symbolic sizes: never)."""
    shape = view.output_shape
    return shape is not None and len(shape) == 4 and all(isinstance(s, int) and s == 1 for s in shape[2:])


def _image_shapes(ctx: PassContext) -> set[tuple[int, ...]] | None:
    """The shapes a graph input must have to be the image: those of the model's example inputs for
    a submodule traced apart or a graph dynamo resumes after a graph break (their inputs are mostly
    a block's activations), any shape otherwise. A 4-d input with an example image's channel count
    is one too (``_image_like``)."""
    apart = ctx.path or not ctx.at_input
    return {tuple(int(n) for n in s) for s in ctx.input_shapes} if apart and ctx.input_shapes else None


def _image_like(value: torch.Tensor, image_shapes: set[tuple[int, ...]]) -> bool:
    """[N, C, H, W] with the C of an image among ``image_shapes`` (the example's: dim 1 of a 4-d
    input, or its last dim, at most 4, for [N, H, W, C]): what a backbone traced apart gets when the
    eager code around it resized, cropped, stacked or transposed the model's input, so that the
    shape no longer matches the example's. Not any few-channel input: RAFT's update block reads a
    2-channel flow. A multi-view clip [B, S, C, H, W] folded into the batch is one view's [C, H, W]
    exactly (its 4-d tokens [B, S, P, C] have S where an image has channels)."""
    views = {s[2:] for s in image_shapes if len(s) == 5}
    shape = _hints(value.shape)
    if shape is None or len(shape) != 4:
        return False
    if views and (shape[1:] in views or (shape[3], *shape[1:3]) in views):
        return True
    channels = {s[1] for s in image_shapes if len(s) == 4 and s[1] <= 4} | {
        s[-1] for s in image_shapes if len(s) == 4 and s[-1] <= 4}
    return shape[1] in channels


def _hints(shape: Any) -> tuple[int, ...] | None:
    """A shape's sizes at this call (a dynamo graph's SymInts by their hints; they do not hash), None
    where one has no value yet (unbacked)."""
    try:
        return tuple(size_hint(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _reads_model_input(node: Any, stops: set[fx.Node], params: dict[str, str],
                       image_shapes: set[tuple[int, ...]] | None = None) -> bool:
    """True when ``node`` is computed from a tensor graph input (not a parameter, nor a size or a
    0-d number such as the BN momentum and eps dynamo lifts to inputs with dynamic=True; of one of
    ``image_shapes`` when given) without passing through a conv, linear, attention or HASTE node:
    the conv it feeds sees the image."""
    seen: set[fx.Node] = set()
    stack = [node] if isinstance(node, fx.Node) else []
    while stack:
        n = stack.pop()
        if n in seen or n in stops:
            continue
        seen.add(n)
        value = meta_val(n)
        # the image may come in a dict, list or tuple ({"image": x}): any tensor in the input counts
        if n.op == "placeholder" and n.name not in params and (value is None or any(
                isinstance(v, torch.Tensor) and v.dim() >= 1
                and (image_shapes is None or _hints(v.shape) in image_shapes or _image_like(v, image_shapes))
                for v in tree_leaves(value))):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _weight_key(weight: Any, node: fx.Node, params: dict[str, str]) -> str:
    """Identity of a conv's layer: its weight's name (a conv module called twice is one layer)."""
    if isinstance(weight, fx.Node):
        if weight.op == "get_attr":
            return str(weight.target)
        if weight.op == "placeholder":
            return params.get(weight.name, weight.name)
    return f"<{node.name}>"  # a computed weight: the node itself


def _view_key(view: ConvView, params: dict[str, str]) -> str:
    return view.weight.path if view.weight.path is not None else _weight_key(view.weight.node, view.node, params)


def _layer_name(key: str, view: ConvView, ctx: PassContext) -> str:
    """The record_buckets key: the weight's owner module (``layer1.0.conv1``), with the graph's prefix."""
    if key.startswith("<"):
        return f"{view.fqn}/{view.node.name}" if view.fqn else view.node.name
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    return f"{ctx.path}.{name}" if ctx.path else name


def _record_key(name: str, view: ConvView, cfg: HASTE, geometries: dict[str, list[tuple]]) -> str:
    """``name``, or ``name#i`` for the i-th other geometry of a weight several convs share (TridentNet's
    dilations): a record_buckets entry holds one patch shape, tile and L, and a second one under the
    same key raised "layer key ... was recorded for another conv" when the model ran."""
    geometry = (patch_shape(view.kernel, view.stride, view.dilation, cfg.tile), cfg.tile, cfg.L)
    seen = geometries.setdefault(name, [])
    if geometry not in seen:
        seen.append(geometry)
    i = seen.index(geometry)
    return name if i == 0 else f"{name}#{i}"


def _register_planes(gm: fx.GraphModule, view: ConvView, layer: str, planes: torch.Tensor) -> str:
    """Store ``planes`` as a persistent buffer next to the conv's weight (on the graph module when the
    weight is a dynamo placeholder); a layer called twice keeps one buffer. Returns its path."""
    path = view.weight.path if view.weight.node is None or view.weight.node.op == "get_attr" else None
    owner_path, _, attr = (path or "").rpartition(".")
    owner: nn.Module = gm
    name = "haste_planes__" + re.sub(r"\W", "_", layer)
    if path is not None:
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
            name = "haste_planes" if attr == "weight" else f"haste_planes_{attr}"
        except AttributeError:
            owner = gm
    existing = getattr(owner, name, None)
    if not (isinstance(existing, torch.Tensor) and torch.equal(existing, planes)):
        base, i = name, 1
        while hasattr(owner, name):
            name, i = f"{base}_{i}", i + 1
        owner.register_buffer(name, planes, persistent=True)
    return f"{owner_path}.{name}" if owner is not gm else name


def _copy_module_meta(gm: fx.GraphModule, anchor: fx.Node, new: fx.Node) -> None:
    """The replaced conv's module stack and source line, so reports line up before and after."""
    stack = dict(anchor.meta.get("nn_module_stack", {}))
    if not stack and anchor.op == "call_module":
        stack = {str(anchor.target): (str(anchor.target), type(gm.get_submodule(str(anchor.target))))}
    if stack:
        new.meta["nn_module_stack"] = stack
    if "stack_trace" in anchor.meta:
        new.meta["stack_trace"] = anchor.meta["stack_trace"]


def _predictions(view: ConvView, cfg: HASTE, counts: HasteLayer) -> dict[str, Any]:
    """Data-free predicted MACs and ops at the example input (calibrated and measured counts come from
    ``fxslim.estimate(..., haste_buckets=...)``)."""
    if view.output_shape is None:
        return {}
    n, _, h_out, w_out = (size_hint(s) for s in view.output_shape)
    tiles = n * -(-h_out // cfg.tile) * -(-w_out // cfg.tile)
    c = counts.predicted(tiles, n * h_out * w_out)
    return {"buckets": "independent_codes",
            "dense_macs": round(c.dense), "predicted_macs": round(c.reduced_conv),
            "predicted_overhead": round(c.overhead), "predicted_ops": round(c.ops),
            "predicted_flops": round(2 * c.reduced_conv + c.overhead), "predicted_ops_ratio": c.ops / c.dense if c.dense else None}
