"""Per-layer conversion of PROM's fake-quant layers to the fast ops of ``fxslim.runtime.prom_onednn``.

The counterpart of ``prom_lower.convert_conv``/``convert_linear``/``convert_add`` for the oneDNN
runtime. The real numbers stay real: BN is folded into a per-channel weight scale
w_c = |α_c·γ_c/σ_c| (a negative factor flips the channel's codes) and a real bias
B_c = γ_c(b_c − μ_c)/σ_c + β_c, so the kernel computes y_c = s_x·w_c·Σ t·(q − z_x) + B_c and rounds
once to the output grid. Weights are prepacked here, at conversion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fxslim.passes.prom_lower import IntegerOp, _clamp_bounds, _input_quant, fold_bn
from fxslim.runtime import prom_onednn
from fxslim.runtime.prom_qat import ActFakeQuant, QConv2d, QLinear, _conv_padding

__all__ = ["convert_conv_onednn", "convert_linear_onednn", "convert_add_onednn"]


def _fold_real(codes: Tensor, w_scale: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor, Tensor]:
    """(codes with signs folded in, non-negative weight scales, real bias), float32 [C_out] each."""
    scale, real_bias = fold_bn(w_scale.to(torch.float64).expand(codes.shape[0]), bias, bn)
    shape = (-1, *([1] * (codes.dim() - 1)))
    codes = codes * torch.where(scale < 0, -1, 1).to(torch.int8).view(shape)
    dead = scale == 0  # constant channel: zero codes, the bias alone
    codes = torch.where(dead.view(shape), torch.zeros_like(codes), codes)
    scale = torch.where(dead, torch.ones_like(scale), scale.abs())
    return codes.contiguous(), scale.to(torch.float32), real_bias.to(torch.float32)


def _real_layer(
    layer: QConv2d | QLinear, bias: Tensor | None, bn: nn.BatchNorm2d | None, out_quant: ActFakeQuant,
    activation: str, x_quant: ActFakeQuant | None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensor args, scalar args) of a conv or linear on the oneDNN ops: weight codes, their real
    scales and bias with BN folded, the input and output grids, the activation as clamp bounds."""
    s_x, z_x = _input_quant(layer, x_quant).qparams()
    s_y, z_y = out_quant.qparams()
    codes, w_scale = layer.weight_codes()
    codes, w_scale, real_bias = _fold_real(codes, w_scale, bias, bn)
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    return ({"weight": codes, "w_scale": w_scale, "bias": real_bias},
            {"x_scale": s_x, "x_zero_point": z_x, "out_scale": s_y, "out_zero_point": z_y, "out_min": lo, "out_max": hi})


def convert_conv_onednn(
    qconv: QConv2d, out_quant: ActFakeQuant, *, bn: nn.BatchNorm2d | None = None, activation: str = "none",
    x_quant: ActFakeQuant | None = None,
) -> IntegerOp:
    """``out_quant(activation(bn(qconv(x))))`` as ``fxslim::qconv2d`` (ternary and int8 weights alike)."""
    conv = qconv.conv
    tensors, scalars = _real_layer(qconv, conv.bias, bn, out_quant, activation, x_quant)
    scalars.update(stride=list(conv.stride), padding=list(_conv_padding(conv)), dilation=list(conv.dilation),
                   groups=conv.groups)
    post_op, _ = prom_onednn._post_op(scalars["out_scale"], scalars["out_zero_point"], scalars["out_min"], scalars["out_max"])
    prom_onednn.prepack(tensors["weight"], tensors["w_scale"], tensors["bias"], scalars["x_scale"], scalars["x_zero_point"],
                        post_op, scalars["stride"], scalars["padding"], scalars["dilation"], conv.groups)
    return IntegerOp(torch.ops.fxslim.qconv2d.default, ("x",), tensors, scalars)


def convert_linear_onednn(
    qlinear: QLinear, out_quant: ActFakeQuant, *, activation: str = "none", x_quant: ActFakeQuant | None = None,
) -> IntegerOp:
    """``out_quant(activation(qlinear(x)))`` as ``fxslim::qlinear``."""
    tensors, scalars = _real_layer(qlinear, qlinear.linear.bias, None, out_quant, activation, x_quant)
    return IntegerOp(torch.ops.fxslim.qlinear.default, ("x",), tensors, scalars)


def convert_add_onednn(
    a_quant: ActFakeQuant, b_quant: ActFakeQuant, out_quant: ActFakeQuant, *, activation: str = "none",
) -> IntegerOp:
    """``out_quant(activation(a + b))`` as ``fxslim::qadd`` (float32, bit-exact against fake quant)."""
    (s_a, z_a), (s_b, z_b), (s_y, z_y) = a_quant.qparams(), b_quant.qparams(), out_quant.qparams()
    lo, hi = _clamp_bounds(activation, s_y, z_y)
    scalars = {"a_scale": s_a, "a_zero_point": z_a, "b_scale": s_b, "b_zero_point": z_b, "out_scale": s_y,
               "out_zero_point": z_y, "out_min": lo, "out_max": hi}
    return IntegerOp(torch.ops.fxslim.qadd.default, ("a", "b"), scalars=scalars)
