"""PROM's direct oneDNN runtime (``prom_direct.DirectSegment`` over ``onednn_capi``): each conv
within 1 LSB of the float model and of ATen's quantized conv (and mostly equal to it) on random
geometries and on MobileNetV2's real layer shapes, with and without the residual sum and ReLU;
whole MobileNetV2 close to the ATen runtime, equal whole batch and slice by slice; plans per input
shape and thread count, the least recently used dropped; the shape oneDNN miscomputes left to
TorchScript; inputs never written; a copy plans again; and without the library, the ATen runtime."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.prom_common import photo_batch, random_mobilenet_v2
from fxslim.api import prepare
from fxslim.passes.prom import calibrate
from fxslim.passes.prom_batching import micro_batched
from fxslim.passes.prom_convert import convert
from fxslim.runtime import onednn_capi as capi
from fxslim.runtime import prom_direct as D
from fxslim.runtime import prom_lowered as L
from fxslim.runtime import prom_reference as R
from fxslim.runtime.prom import conv_output_size
from fxslim.runtime.prom_onednn import (QUANTIZED_CONV, ConvWeights, as_qtensor, codes, onednn_available,
                                        quantized_conv_add)
from tests.runtime.conv_geometry import conv_geometries
from tests.runtime.cpu_isa import vnni_only

pytestmark = [pytest.mark.skipif(not (onednn_available() and capi.available()),
                                 reason="needs oneDNN's C library (fxslim[onednn])"),
              pytest.mark.usefixtures("one_thread_module")]

_SX, _ZX, _SO, _ZO, _SS, _ZS = 0.05, 100, 0.04, 90, 0.03, 120
_SC, _ZC = 0.0351234, 80  # the grid of a conv feeding an add: [-2.8, 6.1], narrower than the conv's values;
# a scale whose multiples rarely tie with the skip's (0.03) halfway between two output codes (0.04)


def _one_conv(weights: ConvWeights, relu: bool, add: bool, zo: int = _ZO, grid: tuple[float, int] = (_SC, _ZC),
              so: float = _SO) -> tuple[L.QuantizedSegment, D.DirectSegment]:
    """A run of one conv, as the lowering builds it: (its ATen segment, the direct one over it);
    ``grid``: the conv's own (scale, zero point) when it feeds an add, ``so``, ``zo``: the output's."""
    graph = fx.Graph()
    x = graph.placeholder("x0")
    skip = graph.placeholder("x1") if add else None
    packed = graph.get_attr("c0")
    kind = "relu" if relu else "none"
    if add:
        node = graph.call_function(quantized_conv_add, (x, skip, packed, *grid, relu, so, zo))
    else:
        node = graph.call_function(QUANTIZED_CONV[kind], (x, packed, so, zo))
    graph.output((node,))
    aten = L.QuantizedSegment(graph, {"c0": weights.pack()}, {"c0": weights})
    return aten, D.DirectSegment(aten)


def _weights(c_in, c_out, kernel, stride, padding, dilation, groups, gen) -> ConvWeights:
    weight = torch.randint(-127, 128, (c_out, c_in // groups, *kernel), generator=gen).to(torch.int8)
    w_scale, bias = 0.001 + 0.004 * torch.rand(c_out, generator=gen), torch.randn(c_out, generator=gen)
    # a dilation along a kernel side of 1 changes nothing; the converter drops it (as oneDNN may crash on it)
    dilation = tuple(d if k > 1 else 1 for d, k in zip(dilation, kernel))
    return ConvWeights(weight, w_scale, bias, tuple(stride), tuple(padding), dilation, groups)


def _check_conv(n, c_in, h, w, weights: ConvWeights, gen, aten_right: bool = True, zx: int = _ZX, zo: int = _ZO
                ) -> float:
    """Each of conv, conv + ReLU, conv + skip, conv + skip + ReLU: the direct codes within 1 LSB of
    the float model (with a skip: the conv onto its grid ``_SC``, ``_ZC``, plus the skip) and
    (``aten_right``) of ATen's; returns the fraction equal to ATen's. ``zx``, ``zo``: the input's
    and output's zero points (a zero point of 0 leaves oneDNN's attribute out)."""
    x = torch.randint(0, 256, (n, c_in, h, w), generator=gen, dtype=torch.int32).to(torch.uint8)
    qx = as_qtensor(x, _SX, zx)
    real_w = weights.weight.double() * weights.w_scale.double().view(-1, 1, 1, 1)
    geometry = (list(weights.stride), list(weights.padding), list(weights.dilation), weights.groups)
    real = torch.nn.functional.conv2d((x.double() - zx) * _SX, real_w, weights.bias.double(), *geometry)
    equal = []
    for add in (False, True):
        skip = torch.randint(0, 256, real.shape, generator=gen, dtype=torch.int32).to(torch.uint8)
        qskip = as_qtensor(skip, _SS, _ZS)
        on_grid = (R.quantize_float_reference(real, _SC, _ZC).double() - _ZC) * _SC
        total = on_grid + (skip.double() - _ZS) * _SS if add else real
        for relu in (False, True):
            aten, direct = _one_conv(weights, relu, add, zo)
            args = (qx, qskip) if add else (qx,)
            (out,) = direct(*args)
            assert all(direct.planned.values())
            (ref,) = aten(*args)
            assert torch.equal(codes(qskip), skip.contiguous(memory_format=torch.channels_last))  # inputs untouched
            assert out.shape == real.shape and out.is_contiguous(memory_format=torch.channels_last)
            assert (out.q_scale(), out.q_zero_point()) == (_SO, zo)
            floating = R.quantize_float_reference(total, _SO, zo, zo if relu else 0, 255)
            ours = codes(out).int()
            assert (ours - floating.int()).abs().max() <= 1
            assert not aten_right or (ours - codes(ref).int()).abs().max() <= 1
            equal.append(float((ours == codes(ref).int()).float().mean()))
    return min(equal)


@vnni_only
@settings(max_examples=60, deadline=None)
@given(geometry=conv_geometries(), seed=st.integers(0, 2**16),
       zero_points=st.sampled_from([(_ZX, _ZO), (0, _ZO), (_ZX, 0), (0, 0)]))
def test_direct_conv_within_one_lsb_of_float_model_and_aten_on_random_geometries(geometry, seed, zero_points):
    g = geometry
    gen = torch.Generator().manual_seed(seed)
    weights = _weights(g.c_in, g.c_out, g.kernel, g.stride, g.padding, g.dilation, g.groups, gen)
    # ATen's conv gets one output column at a column stride above 1 wrong (its segment widens the input)
    one_column = weights.stride[1] > 1 and conv_output_size(g.w, g.kernel[1], g.stride[1], g.padding[1],
                                                             weights.dilation[1]) == 1
    _check_conv(g.n, g.c_in, g.h, g.w, weights, gen, aten_right=not one_column, zx=zero_points[0], zo=zero_points[1])


@pytest.mark.parametrize(("c_in", "c_out", "hw", "kernel", "stride", "groups"), [
    (3, 32, 224, 3, 2, 1),  # the stem
    (32, 32, 112, 3, 1, 32),  # depthwise
    (96, 96, 112, 3, 2, 96),  # strided depthwise
    (16, 96, 112, 1, 1, 1),  # expansion
    (96, 24, 56, 1, 1, 1),  # projection
    (320, 1280, 7, 1, 1, 1),  # the last conv
])
@vnni_only
def test_direct_conv_on_mobilenet_v2_layer_shapes_within_one_lsb_and_mostly_equal_to_aten(c_in, c_out, hw, kernel,
                                                                                          stride, groups):
    """Real channel counts reach the AMX / VNNI kernels that tiny random geometries do not."""
    gen = torch.Generator().manual_seed(c_in * c_out + hw)
    weights = _weights(c_in, c_out, (kernel, kernel), (stride, stride), (kernel // 2,) * 2, (1, 1), groups, gen)
    assert _check_conv(1, c_in, hw, hw, weights, gen) >= 0.999


@pytest.mark.parametrize(("c_in", "c_out", "groups", "hw", "kernel"), [
    (4, 48, 2, 7, 3), (2, 96, 2, 9, 3), (24, 48, 2, 7, 7), (6, 72, 3, 14, 5),
])
@vnni_only
def test_direct_grouped_convs_torch_onednn_miscomputes_within_one_lsb(c_in, c_out, groups, hw, kernel):
    gen = torch.Generator().manual_seed(c_out + hw)
    weights = _weights(c_in, c_out, (kernel, kernel), (1, 1), (kernel // 2,) * 2, (1, 1), groups, gen)
    _check_conv(2, c_in, hw, hw, weights, gen, aten_right=False)


@pytest.fixture(scope="module")
def mobilenet():
    """(photos at 224 px, converted oneDNN integer MobileNetV2, lowered direct, lowered on ATen)."""
    x = photo_batch()
    fast = convert(calibrate(prepare(random_mobilenet_v2(x), (x,)), [x]), runtime="onednn")
    return x, fast, L.lower(fast), L.lower(fast, direct=False)


def _direct_segments(low: fx.GraphModule) -> list[D.DirectSegment]:
    return [m for m in low.modules() if isinstance(m, D.DirectSegment)]


@vnni_only
def test_direct_mobilenet_v2_one_segment_close_to_aten_and_equal_slice_by_slice(mobilenet):
    x, fast, direct, aten = mobilenet
    (segment,) = _direct_segments(direct)
    assert not _direct_segments(aten)
    scale = fast.graph.find_nodes(op="call_function", target=torch.ops.fxslim.dequantize.default)[0].args[1]
    with torch.no_grad():
        out, ref = direct(x), aten(x)
        # 1-LSB ties of depthwise convs propagate through the network: a few output steps at most
        assert ((out - ref).abs() / scale).max() <= 4.01
        assert torch.equal(out.argmax(1), ref.argmax(1))
        for i in range(len(x)):
            assert torch.equal(direct(x[i : i + 1]), out[i : i + 1])
        sliced = micro_batched(fast, max_activation_bytes=3 << 20)
        assert torch.equal(sliced(x), out)
    assert segment.planned[(((6, 3, 224, 224),), (True,), 1)] and segment.planned[(((1, 3, 224, 224),), (True,), 1)]
    # 52 convs and nothing else: the input arrives channels_last, every residual accumulated in place
    assert len(segment._plans[(((1, 3, 224, 224),), (True,), 1)].steps) == 52


@vnni_only
def test_direct_plans_per_shape_and_thread_count_least_recently_used_dropped(mobilenet, monkeypatch):
    x, fast, _, _ = mobilenet
    monkeypatch.setattr(D, "PLANS", 2)
    low = L.lower(fast)
    (segment,) = _direct_segments(low)
    with torch.no_grad():
        first = low(x[:1])
        low(x[:2])
        torch.set_num_threads(2)
        try:
            assert torch.equal(low(x[:1]), first)  # another thread count: its own plan, the same values
        finally:
            torch.set_num_threads(1)
        assert list(segment.planned) == [(((2, 3, 224, 224),), (True,), 1), (((1, 3, 224, 224),), (True,), 2)]
        assert torch.equal(low(x[:1]), first)
    assert len(segment.planned) == 2 and (((1, 3, 224, 224),), (True,), 1) in segment.planned


@vnni_only
def test_direct_one_output_column_at_a_column_stride_runs_as_primitives(mobilenet):
    """torch's oneDNN miscomputes a conv with one output column at a column stride above 1 (the ATen
    segment widens its input); oneDNN 3.2 does not, so the plan runs that width as it is."""
    x, fast, direct, aten = mobilenet
    narrow = x[:1, :, :64, :9].contiguous()  # MobileNetV2's fourth stride-2 conv gets one column
    (segment,) = _direct_segments(direct)
    scale = fast.graph.find_nodes(op="call_function", target=torch.ops.fxslim.dequantize.default)[0].args[1]
    with torch.no_grad():
        out, ref = direct(narrow), aten(narrow)
    assert segment.planned[(((1, 3, 64, 9),), (True,), 1)] is True
    assert ((out - ref).abs() / scale).max() <= 4.01 and torch.equal(out.argmax(1), ref.argmax(1))


def test_direct_input_not_channels_last_gives_the_same_codes():
    gen = torch.Generator().manual_seed(5)
    weights = _weights(8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, gen)
    _, direct = _one_conv(weights, relu=True, add=False)
    x = torch.randint(0, 256, (2, 8, 9, 7), generator=gen, dtype=torch.int32).to(torch.uint8)
    contiguous = torch._make_per_tensor_quantized_tensor(x, _SX, _ZX)  # NCHW
    assert torch.equal(codes(direct(contiguous)[0]), codes(direct(as_qtensor(x, _SX, _ZX))[0]))


@vnni_only
def test_direct_copy_of_a_micro_batched_model_plans_again(mobilenet):
    x, fast, _, _ = mobilenet
    sliced = micro_batched(fast)
    with torch.no_grad():
        ref = sliced(x[:1])
        twin = copy.deepcopy(sliced)
        assert torch.equal(twin(x[:1]), ref)
    (segment,) = _direct_segments(twin.runner)
    assert list(segment.planned) == [(((1, 3, 224, 224),), (True,), 1)]
    assert _direct_segments(sliced.runner)[0] is not segment


def test_direct_without_the_library_lowers_to_aten(mobilenet, monkeypatch):
    x, fast, _, aten = mobilenet
    monkeypatch.setenv("FXSLIM_LIBDNNL", "")
    capi._load.cache_clear()
    try:
        assert not capi.available() and "fxslim[onednn]" in capi.unavailable_reason()
        low = L.lower(fast)
        assert not _direct_segments(low)
        with torch.no_grad():
            assert torch.equal(low(x[:2]), aten(x[:2]))
    finally:
        monkeypatch.delenv("FXSLIM_LIBDNNL")
        capi._load.cache_clear()
    assert capi.available()


def test_capi_reports_a_failing_call_with_its_status():
    with pytest.raises(capi.OneDNNError, match="oneDNN memory descriptor .* failed with status"):
        capi.MemoryDesc((2, -3), capi.U8, (3, 1))  # a negative size


def test_direct_geometry_onednn_refuses_stays_on_aten(monkeypatch, caplog):
    """A conv this oneDNN cannot create a primitive for leaves the run on ATen's convs, with a warning."""
    gen = torch.Generator().manual_seed(9)
    weights = _weights(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, gen)
    aten, direct = _one_conv(weights, relu=False, add=False)

    def refuse(*args, **kwargs):
        raise capi.OneDNNError("oneDNN convolution descriptor failed with status 3")

    monkeypatch.setattr(capi.ConvolutionDesc, "__init__", refuse)
    qx = as_qtensor(torch.randint(0, 256, (1, 8, 6, 6), generator=gen, dtype=torch.int32).to(torch.uint8), _SX, _ZX)
    with caplog.at_level("WARNING", logger="fxslim.runtime.prom_direct"):
        (out,) = direct(qx)
    assert not any(direct.planned.values()) and "stays on ATen" in caplog.text
    assert torch.equal(codes(out), codes(aten(qx)[0]))


