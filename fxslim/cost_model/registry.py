"""The cost-formula registry: one dict from op (``torch.ops.<ns>.<op>`` packet or overload) to formula.

Keys are ``OpOverloadPacket`` / ``OpOverload`` objects only. Torch-level callables of symbolic and
dynamo graphs (``F.relu``, ``operator.add``, ``nn.BatchNorm2d`` leaves, tensor methods) are never
keys: the cost model runs such a node once on meta tensors and costs the aten ops the dispatcher
calls, so the dispatcher does the torch -> aten mapping and this dict stays the only table. Conv,
linear and attention nodes are costed from their canonical views (``fxslim.ir``) in every IR; the
aten formulas here serve the nodes that have no view and ops met inside opaque leaf modules.

Adding a formula for a custom op (``fxslim/cost_model/ops_<name>.py``, imported by
``fxslim/cost_model/__init__.py``)::

    from fxslim.cost_model.registry import OpCall, OpCost, register_cost

    @register_cost(torch.ops.fxslim.ternary_conv2d, kind="pointwise_conv")
    def ternary_conv2d_cost(call: OpCall) -> OpCost:
        \"\"\"Ternary 1x1 conv: one int8 addition per MAC, no multiplications.
        Ignores: the per-channel zero-point correction (folded into the bias).\"\"\"
        x, w = call.args[0], call.args[1]          # TensorSpec: .shape, .dtype, .numel, .format
        out = call.out                             # TensorSpec of the output
        # [n, c_in, h, w] * [c_out, c_in, 1, 1] -> [n, c_out, h, w]
        macs = out.numel * w.shape[1]
        return OpCost(macs=macs, format="ternary")

What a formula receives (``OpCall``): ``target`` (the OpOverload), ``args``/``kwargs`` exactly as the
node passes them with every tensor replaced by a ``TensorSpec(shape, dtype)`` (shapes hold ints,
or SymInts in symbolic estimates: use only ``+ - * //``, never ``int()``), ``out`` (a TensorSpec, or a
tuple for multi-output ops), ``conventions`` (``fxslim.cost_model.Conventions``), ``fqn`` (module
path) and ``value(i)``: the real tensor of argument ``i`` when it is a weight or buffer (None when
not available, e.g. on meta or fake tensors).

What it returns (``OpCost``; every field optional, counts are ints or sympy expressions):
``macs`` (FLOPs are 2·MACs), ``format`` (operand format of those MACs: "fp32", "fp16", "int8",
"ternary", ...; None = the node's dtype or the "as deployed" convention), ``elementwise`` (work
outside FLOPs: norms, softmax, activations, pooling, ...), ``ops`` (extra arithmetic by
``(operation, format)``, e.g. ``{("mul", "int32"): n}`` for requantization: the MACs themselves
are expanded by the cost model from ``macs`` and ``format``), ``bytes_read``/``bytes_written``
(None = tensor arguments/outputs), ``params``/``storage_bits`` (None = counted from the weight
arguments), ``measured_macs`` (data-dependent ops: counts observed in a run), ``zero_fraction``
(ternary ops: share of zero weights, used when ``conventions.skip_zero_weights``), ``kind`` (row
kind, default the one given to ``register_cost``) and ``info`` (extra figures shown with the row).

The conventions the cost model applies by itself (the "as deployed" format of float nodes, bias
additions and the requantization multiply of conv/linear nodes) do not reach custom ops, which
carry their own formats: an op that adds a bias or requantizes returns those operations in ``ops``
when ``call.conventions.include_bias`` / ``include_requant`` is set. Give ``kind`` the kind of
the node the op replaces (e.g. "pointwise_conv") so before/after comparisons line up.

``register_cost(*targets, kind=..., flop_counter=True)`` also registers a FlopCounterMode formula
(FLOPs = 2·MACs under default conventions) for ops FlopCounterMode does not know yet, so
``torch.utils.flop_counter.FlopCounterMode`` counts custom ops with the same formula.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch._ops import OpOverload, OpOverloadPacket

from fxslim.ir import op_namespace, schema_arguments

if TYPE_CHECKING:
    from fxslim.cost_model.conventions import Conventions

__all__ = [
    "TensorSpec", "OpCall", "OpCost", "Formula", "register_cost", "lookup", "registered_costs",
    "registered_kind", "format_of_dtype", "spec_of", "op_namespace",
]

_log = logging.getLogger(__name__)

_DTYPE_FORMATS: dict[torch.dtype, str] = {
    torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
    torch.uint8: "int8", torch.bool: "bool",
}


def format_of_dtype(dtype: torch.dtype | None) -> str | None:
    """'fp32', 'fp16', 'bf16', 'int8', ... for a dtype (None when unknown)."""
    if dtype is None:
        return None
    return _DTYPE_FORMATS.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as formulas see it: shape (ints or SymInts) and dtype."""

    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> Any:
        return math.prod(self.shape) if self.shape else 1

    @property
    def format(self) -> str | None:
        return format_of_dtype(self.dtype)

    @property
    def nbytes(self) -> Any:
        return self.numel * self.dtype.itemsize


