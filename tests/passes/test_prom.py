"""PROM prepare (fake quantization) and convert (integer ops) on torchvision MobileNetV2 and small
inline models: counts, conversion agreement, skip reasons, idempotence, export and compile."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxslim
from fxslim.api import prepare
from fxslim.capture import trace
from fxslim.ir import detect_ir
from fxslim.models.data import imagenet_normalize, mnist_5k, photos
from fxslim.models.mobilenet_mnist import load_mobilenet_mnist
from fxslim.models.train import predict, train_step
from fxslim.passes.base import PassContext
from fxslim.passes.prom import PROM, PerTensorQConv2d, calibrate
from fxslim.passes import prom_fuse
from fxslim.passes.prom_batching import micro_batched
from fxslim.passes.prom_convert import code_agreement, convert
from fxslim.runtime.prom_onednn import onednn_available
from fxslim.runtime.prom_qat import ActFakeQuant, QConv2d

ops = torch.ops.fxslim


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _bn_recalibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random weights with BN running statistics estimated on ``x`` (train-mode forward,
    cumulative average): without it BN is the identity and random MobileNetV2 activations shrink
    below the float32 resolution of any uint8 grid by the last blocks."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet():
    """(float model, photos, prepared + calibrated QAT model, converted integer model)."""
    torch.manual_seed(0)
    x = imagenet_normalize(photos(224))
    model = _bn_recalibrated(torchvision.models.mobilenet_v2(), x)
    qat = calibrate(prepare(model, (x,)), [x])
    return model, x, qat, convert(qat)


def _entries(qat):
    return qat.meta["fxslim_report"].entries("prom")


# ----------------------------------------------------------------------------------------------
# torchvision MobileNetV2


def test_prom_mobilenet_v2_finds_34_ternary_18_int8_convs_1_int8_linear(mobilenet):
    _, _, qat, _ = mobilenet
    counts = Counter((e.kind, e.info.get("weights")) for e in _entries(qat) if e.status == "rewritten")
    assert sum(v for (k, w), v in counts.items() if w == "ternary") == 34
    assert counts[("pointwise_conv", "ternary")] == 34
    assert counts[("depthwise_conv", "int8")] + counts[("conv", "int8")] == 18
    assert counts[("linear", "int8")] == 1
    assert counts[("residual_add", None)] == 10
    assert not [e for e in _entries(qat) if e.status == "skipped"]
    # one quantizer per tensor producer: input, 52 conv outputs, 10 adds, pooled tensor, logits
    assert sum(isinstance(m, ActFakeQuant) for m in qat.modules()) == 65
    assert sum(type(m) is QConv2d and m.weight_quant == "ternary" for m in qat.modules()) == 34


def test_prom_converted_uses_ternary_op_for_exactly_the_pointwise_convs(mobilenet):
    model, _, _, int_model = mobilenet
    pointwise = {name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1}
    ternary = {n for n in int_model.graph.nodes if n.target is ops.ternary_conv2d.default}
    assert len(pointwise) == len(ternary) == 34
    # the op reads the packed weights registered under the conv's own name
    assert {str(n.args[2].target).rpartition(".")[0] for n in ternary} == pointwise
    targets = Counter(n.target for n in int_model.graph.nodes if n.op == "call_function")
    assert targets[ops.int8_conv2d.default] == 18 and targets[ops.int8_linear.default] == 1
    assert targets[ops.int8_add.default] == 10 and targets[ops.int8_global_avg_pool2d.default] == 1
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) for m in int_model.modules())
    packed = int_model.get_submodule("features.18.0").weight_packed  # 320 → 1280, 2 bits per weight
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (1280, 80)


def test_prom_converted_codes_within_one_lsb_layer_by_layer(mobilenet):
    _, x, qat, int_model = mobilenet
    local = code_agreement(qat, int_model, x, mode="local")
    assert len(local.layers) == 65
    assert local.within_one >= 0.999
    elements, _, exact = local.layers["prom_quant.classifier_1"]
    assert exact >= 0.99 * elements  # logits round to nearest (a wrapped int32 offset floored half of them)


def test_prom_converted_argmax_agrees_on_photos(mobilenet):
    _, x, qat, int_model = mobilenet
    with torch.no_grad():
        fake_logits, int_logits = qat.eval()(x), int_model(x)
    assert int_logits.dtype == torch.float32 and int_logits.shape == (6, 1000)
    assert torch.equal(fake_logits.argmax(1), int_logits.argmax(1))


def test_prom_never_modifies_users_model(mobilenet):
    model, x, qat, _ = mobilenet
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qat_state = {k: v.clone() for k, v in qat.state_dict().items()}
    again = prepare(model, (x,))
    for p in again.parameters():
        p.data.zero_()
    convert(qat)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in qat_state.items())
    assert type(model.features[1].conv[1]) is nn.Conv2d


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_prom_prepared_modules_take_the_models_mode(mode):
    # wrappers, observers and fx's containers were made in train mode: a model prepared in eval mode
    # then moved its observers' ranges at every inference call (the next call on the same input
    # differed by 0.026 on resnet18)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    qat = prepare(model, (x,))
    assert {m.training for m in qat.modules()} == {mode == "train"}
    if mode == "eval":
        with torch.no_grad():
            before, state = qat(x), copy.deepcopy(qat.state_dict())
            qat(torch.randn(5, 3, 48, 48) * 10)
            assert all(torch.equal(v, state[k]) for k, v in qat.state_dict().items())
            assert torch.equal(qat(x), before)


def test_prom_prepared_model_is_costed_without_unknown_ops():
    # the cost model runs it on a meta twin, where the observers' bool(initialized) and
    # fake_quantize have no kernel: 65 "ActFakeQuant (not runnable on meta tensors)" on mobilenet_v2
    torch.manual_seed(0)
    model, x = torchvision.models.mobilenet_v2(num_classes=10).eval(), torch.rand(1, 3, 64, 64)
    result = fxslim.optimize(model, x, passes=["prom"])
    assert result.cost_after.unknown_ops == {}
    assert result.cost_after.total.macs == result.cost_before.total.macs
    # with symbolic sizes (fake tensors), bool(initialized) raised GuardOnDataDependentSymNode
    formula = fxslim.estimate(result.module, x, symbolic={"batch": 0})
    assert formula.evaluate(batch=1).total.macs == result.cost_after.total.macs and not formula.unknown_ops


def test_prom_qat_model_under_torch_compile_still_observes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)).train()
    x = torch.rand(2, 3, 16, 16)
    qat = calibrate(prepare(model, x), [x]).train()
    observer = [m for m in qat.modules() if isinstance(m, ActFakeQuant)][-1]
    before = observer.max_val.clone()
    torch._dynamo.reset()
    torch.compile(qat, backend="eager")(x * 5).sum().backward()
    torch._dynamo.reset()
    assert not torch.equal(before, observer.max_val)


def test_prom_second_run_is_not_modified(mobilenet):
    _, x, qat, _ = mobilenet
    gm = copy.deepcopy(qat)
    result = PROM()(gm, PassContext(ir=detect_ir(gm)))
    assert not result.modified
    assert Counter(e.reason for e in result.report.entries) == Counter({"already_rewritten": 53 + 10})


def test_prom_export_save_load_round_trip_identical(mobilenet):
    _, x, _, int_model = mobilenet
    ep = torch.export.export(int_model, (x[:2],))
    assert {n.target for n in ep.graph.nodes if n.op == "call_function"} >= {ops.ternary_conv2d.default, ops.int8_add.default}
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x[:2]), int_model(x[:2]))


# ----------------------------------------------------------------------------------------------
# The MNIST MobileNetV2 (trained float checkpoint): config options, QAT, end to end


@pytest.fixture(scope="module")
def mnist():
    split = mnist_5k()
    return load_mobilenet_mnist(), split


def test_prom_last_pointwise_int8_keeps_last_1x1_at_8_bit(mnist):
    model, split = mnist
    qat = prepare(model, (split.x_test[:2],), PROM(last_pointwise="int8"))
    weights = {e.fqn: e.info["weights"] for e in _entries(qat) if e.kind == "pointwise_conv"}
    assert Counter(weights.values()) == Counter({"ternary": 13, "int8": 1})
    assert weights["features.8.0"] == "int8"


def test_prom_optimize_returns_the_prepared_qat_model(mnist):
    model, split = mnist
    res = fxslim.optimize(model, split.x_test[:2], passes=["prom:ternary=absmean"])
    assert res.report.rewritten("prom") == 14 + 7 + 1 + 1 + 4  # pointwise, depthwise, stem, linear, adds
    assert all(m.ternary_method == "absmean" for m in res.module.modules() if isinstance(m, QConv2d) and m.weight_quant == "ternary")


def test_prom_mnist_post_training_integer_matches_fake_quant_top1(mnist):
    model, split = mnist
    qat = calibrate(prepare(model, (split.x_test[:2],)), [split.x_train[i : i + 250] for i in range(0, 1000, 250)])
    int_model = convert(qat)
    fake, ours = predict(qat, split.x_test).argmax(1), predict(int_model, split.x_test).argmax(1)
    assert (fake == ours).float().mean() >= 0.99
    assert code_agreement(qat, int_model, split.x_test[:100]).within_one >= 0.999


def test_prom_qat_step_trains_latent_weights_and_observers(mnist):
    model, split = mnist
    qat = prepare(model, (split.x_test[:2],))
    conv = qat.get_submodule("features.2.conv.0.0")
    before = conv.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    loss, _ = train_step(qat, optimizer, split.x_train[:32], split.y_train[:32])
    assert torch.isfinite(torch.tensor(loss)) and not torch.equal(before, conv.conv.weight)
    assert all(bool(m.initialized) for m in qat.modules() if isinstance(m, ActFakeQuant))


def test_prom_per_tensor_weights_convert_within_one_lsb(mnist):
    model, split = mnist
    qat = calibrate(prepare(model, (split.x_test[:2],), PROM(per_channel=False)), [split.x_train[:500]])
    assert sum(isinstance(m, PerTensorQConv2d) for m in qat.modules()) == 22
    codes, scale = qat.get_submodule("features.1.conv.1").weight_codes()
    assert scale.unique().numel() == 1
    assert code_agreement(qat, convert(qat), split.x_test[:100]).within_one >= 0.999
    if onednn_available():  # one scale per tensor, expanded to oneDNN's per-channel scales
        assert code_agreement(qat, convert(qat, runtime="onednn"), split.x_test[:100]).within_one == 1.0


def test_prom_converted_runs_under_fxslim_compile_backend(mnist):
    model, split = mnist
    int_model = convert(calibrate(prepare(model, (split.x_test[:2],)), [split.x_train[:500]]))
    compiled = torch.compile(int_model, backend="fxslim", options={"inner": "inductor"})
    with torch.no_grad():
        assert torch.equal(compiled(split.x_test[:8]), int_model(split.x_test[:8]))


# ----------------------------------------------------------------------------------------------
# The oneDNN runtime (convert(runtime="onednn")), the run-time pool size, NaN

_ONEDNN = pytest.mark.skipif(not onednn_available(),
                             reason="needs oneDNN quantized ops")


@_ONEDNN
def test_prom_onednn_runtime_fuses_residual_adds_and_stays_within_one_lsb(mobilenet):
    _, x, qat, _ = mobilenet
    fast = convert(qat, runtime="onednn")
    targets = Counter(n.target for n in fast.graph.nodes if n.op == "call_function")
    # 52 convs: the 10 projection convs that feed a residual add are fused with it
    assert targets[ops.qconv2d.default] == 42 and targets[ops.qconv2d_add.default] == 10
    assert targets[ops.qlinear.default] == 1 and not any(t in targets for t in (ops.ternary_conv2d.default, ops.int8_add.default))
    local = code_agreement(qat, fast, x, mode="local")
    assert len(local.layers) == 65 - 10 and local.within_one == 1.0 and local.exact >= 0.99
    with torch.no_grad():
        assert torch.equal(fast(x).argmax(1), qat.eval()(x).argmax(1))


@_ONEDNN
def test_prom_onednn_runtime_unfused_adds_are_bit_exact_against_fake_quant(mobilenet):
    _, x, qat, _ = mobilenet
    fast = convert(qat, runtime="onednn", fuse_adds=False)
    targets = Counter(n.target for n in fast.graph.nodes if n.op == "call_function")
    assert targets[ops.qconv2d.default] == 52 and targets[ops.qadd.default] == 10
    local = code_agreement(qat, fast, x, mode="local")
    assert len(local.layers) == 65 and local.within_one == 1.0
    adds = [name for name in local.layers if name.startswith("prom_quant.add")]
    assert len(adds) == 10 and all(local.layers[a][2] == local.layers[a][0] for a in adds)


@_ONEDNN
def test_prom_onednn_conv_added_to_itself_is_not_fused_and_converts():
    """y = conv(x); y + y: the conv is both inputs of the add (one user), and fusing it made the add
    read the conv it replaced (convert raised "Tried to erase Node")."""

    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.fc(torch.relu(y + y).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    qat = calibrate(prepare(Doubled().eval(), (x,)), [x]).eval()
    fast = convert(qat, runtime="onednn")
    targets = Counter(n.target for n in fast.graph.nodes if n.op == "call_function")
    assert targets[ops.qadd.default] == 1 and ops.qconv2d_add.default not in targets
    assert code_agreement(qat, fast, x, mode="local").within_one == 1.0


@_ONEDNN
def test_prom_onednn_runtime_export_save_load_round_trip_identical(mnist):
    model, split = mnist
    fast = convert(calibrate(prepare(model, (split.x_test[:2],)), [split.x_train[:500]]), runtime="onednn")
    x = split.x_test[:4]
    exported = torch.export.export(fast, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()  # fresh weight tensors: prepacked again on first call
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x)) and torch.equal(loaded(split.x_test[:7]), fast(split.x_test[:7]))


def test_prom_micro_batched_needs_one_tensor_input_and_output():
    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(ValueError, match="one tensor input and one tensor output"):
        micro_batched(fx.symbolic_trace(TwoInputs()))


def test_prom_micro_batched_refuses_a_model_whose_output_is_not_batch_first():
    """conv → cat([y, relu(y)], dim=0): 2N rows for N samples; sliced, its rows came back
    interleaved (slice by slice) and differed from the whole batch's, silently."""

    class TwoViews(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.fc(torch.cat([y, torch.relu(y)], 0).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    int_model = convert(calibrate(prepare(TwoViews().eval(), (x,)), [x]))
    with pytest.raises(ValueError, match=r"micro_batched: expected an output with the input's batch first \(4 rows"):
        micro_batched(int_model, max_activation_bytes=1024)


class _BatchCentred(nn.Module):
    """Subtracts the batch mean (a float island): each output row depends on every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y - y.mean(0, keepdim=True)))
        return self.fc(y.mean((2, 3)))


class _FoldedViews(nn.Module):
    """Two views of each sample folded into the batch (2N rows) and back: samples stay apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
        y = torch.relu(self.conv(views)).mean((2, 3))
        return self.fc(y.reshape(x.shape[0], 16))


@pytest.mark.parametrize("runtime", ["reference", pytest.param("onednn", marks=_ONEDNN)])
def test_prom_micro_batched_refuses_a_model_that_mixes_samples_and_takes_folded_views(runtime):
    # its output was batch first, so slicing the batch passed the checks and changed the output (0.027
    # on a scale of 0.34 with small slices), silently
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    mixing = convert(calibrate(prepare(_BatchCentred().eval(), (x[:2],)), [x]).eval(), runtime=runtime)
    with pytest.raises(ValueError, match=r"micro_batched: mean .* mixes or regroups the samples"):
        micro_batched(mixing, max_activation_bytes=4096)
    folded = convert(calibrate(prepare(_FoldedViews().eval(), (x[:2],)), [x]).eval(), runtime=runtime)
    sliced = micro_batched(folded, max_activation_bytes=4096)
    assert sliced.rows_per_slice(x) < len(x)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), folded(x), atol=0, rtol=0)


