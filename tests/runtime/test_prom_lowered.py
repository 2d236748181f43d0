"""The lowered oneDNN runtime of PROM (``prom_lowered.lower``): on ATen's quantized convs
(``direct=False``) bit-identical to the converted ``torch.ops.fxslim`` graph it comes from (at the calibration size, another resolution, with NaN
samples, sliced into micro-batches, under ``torch.compile(backend="fxslim")``, at more input
shapes than it keeps packed weights for, with a clamped conv between quantized ones), its direct
forms of the cheap ops equal to the ops, a residual conv rounded onto its own grid before the add
(equal to the graph on ATen, within 1 LSB direct), and the caller's quantized engine left as it was. Its direct runtime
(oneDNN's own library, tests/runtime/test_prom_direct.py) is what ``micro_batched`` and the backend
run, and they are compared with it."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

from benchmarks.prom_common import photo_batch, random_mobilenet_v2
from fxslim.api import prepare
from fxslim.ir import META_PROM_LOWERED
from fxslim.passes.prom import calibrate
from fxslim.passes.prom_batching import micro_batched
from fxslim.passes.prom_convert import code_agreement, convert
from fxslim.propagate import propagate
from fxslim.runtime import prom_lowered as L
from fxslim.runtime import prom_onednn as O
from fxslim.runtime.prom import _inverse_scale, dequantized, nan_flags
from fxslim.runtime.prom_onednn import codes, onednn_available, quantized_conv_add
from tests.runtime.cpu_isa import pretend_no_vnni, vnni_only

pytestmark = [pytest.mark.skipif(not onednn_available(),
                                 reason="needs oneDNN quantized ops"),
              pytest.mark.usefixtures("one_thread_module")]

ops = torch.ops.fxslim
onednn = torch.ops.onednn


@pytest.fixture(scope="module")
def mobilenet():
    """(photos at 224 px, converted oneDNN integer MobileNetV2, its lowered copy on ATen's convs)."""
    x = photo_batch()
    model = random_mobilenet_v2(x)
    fast = convert(calibrate(prepare(model, (x,)), [x]), runtime="onednn")
    return x, fast, L.lower(fast, direct=False)


def _segments(low: fx.GraphModule) -> list[L.QuantizedSegment]:
    return [m for m in low.modules() if isinstance(m, L.QuantizedSegment)]


def _all_nodes(low: fx.GraphModule) -> list[fx.Node]:
    """The lowered graph's nodes and those of its TorchScript segments."""
    return [*low.graph.nodes, *(n for segment in _segments(low) for n in segment.graph.nodes)]


@vnni_only
def test_lower_mobilenet_v2_every_op_lowered(mobilenet):
    _, fast, low = mobilenet
    # the NaN flags and the quantizer of the input fused into one call that reads it once
    assert low.meta[META_PROM_LOWERED] == {"nan_samples": 1, "quantize_flagged": 1, "qconv2d": 42, "qconv2d_add": 10,
                                        "pool": 1, "qlinear": 1, "dequantize": 1}
    targets = Counter(n.target for n in _all_nodes(low) if n.op == "call_function")
    assert targets[L.quantize_flagged] == 1 and targets[L.nan_flags] == targets[L.quantize_qtensor] == 0
    assert targets[torch.ops.quantized.conv2d] == 42 and targets[quantized_conv_add] == 10
    assert targets[onednn.qlinear_pointwise.default] == 1 and targets[onednn.qconv_pointwise.default] == 0
    assert not any(str(t).startswith("fxslim.") for t in targets)
    assert not [n for n in _all_nodes(low) if n.op == "call_method" and n.target == "clone"]
    # all 52 convs in one TorchScript function; the converted graph is left as it was
    (segment,) = _segments(low)
    assert isinstance(segment._first, torch.jit.ScriptModule)
    assert Counter(n.target for n in fast.graph.nodes)[ops.qconv2d.default] == 42


@pytest.mark.parametrize("direct", [False, True])
def test_lower_keeps_convs_onednn_would_not_sum_exactly_as_ops(mobilenet, monkeypatch, direct):
    """On a CPU without VNNI (AVX2, pretended here) oneDNN's pair sums overflow int16 for 8-bit
    dense weights: the stem and the classifier stay ops (which sum them in float), the ternary 1×1
    and depthwise convs are lowered, and the values are the graph's."""
    x, fast, _ = mobilenet
    pretend_no_vnni(monkeypatch)
    low = L.lower(fast, direct=direct)
    counts = low.meta[META_PROM_LOWERED]
    assert counts["kept:inexact_sums"] == 2 and counts["qconv2d"] + counts["qconv2d_add"] == 51
    kept = [n for n in low.graph.nodes if n.target in (ops.qconv2d.default, ops.qlinear.default)]
    assert Counter(n.target for n in kept) == {ops.qconv2d.default: 1, ops.qlinear.default: 1}
    scale = fast.graph.find_nodes(op="call_function", target=ops.dequantize.default)[0].args[1]
    with torch.no_grad():
        out, ref = low(x), fast(x)
    if direct:  # 1-LSB ties of the direct runtime's depthwise convs: a few output steps at most
        assert ((out - ref).abs() / scale).max() <= 4.01 and torch.equal(out.argmax(1), ref.argmax(1))
    else:
        assert torch.equal(out, ref)


def test_lower_mobilenet_v2_bit_identical_to_fxslim_ops(mobilenet):
    x, fast, low = mobilenet
    smaller = x[:2, :, :97, :131].contiguous()  # another resolution, odd sizes
    with torch.no_grad():
        assert torch.equal(low(x), fast(x))
        assert torch.equal(low(x[:1]), fast(x[:1]))
        assert torch.equal(low(smaller), fast(smaller))


@vnni_only
def test_lower_one_copy_per_input_shape_up_to_the_limit_all_equal(mobilenet, monkeypatch):
    """Each input shape gets its own packed weights (their oneDNN primitive is built for the first
    shape they see); past ``SHAPES`` shapes the first copy serves, with the same values."""
    x, fast, _ = mobilenet
    monkeypatch.setattr(L, "SHAPES", 2)
    low = L.lower(fast, direct=False)
    (segment,) = _segments(low)
    sizes = [x[:1], x[:2], x[:3], x[:1, :, :64, :80].contiguous(), x[:1]]
    with torch.no_grad():
        for xi in sizes:
            assert torch.equal(low(xi), fast(xi))
    copies = segment.copies
    assert len(copies) == 2 and copies[(tuple(x[:1].shape),)] is segment._first
    assert len({id(m) for m in copies.values()}) == 2


@vnni_only
def test_lower_restores_the_callers_quantized_engine(mobilenet):
    x, _, low = mobilenet
    engine = torch.backends.quantized.engine
    other = next(e for e in torch.backends.quantized.supported_engines if e not in (engine, "onednn", "none"))
    torch.backends.quantized.engine = other
    try:
        with torch.no_grad():
            low(x[:1])
            with pytest.raises(RuntimeError):
                low(x[:1, :2].contiguous())  # two channels: the stem fails inside the segment; the engine is restored
        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = engine


def test_lower_nan_sample_stays_nan_and_alone(mobilenet):
    x, fast, low = mobilenet
    x = x[:3].clone()
    x[1, 2, 7, 9] = float("nan")
    with torch.no_grad():
        out, ref = low(x), fast(x)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    assert torch.equal(out[[0, 2]], ref[[0, 2]])


@vnni_only
def test_lower_micro_batched_runs_lowered_copy_and_equals_whole_batch(mobilenet):
    x, fast, _ = mobilenet
    sliced = micro_batched(fast, max_activation_bytes=3 << 20)
    assert sliced.runner is not fast and L.has_onednn_ops(fast) and not L.has_onednn_ops(sliced.runner)
    assert micro_batched(fast, lowered=False).runner is fast
    assert set(sliced.state_dict()) == {f"module.{k}" for k in fast.state_dict()}
    with torch.no_grad():
        whole = L.lower(fast)(x)
        assert torch.equal(sliced(x), whole)
        assert torch.equal(copy.deepcopy(sliced)(x), whole)


def test_lower_fxslim_backend_lowers_a_converted_graph_and_equals_eager(mobilenet, caplog):
    x, fast, _ = mobilenet
    compiled = torch.compile(fast, backend="fxslim")
    with caplog.at_level("INFO", logger="fxslim.backend"), torch.no_grad():
        assert torch.equal(compiled(x), L.lower(fast)(x))
    assert "PROM oneDNN graph lowered" in caplog.text


def test_lower_fxslim_backend_follows_weights_written_or_replaced_after_compiling(mobilenet):
    """It packed the weights once: after an in-place write the compiled model kept the old outputs
    (0.30 off the eager converted model)."""
    x, fast, _ = mobilenet
    model = copy.deepcopy(fast)
    compiled = torch.compile(model, backend="fxslim")
    name = next(n for n, t in model.named_buffers() if t.dtype == torch.int8 and t.dim() == 4)
    with torch.no_grad():
        before = compiled(x[:2])
        model.get_buffer(name).neg_()
        assert not torch.equal(compiled(x[:2]), before)
        assert torch.equal(compiled(x[:2]), L.lower(model)(x[:2]))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[name] = -state[name]  # back to the converted weights, as new tensors
        model.load_state_dict(state, assign=True)
        assert torch.equal(compiled(x[:2]), before)


def test_lower_micro_batched_under_compile_runs_its_runner_outside_the_graph(mobilenet):
    x, fast, _ = mobilenet
    sliced = micro_batched(fast)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(sliced, backend=backend)
    with torch.no_grad():
        assert torch.equal(compiled(x), L.lower(fast)(x))
    assert not any(n.op == "call_function" for gm in graphs for n in gm.graph.nodes)


def test_lower_micro_batched_exports_the_fxslim_ops(mobilenet):
    x, fast, _ = mobilenet
    exported = torch.export.export(micro_batched(fast), (x[:2],))
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert ops.qconv2d.default in targets and onednn.qconv_pointwise.default not in targets
    with torch.no_grad():
        assert torch.equal(exported.module()(x[:2]), fast(x[:2]))


def test_lower_micro_batched_exports_with_dynamic_batch_and_resolution(mobilenet):
    """Exported with symbolic sizes, the program runs at any of them: the slice size (from the
    resolution) stayed in it as a guard that refused every other resolution."""
    x, fast, _ = mobilenet
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=33, max=512),
            3: torch.export.Dim("w", min=33, max=512)}
    program = torch.export.export(micro_batched(fast), (x[:2],), dynamic_shapes={"x": dims}).module()
    for shape in ((3, 97, 131), (1, 224, 224), (40, 64, 48)):
        sample = x.repeat(shape[0], 1, 1, 1)[: shape[0], :, : shape[1], : shape[2]].contiguous()
        with torch.no_grad():
            assert torch.equal(program(sample), fast(sample))


