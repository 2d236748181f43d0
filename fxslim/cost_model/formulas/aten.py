"""Cost formulas for aten ops: matmuls and convs without a view, norms, softmax, elementwise, pooling.

These serve the nodes that have no canonical view (generic ``mm``/``bmm``/``matmul``, everything that
is not a conv, linear or attention) and the aten ops met inside opaque leaf modules. MACs follow
``torch.utils.flop_counter`` exactly (FLOPs = 2·MACs). Work outside FLOPs goes in ``elementwise``,
counted per element with the constants below (a documented convention, not a hardware model):

- unary and binary elementwise ops (activations, add, mul, comparisons, ...): 1 per output element;
- batch norm (inference form, scale and shift): 2 per element; layer/group norm: 5 per element
  with an affine, 4 without (mean, variance, normalise, [affine]); RMS norm: 4 with weight, 3 without;
- softmax / log-softmax: 5 per element (max, subtract, exp, sum, divide);
- reductions (sum, mean, amax, ...): 1 per input element; var/std: 3; vector norms: 2;
- max pooling: k−1 comparisons per output element; average pooling: k per output element;
  adaptive pooling: 1 per input element; bilinear upsampling: 4 per output element.

Pure data movement costs nothing and is listed explicitly in ``DATA_MOVEMENT`` (views, permutes,
concatenation, slicing, indexing, padding, dtype casts, tensor factories, dropout at inference,
nearest upsampling, shape queries, export's runtime asserts). An op that is in none of these lists
is reported in ``CostReport.unknown_ops``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from fxslim.cost_model.registry import OpCall, OpCost, TensorSpec, register_cost
from fxslim.ir import conv_kind

__all__ = ["DATA_MOVEMENT", "UNARY", "BINARY", "conv_kind_of"]

_log = logging.getLogger(__name__)
aten = torch.ops.aten


def _ops(names: tuple[str, ...]) -> list[Any]:
    """The aten packets that exist among ``names`` (the list spans torch versions)."""
    out = []
    for name in names:
        try:
            out.append(getattr(aten, name))
        except (AttributeError, RuntimeError):
            _log.debug("aten.%s does not exist in this torch; not registered", name)
    return out


def _arg(call: OpCall, index: int, name: str, default: Any = None) -> Any:
    if len(call.args) > index:
        return call.args[index]
    return call.kwargs.get(name, default)


def _out(call: OpCall) -> TensorSpec:
    out = call.out
    while isinstance(out, (tuple, list)):
        out = out[0]
    assert isinstance(out, TensorSpec), f"{call.target}: expected a tensor output, got {out!r}"
    return out


# ----------------------------------------------------------------------------------------------
# Matmuls


@register_cost(aten.mm, kind="matmul")
def mm_cost(call: OpCall) -> OpCost:
    """[m, k] @ [k, n] -> [m, n]: m·k·n MACs.
    Ignores: nothing."""
    a, b = call.args[0], call.args[1]
    return OpCost(macs=a.shape[0] * a.shape[1] * b.shape[1])


@register_cost(aten.addmm, kind="matmul")
def addmm_cost(call: OpCall) -> OpCost:
    """bias + [m, k] @ [k, n] -> [m, n]: m·k·n MACs.
    Ignores: the bias addition (like FlopCounterMode)."""
    a, b = call.args[1], call.args[2]
    return OpCost(macs=a.shape[0] * a.shape[1] * b.shape[1])


@register_cost(aten.bmm, kind="matmul")
def bmm_cost(call: OpCall) -> OpCost:
    """[b, m, k] @ [b, k, n] -> [b, m, n]: b·m·k·n MACs.
    Ignores: nothing."""
    a, b = call.args[0], call.args[1]
    return OpCost(macs=a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])


@register_cost(aten.baddbmm, kind="matmul")
def baddbmm_cost(call: OpCall) -> OpCost:
    """bias + [b, m, k] @ [b, k, n] -> [b, m, n]: b·m·k·n MACs.
    Ignores: the bias addition and alpha/beta scaling."""
    a, b = call.args[1], call.args[2]
    return OpCost(macs=a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])


@register_cost(aten.matmul, aten.linear, kind="matmul")
def matmul_cost(call: OpCall) -> OpCost:
    """[..., m, k] @ [..., k, n] -> [..., m, n] (broadcast; linear: [..., k] @ [n, k]^T): numel(out)·k MACs.
    Ignores: the bias addition of linear."""
    a = call.args[0]
    return OpCost(macs=_out(call).numel * a.shape[-1])


# ----------------------------------------------------------------------------------------------
# Convolutions


def conv_kind_of(x: TensorSpec, w: TensorSpec, groups: Any, transposed: bool) -> str:
    """The kind of a conv from its shapes (``fxslim.ir.conv_kind``; a non-2-D conv is 'conv')."""
    if len(w.shape) != 4 and not transposed:
        return "conv"
    if isinstance(groups, torch.SymInt) and groups.node.expr.free_symbols and not transposed:
        raise ValueError("symbolic: a conv's groups follow the input sizes (groups = batch, as timm's CondConv2d "
                         "folds the batch into channels), so whether it is a grouped conv changes with them; "
                         "cost the sizes you need one by one (fxslim.cost_model.sweep)")
    return conv_kind(tuple(w.shape[2:]), groups, x.shape[1], transposed)


def _conv(call: OpCall, transposed: bool, groups: Any) -> OpCost:
    """``groups`` as the call gives it: never made an int, which would pin a symbolic size."""
    x, w = call.args[0], call.args[1]
    out = _out(call)
    # [n, c_in, *s] * [c_out, c_in/g, *k] -> [n, c_out, *s']; transposed: w is [c_in, c_out/g, *k] over s
    spatial = x.shape[2:] if transposed else out.shape[2:]
    macs = x.shape[0] * math.prod(w.shape) * math.prod(spatial)
    return OpCost(macs=macs, kind=conv_kind_of(x, w, groups, transposed))


@register_cost(aten.convolution, aten._convolution, kind="conv")
def convolution_cost(call: OpCall) -> OpCost:
    """N·C_out·(C_in/groups)·prod(kernel)·prod(out spatial) MACs (transposed: over the input positions).
    Ignores: the bias addition, padding (padded positions are counted as MACs)."""
    return _conv(call, bool(_arg(call, 6, "transposed", False)), _arg(call, 8, "groups", 1))


@register_cost(aten.conv1d, aten.conv2d, aten.conv3d, kind="conv")
def conv_nd_cost(call: OpCall) -> OpCost:
    """aten.conv{1,2,3}d (export IR): as ``convolution``.
    Ignores: the bias addition, padding."""
    return _conv(call, False, _arg(call, 6, "groups", 1))


@register_cost(*_ops(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")), kind="transposed_conv")
def conv_transpose_cost(call: OpCall) -> OpCost:
    """aten.conv_transpose{1,2,3}d (export IR): as a transposed ``convolution``.
    Ignores: the bias addition, output padding."""
    return _conv(call, True, _arg(call, 6, "groups", 1))


# ----------------------------------------------------------------------------------------------
# Attention without a view (e.g. inside opaque leaf modules)

SOFTMAX_OPS = 5  # max, subtract, exp, sum, divide per element


@register_cost(*_ops((
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
)), kind="attention")
def sdpa_cost(call: OpCall) -> OpCost:
    """[b, h, s_q, d] @ [b, h, d, s_k] -> [b, h, s_q, s_k] @ [b, h, s_k, d_v]: b·h·s_q·s_k·(d + d_v) MACs.
    Ignores: causal masking (not discounted); softmax, scale and mask go to elementwise."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    scores = math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2]
    return OpCost(macs=scores * (q.shape[-1] + v.shape[-1]), elementwise=scores * (SOFTMAX_OPS + 1))


