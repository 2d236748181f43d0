"""Fast integer runtime of PROM: oneDNN's fused u8 quantized convs behind ``torch.ops.fxslim`` ops.

Same numbers as ``fxslim.runtime.prom`` (uint8 activation codes, real value ``s·(q − z)``, per-channel
symmetric int8 weight codes; ternary codes {−1, 0, 1} are exact int8 codes), but the
requantization is oneDNN's: ``acc_s32 · s_x·w_c + bias_c`` in f32, then the clamp of the activation
(``out_min``/``out_max`` codes, applied as a ``relu``/``hardtanh`` post-op on the real value) and
``round_half_even(y / s_y) + z_y`` saturated to u8, all inside the conv kernel. ``prom`` keeps
the fixed-point integer requantization; the two agree within 1 LSB, and the float models of
``prom_reference`` (``conv2d_float_reference``, ``add_float_reference``, ...) are these ops' oracles
(tests/runtime/test_prom_onednn.py).

- ``qconv2d``: any conv (pointwise ternary, depthwise, the stem), u8 [N, C, H, W] → u8
  channels_last. Weights are prepacked once per (weight tensor, geometry, post-op) and cached
  (``prepack``; the converter calls it so a converted model is packed before its first call).
  The oneDNN kernel is reached through ATen's quantized convs (``QUANTIZED_CONV``, QTensors in and
  out) when the clamp is none or a relu, which the lowered runtime calls from TorchScript, else
  through ``onednn::qconv_pointwise``; the op and its lowered form run the same kernel, so they agree bit for bit.
- ``qconv2d_add``: ``qconv2d`` onto the conv's own grid, then ``qadd`` of a u8 ``skip`` tensor: a
  conv feeding a residual add. The direct runtime runs the pair as one kernel (oneDNN post-ops
  round onto the conv's grid before the sum); the op itself, as the two ops (ATen's fused
  ``conv2d_add`` rounds once, with no grid of the conv's).
- ``qlinear``: linear layer, u8 [..., in] → u8 [..., out].
- ``qadd``: residual add of two u8 tensors in float32, the same arithmetic as the fake-quant model
  (dequantize, add, quantize), so it is bit-exact against it; used where ``qconv2d_add`` cannot be.

Exactness: oneDNN's int8 kernels sum u8·s8 products exactly with VNNI/AMX dot products
(``vnni_available``). Without them (AVX2) they add pairs of products in saturating int16 first,
which 8-bit weights overflow (codes off by up to 99 on a dense 3×3 conv with weights ±127):
``exact_sums`` says which weights oneDNN sums exactly on this CPU, and the ops compute the others
with their integer sums in float (``_exact_conv``, ``_exact_linear``: the same requantization,
within 1 LSB of oneDNN's), so a converted model gives its values on every CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from fxslim.runtime.autocast_kernels import exclude_autocast
from fxslim.runtime.prom import (
    _CACHE, _check_addends, _check_code, _check_code_range, _check_conv_geometry, _check_uint8, _conv_acc, _inverse_scale,
    _linear_acc, conv_output_size,
)

__all__ = ["qconv2d", "qconv2d_add", "qlinear", "qadd", "prepack", "prepack_linear", "vnni_available", "onednn_available",
           "exact_sums",
           "QUANTIZED_CONV", "quantized_conv_add", "onednn_engine", "codes", "as_qtensor", "pack_quantized",
           "ConvWeights", "miscomputed_grouping", "requantization", "quiet_qtensor_warning"]

def onednn_available() -> bool:
    """Whether this torch build has the oneDNN quantized conv/linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise")