@pytest.mark.parametrize("runtime", ["reference", pytest.param("onednn", marks=_ONEDNN)])
def test_prom_micro_batched_refuses_another_rank_or_channel_count(runtime):
    """An unbatched image or a 4-channel one got TorchScript's or an IndexError's traceback from
    the runtime's internals; the wrapper names the shape it takes. Batch and size stay free."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    x = torch.randn(2, 3, 16, 16)
    int_model = convert(calibrate(prepare(model.eval(), (x,)), [x]), runtime=runtime)
    wrapped = micro_batched(int_model)
    for bad in (x[0], torch.randn(2, 4, 16, 16), torch.randn(1, 2, 3, 16, 16)):
        with pytest.raises(ValueError, match=r"x: expected a tensor of shape \[N, 3, H, W\] .* got \(" +
                           ", ".join(map(str, bad.shape))):
            wrapped(bad)
    with pytest.raises(ValueError, match=r"got list"):
        wrapped([x])
    with pytest.raises(ValueError, match=r"x: expected a floating-point tensor, got torch.int64"):
        wrapped(x.long())  # the converted model refuses it too; the lowered runner quantized it silently
    with pytest.raises(ValueError, match=r"x: expected a 4-d tensor \[N, C_in, H, W\], got shape \(3, 16, 16\)"):
        int_model(x[0])  # the ops themselves, unwrapped
    with torch.no_grad():
        assert wrapped(torch.randn(5, 3, 9, 13)).shape == (5, 4)


@pytest.mark.parametrize("runtime", ["reference", pytest.param("onednn", marks=_ONEDNN)])
def test_prom_micro_batched_takes_tokens_of_another_count(runtime):
    # [N, T, F] into a linear: T is free like a batch, F is the channel count
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(8, 5, 12)
    int_model = convert(calibrate(prepare(model, x[:2]), [x]), runtime=runtime)
    wrapped, longer = micro_batched(int_model), torch.randn(3, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(longer), int_model(longer), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected a tensor of shape \[N, 5, d2\] or \[N, d1, 12\]"):
        wrapped(torch.randn(3, 7, 11))


@pytest.mark.parametrize("runtime", ["reference", pytest.param("onednn", marks=_ONEDNN)])
def test_prom_micro_batched_traces_into_torchscript_as_its_ops(runtime):
    # the lowered runner calls oneDNN through ctypes, which a trace does not record: it kept only
    # the output's allocation, and the traced model returned uninitialised memory
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(4, 3, 16, 16)
    int_model = convert(calibrate(prepare(model, x[:2]), [x]), runtime=runtime)
    wrapped = micro_batched(int_model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        traced = torch.jit.trace(wrapped, x[:2])
        for other in (x[:2], x[2:3], torch.randn(3, 3, 24, 24)):
            torch.testing.assert_close(traced(other), int_model(other), rtol=0, atol=0)


def test_prom_after_haste_lists_the_haste_convs_it_leaves_in_float():
    # they were in no entry of PROM's report: a matcher never drops a node silently
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model, torch.randn(1, 3, 16, 16), passes=["haste:L=8", "prom"])
    hashed = result.report.rewritten("haste")
    others = [e for e in result.report.entries("prom") if e.reason == "other_pass"]
    assert hashed > 0 and len(others) == hashed
    assert all("run PROM before it or alone" in e.detail for e in others)


def test_prom_convert_unknown_runtime_raises(mobilenet):
    with pytest.raises(ValueError, match="runtime must be one of"):
        convert(mobilenet[2], runtime="tflite")


@_ONEDNN
def test_prom_onednn_runtime_micro_batched_equals_whole_batch(mobilenet):
    _, x, qat, _ = mobilenet
    fast = convert(qat, runtime="onednn")
    sliced = micro_batched(fast, max_activation_bytes=3 << 20)  # 1.2 MB per sample at 224 px: 2 per slice
    assert sliced.rows_per_slice(x) == 2
    with torch.no_grad():
        assert torch.equal(sliced(x), micro_batched(fast)(x))  # the whole batch in one slice


@pytest.mark.parametrize("runtime", ["reference", pytest.param("onednn", marks=_ONEDNN)])
def test_prom_global_pool_divides_by_run_time_size(runtime):
    """Converted at 16 px, run at 8 and 32 px: the pool's codes stay within 1 LSB of fake quant
    (the old multiplier baked in 1/(16·16/4) and was off by 4× and 1/4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    qat = calibrate(prepare(model.eval(), torch.randn(2, 3, 16, 16)),
                    [torch.randn(8, 3, size, size) for size in (8, 16, 32)])
    int_model = convert(qat, runtime=runtime)
    for size in (8, 32):
        x = torch.randn(4, 3, size, size)
        local = code_agreement(qat, int_model, x, mode="local")
        assert local.within_one == 1.0
        assert code_agreement(qat, int_model, x, mode="end_to_end").within_one == 1.0


@pytest.mark.parametrize("runtime", ["reference", pytest.param("onednn", marks=_ONEDNN)])
def test_prom_nan_in_one_sample_gives_nan_outputs_there_only(mnist, runtime):
    model, split = mnist
    qat = calibrate(prepare(model, (split.x_test[:2],)), [split.x_train[:500]]).eval()
    int_model = convert(qat, runtime=runtime)
    x = split.x_test[:3].clone()
    x[1, 0, 5, 7] = float("nan")
    with torch.no_grad():
        for m in (qat, int_model):
            clean, y = m(split.x_test[:3]), m(x)
            assert torch.isnan(y[1]).all()
            assert torch.equal(y[[0, 2]], clean[[0, 2]])


# ----------------------------------------------------------------------------------------------
# Small inline models: skip reasons, config validation, conversion errors


class _Skips(nn.Module):
    """x → conv(functional) → shared conv twice → transposed → reflect-padded → 'same' 2×2 → + bias map."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.shared = nn.Conv2d(4, 4, 1)
        self.up = nn.ConvTranspose2d(4, 4, 1)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.even = nn.Conv2d(4, 4, 2, padding="same")
        self.bias_map = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        x = F.conv2d(x, self.w)
        x = self.shared(self.shared(x))
        x = self.even(self.reflect(self.up(x)))
        return x + self.bias_map


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_prom_skip_reasons_are_reported():
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning, match="rewrote nothing"):
        res = fxslim.optimize(_Skips(), x, passes=["prom"])
    reasons = Counter(e.reason for e in res.report.entries("prom"))
    assert reasons == Counter({"not_a_module": 1, "shared_module": 2, "transposed": 1, "padding_mode": 1,
                               "asymmetric_padding": 1, "broadcast": 1})


def test_prom_filter_fn_and_override_skip_with_filtered_out():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    res = fxslim.optimize(net, torch.randn(1, 3, 6, 6), passes=["prom"], overrides={"2": None})
    assert sorted((e.fqn, e.status, e.reason) for e in res.report.entries("prom")) == [("0", "rewritten", ""), ("2", "skipped", "filtered_out")]
    res = fxslim.optimize(net, torch.randn(1, 3, 6, 6), passes=["prom"], overrides={"2": PROM(pointwise="int8")})
    assert [e.info["weights"] for e in res.report.entries("prom")] == ["int8", "int8"]


def test_prom_config_validation_and_string_round_trip():
    with pytest.raises(ValueError, match=r"PROM.ternary: expected one of \('twn', 'absmean'\), got 'ttq'"):
        PROM(ternary="ttq")
    with pytest.raises(ValueError, match="PROM.last_pointwise"):
        PROM(last_pointwise="fp16")
    with pytest.raises(ValueError, match="PROM.momentum"):
        PROM(momentum=1.0)
    cfg = fxslim.parse_pass("prom:ternary=absmean,last_pointwise=int8,per_channel=false")
    assert cfg == PROM(ternary="absmean", last_pointwise="int8", per_channel=False)
    assert PROM.from_dict(cfg.to_dict()) == cfg and fxslim.parse_pass(cfg.to_string()) == cfg


def test_prom_needs_module_ir():
    net = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    with pytest.raises(ValueError, match="PROM: expected a symbolic-traced graph"):
        fxslim.optimize(net, torch.randn(1, 3, 4, 4), passes=["prom"], capture="export")


def test_prom_convert_rejects_unprepared_or_uncalibrated_models():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    with pytest.raises(TypeError, match="expected the GraphModule returned by"):
        convert(fx.symbolic_trace(net))
    with pytest.raises(ValueError, match="has seen no data; run calibrate"):
        convert(prepare(net, torch.randn(1, 3, 4, 4)))


def test_calibrate_refuses_frozen_observers_rather_than_observing_nothing():
    """After freeze_observers, calibrate ran the batches and kept the old ranges without a word."""
    from fxslim.runtime.prom_qat import freeze_observers, unfreeze_observers

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 4, 4)
    qat = fxslim.calibrate(prepare(net, x), [x])
    scales = [m.scale.clone() for m in qat.modules() if isinstance(m, ActFakeQuant)]
    freeze_observers(qat)
    with pytest.raises(ValueError, match=r"calibrate: 2 of 2 observers are frozen .*unfreeze_observers"):
        fxslim.calibrate(qat, [10 * x])
    assert all(torch.equal(m.scale, s) for m, s in zip((m for m in qat.modules() if isinstance(m, ActFakeQuant)), scales))
    unfreeze_observers(qat)
    fxslim.calibrate(qat, [10 * x])
    assert not torch.equal(next(m for m in qat.modules() if isinstance(m, ActFakeQuant)).scale, scales[0])


def test_prom_add_relu_and_mean_pool_convert_within_one_lsb():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = F.relu(y + self.b(y))
            return self.fc(z.mean((2, 3)))

    x = torch.randn(8, 3, 6, 6)
    qat = calibrate(prepare(Net().eval(), x), [x])
    int_model = convert(qat)
    targets = [n.target for n in int_model.graph.nodes if n.op == "call_function"]
    assert ops.int8_add.default in targets and ops.int8_global_avg_pool2d.default in targets
    add = next(n for n in int_model.graph.nodes if n.target is ops.int8_add.default)
    assert add.args[8] == add.args[7]  # ReLU: out_min is the output zero point
    assert code_agreement(qat, int_model, x).within_one == 1.0


def test_prom_add_onto_a_much_finer_grid_converts_with_a_smaller_shift():
    # y + y * -0.9999: the output grid is ~10^4 times finer than y's, a multiplier over 2^31 at shift 20
    class Cancels(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(torch.relu(self.stem(x)))
            return y + y * -0.9999

    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qat = calibrate(prepare(Cancels().eval(), x[:2]), [x]).eval()
    int_model = convert(qat)
    add = next(n for n in int_model.graph.nodes if n.target is ops.int8_add.default)
    assert add.args[6] < 20  # the shift
    assert code_agreement(qat, int_model, x).within_one == 1.0


def test_prom_reference_convert_names_the_layer_and_the_runtime_for_grids_int32_cannot_hold():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    qat = calibrate(prepare(net, torch.randn(2, 3, 8, 8)), [torch.randn(4, 3, 8, 8) * 1e15]).eval()
    with pytest.raises(ValueError, match=r"coarser than its output's.*runtime='onednn'.*\[at 0\]"):
        convert(qat)
    if onednn_available():
        assert convert(qat, runtime="onednn") is not None


def test_example_prom_qat_own_loop_runs():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "examples" / "prom_qat_own_loop.py"), "--steps", "10"],
                         capture_output=True, text=True, timeout=300, cwd=root, check=True)
    assert "integer model top-1" in out.stdout


def test_prom_convert_replays_value_preserving_ops_between_layer_and_quantizer():
    class Hand(nn.Module):
        """x → q → int8 conv → ReLU → flatten → q (a QAT graph written by hand, not by prepare)."""

        def __init__(self):
            super().__init__()
            self.q_in, self.conv, self.q_out = ActFakeQuant(), QConv2d(nn.Conv2d(3, 4, 3), "int8"), ActFakeQuant()

        def forward(self, x):
            return self.q_out(torch.relu(self.conv(self.q_in(x))).flatten(1))

    x = torch.randn(8, 3, 6, 6)
    qat = calibrate(trace(Hand(), leaf_modules=(QConv2d, ActFakeQuant)), [x])
    next(iter(qat.graph.nodes)).meta["val"] = x  # the input shape convert propagates from (prepare sets it)
    int_model = convert(qat)
    assert int_model(x).shape == (8, 64)
    assert code_agreement(qat, int_model, x).within_one == 1.0


def test_prom_layer_whose_weight_is_also_read_directly_is_wrapped_and_the_read_redirected():
    # timm's EdgeNeXt reads token_projection.weight.device/.dtype besides calling the conv; the
    # quantizer of the node named "to" must not collide with nn.Module.to
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.to(self.proj.weight.dtype))

    net, x = Net().eval(), torch.randn(2, 3, 5, 5)
    qat = calibrate(prepare(net, (x,)), [x])
    reads = [str(n.target) for n in qat.graph.nodes if n.op == "get_attr"]
    assert reads == ["proj.conv.weight"] and isinstance(qat.get_submodule("proj"), QConv2d)
    with torch.no_grad():
        assert qat.eval()(x).shape == (2, 4, 5, 5)


def test_code_agreement_keeps_each_modules_own_mode():
    """A QAT loop that froze its batch norms (``bn.eval()`` in a training model) keeps them frozen
    after ``code_agreement``: it put every module back in the root's mode, and the BN statistics
    started updating again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    x = torch.randn(4, 3, 8, 8)
    qat = fxslim.prepare(model.eval(), x)
    fxslim.calibrate(qat, [x])
    int_model = fxslim.convert(qat)
    qat.train()
    frozen = [m for m in qat.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen
    for bn in frozen:
        bn.eval()
    code_agreement(qat, int_model, x)
    assert qat.training and not any(bn.training for bn in frozen)


class _UntracedRoot(nn.Module):
    """A root whose forward branches on a value: its own conv, 1×1 conv and linear are traced one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.proj, self.fc = (nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 1),
                                                     nn.ReLU()), nn.Conv2d(8, 16, 1), nn.Linear(16, 3))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        if x.mean() > 0:
            x = self.block(x)
        return self.fc(self.proj(x).mean((2, 3)))


def test_layers_traced_alone_are_reported_and_warned_about():
    """A layer whose caller did not trace is a graph of its own that PROM cannot wrap: it was skipped
    as ``not_a_module`` (a 1×1 conv among them) without a word, as the block beside it was rewritten."""
    with pytest.warns(UserWarning, match=r"'fc', 'proj', 'stem' stay float: each was traced alone.*_UntracedRoot"):
        result = fxslim.optimize(_UntracedRoot().eval(), torch.randn(2, 3, 8, 8), passes=["prom"])
    assert result.report.skipped("prom") == Counter({"traced_alone": 3})
    assert result.report.rewritten("prom") == 1


def test_estimating_a_model_converted_in_parts_does_not_warn_about_train():
    """Capture runs a copy in the other train/eval mode; the integer parts' train() warned the user that
    it "keeps it in eval mode" as if they had called it."""
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="traced alone"):
        qat = fxslim.prepare(_UntracedRoot().eval(), x)
    fxslim.calibrate(qat, [x])
    int_model = fxslim.convert(qat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fxslim.estimate(int_model, x).total.macs > 0
    assert not [w for w in caught if "eval mode" in str(w.message)]