@register_cost(*_ops(("_native_multi_head_attention",)), kind="attention")
def native_mha_cost(call: OpCall) -> OpCost:
    """nn.MultiheadAttention's fused inference path (eval, no grad, ``need_weights=False``): the q, k, v
    in-projections and the out-projection ([rows, E] @ [E, E] each), and attention over all heads,
    b·L·S·2E MACs; softmax and scale per score are elementwise. (FlopCounterMode sees the
    projections of this op but not its attention.)
    Ignores: the biases (see Conventions.include_bias), the mask."""
    a = call.arguments
    q, k = a["query"], a["key"]
    embed, heads = int(a["embed_dim"]), int(a["num_head"])
    batch = math.prod(q.shape[:-2])
    q_rows, kv_rows = batch * q.shape[-2], batch * k.shape[-2]
    projections = 2 * q_rows * embed * embed + 2 * kv_rows * embed * embed
    attention = q_rows * k.shape[-2] * 2 * embed
    scores = q_rows * heads * k.shape[-2]
    return OpCost(macs=projections + attention, elementwise=scores * (SOFTMAX_OPS + 1))


# ----------------------------------------------------------------------------------------------
# Elementwise, norms, softmax, reductions, pooling

UNARY = (
    "abs", "neg", "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "mish", "mish_", "softplus", "threshold", "threshold_", "_prelu_kernel",
    "exp", "exp_", "exp2", "expm1", "log", "log_", "log2", "log1p", "sqrt", "sqrt_", "rsqrt", "rsqrt_",
    "reciprocal", "reciprocal_", "sin", "cos", "tan", "atan", "erf", "erf_", "erfinv", "sign", "sgn",
    "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
    "clamp_max_", "pow", "pow_", "square", "logical_not", "bitwise_not", "isnan", "isinf", "nan_to_num",
    "log_sigmoid_forward", "glu", "celu", "selu", "rrelu", "softshrink", "hardshrink",
)
BINARY = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "true_divide", "floor_divide",
    "remainder", "fmod", "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt", "ge", "where",
    "masked_fill", "masked_fill_", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "atan2", "hypot", "copysign", "lerp", "lerp_", "xlogy", "heaviside",
)