def vnni_available() -> bool:
    """Whether the CPU has exact u8·s8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    flags = _cpu_flags()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def exact_sums(weight: Tensor, groups: int) -> bool:
    """Whether oneDNN's u8·s8 kernels sum the products of these int8 weight codes (a conv's
    [C_out, C_in/groups, kH, kW] or a linear's [out, in]) exactly on this CPU: always with VNNI/AMX;
    on AVX2 when no pair of products can leave int16 (every |code| ≤ 64, as ternary codes: 2·255·64
    < 2^15), and for depthwise convs (one input and one output channel per group), whose kernel
    adds no pairs (measured on AVX2 with codes 255 against weights ±127)."""
    if vnni_available():
        return True
    if weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] == groups:
        return True
    # the bounds rather than int8 abs(), which leaves −128 at −128
    return weight.numel() == 0 or max(-int(weight.min()), int(weight.max())) <= _PAIR_SAFE


_PAIR_SAFE = 64  # the largest |weight code| whose pairs of u8 products stay below 2^15 (2·255·64 = 32640)


def _exact_sums(weight: Tensor, groups: int) -> bool:
    """``exact_sums``, cached on the weight tensor (the ops ask on every call)."""
    return _CACHE.get(weight, ("exact_sums", int(groups)), lambda: exact_sums(weight, groups))


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _check_scale(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite float > 0, got {value}")


def _check_out(out_scale: float, out_zero_point: int, out_min: int, out_max: int) -> None:
    _check_scale("out_scale", out_scale)
    _check_code("out_zero_point", out_zero_point)
    _check_code_range(out_min, out_max)


def _check_weight(weight: Tensor, w_scale: Tensor, bias: Tensor, dim: int) -> None:
    if weight.dtype != torch.int8 or weight.dim() != dim:
        raise ValueError(f"weight: expected {dim}-d int8 codes, got {weight.dtype} {tuple(weight.shape)}")
    c_out = weight.shape[0]
    for name, t in (("w_scale", w_scale), ("bias", bias)):
        if t.dtype != torch.float32 or tuple(t.shape) != (c_out,):
            raise ValueError(f"{name}: expected a float32 tensor of shape [{c_out}], got {t.dtype} {tuple(t.shape)}")


def _post_op(out_scale: float, out_zero_point: int, out_min: int, out_max: int) -> tuple[str, list[float]]:
    """The oneDNN unary post-op that clamps codes to [out_min, out_max]: quantization is monotone,
    so clamping the real value to the reals of those codes clamps the codes to them."""
    if (out_min, out_max) == (0, 255):
        return "none", []
    if (out_min, out_max) == (out_zero_point, 255):
        return "relu", []
    return "hardtanh", [(out_min - out_zero_point) * out_scale, (out_max - out_zero_point) * out_scale]


# ----------------------------------------------------------------------------------------------
# qconv2d / qconv2d_add

_CONV_ARGS = (
    "Tensor x, float x_scale, int x_zero_point, Tensor weight, Tensor w_scale, Tensor bias, float out_scale, "
    "int out_zero_point, int out_min, int out_max, int[2] stride, int[2] padding, int[2] dilation, int groups"
)


def _check_image(x: Tensor) -> None:
    _check_uint8("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-d tensor [N, C_in, H, W], got shape {tuple(x.shape)}")


def _conv_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
                stride, padding, dilation, groups):
    _check_image(x)
    _check_scale("x_scale", x_scale)
    _check_code("x_zero_point", x_zero_point)
    _check_weight(weight, w_scale, bias, 4)
    _check_out(out_scale, out_zero_point, out_min, out_max)
    shape, stride, padding, dilation = _check_conv_geometry(x, weight, groups, stride, padding, dilation)
    return shape, list(stride), list(padding), list(dilation)


# ATen's quantized convs on oneDNN, by post-op. Their packed weights keep the oneDNN primitive of
# their first call and reuse it while input shape and quantization stay the same, where
# ``onednn::qconv_pointwise`` builds its primitive descriptor on every call (7.5 against 21 µs a
# call at batch 1, called from TorchScript). They take QTensors and read the input's quantization
# from it. ``qconv_pointwise`` stays for the post-op they lack (hardtanh: a clamp short of the u8 range).
# Both are deprecated in torch (QTensors, and TorchScript that ``prom_lowered`` calls them from):
# on a torch without them every conv takes ``qconv_pointwise``, with the same values within 1 LSB.
def _quantized_convs_available() -> bool:
    return "onednn" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "conv2d_relu")


QUANTIZED_CONV = ({"none": torch.ops.quantized.conv2d, "relu": torch.ops.quantized.conv2d_relu}
                  if _quantized_convs_available() else {})


def quantized_conv_add(x: Tensor, skip: Tensor, packed: torch.classes.quantized.Conv2dPackedParamsBase,
                       conv_scale: float, conv_zero_point: int, relu: bool, out_scale: float, out_zero_point: int
                       ) -> Tensor:
    """``fxslim::qconv2d_add`` on ATen's quantized convs (TorchScript; QTensors ``x``, ``skip`` and the
    result): the conv onto its own grid, then the add as ``qadd`` computes it, in float32. ATen's
    ``conv2d_add`` would round once, with no grid of the conv's."""
    conv = torch.ops.quantized.conv2d(x, packed, conv_scale, conv_zero_point)
    total = conv.dequantize() + skip.dequantize()
    if relu:
        total = torch.relu(total)
    bound = 512.0 * out_scale  # past either end of the grid: ATen's quantizer would wrap beyond int32
    return torch.quantize_per_tensor(total.clamp(-bound, bound), out_scale, out_zero_point, torch.quint8)


