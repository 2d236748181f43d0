"""Fake quantization for PROM's quantization-aware training (docs/methods/PROM.md); the PROM pass
inserts these modules, ``fxslim.passes.prom_lower`` turns them into integer op calls.

QAT pieces (nothing here edits graphs):

- ``ternary_codes`` / ``ternary_fake_quant``: per-output-channel ternary weights, TWN (default:
  Δ_c = 0.7·mean|W_c|, t = sign(W)·1[|W| > Δ_c], α_c = mean |W| over the kept entries) or absmean
  (γ_c = mean|W_c|, t = clip(round(W/γ_c), −1, 1), α_c = γ_c).
- ``int8_weight_codes`` / ``int8_weight_fake_quant``: symmetric per-channel int8, scale max|W_c|/127.
  Both weight fake quantizers recompute codes and scales at every forward and pass the gradient
  straight through to the latent float weights.
- ``ActFakeQuant``: per-tensor affine uint8 activations with an EMA min/max observer.
- ``QConv2d`` / ``QLinear``: the original float conv/linear, fake-quantized weights, and optionally
  the input's ActFakeQuant. BN stays a separate float module during QAT and is folded at conversion.

Activation grid (TFLite uint8 convention): codes 0..255, real = scale·(code − zero_point), the
observed range is widened to include 0 so that real 0 is a code (exact zero padding, ReLU bounds),
and the zero point is the integer round(−min/scale) clamped to [0, 255] ("nudged"), so the
represented range can shift by up to half a step. Rounding is half to even
(``torch.fake_quantize_per_tensor_affine``), with the gradient clipped outside the range.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake


__all__ = [
    "TERNARY_METHODS",
    "WEIGHT_QUANTS",
    "ACTIVATIONS",
    "ternary_codes",
    "ternary_fake_quant",
    "int8_weight_codes",
    "int8_weight_fake_quant",
    "ActFakeQuant",
    "freeze_observers",
    "unfreeze_observers",
    "QConv2d",
    "QLinear",
]

TERNARY_METHODS = ("twn", "absmean")
WEIGHT_QUANTS = ("ternary", "int8")
ACTIVATIONS = ("none", "relu", "relu6")
_TWN_THRESHOLD = 0.7
_QMIN, _QMAX = 0, 255
_SCALE_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------
# Weight quantizers


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized weight, send the gradient unchanged to the latent weight.

    Written with ``setup_context`` and a generated vmap rule, so that torch.func's transforms
    (``grad``, ``vmap``, per-sample gradients through ``functional_call``) take a QAT model as they
    take the float one: the older ``forward(ctx, ...)`` form refused them all, even under no_grad."""

    generate_vmap_rule = True

    @staticmethod
    def forward(latent: Tensor, quantized: Tensor) -> Tensor:
        return quantized.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass  # the gradient passes straight through: nothing to keep

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _check_method(method: str) -> None:
    if method not in TERNARY_METHODS:
        raise ValueError(f"method: expected one of {TERNARY_METHODS}, got {method!r}")


@torch.no_grad()
def ternary_codes(weight: Tensor, method: str = "twn") -> tuple[Tensor, Tensor]:
    """Ternary codes (int8, shape of ``weight``, in {−1, 0, 1}) and α (float32 [C_out]).

    Rows are output channels (dim 0). A channel with no kept entry gets α = 0.
    """
    _check_method(method)
    w = weight.detach().flatten(1).to(torch.float32)
    absw = w.abs()
    if method == "twn":
        keep = absw > _TWN_THRESHOLD * absw.mean(1, keepdim=True)
        codes = torch.sign(w) * keep
        alpha = (absw * keep).sum(1) / keep.sum(1).clamp_min(1)
    else:
        gamma = absw.mean(1)
        codes = torch.clamp(torch.round(w / gamma.clamp_min(torch.finfo(torch.float32).tiny)[:, None]), -1, 1)
        alpha = gamma
    return codes.to(torch.int8).view(weight.shape), alpha


