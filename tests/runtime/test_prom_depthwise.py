"""PROM's native depthwise conv (``prom_depthwise``): codes within 1 LSB of ATen's quantized conv (torch's
oneDNN) and mostly equal on random geometries and MobileNetV2's layers; the vector form equal to the
portable one bit for bit; what it takes; and a direct plan that runs it between its own buffers,
within 1 LSB of the same plan on oneDNN's primitives, inputs untouched."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslim.runtime import native_kernels
from fxslim.runtime import onednn_capi as capi
from fxslim.runtime import prom_depthwise as W
from fxslim.runtime import prom_direct as D
from fxslim.runtime import prom_lowered as L
from fxslim.runtime.prom import conv_output_size
from fxslim.runtime.prom_onednn import QUANTIZED_CONV, ConvWeights, as_qtensor, codes, onednn_available

pytestmark = [pytest.mark.skipif(not (onednn_available() and W.available()),
                                 reason="needs torch's oneDNN and the kernel's vector form (AVX-512 with VNNI)"),
              pytest.mark.usefixtures("one_thread_module")]


def _weights(c: int, stride: int, pad: int, gen: torch.Generator) -> ConvWeights:
    weight = torch.randint(-128, 128, (c, 1, 3, 3), generator=gen).to(torch.int8)
    w_scale, bias = 0.001 + 0.01 * torch.rand(c, generator=gen), torch.randn(c, generator=gen)
    return ConvWeights(weight, w_scale, bias, (stride, stride), (pad, pad), (1, 1), c)


def _run(weights: ConvWeights, x: torch.Tensor, q: tuple[float, int, float, int], relu: bool,
         symbol: str = "prom_depthwise3x3") -> torch.Tensor:
    """The kernel's codes for u8 ``x`` [N, C, H, W] (channels_last)."""
    n, c, h, w = x.shape
    oh, ow = (conv_output_size(size, 3, weights.stride[0], weights.padding[0], 1) for size in (h, w))
    out = torch.empty((n, c, oh, ow), dtype=torch.uint8, memory_format=torch.channels_last)
    step = W.DepthwiseStep(weights, tuple(x.shape), tuple(out.shape), *q, relu, x.data_ptr(), out.data_ptr(), symbol)
    assert step() == 0
    return out


def _aten(weights: ConvWeights, x: torch.Tensor, q: tuple[float, int, float, int], relu: bool) -> torch.Tensor:
    out = QUANTIZED_CONV["relu" if relu else "none"](as_qtensor(x, q[0], q[1]), weights.pack(), q[2], q[3])
    return codes(out)


def _input(n, c, h, w, gen) -> torch.Tensor:
    x = torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.int32).to(torch.uint8)
    return x.contiguous(memory_format=torch.channels_last)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 150), h=st.integers(1, 13), w=st.integers(1, 13),
       stride=st.sampled_from([1, 2]), pad=st.integers(0, 2), relu=st.booleans(), zx=st.integers(0, 255),
       zo=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_depthwise_within_one_lsb_of_aten_on_random_geometries(n, c, h, w, stride, pad, relu, zx, zo, seed):
    if h + 2 * pad < 3 or w + 2 * pad < 3:
        return  # no output pixel
    gen = torch.Generator().manual_seed(seed)
    weights, x = _weights(c, stride, pad, gen), _input(n, c, h, w, gen)
    q = (0.01 + 0.05 * float(torch.rand(1, generator=gen)), zx, 0.01 + 0.05 * float(torch.rand(1, generator=gen)), zo)
    ours, ref = _run(weights, x, q, relu).int(), _aten(weights, x, q, relu).int()
    if stride == 2 and ref.shape[3] == 1:
        return  # torch's oneDNN miscomputes one output column at a column stride of 2 (prom_onednn)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1
    assert int((ours != ref).sum()) <= 1 + ref.numel() // 1000  # rounding ties only


@pytest.mark.parametrize(("c", "hw", "stride"), [(96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1),
                                                 (384, 14, 1), (576, 14, 2), (960, 7, 1)])