@contextlib.contextmanager
def onednn_engine() -> Iterator[None]:
    """ATen's quantized engine set to oneDNN inside, the caller's restored after: the prepacked weights
    are oneDNN's only if packed under it. The engine is one setting for the process: the first of
    the threads inside sets it and the last one out restores it (each restoring what it saw on the
    way in left another thread's oneDNN as the user's engine)."""
    with _ENGINE.lock:
        engine = torch.backends.quantized.engine
        if not _ENGINE.calls or engine != "onednn":  # also one the user chose while a call was inside
            _ENGINE.callers = engine
        if engine != "onednn":
            torch.backends.quantized.engine = "onednn"
        _ENGINE.calls += 1
    try:
        yield
    finally:
        with _ENGINE.lock:
            _ENGINE.calls -= 1
            if not _ENGINE.calls:
                torch.backends.quantized.engine = _ENGINE.callers


@dataclasses.dataclass
class _EngineUse:
    """The calls inside ``onednn_engine`` now, and the engine to give back when the last one leaves."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    calls: int = 0
    callers: str = ""


_ENGINE = _EngineUse()


def codes(q: Tensor) -> Tensor:
    """The uint8 codes of a quint8 QTensor, as a view of its storage (``int_repr`` copies them)."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def as_qtensor(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """uint8 codes ``x`` as a quint8 QTensor with these parameters (a copy), channels_last when 4-d."""
    if x.dim() == 4:
        x = _channels_last(x)
    return torch._make_per_tensor_quantized_tensor(x, scale, zero_point)


def quiet_qtensor_warning() -> None:
    """Make the process's first QTensor now, with warnings off: ATen warns once per process, at the first
    one, that quantized dtypes are deprecated, and a runtime built on QTensors would pass that on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)


_quiet_once = functools.cache(quiet_qtensor_warning)


def requantization(x_scale: float, w_scale: Tensor, out_scale: float) -> tuple[Tensor, float]:
    """The float32 factors oneDNN requantizes a u8 conv's or linear's int32 sums with, for kernels
    that compute as it does: per output channel fl32(x scale) · fl32(w scale) (a contiguous float32
    tensor), and fl32(1 / fl32(out scale))."""
    scale = torch.tensor(x_scale, dtype=torch.float32) * w_scale.to(torch.float32)
    return scale.contiguous(), _inverse_scale(out_scale)


def _dense(t: Tensor) -> Tensor:
    """``t`` if contiguous, else a contiguous copy cached on it. oneDNN's ops read weights, scales and
    biases as dense arrays whatever their strides: a converted model given a transposed or strided
    tensor (``load_state_dict(..., assign=True)`` from such a source) got other codes, silently."""
    return t if t.is_contiguous() else _CACHE.get(t, "contiguous", t.contiguous)