def test_lower_conv_with_weight_from_input_keeps_checking_op():
    """A weight the graph gets at run time cannot be packed ahead: the op stays."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 4, 1, 1), generator=gen).to(torch.int8)

    class Conv(nn.Module):
        def forward(self, x, weight):
            return ops.qconv2d.default(x, 0.1, 3, weight, torch.ones(8), torch.zeros(8), 0.2, 0, 0, 255, [1, 1], [0, 0],
                                       [1, 1], 1)

    gm = fx.symbolic_trace(Conv())
    low = L.lower(gm)
    assert low.meta[META_PROM_LOWERED] == {"kept:weight_at_run_time": 1} and any(n.target is ops.qconv2d.default for n in low.graph.nodes)
    x = torch.randint(0, 256, (1, 4, 5, 5), generator=gen).to(torch.uint8)
    assert torch.equal(low(x, w), gm(x, w))


def _residual_graph(read_skip_after: bool) -> tuple[fx.GraphModule, torch.Tensor]:
    """x → conv a → conv b → qconv2d_add(conv c(b), skip=a) [→ qadd(sum, a)]: a's storage may take
    the sum only when nothing reads a after the fused conv."""
    gen = torch.Generator().manual_seed(1)
    graph = fx.Graph()
    root = nn.Module()
    x = graph.placeholder("x")

    def conv(src, name, c_in, c_out):
        root.register_buffer(f"{name}_w", torch.randint(-127, 128, (c_out, c_in, 1, 1), generator=gen).to(torch.int8))
        root.register_buffer(f"{name}_s", 0.002 + 0.002 * torch.rand(c_out, generator=gen))
        root.register_buffer(f"{name}_b", torch.randn(c_out, generator=gen))
        return [src, 0.05, 100, graph.get_attr(f"{name}_w"), graph.get_attr(f"{name}_s"), graph.get_attr(f"{name}_b"),
                0.08, 120, 0, 255, [1, 1], [0, 0], [1, 1], 1]

    a = graph.call_function(ops.qconv2d.default, tuple(conv(x, "a", 6, 8)))
    b = graph.call_function(ops.qconv2d.default, tuple(conv(a, "b", 8, 8)))
    out = graph.call_function(ops.qconv2d_add.default, (*conv(b, "c", 8, 8), a, 0.08, 120, 0.06, 100))
    if read_skip_after:
        out = graph.call_function(ops.qadd.default, (out, 0.08, 120, a, 0.08, 120, 0.1, 128, 0, 255))
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    x_val = torch.randint(0, 256, (2, 6, 5, 5), generator=gen).to(torch.uint8)
    propagate(gm, [x_val])
    return gm, x_val


@vnni_only
@pytest.mark.parametrize("read_skip_after", [False, True])
def test_lower_residual_equals_graph_on_aten_and_within_one_lsb_direct(read_skip_after):
    """On ATen's convs the residual conv rounds onto its own grid before the add, as the op does: the
    same codes. The direct runtime rounds once (within 1 LSB), accumulating into the skip's buffer
    only when nothing reads the skip later."""
    gm, x = _residual_graph(read_skip_after)
    aten, direct = L.lower(gm, direct=False), L.lower(gm)
    assert aten.meta[META_PROM_LOWERED]["qconv2d_add"] == 1
    assert torch.equal(aten(x), gm(x))
    assert (direct(x).int() - gm(x).int()).abs().max() <= 1


def test_lower_quantize_qtensor_equals_op_on_ties_saturation_and_slices():
    scale, zero_point = 0.0187, 114
    inverse = _inverse_scale(scale)
    x = torch.randn(5, 3, 61, 67) * 3  # beyond the grid at both ends
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) / inverse  # x·(1/s) exactly k + ½
    x.view(-1)[: ties.numel()] = ties
    ref = ops.quantize_per_tensor.default(x, scale, zero_point)
    out = L.quantize_qtensor(x, scale, zero_point, True)  # 5 samples of 12k floats: 1 slice
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(codes(out), ref)
    assert (out.q_scale(), out.q_zero_point()) == (scale, zero_point)
    big = torch.randn(40, 3, 61, 67)  # 490k floats: two slices written into one tensor
    assert torch.equal(codes(L.quantize_qtensor(big, scale, zero_point, True)), ops.quantize_per_tensor.default(big, scale, zero_point))
    assert torch.equal(codes(L.quantize_qtensor(x, scale, zero_point, False)), ref)
    assert torch.equal(codes(L.quantize_qtensor(x.double(), scale, zero_point, False)),
                       ops.quantize_per_tensor.default(x.double(), scale, zero_point))


@vnni_only
def test_lower_clamped_conv_between_quantized_convs_keeps_qconv_pointwise_and_equals_graph():
    """A conv whose clamp stops short of the u8 range has no ATen quantized form: it runs on oneDNN's
    op, reading the codes of the QTensor before it and handing codes to the QTensor conv after it;
    a residual add under such a clamp keeps its fxslim op."""
    gen = torch.Generator().manual_seed(3)
    graph, root = fx.Graph(), nn.Module()
    x = graph.placeholder("x")

    def conv(src, name, lo, hi):
        root.register_buffer(f"{name}_w", torch.randint(-127, 128, (8, 8, 3, 3), generator=gen).to(torch.int8))
        root.register_buffer(f"{name}_s", 0.0005 + 0.0005 * torch.rand(8, generator=gen))
        root.register_buffer(f"{name}_b", torch.randn(8, generator=gen))
        return graph.call_function(ops.qconv2d.default, (src, 0.05, 100, graph.get_attr(f"{name}_w"), graph.get_attr(f"{name}_s"),
                                                         graph.get_attr(f"{name}_b"), 0.05, 100, lo, hi, [1, 1], [1, 1], [1, 1], 1))

    a = conv(x, "a", 0, 255)
    b = conv(a, "b", 100, 200)  # a clamp short of 255: hardtanh
    c = conv(b, "c", 100, 255)  # a relu at the zero point: quantized::conv2d_relu
    d = conv(c, "d", 0, 255)
    # a residual add under a clamp short of 255: no oneDNN form, the checking op stays (it clamps after the sum)
    e = graph.call_function(ops.qconv2d_add.default, (*conv(d, "e", 100, 200).args, c, 0.05, 100, 0.05, 100))
    graph.erase_node(next(n for n in graph.nodes if n.name == "qconv2d_default_4"))
    graph.output(e)
    gm = fx.GraphModule(root, graph)
    x_val = torch.randint(0, 256, (2, 8, 9, 11), generator=gen).to(torch.uint8)
    propagate(gm, [x_val])
    low = L.lower(gm)
    assert low.meta[META_PROM_LOWERED]["kept:clamped_residual"] == 1
    targets = Counter(n.target for n in _all_nodes(low) if n.op == "call_function")
    assert targets[onednn.qconv_pointwise.default] == 1 and targets[torch.ops.quantized.conv2d_relu] == 1
    assert targets[torch.ops.quantized.conv2d] == 2 and len(_segments(low)) == 2 and targets[ops.qconv2d_add.default] == 1
    assert torch.equal(low(x_val), gm(x_val)) and torch.equal(low(x_val[:1]), gm(x_val[:1]))


def test_lower_cheap_ops_equal_fxslim_ops():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 256, (4, 16, 7, 9), generator=gen).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    args = (113, 1_234_567_890, 24, 7, 0, 255)
    assert torch.equal(L.global_avg_pool(q, *args), ops.int8_global_avg_pool2d.default(q, *args))
    x = torch.randn(4, 3, 5, 5)
    x[2, 1, 1, 1] = float("nan")
    flags = nan_flags(x)
    assert torch.equal(flags, ops.nan_samples.default(x)) and flags.tolist() == [False, False, True, False]
    logits = torch.randint(0, 256, (4, 10), generator=gen).to(torch.uint8)
    out, ref = dequantized(logits, 0.037, 120, flags), ops.dequantize.default(logits, 0.037, 120, flags)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[~flags], ref[~flags])
    assert torch.equal(dequantized(logits, 0.037, 120), ops.dequantize.default(logits, 0.037, 120))
    other = logits[:3]  # dim 0 is not the flags' batch: any NaN sample makes it all NaN, as the op does
    assert dequantized(other, 0.037, 120, flags).isnan().all() and ops.dequantize.default(other, 0.037, 120, flags).isnan().all()
    assert torch.equal(dequantized(other, 0.037, 120, flags & False), ops.dequantize.default(other, 0.037, 120, flags & False))


def test_lower_empty_batch_gives_empty_output_like_the_graph(mobilenet):
    """A batch of 0 samples: quantize_qtensor sized its slices from x[0], which a batch of 0 lacks
    (IndexError); the graph it lowers returns an empty batch."""
    x, fast, low = mobilenet
    with torch.no_grad():
        want = fast(x[:0])
        assert want.shape == (0, 1000)
        assert low(x[:0]).shape == want.shape and micro_batched(fast)(x[:0]).shape == want.shape
    assert L.quantize_qtensor(x[:0], 0.02, 100, True).shape == x[:0].shape


class _PoolSkipBlock(nn.Module):
    """ResNet's stem and first block: conv-ReLU → max pool → conv-ReLU → conv, + the pooled codes → ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1)
        return torch.relu(self.b(torch.relu(self.a(p))) + p).mean((2, 3))


