"""Cost formula of ``fxslim::haste_conv2d`` (HASTE): the reduced conv as MACs, hashing and merging as overhead.

Per sample and output tile τ (p_τ valid output pixels, patch d = t_h·t_w, B_τ buckets, C -> O
channels, k_h×k_w kernel), counted as docs/methods/HASTE.md does (a MAC is one op):

    centering      2·C·d                      channel mean per pixel, then subtract
    hashing        C·nnz(planes)              signed additions (≈ C·d·L·(1−s))
    input merge    C·d + B_τ·d                additions into buckets, divisions by the bucket sizes
    filter merge   O·k_h·k_w·(C − B_τ)        sums of filter slices
    reduced conv   O·B_τ·k_h·k_w·p_τ          multiply-accumulates (dense: O·C·k_h·k_w·p_τ)

The reduced conv goes to ``macs``, the rest to ``elementwise`` (as the merging work of the other
fxslim ops does); ``info`` holds every term, the dense MACs and ``ops`` = MACs + overhead. The
hyperplanes count in storage (as the buffer they are stored in), not in parameters.

B is data-dependent, so there are two numbers:

- predicted (``macs``): B_τ from ``calibration`` stats when given (the layer's mean B/C per tile and per
  output pixel, from a ``record_buckets`` run on sample inputs), else the data-free estimate
  E[B] = M·(1 − (1 − 1/M)^C), M = 2^L, the expected number of occupied buckets when the C channel
  codes are independent and uniform: the most buckets independently drawn codes occupy on average
  (trained channels are correlated and share codes, so images save more). It is not a bound: an
  input built to give its channels distinct codes occupies up to min(C, M);
- measured (``measured_macs``): the reduced-conv MACs a ``record_buckets`` run counted (``measured``
  stats), as the mean per sample times the batch of the costed call.

Stats are given explicitly: ``fxslim.estimate(..., haste_buckets=HasteBuckets(calibration=...,
measured=...))`` or ``OptimizeResult.compare(haste_buckets=...)``; both map the op's ``layer``
argument to ``HasteStats``. Without them every count is the data-free prediction (also what the
HASTE pass report and FlopCounterMode give). Measured stats apply only to a call with their tiles
and valid output pixels per sample (when stats are given, ``info["measured"]`` says "used", "no
stats", or why not, with a warning). Only HASTE rows carry ``measured_macs``; a report's
``total.measured_macs`` sums the HASTE convs, and is None unless every one of them was measured.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch.utils.flop_counter import register_flop_formula

from fxslim.cost_model.registry import OpCall, OpCost, register_cost
from fxslim.runtime.haste import output_shape, patch_shape
from fxslim.runtime.haste_counts import HasteBuckets, HasteLayer
from fxslim.warn import warn_user

__all__ = ["haste_conv2d_cost", "DEFAULT_SPARSITY"]

DEFAULT_SPARSITY = 2 / 3  # assumed for the hashing count when the planes' values are not available


# ----------------------------------------------------------------------------------------------
# The formula


def _sym(value: Any) -> Any:
    """ints stay ints; SymInts become their sympy expression."""
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _int(value: Any) -> Any:
    """Counts are whole operations: round floats, and a formula with a real coefficient (the expected
    buckets) to the nearest integer at any size, as the numeric count rounds each call."""
    if isinstance(value, float):
        return round(value)
    if isinstance(value, sympy.Expr) and value.has(sympy.Float):
        return round(float(value)) if value.is_number else sympy.floor(value + sympy.Rational(1, 2))
    return value


def _layer_and_sizes(x_shape, w_shape, planes_shape, stride, padding, dilation, tile, center, nnz=None):
    """(HasteLayer, tiles, output pixels) of one call, from shapes; ``nnz`` of the planes when known."""
    n, c, h, w_in = (_sym(s) for s in x_shape)
    o, kh, kw = w_shape[0], w_shape[2], w_shape[3]
    h_out, w_out = output_shape((h, w_in), (kh, kw), tuple(stride), tuple(padding), tuple(dilation))
    th, tw = patch_shape((kh, kw), tuple(stride), tuple(dilation), tile)
    L, d = planes_shape[0], th * tw
    layer = HasteLayer(c, o, (kh, kw), L, d, L * d * (1 - DEFAULT_SPARSITY) if nnz is None else nnz, bool(center))
    return layer, n * -(-h_out // tile) * -(-w_out // tile), n * h_out * w_out


def _one_pixel(pixels: Any, n: Any) -> Any:
    """Whether each sample has one output pixel: the op then runs the dense conv (``runtime.haste``).
    A bool at numeric sizes, else the sympy condition (at some sizes of a formula it is one pixel)."""
    per_sample = sympy.simplify(sympy.sympify(pixels) / sympy.sympify(n)) if n != 0 else sympy.sympify(pixels)
    return bool(per_sample == 1) if per_sample.is_number else sympy.Eq(per_sample, 1)


def _where_one_pixel(one_pixel: Any, dense: Any, otherwise: Any) -> Any:
    """``dense`` where each sample has one output pixel, else ``otherwise`` (a Piecewise in a formula)."""
    if isinstance(one_pixel, bool):
        return dense if one_pixel else otherwise
    return sympy.Piecewise((dense, one_pixel), (otherwise, True))


@register_flop_formula(torch.ops.fxslim.haste_conv2d)
def _haste_conv2d_flops(x_shape, w_shape, bias_shape, planes_shape, stride, padding, dilation, tile=4, center=True,
                        layer="", *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's count of the op: 2 x the reduced-conv MACs the cost model predicts from the
    data-free expected buckets (what ``fxslim.estimate`` gives without ``haste_buckets``)."""
    haste_layer, tiles, pixels = _layer_and_sizes(x_shape, w_shape, planes_shape, stride, padding, dilation, tile,
                                                  center)
    predicted = haste_layer.predicted(tiles, pixels)
    one_pixel = _one_pixel(pixels, x_shape[0])
    return int(2 * _int(predicted.dense if one_pixel is True else predicted.reduced_conv))