def pack_quantized(weight: Tensor, w_scale: Tensor, bias: Tensor, stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int) -> torch.ScriptObject:
    """A new packed form of the int8 ``weight`` (per-channel ``w_scale``, real ``bias``) for ATen's
    quantized convs on oneDNN. Each holds the primitive of the first input shape it runs at."""
    weight, w_scale, bias = _dense(weight), _dense(w_scale), _dense(bias)
    zeros = torch.zeros(weight.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # QTensors are deprecated (see QUANTIZED_CONV)
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(weight, w_scale.double(), zeros, 0)
    with onednn_engine():
        return torch.ops.quantized.conv2d_prepack(qweight, bias, list(stride), list(padding), list(dilation), groups)


@dataclasses.dataclass(frozen=True, eq=False)
class ConvWeights:
    """A conv's constants, as the lowered runtimes pack them: int8 ``weight`` codes [O, I/groups, kH, kW],
    per-channel ``w_scale`` [O], real ``bias`` [O] and its geometry."""

    weight: Tensor
    w_scale: Tensor
    bias: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def pack(self) -> torch.ScriptObject:
        """A new packed form for ATen's quantized convs (``pack_quantized``)."""
        return pack_quantized(self.weight, self.w_scale, self.bias, self.stride, self.padding, self.dilation, self.groups)


def prepack(weight: Tensor, w_scale: Tensor, bias: Tensor, x_scale: float, x_zero_point: int, post_op: str,
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> tuple[object, Tensor | None]:
    """The packed form of ``weight`` the conv ops run with a ``post_op`` (``_post_op``), cached on the
    tensor: ATen's quantized conv's packed params (a ScriptObject; zero points None) when it has that
    post-op, else oneDNN's packed weight and its int64 zero points."""
    geometry = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    if post_op in QUANTIZED_CONV:
        return _CACHE.get(weight, ("quantized", *geometry), lambda: (
            pack_quantized(weight, w_scale, bias, stride, padding, dilation, groups), None), also=(w_scale, bias))
    key = ("qconv", float(x_scale), int(x_zero_point), *geometry)
    return _CACHE.get(weight, key, lambda: (
        torch.ops.onednn.qconv_prepack(weight, w_scale, x_scale, x_zero_point, list(stride), list(padding),
                                       list(dilation), groups, None),
        torch.zeros(weight.shape[0], dtype=torch.int64),
    ), also=(w_scale,))


def _conv_plan(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
               stride, padding, dilation, groups, full: bool = False) -> tuple:
    """Everything about a conv call but ``x``, checked and prepared once per weight and arguments:
    (packed weight, zero points, post-op name, post-op scalars, stride, padding, dilation), and with
    ``full`` whether every input size gives an output (then a caller that knows x need not check it)."""
    key = ("plan", x_scale, x_zero_point, out_scale, out_zero_point, out_min, out_max, tuple(stride), tuple(padding),
           tuple(dilation), groups)

    def build() -> tuple:
        _, stride_, padding_, dilation_ = _conv_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale,
                                                      out_zero_point, out_min, out_max, stride, padding, dilation, groups)
        post_op = _post_op(out_scale, out_zero_point, out_min, out_max)
        packed, zeros = prepack(weight, w_scale, bias, x_scale, x_zero_point, post_op[0], stride_, padding_, dilation_,
                                groups)
        # whether a 1-pixel input still gives an output (then no input size can be too small)
        any_size = all(conv_output_size(1, weight.shape[2 + i], stride_[i], padding_[i], dilation_[i]) >= 1 for i in range(2))
        return (packed, zeros, *post_op, stride_, padding_, dilation_, any_size)

    plan = _CACHE.get(weight, key, build, also=(w_scale, bias))
    # per call, only what x can change (the plan's checks covered the rest)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != weight.shape[1] * groups or not plan[7]:
        _conv_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
                    stride, padding, dilation, groups)
    return plan if full else plan[:7]


# Registered with torch.library.define/impl rather than custom_op: the per-call overhead of a
# custom_op (about 10 µs) is a tenth of a small conv at batch 1.
torch.library.define("fxslim::qconv2d", f"({_CONV_ARGS}) -> Tensor")
torch.library.define(
    "fxslim::qconv2d_add",
    f"({_CONV_ARGS}, Tensor skip, float skip_scale, int skip_zero_point, float conv_scale, int conv_zero_point) -> Tensor")


def one_column_widened(x: Tensor, kernel: int, stride: int, padding: int, dilation: int, zero_point: int) -> Tensor:
    """``x`` (uint8 codes [N, C, H, W]) with ``stride`` columns of ``zero_point`` appended when the
    conv gives one output column at a stride above 1, else ``x`` itself.

    oneDNN computes a conv with one output column and a column stride of 2 or more wrongly (codes off
    by up to 255 on every row: a 16×2 input through a 3×3 stride-2 conv with padding 1, or any
    resolution whose last feature maps are one column wide). With two output columns it is right,
    and the first one is the conv's: its window sees the appended columns exactly where it saw the
    right padding (the zero point) before.
    """
    if stride == 1 or conv_output_size(x.shape[3], kernel, stride, padding, dilation) != 1:
        return x
    return torch.nn.functional.pad(x, (0, stride), value=zero_point)