def test_direct_model_keeps_nan_per_sample_empty_batches_and_any_input_layout(mobilenet):
    x, fast, direct, aten = mobilenet
    y = x[:3].clone()
    y[1, 0, 5, 5] = float("nan")
    with torch.no_grad():
        out = direct(y)
        assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
        assert torch.equal(out[[0, 2]], direct(x[[0, 2]]))
        assert direct(x[:0]).shape == (0, 1000)
        strided = x[:2, :, ::2, ::3]
        assert torch.equal(direct(strided), direct(strided.contiguous()))
        assert torch.equal(direct(x[:2].contiguous(memory_format=torch.channels_last)), direct(x[:2]))


@vnni_only
def test_direct_conv_add_rounds_the_conv_onto_its_grid_before_the_sum():
    """Where a conv's values pass the ends of its own grid (an input unlike the calibration's), the
    fake-quant model saturates them before the add; the primitive's post-ops do too. Without them
    the sum took the true value: 10 LSB off on MobileNetV2 fed N(0, 1) images."""
    gen = torch.Generator().manual_seed(5)
    weights = _weights(32, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1, gen)
    x = torch.randint(0, 256, (2, 32, 6, 6), generator=gen, dtype=torch.int32).to(torch.uint8)
    real_w = weights.weight.double() * weights.w_scale.double().view(-1, 1, 1, 1)
    real = torch.nn.functional.conv2d((x.double() - _ZX) * _SX, real_w, weights.bias.double())
    low, high = real.quantile(0.3).item(), real.quantile(0.7).item()  # a grid over the middle 40 % of the values
    grid = ((high - low) / 255, round(-low * 255 / (high - low)))
    skip = torch.randint(0, 256, real.shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    so = grid[0] * 1.2
    rest = (skip.double() - _ZS) * _SS
    for relu in (False, True):
        aten, direct = _one_conv(weights, relu, add=True, grid=grid, so=so)
        (out,) = direct(as_qtensor(x, _SX, _ZX), as_qtensor(skip, _SS, _ZS))
        (ref,) = aten(as_qtensor(x, _SX, _ZX), as_qtensor(skip, _SS, _ZS))
        assert all(direct.planned.values())
        lo = _ZO if relu else 0
        on_grid = (R.quantize_float_reference(real, *grid).double() - grid[1]) * grid[0]
        twice = R.quantize_float_reference(on_grid + rest, so, _ZO, lo, 255)
        unclipped = R.quantize_float_reference(real + rest, so, _ZO, lo, 255)
        ours = codes(out).int()
        assert (ours - twice.int()).abs().max() <= 1 and (ours - codes(ref).int()).abs().max() <= 1
        assert (ours == codes(ref).int()).float().mean() > 0.999
        assert (ours - unclipped.int()).abs().max() > 10


def test_direct_skip_that_is_the_conv_input_is_copied_not_overwritten():
    """x + conv3x3(x): accumulating the sum in place into x's buffer overwrote pixels the conv had yet
    to read (42 output steps off on a 16-channel block)."""
    gen = torch.Generator().manual_seed(6)
    weights = {f"c{i}": _weights(16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, gen) for i in range(2)}
    graph = fx.Graph()
    x = graph.placeholder("x0")
    c = {name: graph.get_attr(name) for name in weights}
    v1 = graph.call_function(QUANTIZED_CONV["none"], (x, c["c0"], _SO, _ZO))
    v2 = graph.call_function(quantized_conv_add, (v1, v1, c["c1"], _SO, _ZO, False, _SO, _ZO))
    graph.output((v2,))
    aten = L.QuantizedSegment(graph, {k: w.pack() for k, w in weights.items()}, weights)
    direct = D.DirectSegment(aten)
    x = as_qtensor(torch.randint(0, 256, (2, 16, 9, 9), generator=gen, dtype=torch.int32).to(torch.uint8), _SX, _ZX)
    (out,), (ref,) = direct(x), aten(x)
    assert all(direct.planned.values())
    assert (codes(out).int() - codes(ref).int()).abs().max() <= 1


def test_direct_skip_read_again_after_the_sum_is_copied_not_overwritten():
    """A sum post-op accumulates in place only into a skip nothing reads later: here the skip v1 is
    read again after the residual conv (by v4), so the plan copies it first and v4 reads it intact."""
    gen = torch.Generator().manual_seed(4)
    weights = {f"c{i}": _weights(8, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1, gen) for i in range(4)}
    conv = QUANTIZED_CONV["none"]
    graph = fx.Graph()
    x = graph.placeholder("x0")
    c = {name: graph.get_attr(name) for name in weights}
    v1 = graph.call_function(conv, (x, c["c0"], _SO, _ZO))
    v2 = graph.call_function(conv, (v1, c["c1"], _SO, _ZO))
    v3 = graph.call_function(quantized_conv_add, (v2, v1, c["c2"], _SC, _ZC, False, _SO, _ZO))
    v4 = graph.call_function(conv, (v1, c["c3"], _SO, _ZO))
    graph.output((v3, v4))
    aten = L.QuantizedSegment(graph, {k: w.pack() for k, w in weights.items()}, weights)
    direct = D.DirectSegment(aten)
    x = as_qtensor(torch.randint(0, 256, (2, 8, 5, 6), generator=gen, dtype=torch.int32).to(torch.uint8), _SX, _ZX)
    out, ref = direct(x), aten(x)
    assert all(direct.planned.values())
    assert (codes(out[0]).int() - codes(ref[0]).int()).abs().max() <= 1
    assert torch.equal(codes(out[1]), codes(ref[1]))


def test_direct_run_with_a_grouped_conv_refuses_the_aten_fallback(monkeypatch):
    """ATen's convs get some grouped convs wrong: a run holding one that cannot be planned raises,
    naming the exact lowering, rather than fall back to them."""
    gen = torch.Generator().manual_seed(2)
    weights = _weights(4, 48, (3, 3), (1, 1), (1, 1), (1, 1), 2, gen)
    _, direct = _one_conv(weights, relu=False, add=False)
    assert direct.needs_plan

    def refuse(*args, **kwargs):
        raise capi.OneDNNError("oneDNN convolution descriptor failed with status 3")

    monkeypatch.setattr(capi.ConvolutionDesc, "__init__", refuse)
    qx = as_qtensor(torch.randint(0, 256, (1, 4, 7, 7), generator=gen, dtype=torch.int32).to(torch.uint8), _SX, _ZX)
    with pytest.raises(RuntimeError, match=r"direct=False"):
        direct(qx)


def test_micro_batched_direct_false_runs_aten_convs(mobilenet):
    x, fast, _, aten = mobilenet
    sliced = micro_batched(fast, direct=False)
    assert not _direct_segments(sliced.runner) and _direct_segments(micro_batched(fast).runner)
    with torch.no_grad():
        assert torch.equal(sliced(x[:2]), aten(x[:2]))


def _writes_past_dst(shape_in, c_out, kernel, stride, groups, avoid) -> tuple[str, bool]:
    """(implementation, whether it writes past dst or the scratchpad) of a u8 conv, with guard bytes."""
    n, c_in, h, w = shape_in
    oh, ow = (conv_output_size(s, kernel, stride, kernel // 2, 1) for s in (h, w))
    src = capi.MemoryDesc(shape_in, capi.U8, (c_in * h * w, 1, w * c_in, c_in))
    dst = capi.MemoryDesc((n, c_out, oh, ow), capi.U8, (c_out * oh * ow, 1, ow * c_out, c_out))
    bias = capi.MemoryDesc((c_out,), capi.F32, (1,))
    shape = (c_out, c_in, kernel, kernel) if groups == 1 else (groups, c_out // groups, c_in // groups, kernel, kernel)
    desc = capi.ConvolutionDesc(src, capi.MemoryDesc(shape, capi.S8, None), bias, dst, (stride, stride),
                                (kernel // 2,) * 2, (1, 1), capi.conv_attr(1 if groups == 1 else 3, None, False))
    desc.skip(avoid)
    guard = 1 << 12
    buffers = {"x": torch.randint(0, 255, (src.size + guard,), dtype=torch.uint8),
               "y": torch.full((dst.size + guard,), 0xAB, dtype=torch.uint8),
               "w": torch.zeros(desc.weights_desc.size, dtype=torch.uint8),
               "s": torch.full((desc.scratchpad_desc.size + guard,), 0xAB, dtype=torch.uint8),
               "b": torch.zeros(c_out), "one": torch.ones(c_out), "zero": torch.zeros(1, dtype=torch.int32)}
    i1, fc = capi.MemoryDesc((1,), capi.S32, (1,)), capi.MemoryDesc((c_out,), capi.F32, (1,))
    memories = [(capi.ARG_SRC, src, "x"), (capi.ARG_WEIGHTS, desc.weights_desc, "w"), (capi.ARG_BIAS, bias, "b"),
                (capi.ARG_DST, dst, "y"), (capi.ARG_SCRATCHPAD, desc.scratchpad_desc, "s"),
                (capi.ARG_SCALES | capi.ARG_WEIGHTS, fc, "one"), (capi.ARG_ZERO_POINTS | capi.ARG_SRC, i1, "zero"),
                (capi.ARG_ZERO_POINTS | capi.ARG_DST, i1, "zero")]
    objects = [capi.Memory(d, buffers[k].data_ptr()) for _, d, k in memories]
    capi.execute(desc.primitive(), (capi.ExecArg * len(objects))(
        *(capi.ExecArg(arg, m.handle) for (arg, _, _), m in zip(memories, objects))))
    past = bool((buffers["y"][dst.size:] != 0xAB).any() or (buffers["s"][desc.scratchpad_desc.size:] != 0xAB).any())
    return desc.implementation, past


@pytest.mark.parametrize(("shape_in", "c_out", "kernel", "stride", "groups"), [
    ((1, 96, 6, 6), 40, 1, 1, 1), ((2, 96, 6, 6), 240, 1, 1, 1), ((1, 16, 10, 10), 96, 1, 1, 1),
    ((2, 144, 7, 7), 144, 3, 1, 144), ((1, 320, 5, 5), 1280, 1, 1, 1), ((3, 24, 13, 11), 144, 1, 1, 1),
    ((1, 3, 17, 17), 32, 3, 2, 1), ((2, 40, 9, 9), 40, 5, 2, 40),
])
def test_direct_convs_never_write_past_their_output(shape_in, c_out, kernel, stride, groups):
    """oneDNN 3.2's AMX 1×1 kernel writes whole 16-pixel blocks past the end of dst (heap corruption
    on a 6×6 input); the plan skips it (prom_direct.AVOIDED), and what it picks instead stays inside."""
    implementation, past = _writes_past_dst(shape_in, c_out, kernel, stride, groups, D.AVOIDED)
    assert implementation not in D.AVOIDED and not past
    default, default_past = _writes_past_dst(shape_in, c_out, kernel, stride, groups, ())
    if shape_in == (1, 96, 6, 6) and default in D.AVOIDED:
        assert default_past  # the bug the skip is for


def test_plan_steps_in_one_call_equal_step_by_step_and_report_the_failing_step(mobilenet, monkeypatch):
    x, fast, _, _ = mobilenet
    low = L.lower(fast)
    with torch.no_grad():
        one_call = low(x[:2])
        monkeypatch.setattr(D, "_run_steps", lambda: None)
        assert torch.equal(low(x[:2]), one_call)
    monkeypatch.undo()
    run_steps = D._run_steps()
    assert run_steps is not None
    calls = []
    one = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    four = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
    fine = one(lambda a: calls.append(("one", a)) or 0)
    failing = four(lambda a, b, count, args: calls.append(("four", a, b, count)) or 7)
    steps = (D._Step * 3)(D._Step(D._address(fine), 11, None, 0, None, 1),
                          D._Step(D._address(failing), 5, 6, 3, None, 4),
                          D._Step(D._address(fine), 12, None, 0, None, 1))
    assert run_steps(ctypes.addressof(steps), 3) == (2 << 32) + 7  # the second step, status 7
    assert calls == [("one", 11), ("four", 5, 6, 3)]  # the third never ran