@vnni_only
def test_lower_residual_add_whose_skip_is_max_pooled_codes_equals_graph():
    """The skip of a fused conv + add that is no QTensor (a max pool's codes) becomes a QTensor copy;
    lowering looked up that copy's grid among the QTensors (KeyError) and failed on every ResNet."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    fast = convert(calibrate(prepare(_PoolSkipBlock().eval(), (x,)), [x]), runtime="onednn")
    skips = [n.args[14] for n in fast.graph.nodes if n.target is ops.qconv2d_add.default]
    assert [s.target for s in skips] == [ops.max_pool2d_codes.default]
    low, direct = L.lower(fast, direct=False), L.lower(fast)
    assert low.meta[META_PROM_LOWERED]["qconv2d_add"] == 1
    step = next(n for n in fast.graph.nodes if n.target is ops.qconv2d_add.default).args[6]
    other = torch.randn(3, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(low(x), fast(x)) and torch.equal(low(other), fast(other))
        # the direct runtime rounds the residual once: within one step of the add's grid, averaged by the pool
        assert (direct(other) - fast(other)).abs().max() <= step * 1.001
        assert torch.equal(micro_batched(fast)(other), direct(other))


def test_lower_quantize_qtensor_saturates_values_beyond_int32_steps_as_the_op():
    """ATen's quantizer wraps once x·(1/scale) leaves int32 (1e9 at scale 0.02, ±inf) and gave code 0
    where the op saturates to 255 (at a zero point of 128 or more): the lowered model's outputs then
    differed from the graph's."""
    scale, zero_point = 0.0187, 131
    x = torch.randn(40, 3, 61, 67)  # 490k floats: two slices
    x[0, 0, 0, :6] = torch.tensor([1e9, -1e9, 3e38, -3e38, float("inf"), float("-inf")])
    x[39, 2, 5, 5], x[20, 1, 1, 1] = 5e10, -5e10
    for channels_last, rows in ((True, x), (True, x[:2]), (False, x[:2])):
        out = codes(L.quantize_qtensor(rows, scale, zero_point, channels_last))
        assert torch.equal(out, ops.quantize_per_tensor.default(rows, scale, zero_point))
    assert codes(L.quantize_qtensor(x, scale, zero_point, True))[0, 0, 0, :6].tolist() == [255, 0, 255, 0, 255, 0]
    torch.manual_seed(0)
    dark = torch.randn(2, 3, 32, 32) - 1.5  # mostly negative: the input's zero point is above 128
    fast = convert(calibrate(prepare(_PoolSkipBlock().eval(), (dark,)), [dark]), runtime="onednn")
    (quantize,) = [n for n in fast.graph.nodes if n.target is ops.quantize_per_tensor.default]
    assert quantize.args[2] >= 128
    bright = dark.clone()
    bright[0, :, :9] = 1e12  # a band of overexposed pixels: saturated, not wrapped to code 0
    with torch.no_grad():
        assert torch.equal(L.lower(fast, direct=False)(bright), fast(bright))


