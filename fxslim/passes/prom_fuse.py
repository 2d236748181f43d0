"""Fuse a oneDNN PROM conv into the residual add it feeds (on a converted, ``runtime="onednn"`` graph).

Matches ``fxslim::qadd(a, b)`` where one input is an ``fxslim::qconv2d`` whose only user is that
add; emits one ``fxslim::qconv2d_add`` (oneDNN sum post-op) with the other input as the skip:

    c = qconv2d(x) on grid (s_c, z_c);  y = qadd(c, skip)  →  y = qconv2d_add(x, skip)

The fused op keeps the conv's grid (``conv_scale``, ``conv_zero_point``) and computes what the pair
computes: the conv's value rounded onto that grid (saturating at its ends, also for inputs beyond
the observed range), then the add. The rewrite changes where that runs (one oneDNN kernel in the
direct runtime, ``prom_direct``), not the values; it needs a conv without a clamp of its own.
``convert(..., fuse_adds=False)`` keeps both ops.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

__all__ = ["fuse_conv_add"]

_log = logging.getLogger(__name__)


def _named_args(node: fx.Node) -> dict[str, object]:
    schema = node.target._schema
    return {arg.name: value for arg, value in zip(schema.arguments, node.args)}


def _fusable(conv: object, skip: object) -> str | None:
    """The reason a qconv2d input of ``add`` (other input ``skip``) cannot fuse, or None when it can."""
    if not isinstance(conv, fx.Node) or conv.target is not torch.ops.fxslim.qconv2d.default:
        return "not_a_conv"
    if skip is conv:  # y + y: the fused op would read the conv it replaces as its skip
        return "conv_is_its_own_skip"
    if len(conv.users) != 1:
        return "intermediate_escapes"
    args = _named_args(conv)
    if (args["out_min"], args["out_max"]) != (0, 255):
        return "conv_has_clamp"
    return None


def fuse_conv_add(gm: fx.GraphModule) -> int:
    """Rewrite every fusable conv → add pair in place; returns how many were fused."""
    fused = 0
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target is not torch.ops.fxslim.qadd.default:
            continue  # only adds are candidates
        args = _named_args(add)
        for conv_key, skip_key in (("a", "b"), ("b", "a")):
            reason = _fusable(args[conv_key], args[skip_key])
            if reason is None:
                break
            _log.debug("prom fuse: %s input %s of %s not fused: %s", conv_key, args[conv_key], add.name, reason)
        else:
            continue  # neither input fuses (reasons logged above)
        conv = args[conv_key]
        conv_args = _named_args(conv)
        conv_args.update(out_scale=args["out_scale"], out_zero_point=args["out_zero_point"], out_min=args["out_min"],
                         out_max=args["out_max"], skip=args[skip_key], skip_scale=args[f"{skip_key}_scale"],
                         skip_zero_point=args[f"{skip_key}_zero_point"], conv_scale=conv_args["out_scale"],
                         conv_zero_point=conv_args["out_zero_point"])
        op = torch.ops.fxslim.qconv2d_add.default
        with gm.graph.inserting_before(add):
            new = gm.graph.call_function(op, tuple(conv_args[a.name] for a in op._schema.arguments))
        new.meta.update(add.meta)
        add.replace_all_uses_with(new)
        gm.graph.erase_node(add)
        gm.graph.erase_node(conv)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    _log.info("prom fuse: %d conv → residual add pairs fused", fused)
    return fused