def ternary_fake_quant(weight: Tensor, method: str = "twn") -> Tensor:
    """α_c·t with a straight-through gradient to ``weight`` (t and α recomputed from it each call)."""
    codes, alpha = ternary_codes(weight, method)
    quantized = codes.to(weight.dtype) * alpha.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return _StraightThrough.apply(weight, quantized)


@torch.no_grad()
def int8_weight_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 codes in [−127, 127] and scales (float32 [C_out]).

    scale_c = max|W_c| / 127 (1 for an all-zero channel, whose codes are all 0).
    """
    w = weight.detach().flatten(1).to(torch.float32)
    scale = w.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    return codes.to(torch.int8).view(weight.shape), scale


def int8_weight_fake_quant(weight: Tensor) -> Tensor:
    """scale_c·codes with a straight-through gradient to ``weight``."""
    codes, scale = int8_weight_codes(weight)
    quantized = codes.to(weight.dtype) * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return _StraightThrough.apply(weight, quantized)


# ----------------------------------------------------------------------------------------------
# Activation fake quantizer


class ActFakeQuant(nn.Module):
    """Per-tensor affine uint8 fake quantization with an EMA min/max observer.

    The observer updates in training mode while enabled, and on the first batch the module ever
    sees (whatever the mode), which sets min/max directly so the EMA is defined from the start:
    ``min ← momentum·min + (1 − momentum)·batch_min`` afterwards (likewise max). Scale and zero
    point are recomputed after each update (module docstring). An observer that sees NaN or inf
    raises ValueError; otherwise NaN passes through unchanged (as in the float model) and inf is
    clamped to the grid. All state lives in buffers
    (``min_val``, ``max_val``, ``scale``, ``zero_point``, ``initialized``, ``observer_enabled``), so
    it is saved in the state dict and, under DistributedDataParallel, broadcast from rank 0 with
    the other buffers at every forward (each rank observes its own batch in between).
    """

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ActFakeQuant.momentum: expected a float in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("min_val", torch.zeros((), dtype=torch.float32))
        self.register_buffer("max_val", torch.zeros((), dtype=torch.float32))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:  # an empty batch has no range to observe
            return x.clone()
        if x.is_meta or self.initialized.is_meta or (is_fake(x) and not torch.compiler.is_compiling()):
            # shapes only (the cost model's meta twin, or its fake tensors with symbolic sizes; not a
            # trace by torch.compile or export, whose graph must observe): no range to observe, and
            # fake_quantize has no meta kernel; the same arithmetic in ops that have one
            codes = torch.clamp(torch.round(x / self.scale) + self.zero_point, _QMIN, _QMAX)
            out = (codes - self.zero_point) * self.scale
        else:
            initialized = bool(self.initialized)
            if bool(self.observer_enabled) and (self.training or not initialized):
                self._observe(x)
            elif not initialized:
                raise RuntimeError("ActFakeQuant: the observer is frozen before it saw any batch; unfreeze it and run "
                                   "data through")
            out = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, _QMIN, _QMAX)
        return torch.where(torch.isnan(x), x, out)  # NaN stays NaN (the grid has no code for it)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        low, high = torch.aminmax(x.detach().to(torch.float32))
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError(f"ActFakeQuant: expected finite activations to observe, got a batch with range "
                             f"[{float(low)}, {float(high)}] (NaN or inf in the input or an earlier layer)")
        if bool(self.initialized):
            self.min_val.mul_(self.momentum).add_((1.0 - self.momentum) * low)
            self.max_val.mul_(self.momentum).add_((1.0 - self.momentum) * high)
        else:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
            self.initialized.fill_(1)
        low = torch.clamp(self.min_val, max=0.0)
        high = torch.clamp(self.max_val, min=0.0)
        scale = torch.clamp((high - low) / (_QMAX - _QMIN), min=_SCALE_EPS)
        self.scale.copy_(scale)
        self.zero_point.copy_(torch.clamp(torch.round(_QMIN - low / scale), _QMIN, _QMAX).to(torch.int32))

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) as Python numbers (scale is the float32 value the model uses)."""
        if not bool(self.initialized):
            raise RuntimeError("ActFakeQuant.qparams: no range observed yet")
        return float(self.scale), int(self.zero_point)

    def freeze(self) -> None:
        """Stop updating min/max (the grid stays fixed)."""
        self.observer_enabled.fill_(0)

    def unfreeze(self) -> None:
        self.observer_enabled.fill_(1)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def freeze_observers(model: nn.Module) -> None:
    """Freeze every ActFakeQuant in ``model`` (e.g. for the last part of QAT)."""
    for module in model.modules():
        if isinstance(module, ActFakeQuant):
            module.freeze()