@vnni_only
def test_lower_strided_conv_to_one_output_column_within_one_lsb_of_fake_quant():
    """oneDNN gets a conv with one output column at a column stride above 1 wrong (ResNet18 at 33×17
    px: 40 % of some layer's codes off by more than 1 LSB). The op widens its input; the lowered
    QTensor conv does the same inside its TorchScript run, and a strided conv + add keeps the op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    qat = calibrate(prepare(model, (x,)), [x]).eval()
    fast = convert(qat, runtime="onednn")
    low = L.lower(fast)
    assert low.meta[META_PROM_LOWERED]["qconv2d"] == 3 and len(_segments(low)) == 1
    narrow = torch.randn(3, 3, 32, 2)  # 32×2 → 16×1 → 8×1: both strided convs give one column
    assert code_agreement(qat, fast, narrow, mode="local").worst()[1] == 1.0
    with torch.no_grad():
        assert torch.equal(low(narrow), fast(narrow)) and torch.equal(low(x), fast(x))


@vnni_only
def test_lower_conv_with_windows_of_padding_only_keeps_the_op_and_equals_graph():
    """A grayscale stem with padding past its kernel: the op writes that padding into the input
    (oneDNN gets windows of padding only wrong there), so lowering keeps the op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 2, 1, 2), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 1, 12, 12)
    qat = calibrate(prepare(model, (x,)), [x]).eval()
    fast = convert(qat, runtime="onednn")
    low = L.lower(fast)
    assert low.meta[META_PROM_LOWERED]["kept:explicit_padding"] == 1 and low.meta[META_PROM_LOWERED]["qconv2d"] == 1
    assert code_agreement(qat, fast, x, mode="local").worst()[1] == 1.0
    with torch.no_grad():
        assert torch.equal(low(x), fast(x))