def _measured_use(stats: Any, tiles: Any, pixels: Any, n: Any) -> str:
    """"used", "no stats", or "not used: <why>": stats apply only to calls with their tiles and valid
    output pixels per sample (another resolution hashes other patches: its buckets say nothing here)."""
    if stats is None:
        return "no stats"
    per_sample = [sympy.simplify(sympy.sympify(count) / sympy.sympify(n)) for count in (tiles, pixels)]
    recorded = (sympy.Rational(stats.tiles, stats.samples), sympy.Rational(stats.pixels, stats.samples))
    if any(not value.is_number for value in per_sample):
        return "not used: recorded at one size, the call is costed for any spatial size"
    if tuple(per_sample) != recorded:
        return (f"not used: recorded at {recorded[0]} tiles and {recorded[1]} output pixels per sample, the call "
                f"has {per_sample[0]} and {per_sample[1]}")
    return "used"


@register_cost(torch.ops.fxslim.haste_conv2d, kind="conv")
def haste_conv2d_cost(call: OpCall) -> OpCost:
    """[n, C, h, w] * [O, C, kh, kw] -> [n, O, h', w']: O·B·kh·kw·p MACs per tile, hashing and merging elementwise.
    Ignores: sorting codes and tiles, im2col and stitching copies (data movement)."""
    a = call.arguments
    x, w = a["x"], a["weight"]
    n, o, (kh, kw) = _sym(x.shape[0]), w.shape[0], tuple(w.shape[2:])
    planes = call.value(3)
    layer, tiles, pixels = _layer_and_sizes(
        x.shape, w.shape, a["planes"].shape, a["stride"], a["padding"], a["dilation"], a["tile"], a["center"],
        int((planes != 0).sum()) if planes is not None else None)
    L, d, tile = layer.planes, layer.d, a["tile"]
    given = call.haste_buckets or HasteBuckets()
    calibration, measured = given.calibration, given.measured
    key = a["layer"]
    predicted = layer.predicted(tiles, pixels, calibration.get(key))
    info: dict[str, Any] = {"L": L, "d": d, "tile": tile, "dense_macs": _int(predicted.dense),
                            "predicted_ops": _int(predicted.ops),
                            "buckets": "calibrated" if key in calibration else "independent_codes"}
    info.update({f"predicted_{k}": _int(v) for k, v in predicted.as_dict().items()
                 if k not in ("dense", "ops", "reduced_conv")})
    measured_macs = None
    stats = measured.get(key)
    measured_use = _measured_use(stats, tiles, pixels, n) if measured else "no stats"
    if measured:  # stats were given: whether this layer's apply shows in the report
        info["measured"] = measured_use
    if measured_use.startswith("not used"):
        warn_user(f"HASTE layer {key!r}: measured stats {measured_use.removeprefix('not used: ')}; record them "
                  "at the size you cost")
    elif stats is not None:
        got = layer.measured(stats, n)
        measured_macs = _int(got.reduced_conv)
        info.update({"measured_overhead": _int(got.overhead), "measured_ops": _int(got.ops),
                     "measured_buckets_per_tile": stats.buckets / stats.tiles})
    ops = {}
    if call.conventions.include_bias and a["bias"] is not None:
        ops[("add", x.format)] = o * pixels  # the bias, added once per output element (pixels: N·H_out·W_out)
    params = w.numel + (a["bias"].numel if a["bias"] is not None else 0)  # the planes are metadata, not parameters
    one_pixel = _one_pixel(pixels, n)  # there the op runs the dense conv: nothing hashed, nothing merged
    macs = _where_one_pixel(one_pixel, predicted.dense, predicted.reduced_conv)
    overhead = _where_one_pixel(one_pixel, 0, predicted.overhead)
    if one_pixel is True:
        info["one_pixel_output"] = "runs the dense conv"
        measured_macs = None if measured_macs is None else _int(predicted.dense)
    return OpCost(macs=_int(macs), elementwise=_int(overhead), ops=ops, params=params,
                  measured_macs=measured_macs, kind="pointwise_conv" if (kh, kw) == (1, 1) else "conv", info=info)