def unfreeze_observers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ActFakeQuant):
            module.unfreeze()


# ----------------------------------------------------------------------------------------------
# Layer wrappers


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    spans = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if any(s % 2 for s in spans):
        raise ValueError(f"conv.padding: 'same' with an even effective kernel pads asymmetrically, got kernel {conv.kernel_size}")
    return (spans[0] // 2, spans[1] // 2)


class QConv2d(nn.Module):
    """A float ``nn.Conv2d`` whose weights are fake-quantized (``"ternary"`` or ``"int8"``).

    ``input_quant`` fake-quantizes the input first; leave it None when the input is already the
    output of an ActFakeQuant (one quantizer per tensor, shared by all its consumers). Ternary
    needs a 1×1, groups-1, unpadded conv, like ``fxslim::ternary_conv2d``.
    """

    def __init__(
        self, conv: nn.Conv2d, weight_quant: str = "int8", *, ternary_method: str = "twn",
        input_quant: ActFakeQuant | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QConv2d.conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"QConv2d.weight_quant: expected one of {WEIGHT_QUANTS}, got {weight_quant!r}")
        _check_method(ternary_method)
        if conv.padding_mode != "zeros":
            raise ValueError(f"QConv2d.conv: expected padding_mode 'zeros', got {conv.padding_mode!r}")
        padding = _conv_padding(conv)
        if weight_quant == "ternary" and (conv.kernel_size != (1, 1) or conv.groups != 1 or padding != (0, 0)):
            raise ValueError(
                "QConv2d.weight_quant: 'ternary' needs a 1x1, groups=1, unpadded conv, got kernel "
                f"{conv.kernel_size}, groups {conv.groups}, padding {padding}"
            )
        self.conv = conv
        self.weight_quant = weight_quant
        self.ternary_method = ternary_method
        self.input_quant = input_quant

    def quantized_weight(self) -> Tensor:
        if self.weight_quant == "ternary":
            return ternary_fake_quant(self.conv.weight, self.ternary_method)
        return int8_weight_fake_quant(self.conv.weight)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """(int8 codes [C_out, C_in/groups, kh, kw], per-channel real scale α_c or s_c)."""
        if self.weight_quant == "ternary":
            return ternary_codes(self.conv.weight, self.ternary_method)
        return int8_weight_codes(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.conv._conv_forward(x, self.quantized_weight(), self.conv.bias)

    def extra_repr(self) -> str:
        method = f", ternary_method={self.ternary_method!r}" if self.weight_quant == "ternary" else ""
        return f"weight_quant={self.weight_quant!r}{method}"


class QLinear(nn.Module):
    """A float ``nn.Linear`` with int8 per-channel fake-quantized weights (input_quant as in QConv2d)."""

    def __init__(self, linear: nn.Linear, *, input_quant: ActFakeQuant | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.linear: expected an nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.input_quant = input_quant

    def quantized_weight(self) -> Tensor:
        return int8_weight_fake_quant(self.linear.weight)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        return int8_weight_codes(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight(), self.linear.bias)
