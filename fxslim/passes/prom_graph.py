"""Graph patterns shared by PROM's prepare and convert: quantizers, value-preserving ops,
ReLU/ReLU6 activations and residual adds, on symbolic-traced (module IR) graphs."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from fxslim.ir import meta_val
from fxslim.passes.matchers import custom_forward
from fxslim.runtime.prom_qat import ActFakeQuant

__all__ = ["is_quant", "is_shape_op", "is_activation", "is_residual_add", "float_tensor", "module_of", "layer_of"]

# Value-preserving ops (dropout counts: it is the identity in eval mode, the mode convert assumes).
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.dropout}
_SHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"}
_SHAPE_MODULES = (nn.Flatten, nn.Identity, nn.Dropout)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6"}
_ACT_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"))
_ADD_FUNCTIONS = {operator.add, torch.add}


def module_of(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def layer_of(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    """The module a node calls when its torch.nn class says what it computes: None for a subclass
    with its own forward (``matchers.custom_forward``: timm's BatchNormAct2d, a leaf where it does
    not trace, is a BatchNorm2d followed by its activation), which PROM must not fold as its base."""
    module = module_of(gm, node)
    return None if module is None or custom_forward(module) else module


def is_quant(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(module_of(gm, node), ActFakeQuant)


def is_shape_op(gm: fx.GraphModule, node: Any) -> bool:
    """Flatten/view/reshape/(un)squeeze/contiguous/dropout/identity: values pass through unchanged."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return isinstance(layer_of(gm, node), _SHAPE_MODULES)


def is_activation(gm: fx.GraphModule, node: Any) -> str | None:
    """'relu' or 'relu6' for a ReLU/ReLU6 module or function node, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    module = layer_of(gm, node)
    return next((name for cls, name in _ACT_MODULES if isinstance(module, cls)), None)


def float_tensor(node: Any) -> Tensor | None:
    val = meta_val(node)
    return val if isinstance(val, Tensor) and val.is_floating_point() else None


def is_residual_add(node: fx.Node) -> bool:
    """``a + b`` of two graph tensors (operator/torch add or the add method), no alpha."""
    if node.op == "call_function":
        ok = node.target in _ADD_FUNCTIONS
    else:
        ok = node.op == "call_method" and node.target == "add"
    return ok and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