@register_cost(*_ops(UNARY + BINARY), kind="elementwise")
def elementwise_cost(call: OpCall) -> OpCost:
    """One operation per output element.
    Ignores: that transcendental functions cost more than an add."""
    return OpCost(elementwise=_out(call).numel)


@register_cost(*_ops(("addcmul", "addcmul_", "addcdiv", "addcdiv_")), kind="elementwise")
def addc_cost(call: OpCall) -> OpCost:
    """x + value·(a ∘ b): two operations per output element.
    Ignores: the scalar ``value`` multiplication."""
    return OpCost(elementwise=2 * _out(call).numel)


@register_cost(*_ops((
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "batch_norm", "cudnn_batch_norm", "miopen_batch_norm",
    "_batch_norm_with_update", "_batch_norm_no_update",
)), kind="norm")
def batch_norm_cost(call: OpCall) -> OpCost:
    """Inference batch norm, y = x·a + b per channel: 2 per element.
    Ignores: computing batch statistics in training mode."""
    return OpCost(elementwise=2 * call.args[0].numel)


@register_cost(*_ops(("native_layer_norm", "layer_norm", "native_group_norm", "group_norm")), kind="norm")
def layer_norm_cost(call: OpCall) -> OpCost:
    """Layer/group norm: mean, variance, normalise (+ affine): 5 per element with a weight, else 4.
    Ignores: the rsqrt per group."""
    name = call.target.__name__.split(".")[0]
    weight_index = 1 if name == "native_group_norm" else 2  # group_norm(input, num_groups, weight, ...)
    has_affine = isinstance(_arg(call, weight_index, "weight"), TensorSpec)
    return OpCost(elementwise=(5 if has_affine else 4) * call.args[0].numel)