def spec_of(value: Any) -> Any:
    """TensorSpec for a tensor, recursively for tuples/lists; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(spec_of(v) for v in value)
    return value


@dataclass(frozen=True)
class OpCall:
    """What a cost formula receives (see the module docstring)."""

    target: Any
    args: tuple
    kwargs: Mapping[str, Any]
    out: Any
    conventions: "Conventions"
    fqn: str = ""
    values: Mapping[int, torch.Tensor] = field(default_factory=dict)
    haste_buckets: Any = None  # the HasteBuckets given to estimate(), for the HASTE formula

    def value(self, index: int) -> torch.Tensor | None:
        """The real tensor passed as argument ``index`` (weights and buffers), or None."""
        return self.values.get(index)

    @property
    def tensor_args(self) -> list[TensorSpec]:
        return [a for a in self.args if isinstance(a, TensorSpec)]

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments by schema name (positional or keyword, schema defaults filled in); for ops
        with a schema (``torch.ops.*``), which is what custom-op formulas receive."""
        return schema_arguments(self.target, self.args, self.kwargs)


@dataclass(frozen=True)
class OpCost:
    """What a cost formula returns (see the module docstring). Counts are ints or sympy expressions."""

    macs: Any = 0
    elementwise: Any = 0
    format: str | None = None
    ops: Mapping[tuple[str, str], Any] = field(default_factory=dict)
    bytes_read: Any = None
    bytes_written: Any = None
    params: Any = None
    storage_bits: Any = None
    measured_macs: Any = None
    zero_fraction: float | None = None
    kind: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


Formula = Callable[[OpCall], OpCost]

_REGISTRY: dict[OpOverloadPacket | OpOverload, Formula] = {}
_KINDS: dict[OpOverloadPacket | OpOverload, str] = {}


def register_cost(*targets: OpOverloadPacket | OpOverload, kind: str = "other",
                  flop_counter: bool = True) -> Callable[[Formula], Formula]:
    """Decorator: register ``formula(call: OpCall) -> OpCost`` for ``targets``; returns it unchanged.

    Raises TypeError for a key that is not an op packet/overload, ValueError for a duplicate. With
    ``flop_counter`` (default), ops outside the aten namespace that FlopCounterMode has no formula
    for get one derived from this formula (2·MACs).
    """
    if not targets:
        raise TypeError("register_cost: expected at least one op, e.g. register_cost(torch.ops.aten.mm)")
    for target in targets:
        if not isinstance(target, (OpOverloadPacket, OpOverload)):
            raise TypeError(
                f"register_cost: expected torch.ops.<namespace>.<op> (OpOverloadPacket or OpOverload), "
                f"got {target!r} of type {type(target).__name__}"
            )

    def deco(formula: Formula) -> Formula:
        for target in targets:
            if target in _REGISTRY:
                raise ValueError(f"register_cost: {target} already has a cost formula ({_REGISTRY[target].__qualname__})")
        for target in targets:
            _REGISTRY[target] = formula
            _KINDS[target] = kind
            if flop_counter and op_namespace(target) != "aten":
                _maybe_register_flop_formula(target, formula)
        return formula

    return deco


def lookup(target: Any) -> Formula | None:
    """The formula for an op overload (its own, else its packet's), or None."""
    if not isinstance(target, (OpOverload, OpOverloadPacket)):
        return None
    formula = _REGISTRY.get(target)
    if formula is None and isinstance(target, OpOverload):
        formula = _REGISTRY.get(target.overloadpacket)
    return formula


def registered_kind(target: Any) -> str:
    """The kind an op was registered with ('other' when unknown)."""
    kind = _KINDS.get(target)
    if kind is None and isinstance(target, OpOverload):
        kind = _KINDS.get(target.overloadpacket)
    return kind or "other"


def registered_costs() -> dict[Any, Formula]:
    """A copy of the registry (op -> formula)."""
    return dict(_REGISTRY)


def _maybe_register_flop_formula(target: OpOverloadPacket | OpOverload, formula: Formula) -> None:
    """Give FlopCounterMode a 2·MACs formula for a custom op it does not count yet."""
    from torch.utils import flop_counter

    packet = target.overloadpacket if isinstance(target, OpOverload) else target
    if packet in flop_counter.flop_registry:
        _log.debug("FlopCounterMode already counts %s; keeping its formula", packet)
        return

    def flops(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        from fxslim.cost_model.conventions import Conventions

        call = OpCall(packet, spec_of(args), {k: spec_of(v) for k, v in kwargs.items()}, spec_of(out_val), Conventions())
        return 2 * formula(call).macs

    flop_counter.register_flop_formula(packet, get_raw=True)(flops)