@vnni_only
def test_lower_grouped_conv_exact_op_on_aten_direct_segment_on_onednn_library():
    """torch's oneDNN gets some grouped convs wrong (prom_onednn.miscomputed_grouping): the ops
    compute them exactly and the ATen lowering keeps them; a direct segment runs them on oneDNN's own
    library (within 1 LSB: the same logits here but for a few output steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 48, 3, 1, 1, groups=2), nn.ReLU(),
                          nn.Conv2d(48, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 3, 7, 7)
    qat = calibrate(prepare(model, (x,)), [x]).eval()
    fast = convert(qat, runtime="onednn")
    assert code_agreement(qat, fast, x, mode="local").worst()[1] == 1.0
    aten = L.lower(fast, direct=False)
    assert aten.meta[META_PROM_LOWERED]["kept:grouped_conv"] == 1 and aten.meta[META_PROM_LOWERED]["qconv2d"] == 2
    direct = L.lower(fast)
    assert "kept:grouped_conv" not in direct.meta[META_PROM_LOWERED] and direct.meta[META_PROM_LOWERED]["qconv2d"] == 3
    scale = fast.graph.find_nodes(op="call_function", target=ops.dequantize.default)[0].args[1]
    with torch.no_grad():
        assert torch.equal(aten(x), fast(x))
        assert ((direct(x) - fast(x)).abs() / scale).max() <= 3.01
