"""Cost formulas for canonical views (conv, linear, attention): the same numbers in every IR.

A view stands for a whole node (or, for hand-written attention, a chain of nodes) however it was
captured, so these formulas are written once. MACs match FlopCounterMode's (FLOPs = 2·MACs);
multi-head attention includes its in/out projections, as FlopCounterMode sees them.
"""

from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from fxslim.cost_model.formulas.aten import SOFTMAX_OPS
from fxslim.cost_model.registry import OpCost
from fxslim.ir import AttentionView, ConvView, LinearView, View, attribute, shape_of

__all__ = ["view_cost", "attention_bias_adds"]


def _conv_cost(view: ConvView) -> OpCost:
    """[n, c_in, h, w] * [c_out, c_in/g, kh, kw] -> [n, c_out, h', w']: n·c_out·(c_in/g)·kh·kw·h'·w' MACs.
    Ignores: the bias addition (see Conventions.include_bias), padding."""
    return OpCost(macs=view.macs, kind=view.conv_kind)


def _linear_cost(view: LinearView) -> OpCost:
    """[..., in] @ [out, in]^T -> [..., out]: rows·in·out MACs.
    Ignores: the bias addition (see Conventions.include_bias)."""
    return OpCost(macs=view.macs, kind="linear")


def _projection_macs(view: AttentionView, gm: fx.GraphModule) -> Any:
    """MACs of the projections an MHA or a wrapped attention function performs itself."""
    if view.form == "mha":
        embed = view.heads * view.head_dim
        kdim = shape_of(view.k)[-1]
        vdim = shape_of(view.v)[-1]
        q_rows, kv_rows = view.batch * view.q_len, view.batch * view.kv_len
        # q, k, v in-projections ([rows, e_in] @ [e_in, embed]) and the out-projection [rows, embed] @ [embed, embed]
        return q_rows * embed * embed + kv_rows * kdim * embed + kv_rows * vdim * embed + q_rows * embed * embed
    if view.form == "wrapped":
        # weight matrices passed as arguments (e.g. Swin's qkv_weight [3c, c], proj_weight [c, c]) act on every token
        rows = view.batch * view.q_len
        total: Any = 0
        for arg in view.node.args[1:]:
            if isinstance(arg, fx.Node) and arg.op in ("get_attr", "placeholder"):
                shape = shape_of(arg) or _attr_shape(gm, arg)
                if shape is not None and len(shape) == 2:
                    total = total + rows * math.prod(shape)
        return total
    return 0


def attention_bias_adds(view: AttentionView, gm: fx.GraphModule) -> Any:
    """Bias additions of the projections an MHA performs itself (``Conventions.include_bias``): one
    per output element of its q, k and v in-projections and of its out-projection, where it has
    those biases; 0 for other forms (their projections are linear nodes of their own)."""
    if view.form != "mha":
        return 0
    node = view.node
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        in_bias, out_bias = mod.in_proj_bias is not None, mod.out_proj.bias is not None
    else:  # F.multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias,
        #    bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, ...)
        def given(index: int, name: str) -> bool:
            value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
            return value is not None

        in_bias, out_bias = given(6, "in_proj_bias"), given(12, "out_proj_bias")
    embed = view.heads * view.head_dim
    q_rows, kv_rows = view.batch * view.q_len, view.batch * view.kv_len
    return (q_rows + 2 * kv_rows) * embed * in_bias + q_rows * embed * out_bias


def _attr_shape(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    obj = attribute(gm, node.target, None)
    return tuple(obj.shape) if hasattr(obj, "shape") else None


def _attention_cost(view: AttentionView, gm: fx.GraphModule) -> OpCost:
    """[b, h, s_q, d] @ [b, h, d, s_k] -> [b, h, s_q, s_k] @ [b, h, s_k, d_v]: b·h·s_q·s_k·(d + d_v) MACs
    (+ projections for MHA and wrapped forms); softmax, scale and mask (filled in, or added as a tensor:
    an additive mask, a relative-position bias) per score are elementwise.
    Ignores: causal masking (not discounted), MHA's bias_k/add_zero_attn."""
    scores = view.batch * view.heads * view.q_len * view.kv_len
    elementwise = scores * (SOFTMAX_OPS + 1 + (1 if view.has_mask else 0))
    return OpCost(macs=view.macs + _projection_macs(view, gm), elementwise=elementwise, kind="attention",
                  info={"form": view.form, "heads": view.heads, "q_len": view.q_len, "kv_len": view.kv_len})


def view_cost(view: View, gm: fx.GraphModule) -> OpCost:
    """The cost of a conv, linear or attention view."""
    if isinstance(view, ConvView):
        return _conv_cost(view)
    if isinstance(view, LinearView):
        return _linear_cost(view)
    return _attention_cost(view, gm)