def miscomputed_grouping(weight: Tensor, groups: int) -> bool:
    """Whether torch's oneDNN may get this conv's codes wrong: a grouped conv (groups above 1) with a
    kernel larger than 1×1 that is not plain depthwise (one input and one output channel per group).

    Measured on torch 2.14.1 (AMX/VNNI): codes off by up to 255 for, among others, 2 groups of 2 → 24
    channels with a 3×3 kernel on a 7×7 input, 2 groups of 1 → 48 on 9×9, 2 groups of 12 → 24 with a
    7×7 kernel; which groupings fail depends on the channel counts per group and the input size, so
    every grouped conv of this kind is computed exactly instead (``_exact_conv``). oneDNN 3.2
    (``prom_direct``) gets them right.
    """
    return groups > 1 and weight.shape[2] * weight.shape[3] > 1 and not (weight.shape[1] == 1 and weight.shape[0] == groups)


def _exact_conv(x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, w_scale: Tensor, bias: Tensor,
                out_scale: float, out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``qconv2d``'s arithmetic without oneDNN's kernels, for convs they would get wrong
    (``miscomputed_grouping``, or sums not ``exact_sums`` on this CPU): the integer sums Σ w·(q − z)
    in float as the reference runtime makes them (``prom._conv_acc``: float32 where that is exact,
    else float64), then oneDNN's requantization in float32 (``_requantized``); uint8 channels_last
    like the oneDNN ops, within 1 LSB of them (they fuse the scaling into one rounding)."""
    zero = _no_integer_bias(weight)

    def part(rows: Tensor) -> Tensor:
        acc = _conv_acc(rows, x_zero_point, weight, weight, zero, tuple(stride), tuple(padding), tuple(dilation),
                        groups, onednn=False)
        return _requantized(acc, x_scale, w_scale, bias, out_scale, out_zero_point, out_min, out_max, 1)

    # a few samples at a time: the float sums are 4-8× the size of the codes, and a fresh buffer of
    # tens of MB a call costs more in page faults than the conv (MobileNetV2's stem at batch 16: 29 ms whole, 18 in slices)
    first = part(x[:1] if x.shape[0] else x)
    rows = max(1, _EXACT_CHUNK // max(1, first.numel()))
    if x.shape[0] <= 1:
        return first
    out = torch.empty((x.shape[0], *first.shape[1:]), dtype=torch.uint8, memory_format=torch.channels_last)
    out[:1] = first
    for start in range(1, x.shape[0], rows):
        out[start : start + rows] = part(x[start : start + rows])
    return out


_EXACT_CHUNK = 1 << 19  # output values per slice of ``_exact_conv``: 2 MB of float32 sums, about L2's size


def _no_integer_bias(weight: Tensor) -> Tensor:
    """A zero int32 bias per output channel (cached on ``weight``): the reference runtime's exact
    sums add an integer bias, these ops a real one after scaling."""
    return _CACHE.get(weight, "no_integer_bias", lambda: torch.zeros(weight.shape[0], dtype=torch.int32))


def _requantized(acc: Tensor, x_scale: float, w_scale: Tensor, bias: Tensor, out_scale: float, out_zero_point: int,
                 out_min: int, out_max: int, channel_dim: int) -> Tensor:
    """u8 codes of the exact integer sums ``acc`` as oneDNN requantizes them: real = fl32(acc)·(fl32(s_x)·w_c)
    + bias_c, then round_half_even(real · fl32(1/s_out)) + z_out clamped to [out_min, out_max]
    (ATen's quantizer: one pass, 3-7× faster than the same steps as float ops; after a clamp that keeps
    real · (1/s_out) inside int32); channels_last when 4-d."""
    scale, _ = requantization(x_scale, w_scale, out_scale)
    shape = [-1 if d == channel_dim else 1 for d in range(acc.dim())]
    real = acc.to(torch.float32).mul_(scale.view(shape)).add_(bias.view(shape))  # in place: acc is the caller's own
    bound = min(_SATURATED * out_scale, _FLOAT32_MAX)  # a float32 clamp bound (out_scale may pass 6.6e35)
    _quiet_once()
    out = codes(torch.quantize_per_tensor(real.clamp_(-bound, bound), out_scale, out_zero_point, torch.quint8))
    if (out_min, out_max) != (0, 255):
        out = out.clamp_(out_min, out_max)
    return _channels_last(out) if out.dim() == 4 else out.contiguous()


_SATURATED = 512.0  # steps of the grid from 0 past which every code saturates (the grid spans 255)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def may_pad_explicitly(weight: Tensor, padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether ``_padded_explicitly`` writes padding into the input at some input size: padding past
    the kernel's extent minus one, or padding with a dilation (a window can straddle a small input)."""
    pad, dil = _pair(padding), _pair(dilation)
    return any(pad[i] > 0 and (pad[i] > dil[i] * (weight.shape[2 + i] - 1) or dil[i] > 1) for i in range(2))


def _pair(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values] * (2 // len(values))


def _padded_explicitly(x: Tensor, weight: Tensor, padding: Sequence[int], dilation: Sequence[int], zero_point: int
                       ) -> tuple[Tensor, Sequence[int]]:
    """``x`` and ``padding``, with the padding of each spatial dim where a window can lie wholly in
    it written into ``x`` as the zero point (what the conv pads with) instead.

    oneDNN gets the outputs whose window holds only padding wrong (codes off by up to 255) for
    convs with one input channel per group (a grayscale stem, a depthwise conv with a channel
    multiplier): a 3×3 kernel with padding 3, a 2×2 one with padding 2, or a 1-row input under a
    2-row kernel dilated by 2 with padding 1. Such a window exists where the padding passes the
    kernel's extent minus one, or where the dilation passes the input size. The output is the same.
    """
    (ph, pw), (dh, dw) = (padding[0], padding[-1]), (dilation[0], dilation[-1])
    if (ph == 0 or (ph <= dh * (weight.shape[2] - 1) and dh <= x.shape[2])) and (
            pw == 0 or (pw <= dw * (weight.shape[3] - 1) and dw <= x.shape[3])):
        return x, padding  # the common case, checked first: this runs on every conv call
    pad, dil = _pair(padding), _pair(dilation)
    explicit = [pad[i] if pad[i] > 0 and (pad[i] > dil[i] * (weight.shape[2 + i] - 1) or dil[i] > x.shape[2 + i])
                else 0 for i in range(2)]
    x = torch.nn.functional.pad(x, (explicit[1], explicit[1], explicit[0], explicit[0]), value=zero_point)
    return x, [pad[i] - explicit[i] for i in range(2)]


def _first_column(out: Tensor) -> Tensor:
    """The conv's output column of a ``one_column_widened`` input's two."""
    return out[..., :1].contiguous(memory_format=torch.channels_last)


@torch.library.impl("fxslim::qconv2d", "cpu")
def _qconv2d_cpu(
    x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, w_scale: Tensor, bias: Tensor, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> Tensor:
    """Conv with int8 weight codes, requantized to u8 in the kernel (module docstring).

    y_c = s_x·w_scale_c·Σ w·(q − z_x) + bias_c (real bias); out = clamp(round(y/s_out) + z_out).
    """
    weight, w_scale, bias = _dense(weight), _dense(w_scale), _dense(bias)
    if miscomputed_grouping(weight, groups) or not _exact_sums(weight, groups):
        *_, stride, padding, dilation = _conv_plan(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale,
                                                   out_zero_point, out_min, out_max, stride, padding, dilation, groups)
        return _exact_conv(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min,
                           out_max, stride, padding, dilation, groups)
    _check_image(x)  # before the padding below reads its spatial dims
    x, padding = _padded_explicitly(x, weight, padding, dilation, x_zero_point)
    packed, zeros, attr, scalars, stride, padding, dilation = _conv_plan(
        x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max, stride, padding,
        dilation, groups)
    wide = one_column_widened(x, weight.shape[3], stride[1], padding[1], dilation[1], x_zero_point)
    if wide is not x:
        return _first_column(qconv2d(wide, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point,
                                     out_min, out_max, stride, padding, dilation, groups))
    if attr in QUANTIZED_CONV:
        with onednn_engine():
            return codes(QUANTIZED_CONV[attr](as_qtensor(x, x_scale, x_zero_point), packed, out_scale, out_zero_point))
    return torch.ops.onednn.qconv_pointwise.default(
        _channels_last(x), x_scale, x_zero_point, packed, w_scale, zeros, bias, stride, padding, dilation, groups,
        out_scale, out_zero_point, None, attr, scalars, "",
    )


def _channels_last(x: Tensor) -> Tensor:
    """``x`` in the layout oneDNN computes in. ATen's u8 reorder is about 3× faster than the one
    oneDNN runs inside the conv (the stem's NCHW input: 1.2 vs 3.2 ms at batch 16, 224 px)."""
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("fxslim::qconv2d")
def _qconv2d_fake(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
                  stride, padding, dilation, groups):
    shape, *_ = _conv_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
                            stride, padding, dilation, groups)
    return torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)


@torch.library.impl("fxslim::qconv2d_add", "cpu")
def _qconv2d_add_cpu(
    x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, w_scale: Tensor, bias: Tensor, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int, skip: Tensor, skip_scale: float, skip_zero_point: int, conv_scale: float,
    conv_zero_point: int,
) -> Tensor:
    """``qconv2d`` plus a residual, as the fake-quant model computes it: the conv's real output
    quantized onto its own grid (``conv_scale``, ``conv_zero_point``), saturating at its ends, then
    ``qadd`` of it and ``skip``. The direct runtime (``prom_direct``) computes the same in one
    kernel; ATen's fused ``conv2d_add`` rounds once, with no grid of the conv's, so it is not used.
    """
    _check_scale("conv_scale", conv_scale)
    _check_code("conv_zero_point", conv_zero_point)
    conv = qconv2d(x, x_scale, x_zero_point, weight, w_scale, bias, conv_scale, conv_zero_point, 0, 255, stride,
                   padding, dilation, groups)
    _add_skip_check(skip, tuple(conv.shape), skip_scale, skip_zero_point)
    return qadd(conv, conv_scale, conv_zero_point, skip, skip_scale, skip_zero_point, out_scale, out_zero_point,
                out_min, out_max)


def _add_skip_check(skip: Tensor, shape: tuple[int, ...], skip_scale: float, skip_zero_point: int) -> None:
    _check_uint8("skip", skip)
    if tuple(skip.shape) != tuple(shape):
        raise ValueError(f"skip: expected the conv's output shape {tuple(shape)}, got {tuple(skip.shape)}")
    _check_scale("skip_scale", skip_scale)
    _check_code("skip_zero_point", skip_zero_point)


@torch.library.register_fake("fxslim::qconv2d_add")
def _qconv2d_add_fake(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
                      stride, padding, dilation, groups, skip, skip_scale, skip_zero_point, conv_scale, conv_zero_point):
    shape, *_ = _conv_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max,
                            stride, padding, dilation, groups)
    _add_skip_check(skip, shape, skip_scale, skip_zero_point)
    _check_scale("conv_scale", conv_scale)
    _check_code("conv_zero_point", conv_zero_point)
    return torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)


