"""What the tokens of an attention's q, k and v are computed from, for HTTM's matcher: whether they
are one sequence attending to itself (``cross_tokens``), and which graph nodes feed a value rather
than only its shape (``data_ancestors``), on graphs of every IR."""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from fxslim.ir import META_PLACEHOLDER_FQNS, AttentionView, meta_val, size_hint

__all__ = ["cross_tokens", "data_ancestors", "is_metadata_op", "sized_by_values"]

_METADATA_ATTRS = ("shape", "device", "dtype", "ndim")
_METADATA_METHODS = ("size", "dim", "numel")
_METADATA_OPS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default)
_SHIFTS = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.ops.aten.add.Tensor,
           torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Tensor)
_SHIFT_METHODS = ("add", "sub", "mul")
# ops whose output size depends on their input's values, by name in every IR (torch.nonzero,
# "nonzero" methods, aten.nonzero.default)
_SIZED_BY_VALUES = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique2",
                    "unique_dim", "boolean_mask")


def cross_tokens(gm: fx.GraphModule, view: AttentionView, projections: dict[fx.Node, Any]) -> tuple[str, str]:
    """("cross_attention", detail) when q is projected from other tokens than k or v (queries of one
    clip attending to another's keys: same shapes, but not one sequence attending to itself),
    ("", "") otherwise or when it cannot tell (no projection on a path).

    Other tokens: a projection of q, k or v saw more tokens than q holds (one linear over two clips,
    each side then cut out of its output; fewer is fine: special tokens concatenated after the
    projection, a position table projected once for the batch), or q's projections and k's (v's) read inputs
    that are not the same tokens, also after adding a term computed from no input (``x + pos_emb``
    for q and k, ``x`` for v, as DETR writes it, is one sequence)."""
    q_shape = meta_val(view.q).shape
    tokens = size_hint(q_shape[0]) * size_hint(q_shape[2])
    sources = {name: _projected_from(node, projections) for name, node in (("q", view.q), ("k", view.k), ("v", view.v))}
    for name, found in sources.items():
        for source in sorted(found, key=lambda n: n.name):
            seen = _token_count(source)
            if seen is not None and seen > tokens:
                return "cross_attention", (f"{name} is projected from {source.name}, {seen} tokens, where q holds "
                                           f"{tokens} (batch x sequence): each side is cut out of a projection of "
                                           "other tokens as well")
    q = _same_tokens(gm, sources["q"])
    for name in ("k", "v"):
        if q and sources[name] and not q & _same_tokens(gm, sources[name]):
            return "cross_attention", (f"q is projected from {', '.join(sorted(n.name for n in sources['q']))}, "
                                       f"{name} from {', '.join(sorted(n.name for n in sources[name]))}: other tokens")
    return "", ""


def _token_count(node: fx.Node) -> int | None:
    """Rows of features [..., C] a linear layer reads from ``node`` (None when its value is unknown)."""
    val = meta_val(node)
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    return math.prod(size_hint(n) for n in val.shape[:-1])


def _same_tokens(gm: fx.GraphModule, nodes: set[fx.Node]) -> set[fx.Node]:
    """``nodes`` and what each adds (subtracts, multiplies) a term computed from no model input to:
    the same tokens, shifted by a position or frame embedding."""
    found = set(nodes)
    for node in nodes:
        while (term := _shift(gm, node)) is not None:
            node = term
            found.add(node)
    return found


def _shift(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The operand x of ``node`` = x + e (x - e, x * e) of x's shape, where e's value comes from no
    input of the model (parameters, buffers and shapes only); None when ``node`` is no such op."""
    is_op = (node.op == "call_function" and node.target in _SHIFTS) or (
        node.op == "call_method" and node.target in _SHIFT_METHODS)
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)] if is_op else []
    if len(operands) != 2:
        return None
    params = gm.meta.get(META_PLACEHOLDER_FQNS, {})
    shape = getattr(meta_val(node), "shape", None)
    for x, term in (operands, operands[::-1]):
        # sizes and 0-d numbers (Embedding.norm_type) are no input's values: dynamo passes them as
        # placeholders under dynamic=True
        inputs = [n for n in data_ancestors(gm, term) if n.op == "placeholder" and n.name not in params
                  and isinstance(val := meta_val(n), torch.Tensor) and val.dim() > 0]
        if getattr(meta_val(x), "shape", None) == shape and not inputs:
            return x
    return None


def _projected_from(start: Any, projections: dict[fx.Node, Any]) -> set[fx.Node]:
    """The inputs of the linear layers nearest above ``start`` (what its tokens were projected from),
    on the paths of its values (not through reads of a shape)."""
    found: set[fx.Node] = set()
    stack, seen = ([start] if isinstance(start, fx.Node) else []), set()
    while stack:
        node = stack.pop()
        if node in seen or is_metadata_op(node):
            continue
        seen.add(node)
        if node in projections:
            if isinstance(projections[node], fx.Node):
                found.add(projections[node])
            continue
        stack.extend(node.all_input_nodes)
    return found


def is_metadata_op(node: fx.Node) -> bool:
    """Ops that read only an input's metadata (shape, device, dtype), never its values."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in _METADATA_ATTRS
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target in _METADATA_OPS


def data_ancestors(gm: fx.GraphModule, target: fx.Node) -> set[fx.Node]:
    """``target`` and the nodes whose values (not only shapes or devices) it is computed from."""
    data = {target}
    for node in reversed(gm.graph.nodes):  # consumers before producers
        if node in data and not is_metadata_op(node):
            data.update(node.all_input_nodes)
    return data


def sized_by_values(gm: fx.GraphModule, target: fx.Node) -> fx.Node | None:
    """A node ``target`` is computed from whose output size depends on the values of the model's
    inputs (``images[valid]`` with ``valid`` computed from the images, ``nonzero``, ``unique``): the
    frames of a sequence built after one need not be those of any input's dim. None when there is
    none; a mask held by the model (``x[..., self.keep]``) sizes the same on every call."""
    for node in data_ancestors(gm, target):
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if name.split(".")[0] in _SIZED_BY_VALUES:
            values = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        elif node.target in (operator.getitem, torch.ops.aten.index.Tensor):
            values = _mask_of(node.args[1])
        else:
            continue
        if values is not None and _from_inputs(gm, values):
            return node
    return None


def _mask_of(index: Any) -> fx.Node | None:
    """The boolean tensor an index is (or holds among a tuple/list of them), else None."""
    items = index if isinstance(index, (tuple, list)) else (index,)
    return next((i for i in items if isinstance(i, fx.Node) and isinstance(v := meta_val(i), torch.Tensor)
                 and v.dtype == torch.bool), None)


def _from_inputs(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s values are computed from an input of the graph (not only its weights)."""
    params = gm.meta.get(META_PLACEHOLDER_FQNS, {})
    return any(n.op == "placeholder" and n.name not in params for n in data_ancestors(gm, node))