def test_depthwise_on_mobilenet_v2_layers_mostly_equal_to_aten(c, hw, stride):
    gen = torch.Generator().manual_seed(c + hw)
    weights, x = _weights(c, stride, 1, gen), _input(2, c, hw, hw, gen)
    for relu in (False, True):
        q = (0.04, 7, 0.05, 3)
        ours, ref = _run(weights, x, q, relu).int(), _aten(weights, x, q, relu).int()
        assert (ours - ref).abs().max() <= 1 and float((ours == ref).float().mean()) >= 0.9999


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 140), h=st.integers(3, 11), w=st.integers(3, 11), stride=st.sampled_from([1, 2]),
       pad=st.integers(0, 2), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_vector_form_equals_portable_form(c, h, w, stride, pad, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    weights, x = _weights(c, stride, pad, gen), _input(2, c, h, w, gen)
    q = (0.03, 200, 0.02, 40)
    assert torch.equal(_run(weights, x, q, relu), _run(weights, x, q, relu, "prom_depthwise3x3_scalar"))


def test_supported_takes_plain_3x3_depthwise_convs_only():
    gen = torch.Generator().manual_seed(0)
    assert W.supported(_weights(64, 1, 1, gen), 64) and W.supported(_weights(64, 2, 0, gen), 64)
    w = _weights(64, 1, 1, gen)
    assert not W.supported(w, 32)  # channels other than the input's
    assert not W.supported(ConvWeights(w.weight, w.w_scale, w.bias, (1, 2), (1, 1), (1, 1), 64), 64)
    assert not W.supported(ConvWeights(w.weight, w.w_scale, w.bias, (3, 3), (1, 1), (1, 1), 64), 64)
    assert not W.supported(ConvWeights(w.weight, w.w_scale, w.bias, (1, 1), (1, 1), (2, 2), 64), 64)
    assert not W.supported(ConvWeights(w.weight, w.w_scale, w.bias, (1, 1), (3, 3), (1, 1), 64), 64)
    grouped = ConvWeights(torch.zeros(64, 2, 3, 3, dtype=torch.int8), w.w_scale, w.bias, (1, 1), (1, 1), (1, 1), 32)
    assert not W.supported(grouped, 64)
    five = ConvWeights(torch.zeros(64, 1, 5, 5, dtype=torch.int8), w.w_scale, w.bias, (1, 1), (2, 2), (1, 1), 64)
    assert not W.supported(five, 64)


def _expand_depthwise_project(c: int, gen: torch.Generator) -> tuple[L.QuantizedSegment, dict[str, ConvWeights]]:
    """A run of three convs as the lowering builds it: 1×1 to ``c`` channels, 3×3 depthwise, 1×1 back."""
    def pointwise(c_in, c_out):
        weight = torch.randint(-1, 2, (c_out, c_in, 1, 1), generator=gen).to(torch.int8)
        return ConvWeights(weight, 0.01 + 0.02 * torch.rand(c_out, generator=gen), torch.randn(c_out, generator=gen),
                           (1, 1), (0, 0), (1, 1), 1)

    weights = {"c0": pointwise(16, c), "c1": _weights(c, 1, 1, gen), "c2": pointwise(c, 16)}
    graph = fx.Graph()
    x = graph.placeholder("x0")
    y = graph.call_function(QUANTIZED_CONV["relu"], (x, graph.get_attr("c0"), 0.05, 0))
    y = graph.call_function(QUANTIZED_CONV["relu"], (y, graph.get_attr("c1"), 0.06, 0))
    y = graph.call_function(QUANTIZED_CONV["none"], (y, graph.get_attr("c2"), 0.1, 128))
    graph.output((y,))
    return L.QuantizedSegment(graph, {k: w.pack() for k, w in weights.items()}, weights), weights


def _kernel_steps(segment: D.DirectSegment) -> int:
    """How many steps of the segment's plans call the depthwise kernel."""
    steps = [f for plan in segment._plans.values() for f, _ in plan.steps]
    return sum(getattr(f, "__name__", "") == "prom_depthwise3x3" for f in steps)


@pytest.mark.skipif(not capi.available(), reason="needs oneDNN's C library (fxslim[onednn])")
def test_direct_plan_runs_the_kernel_between_its_buffers_within_one_lsb_of_primitives():
    gen = torch.Generator().manual_seed(3)
    aten, _ = _expand_depthwise_project(D.NATIVE_DEPTHWISE_CHANNELS + 32, gen)
    x = as_qtensor(_input(2, 16, 23, 17, gen), 0.04, 100)
    before = codes(x).clone()
    native = D.DirectSegment(aten)
    (out,) = native(x)
    with native_kernels.disabled():
        primitives = D.DirectSegment(aten)
        (ref,) = primitives(x)
    assert _kernel_steps(native) == 1 and _kernel_steps(primitives) == 0
    assert torch.equal(codes(x), before)  # the input is never written
    assert (codes(out).int() - codes(ref).int()).abs().max() <= 1
    assert (out.q_scale(), out.q_zero_point()) == (ref.q_scale(), ref.q_zero_point())


@pytest.mark.skipif(not capi.available(), reason="needs oneDNN's C library (fxslim[onednn])")
def test_direct_plan_keeps_primitives_for_narrow_depthwise_convs():
    gen = torch.Generator().manual_seed(4)
    aten, _ = _expand_depthwise_project(D.NATIVE_DEPTHWISE_CHANNELS - 8, gen)
    segment = D.DirectSegment(aten)
    segment(as_qtensor(_input(1, 16, 9, 9, gen), 0.04, 100))
    assert _kernel_steps(segment) == 0 and len(segment.planned) == 1