@register_cost(*_ops(("rms_norm", "_fused_rms_norm")), kind="norm")
def rms_norm_cost(call: OpCall) -> OpCost:
    """RMS norm: square, mean, scale (+ weight): 4 per element with a weight, else 3.
    Ignores: the rsqrt per row."""
    has_weight = isinstance(_arg(call, 2, "weight"), TensorSpec)
    return OpCost(elementwise=(4 if has_weight else 3) * call.args[0].numel)


@register_cost(*_ops(("_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax")), kind="softmax")
def softmax_cost(call: OpCall) -> OpCost:
    """Softmax over one dim: 5 per element (max, subtract, exp, sum, divide).
    Ignores: nothing else."""
    return OpCost(elementwise=SOFTMAX_OPS * call.args[0].numel)


@register_cost(*_ops((
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "all", "any", "cumsum",
    "cumprod", "logsumexp", "nansum", "count_nonzero",
)), kind="reduction")
def reduction_cost(call: OpCall) -> OpCost:
    """One operation per input element.
    Ignores: the final division of mean."""
    return OpCost(elementwise=call.args[0].numel)


@register_cost(*_ops(("var", "std", "var_mean", "std_mean")), kind="reduction")
def variance_cost(call: OpCall) -> OpCost:
    """Mean, subtract, square-accumulate: 3 per input element.
    Ignores: the final division/sqrt."""
    return OpCost(elementwise=3 * call.args[0].numel)


@register_cost(*_ops(("linalg_vector_norm", "norm", "frobenius_norm")), kind="reduction")
def vector_norm_cost(call: OpCall) -> OpCost:
    """Square and accumulate: 2 per input element.
    Ignores: the final root."""
    return OpCost(elementwise=2 * call.args[0].numel)


def _kernel_size(call: OpCall) -> int:
    """Taps per window: a lone size (``3`` or ``[3]``) holds for each of the op's 1, 2 or 3 dims."""
    kernel = _arg(call, 1, "kernel_size")
    dims = next(d for d in (1, 2, 3) if f"{d}d" in call.target.__name__)
    if isinstance(kernel, (list, tuple)) and len(kernel) == 1:
        kernel = kernel[0]
    return math.prod(kernel) if isinstance(kernel, (list, tuple)) else kernel ** dims


@register_cost(*_ops(("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
                      "max_pool3d_with_indices", "max_pool1d_with_indices")), kind="pool")
def max_pool_cost(call: OpCall) -> OpCost:
    """k−1 comparisons per output element.
    Ignores: padding positions."""
    return OpCost(elementwise=_out(call).numel * (_kernel_size(call) - 1))


@register_cost(*_ops(("avg_pool1d", "avg_pool2d", "avg_pool3d")), kind="pool")
def avg_pool_cost(call: OpCall) -> OpCost:
    """k−1 additions and one division per output element: k.
    Ignores: padding positions."""
    return OpCost(elementwise=_out(call).numel * _kernel_size(call))


@register_cost(*_ops(("_adaptive_avg_pool2d", "adaptive_avg_pool2d", "adaptive_avg_pool1d", "_adaptive_avg_pool3d",
                      "adaptive_max_pool2d", "adaptive_max_pool1d", "adaptive_max_pool3d")), kind="pool")
def adaptive_pool_cost(call: OpCall) -> OpCost:
    """One operation per input element.
    Ignores: the divisions per output element and overlapping windows."""
    return OpCost(elementwise=call.args[0].numel)


@register_cost(*_ops(("upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d",
                      "_upsample_bilinear2d_aa", "grid_sampler_2d")), kind="elementwise")
def interpolate_cost(call: OpCall) -> OpCost:
    """Linear interpolation: 4 operations per output element.
    Ignores: bicubic's larger stencil."""
    return OpCost(elementwise=4 * _out(call).numel)


