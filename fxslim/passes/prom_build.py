"""PROM convert's graph builder: the new graph, its buffers, and how prepared nodes map into it.

Holds, per prepared node, its new node and the ActFakeQuant grid its uint8 codes are on (None for
a float value). Integer ops are emitted from ``IntegerOp`` descriptions (tensors become buffers);
value-preserving ops are replayed on codes; every other op is copied as a float island op
(``copy_float``), its quantized inputs dequantized once per node with their grids. Model inputs
read as data get ``fxslim::nan_samples`` flags, which convert applies to the outputs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from fxslim.ir import meta_val
from fxslim.passes.prom_graph import is_quant
from fxslim.passes.prom_islands import float_module
from fxslim.passes.prom_nan import flagged_leaves
from fxslim.passes.prom_pointwise import NoIntegerForm, is_layout_op, max_pool_args, pad_code
from fxslim.passes.prom_lower import IntegerOp, convert_output
from fxslim.runtime.prom_qat import ActFakeQuant

__all__ = ["Builder", "codes_layout", "replay_codes"]

_PASSTHROUGH = (nn.Dropout, nn.Identity)
_SHAPE_QUERIES = {"size", "dim", "numel"}  # methods that read only the shape: they may read the codes


class Builder:
    """The new graph, its buffers, and the map from prepared nodes to (new node, grid or None)."""

    def __init__(self, gm: fx.GraphModule, runtime: str) -> None:
        self.gm = gm
        self.runtime = runtime
        self.graph = fx.Graph()
        self.buffers: dict[str, Any] = {}
        self.env: dict[fx.Node, tuple[fx.Node, ActFakeQuant | None]] = {}
        self.nan_samples: dict[fx.Node, fx.Node] = {}  # per model input read as data: which samples hold a NaN
        self.dequantized: dict[fx.Node, fx.Node] = {}  # per quantized prepared node: its float copy
        self.float_ops: dict[fx.Node, fx.Node] = {}  # prepared node run in float → its new node
        self.reads: dict[fx.Node, list[fx.Node]] = {}  # float op → the quantizers it reads as codes

    def quantized(self, node: fx.Node, user: fx.Node) -> tuple[fx.Node, ActFakeQuant]:
        new, grid = self.env[node]
        if grid is None:
            raise NoIntegerForm(user, f"its input {node.name} is a float tensor")  # the plan rules this out
        return new, grid

    def model_input(self, node: fx.Node) -> fx.Node:
        """A placeholder's new node, flagging its NaN samples once (it is read as data): a float
        tensor's, or those of the float tensors in a list, tuple or dict input (any NaN in a tensor
        whose dim 0 differs from the first one's flags every sample)."""
        new = self.env[node][0]
        if node in self.nan_samples:
            return new
        flags, length = None, None
        for path, v in flagged_leaves(meta_val(node)):
            tensor = new
            for key in path:  # list/tuple index or dict key
                tensor = self.graph.call_function(operator.getitem, (tensor, getattr(key, "idx", getattr(key, "key", None))))
            these = self.graph.call_function(torch.ops.fxslim.nan_samples.default, (tensor,))
            if flags is None:
                flags, length = these, v.shape[0]
                continue
            if v.shape[0] != length:
                these = self.graph.call_method("any", (these,))
            flags = self.graph.call_function(torch.logical_or, (flags, these))
        if flags is not None:
            self.nan_samples[node] = flags
        return new

    def float_value(self, node: Any, user: fx.Node) -> Any:
        """What a float op reads for ``node``: codes dequantized with their grid (once per node)."""
        if not isinstance(node, fx.Node):
            return node
        new, grid = self.env[node]
        if grid is None:
            return self.model_input(node) if node.op == "placeholder" else new
        self.reads.setdefault(user, []).append(_quantizer(self.gm, node))
        if node not in self.dequantized:
            dequantized = self.emit(convert_output(grid), [new], "", f"{node.name}_dequantized")
            self.dequantized[node] = self.in_dtype_of(node, dequantized)
        return self.dequantized[node]

    def in_dtype_of(self, node: fx.Node, new: fx.Node) -> fx.Node:
        """``new`` (float32: what dequantization gives) cast to the dtype of the prepared ``node``'s
        values where the model computes in another (a float64 or bfloat16 model): its float islands
        and outputs keep the model's dtype."""
        value = meta_val(node)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            return self.graph.call_method("to", (new, value.dtype))
        return new

    def copy_float(self, node: fx.Node) -> fx.Node:
        """``node`` run in float in the new graph (a float island op)."""
        if node.op in ("call_module", "get_attr") and str(node.target) not in self.buffers:
            # a copy per path: a leaf module called twice is copied once
            self.buffers[str(node.target)] = _attribute(self.gm, str(node.target))
        shape_query = (node.op == "call_method" and node.target in _SHAPE_QUERIES) or (
            node.op == "call_function" and node.target is getattr and node.args[1:] in (("shape",), ("ndim",)))
        if shape_query:  # the shape of the codes is the shape of the values
            new = self.graph.node_copy(node, lambda a: self.env[a][0])
        else:
            new = self.graph.node_copy(node, lambda a: self.float_value(a, node))
            if node.op != "get_attr" and self._computes_floats(node):
                self.float_ops[node] = new
        return new

    def _computes_floats(self, node: fx.Node) -> bool:
        """Whether ``node`` computes float tensors (not shapes, sizes, asserts or other Python
        values); without shape metadata, whether it reads any."""
        if meta_val(node) is None:
            return node in self.reads or any(a in self.float_ops or a.op == "placeholder" for a in node.all_input_nodes)
        values = pytree.tree_leaves(meta_val(node))
        return any(isinstance(v, Tensor) and v.is_floating_point() for v in values)

    def emit(self, op: IntegerOp, inputs: list[fx.Node], prefix: str, name: str) -> fx.Node:
        """One integer op call, positional in schema order; its tensors become buffers under prefix."""
        values = dict(zip(op.inputs, inputs), **op.scalars)
        for key, tensor in op.tensors.items():
            path = f"{prefix}.{key}"
            self.buffers[path] = tensor
            values[key] = self.graph.get_attr(path)
        args = []
        for argument in op.op._schema.arguments:
            if argument.name not in values:
                break  # the rest keep their defaults
            args.append(values[argument.name])
        return self.graph.create_node("call_function", op.op, tuple(args), name=name)

    def replay(self, node: fx.Node, source: fx.Node) -> fx.Node:
        """A value-preserving op applied to ``source`` (a new-graph node): dropout and identity
        vanish, view becomes reshape; a max pool pools the codes."""
        pool = max_pool_args(self.gm, node)
        if pool is not None:
            return self.graph.call_function(torch.ops.fxslim.max_pool2d_codes.default, (source, *pool))
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if isinstance(module, _PASSTHROUGH):
                return source
            assert isinstance(module, nn.Flatten), f"not a value-preserving module: {module}"
            return self.graph.call_function(torch.flatten, (source, module.start_dim, module.end_dim))
        if node.op == "call_function" and node.target is torch.nn.functional.dropout:
            return source
        new = self.graph.node_copy(node, lambda a: source if a is node.args[0] else self.env[a][0])
        if new.op == "call_method" and new.target == "view":
            new.target = "reshape"  # integer codes are channels_last: view may not apply
        return new

    def pad(self, node: fx.Node, source: fx.Node, code: int) -> fx.Node:
        """``F.pad(source, pad, "constant", code)``: a real-valued pad on codes, ``code`` the value's code."""
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        return self.graph.call_function(F.pad, (source, pad, "constant", code))


def _quantizer(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The quantizer node whose codes ``node`` (a codes source) holds."""
    while not is_quant(gm, node):
        node = node.args[0]
    return node


def _attribute(gm: fx.GraphModule, path: str) -> Any:
    """A detached copy of the tensor at ``path`` (a parameter stays one, frozen: a float island's
    weights are the model's weights, which the cost model and ``parameters()`` count), or the float
    copy of the module there (``float_module``)."""
    value = gm
    for part in path.split("."):
        value = getattr(value, part)
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.detach().clone(), requires_grad=False)
    return value.detach().clone() if isinstance(value, Tensor) else float_module(value)


def codes_layout(b: Builder, node: fx.Node) -> bool:
    """A layout op, max pool or exact constant pad of a tensor convert holds as codes (its grid kept)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or b.env[node.args[0]][1] is None:
        return False
    grid = b.env[node.args[0]][1]
    return is_layout_op(b.gm, node) or max_pool_args(b.gm, node) is not None or pad_code(node, *grid.qparams()) is not None


def replay_codes(b: Builder, node: fx.Node) -> fx.Node:
    source, grid = b.env[node.args[0]]
    code = pad_code(node, *grid.qparams())
    return b.pad(node, source, code) if code is not None else b.replay(node, source)