qconv2d = torch.ops.fxslim.qconv2d.default
qconv2d_add = torch.ops.fxslim.qconv2d_add.default


# ----------------------------------------------------------------------------------------------
# qlinear

_LINEAR_SCHEMA = (
    "(Tensor x, float x_scale, int x_zero_point, Tensor weight, Tensor w_scale, Tensor bias, float out_scale, "
    "int out_zero_point, int out_min, int out_max) -> Tensor"
)


def _linear_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max):
    _check_uint8("x", x)
    _check_weight(weight, w_scale, bias, 2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dimension {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    _check_scale("x_scale", x_scale)
    _check_code("x_zero_point", x_zero_point)
    _check_out(out_scale, out_zero_point, out_min, out_max)
    return (*x.shape[:-1], weight.shape[0])


torch.library.define("fxslim::qlinear", _LINEAR_SCHEMA)


@torch.library.impl("fxslim::qlinear", "cpu")
def _qlinear_cpu(
    x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, w_scale: Tensor, bias: Tensor, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Linear with int8 weight codes [out, in], requantized to u8 in the kernel: u8 [..., in] → u8 [..., out]."""
    weight, w_scale, bias = _dense(weight), _dense(w_scale), _dense(bias)
    shape = _linear_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max)
    if not _exact_sums(weight, 1):
        return _exact_linear(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min,
                             out_max).view(shape)
    packed, zeros = prepack_linear(weight)
    attr, scalars = _post_op(out_scale, out_zero_point, out_min, out_max)
    x2 = x.reshape(-1, weight.shape[1]).contiguous()
    out = torch.ops.onednn.qlinear_pointwise(x2, x_scale, x_zero_point, packed, w_scale, zeros, bias, out_scale,
                                             out_zero_point, None, attr, scalars, "")
    return out.view(shape)


def _exact_linear(x: Tensor, x_scale: float, x_zero_point: int, weight: Tensor, w_scale: Tensor, bias: Tensor,
                  out_scale: float, out_zero_point: int, out_min: int, out_max: int) -> Tensor:
    """``qlinear``'s arithmetic without oneDNN's kernel, for weights not ``exact_sums`` on this CPU
    (as ``_exact_conv``): u8 codes [rows, out]."""
    acc = _linear_acc(x.reshape(-1, weight.shape[1]), x_zero_point, weight, weight, _no_integer_bias(weight))
    return _requantized(acc, x_scale, w_scale, bias, out_scale, out_zero_point, out_min, out_max, 1)


def prepack_linear(weight: Tensor) -> tuple[Tensor, Tensor]:
    """oneDNN's packed form of a linear's int8 ``weight`` [out, in] (cached on the tensor) and its int64 zero points."""
    return _CACHE.get(weight, "qlinear", lambda: (torch.ops.onednn.qlinear_prepack(weight, None),
                                                  torch.zeros(weight.shape[0], dtype=torch.int64)))


@torch.library.register_fake("fxslim::qlinear")
def _qlinear_fake(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max):
    shape = _linear_check(x, x_scale, x_zero_point, weight, w_scale, bias, out_scale, out_zero_point, out_min, out_max)
    return torch.empty(shape, dtype=torch.uint8, device=x.device)


qlinear = torch.ops.fxslim.qlinear.default


# ----------------------------------------------------------------------------------------------
# qadd

_ADD_SCHEMA = (
    "(Tensor a, float a_scale, int a_zero_point, Tensor b, float b_scale, int b_zero_point, float out_scale, "
    "int out_zero_point, int out_min, int out_max) -> Tensor"
)


def _qadd_check(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point, out_min, out_max):
    _check_addends(a, b)
    for name, scale, zp in (("a", a_scale, a_zero_point), ("b", b_scale, b_zero_point)):
        _check_scale(f"{name}_scale", scale)
        _check_code(f"{name}_zero_point", zp)
    _check_out(out_scale, out_zero_point, out_min, out_max)


torch.library.define("fxslim::qadd", _ADD_SCHEMA)


@torch.library.impl("fxslim::qadd", "cpu")
def _qadd_cpu(
    a: Tensor, a_scale: float, a_zero_point: int, b: Tensor, b_scale: float, b_zero_point: int, out_scale: float,
    out_zero_point: int, out_min: int, out_max: int,
) -> Tensor:
    """Residual add in float32 exactly as the fake-quant model computes it: (a − z_a)·s_a + (b − z_b)·s_b,
    then round_half_even(· × fl32(1/s_out)) + z_out clamped to [out_min, out_max]. Layout of a."""
    _qadd_check(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point, out_min, out_max)
    f32 = torch.float32
    t = a.to(f32).sub_(a_zero_point).mul_(torch.tensor(a_scale, dtype=f32))
    t.add_(b.to(f32).sub_(b_zero_point).mul_(torch.tensor(b_scale, dtype=f32)))
    t.mul_(_inverse_scale(out_scale)).round_().add_(out_zero_point).clamp_(out_min, out_max)
    return torch.empty_like(a).copy_(t)


@torch.library.register_fake("fxslim::qadd")
def _qadd_fake(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point, out_min, out_max):
    _qadd_check(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point, out_min, out_max)
    return torch.empty_like(a)


qadd = torch.ops.fxslim.qadd.default
# their exact paths sum codes with float32 convs and matmuls, which autocast would run in 16 bits
exclude_autocast("qconv2d", "qconv2d_add", "qlinear", "qadd")