# ----------------------------------------------------------------------------------------------
# Zero cost: data movement

DATA_MOVEMENT = (
    # views and layout
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "transpose_", "t", "t_",
    "expand", "expand_as", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "flatten", "unflatten", "alias",
    "detach", "detach_", "as_strided", "as_strided_", "movedim", "swapaxes", "diagonal", "view_as", "view_as_real",
    "view_as_complex", "unfold", "contiguous", "clone", "_to_copy", "to", "type_as", "copy", "copy_",
    "lift_fresh", "lift_fresh_copy", "view_copy", "permute_copy", "transpose_copy", "t_copy", "expand_copy",
    "unsqueeze_copy", "squeeze_copy", "alias_copy", "_unsafe_view_copy", "detach_copy", "_conj",
    # splitting, joining, slicing, indexing
    "cat", "concat", "stack", "hstack", "vstack", "split", "split_with_sizes", "unsafe_split", "chunk", "unbind", "tensor_split",
    "split_copy", "split_with_sizes_copy", "unbind_copy", "select", "slice", "narrow", "select_copy",
    "slice_copy", "index", "index_select", "gather", "take",
    "slice_scatter", "select_scatter", "masked_select", "embedding", "repeat", "tile", "repeat_interleave",
    "roll", "flip", "tril", "triu", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "im2col",
    # padding and resampling without arithmetic
    "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "_upsample_nearest_exact2d",
    # factories and fills
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "new_zeros",
    "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "fill", "fill_", "zero_", "arange",
    "linspace", "scalar_tensor", "rand", "randn", "rand_like", "randn_like", "bernoulli", "_local_scalar_dense",
    # identity at inference
    "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    # shape queries and export's runtime checks
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_tensor_metadata", "_assert_scalar",
    "sym_constrain_range", "sym_constrain_range_for_size", "_assert_async", "resize_", "set_",
)


# Writes at indices: data movement (zero operations), unless the values are combined with what is
# there, one operation per value. Ignores: index_add's ``alpha`` multiplication; that a value
# landing alone adds nothing.

def _numel(value: Any) -> Any:
    return value.numel if isinstance(value, TensorSpec) else 1


def _combined(values: Any) -> OpCost:
    return OpCost(elementwise=values) if values else OpCost(kind="data")


@register_cost(*_ops(("index_put", "index_put_")), kind="elementwise")
def index_put_cost(call: OpCall) -> OpCost:
    """One add per value with ``accumulate=True``, else data movement."""
    a = call.arguments
    return _combined(_numel(a.get("values")) if a.get("accumulate") else 0)


@register_cost(*_ops(("scatter", "scatter_")), kind="elementwise")
def scatter_cost(call: OpCall) -> OpCost:
    """One op per index with ``reduce=...``, else data movement."""
    a = call.arguments
    return _combined(_numel(a.get("index")) if a.get("reduce") is not None else 0)


@register_cost(*_ops(("scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_")), kind="elementwise")
def scatter_reduce_cost(call: OpCall) -> OpCost:
    """One op per index."""
    return _combined(_numel(call.arguments.get("index")))


@register_cost(*_ops(("index_add", "index_add_")), kind="elementwise")
def index_add_cost(call: OpCall) -> OpCost:
    """One add per source value."""
    return _combined(_numel(call.arguments.get("source")))


@register_cost(*_ops(("col2im",)), kind="elementwise")
def col2im_cost(call: OpCall) -> OpCost:
    """``F.fold``: every patch value is added into its (overlapping) place."""
    return _combined(_numel(call.args[0]))


@register_cost(*_ops(DATA_MOVEMENT), kind="data")
def data_movement_cost(call: OpCall) -> OpCost:
    """Moves or creates data without arithmetic: zero operations.
    Ignores: memory traffic (counted separately when conventions.include_memory is set)."""
    return OpCost()
