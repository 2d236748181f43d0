"""Tests of the PROM fake quantizers and of converting fake-quantized layers to the integer ops
(built by hand here, before any graph pass exists)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxslim.runtime import prom as P
from fxslim.passes import prom_lower as lower
from fxslim.runtime import prom_qat as Q

SETTINGS = settings(max_examples=20, deadline=None)


def _codes_of(y: torch.Tensor, act: Q.ActFakeQuant) -> torch.Tensor:
    """Integer codes of a fake-quantized tensor (exact: y = scale·(code − zp) in float32)."""
    scale, zp = act.qparams()
    return torch.round(y / scale) + zp


# ----------------------------------------------------------------------------------------------
# Weight quantizers


@SETTINGS
@given(c_out=st.integers(1, 8), c_in=st.integers(1, 30), method=st.sampled_from(Q.TERNARY_METHODS), seed=st.integers(0, 999))
def test_ternary_fake_quant_values_in_minus_alpha_zero_alpha(c_out, c_in, method, seed):
    w = torch.randn(c_out, c_in, 1, 1, generator=torch.Generator().manual_seed(seed))
    codes, alpha = Q.ternary_codes(w, method)
    wq = Q.ternary_fake_quant(w, method)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    for c in range(c_out):
        allowed = torch.tensor([-alpha[c], 0.0, alpha[c]])
        assert torch.isin(wq[c], allowed).all()
    assert torch.equal(wq, codes.float() * alpha.view(-1, 1, 1, 1))


def test_ternary_codes_twn_follows_threshold_rule():
    w = torch.tensor([[1.0, -0.2, 0.5, -0.9], [0.0, 0.0, 0.0, 0.0]])
    codes, alpha = Q.ternary_codes(w, "twn")
    # row 0: mean|w| = 0.65, Δ = 0.455: keep 1.0, 0.5, -0.9; α = (1.0 + 0.5 + 0.9) / 3
    assert codes.tolist() == [[1, 0, 1, -1], [0, 0, 0, 0]]
    assert torch.allclose(alpha, torch.tensor([2.4 / 3, 0.0]))


def test_ternary_codes_absmean_follows_rounding_rule():
    w = torch.tensor([[1.0, -0.2, 0.5, -0.9]])
    codes, alpha = Q.ternary_codes(w, "absmean")
    # γ = 0.65: w/γ = 1.54, -0.31, 0.77, -1.38 → round, clip → 1, 0, 1, -1
    assert codes.tolist() == [[1, 0, 1, -1]]
    assert torch.allclose(alpha, torch.tensor([0.65]))


def test_ternary_codes_unknown_method_raises():
    with pytest.raises(ValueError, match="method"):
        Q.ternary_codes(torch.randn(2, 3), "ttq")


@pytest.mark.parametrize("quantizer", [lambda w: Q.ternary_fake_quant(w, "twn"), lambda w: Q.ternary_fake_quant(w, "absmean"),
                                       Q.int8_weight_fake_quant])
def test_weight_fake_quant_gradient_equals_incoming_gradient(quantizer):
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    grad = torch.randn(6, 5, 3, 3)
    quantizer(w).backward(grad)
    assert torch.equal(w.grad, grad)


@SETTINGS
@given(c_out=st.integers(1, 8), c_in=st.integers(1, 30), seed=st.integers(0, 999))
def test_int8_weight_codes_in_symmetric_range(c_out, c_in, seed):
    w = torch.randn(c_out, c_in, generator=torch.Generator().manual_seed(seed))
    w[0] = 0  # an all-zero channel
    codes, scale = Q.int8_weight_codes(w)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -127 and int(codes.max()) <= 127
    assert codes[0].abs().max() == 0
    assert (codes[1:].abs().amax(1) == 127).all()  # max|W_c| maps to 127
    assert torch.equal(Q.int8_weight_fake_quant(w), codes.float() * scale.view(-1, 1))


# ----------------------------------------------------------------------------------------------
# ActFakeQuant


def test_act_fake_quant_first_batch_sets_range_then_ema():
    act = Q.ActFakeQuant(momentum=0.9)
    act(torch.tensor([-1.0, 2.0]))
    assert float(act.min_val) == -1.0 and float(act.max_val) == 2.0
    act(torch.tensor([-3.0, 4.0]))
    assert torch.isclose(act.min_val, torch.tensor(0.9 * -1.0 + 0.1 * -3.0))
    assert torch.isclose(act.max_val, torch.tensor(0.9 * 2.0 + 0.1 * 4.0))


def test_act_fake_quant_eval_mode_does_not_update_after_first_batch():
    act = Q.ActFakeQuant().eval()
    act(torch.tensor([-1.0, 2.0]))  # the first batch initializes even in eval mode
    act(torch.tensor([-10.0, 20.0]))
    assert float(act.min_val) == -1.0 and float(act.max_val) == 2.0


def test_act_fake_quant_frozen_observer_keeps_range():
    act = Q.ActFakeQuant()
    act(torch.tensor([0.0, 1.0]))
    act.freeze()
    act(torch.tensor([-5.0, 9.0]))
    assert float(act.max_val) == 1.0
    Q.unfreeze_observers(nn.Sequential(act))
    act(torch.tensor([-5.0, 9.0]))
    assert float(act.max_val) > 1.0


def test_act_fake_quant_frozen_before_any_batch_raises():
    act = Q.ActFakeQuant()
    Q.freeze_observers(nn.Sequential(act))
    with pytest.raises(RuntimeError, match="frozen"):
        act(torch.randn(3))


@SETTINGS
@given(low=st.floats(-5, 5), width=st.floats(0.0, 10.0), seed=st.integers(0, 999))
def test_act_fake_quant_codes_in_uint8_range_with_integer_zero_point(low, width, seed):
    act = Q.ActFakeQuant()
    x = low + width * torch.rand(100, generator=torch.Generator().manual_seed(seed))
    y = act(x)
    scale, zp = act.qparams()
    codes = y / scale + zp
    assert 0 <= zp <= 255
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 255
    assert scale >= (max(float(x.max()), 0) - min(float(x.min()), 0)) / 255 * (1 - 1e-6)


def test_act_fake_quant_range_includes_zero():
    positive, negative = Q.ActFakeQuant(), Q.ActFakeQuant()
    positive(torch.tensor([2.0, 6.0]))
    negative(torch.tensor([-6.0, -2.0]))
    assert positive.qparams() == (pytest.approx(6.0 / 255), 0)
    assert negative.qparams() == (pytest.approx(6.0 / 255), 255)


def test_act_fake_quant_gradient_clipped_outside_range():
    act = Q.ActFakeQuant()
    act(torch.tensor([0.0, 1.0]))
    act.eval()
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    act(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_act_fake_quant_state_in_state_dict_round_trips():
    act = Q.ActFakeQuant()
    act(torch.tensor([-1.0, 3.0]))
    state = act.state_dict()
    assert set(state) == {"min_val", "max_val", "scale", "zero_point", "initialized", "observer_enabled"}
    clone = Q.ActFakeQuant()
    clone.load_state_dict(state)
    assert clone.qparams() == act.qparams()
    x = torch.randn(20)
    assert torch.equal(clone.eval()(x), act.eval()(x))


def test_act_fake_quant_bad_momentum_raises():
    with pytest.raises(ValueError, match="momentum"):
        Q.ActFakeQuant(momentum=1.0)


# ----------------------------------------------------------------------------------------------
# Layer wrappers


def test_qconv2d_ternary_rejects_non_pointwise_conv():
    with pytest.raises(ValueError, match="ternary"):
        Q.QConv2d(nn.Conv2d(4, 4, 3), "ternary")
    with pytest.raises(ValueError, match="ternary"):
        Q.QConv2d(nn.Conv2d(4, 4, 1, groups=2), "ternary")


def test_qconv2d_bad_weight_quant_raises():
    with pytest.raises(ValueError, match="weight_quant"):
        Q.QConv2d(nn.Conv2d(4, 4, 1), "int4")


def test_qconv2d_forward_uses_fake_quant_input_and_weights_and_trains():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    act = Q.ActFakeQuant()
    layer = Q.QConv2d(conv, "int8", input_quant=act)
    x = torch.randn(2, 3, 6, 6)
    y = layer(x)
    expected = F.conv2d(act(x), Q.int8_weight_fake_quant(conv.weight), conv.bias, padding=1)
    assert torch.equal(y, expected)
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_qlinear_forward_matches_fake_quant_linear():
    linear = nn.Linear(7, 3)
    layer = Q.QLinear(linear)
    x = torch.randn(4, 7)
    assert torch.equal(layer(x), F.linear(x, Q.int8_weight_fake_quant(linear.weight), linear.bias))


def test_requant_shift_prefers_int32_kernel_and_falls_back():
    assert lower.requant_shift(torch.tensor([0.5, 0.01])) == P.CONV_SHIFT
    assert lower.requant_shift(torch.tensor([2.0, 0.5])) == P.CONV_SHIFT - 1  # int32 kernel with a final clamp
    assert lower.requant_shift(torch.tensor([300.0])) == 22  # 300·2^22 < 2^31 <= 300·2^23: int64 kernel
    tiny = torch.tensor([1e-6])
    assert lower.requant_shift(tiny) > P.CONV_SHIFT
    assert lower.requant_shift(tiny, acc_bound=torch.tensor([1000])) == P.CONV_SHIFT  # |acc| too small to matter


# ----------------------------------------------------------------------------------------------
# Conversion by hand: fake-quant net vs integer ops


def _calibrate(model: nn.Module, shape, batches: int = 6, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape, generator=gen))
    model.eval()


def _conv_bn_relu6_conv(method: str):
    """x → ActFakeQuant → int8 conv3x3 → BN → ReLU6 → ActFakeQuant → ternary conv1x1 → ActFakeQuant."""
    torch.manual_seed(1)
    conv1, bn1, conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 24, 1, stride=2)
    with torch.no_grad():
        bn1.weight.uniform_(-1.5, 1.5)  # negative γ: the converter flips those channels' codes
        bn1.weight[3] = 0.0  # a dead channel: constant output
        bn1.bias.uniform_(-0.5, 0.5)
    act_in, act_mid, act_out = Q.ActFakeQuant(), Q.ActFakeQuant(), Q.ActFakeQuant()
    q1 = Q.QConv2d(conv1, "int8", input_quant=act_in)
    q2 = Q.QConv2d(conv2, "ternary", ternary_method=method, input_quant=act_mid)
    model = nn.Sequential(q1, bn1, nn.ReLU6(), q2, act_out)
    _calibrate(model, (8, 3, 12, 12))
    return model, (q1, bn1, q2, act_in, act_mid, act_out)


@pytest.mark.parametrize("method", Q.TERNARY_METHODS)
def test_converted_conv_bn_relu6_conv_within_one_lsb(method):
    model, (q1, bn1, q2, act_in, act_mid, act_out) = _conv_bn_relu6_conv(method)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fake_mid = act_mid(F.relu6(bn1(q1(x))))
        fake_out = model(x)
    first, second = lower.convert_conv(q1, act_mid, bn=bn1, activation="relu6"), lower.convert_conv(q2, act_out)
    assert first.op is torch.ops.fxslim.int8_conv2d.default and second.op is torch.ops.fxslim.ternary_conv2d.default
    q_in = lower.convert_input(act_in)(x)
    q_mid = first(q_in)
    q_out = second(q_mid)
    assert (q_mid.float() - _codes_of(fake_mid, act_mid)).abs().max() <= 1
    assert (q_out.float() - _codes_of(fake_out, act_out)).abs().max() <= 1
    # layer-local: the ternary layer fed the integer codes agrees within 1 LSB as well
    with torch.no_grad():
        fake_local = act_out(F.conv2d(lower.convert_output(act_mid)(q_mid), q2.quantized_weight(), q2.conv.bias, stride=2))
    assert (q_out.float() - _codes_of(fake_local, act_out)).abs().max() <= 1
    assert torch.allclose(lower.convert_output(act_out)(q_out), fake_out, atol=act_out.qparams()[0] * 1.001)


def _tiny_inverted_residual():
    """stem (int8 3x3) → expand (ternary) → depthwise (int8) → project (ternary) → + → GAP → linear."""
    torch.manual_seed(2)
    stem, bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    expand, bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
    dw, bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
    project, bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
    fc = nn.Linear(8, 10)
    acts = {name: Q.ActFakeQuant() for name in ("x", "a", "e", "d", "p", "sum", "pool", "logits")}
    layers = {
        "stem": Q.QConv2d(stem, "int8", input_quant=acts["x"]),
        "expand": Q.QConv2d(expand, "ternary"),
        "dw": Q.QConv2d(dw, "int8"),
        "project": Q.QConv2d(project, "ternary"),
        "fc": Q.QLinear(fc),
    }
    bns = {"stem": bn0, "expand": bn1, "dw": bn2, "project": bn3}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers, self.bns, self.acts = nn.ModuleDict(layers), nn.ModuleDict(bns), nn.ModuleDict(acts)

        def forward(self, x):
            L, B, A = self.layers, self.bns, self.acts
            a = A["a"](F.relu6(B["stem"](L["stem"](x))))
            e = A["e"](F.relu6(B["expand"](L["expand"](a))))
            d = A["d"](F.relu6(B["dw"](L["dw"](e))))
            p = A["p"](B["project"](L["project"](d)))
            s = A["sum"](a + p)
            pooled = A["pool"](F.adaptive_avg_pool2d(s, 1).flatten(1))
            return A["logits"](L["fc"](pooled))

    net = Net()
    _calibrate(net, (16, 1, 10, 10))
    return net


def test_converted_inverted_residual_with_add_pool_linear_within_one_lsb():
    net = _tiny_inverted_residual()
    L, B, A = net.layers, net.bns, net.acts
    x = torch.randn(6, 1, 10, 10, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        fake_logits = net(x)
    ops = {
        "x": lower.convert_input(A["x"]),
        "stem": lower.convert_conv(L["stem"], A["a"], bn=B["stem"], activation="relu6"),
        "expand": lower.convert_conv(L["expand"], A["e"], bn=B["expand"], activation="relu6", x_quant=A["a"]),
        "dw": lower.convert_conv(L["dw"], A["d"], bn=B["dw"], activation="relu6", x_quant=A["e"]),
        "project": lower.convert_conv(L["project"], A["p"], bn=B["project"], x_quant=A["d"]),
        "add": lower.convert_add(A["a"], A["p"], A["sum"]),
        "pool": lower.convert_global_avg_pool(A["sum"], A["pool"]),
        "fc": lower.convert_linear(L["fc"], A["logits"], x_quant=A["pool"]),
    }
    assert ops["expand"].op is torch.ops.fxslim.ternary_conv2d.default
    assert ops["dw"].op is torch.ops.fxslim.int8_conv2d.default and ops["dw"].scalars["groups"] == 16
    qa = ops["stem"](ops["x"](x))
    qp = ops["project"](ops["dw"](ops["expand"](qa)))
    qs = ops["add"](qa, qp)
    logits = ops["fc"](ops["pool"](qs).flatten(1))
    # layer-local checks: each integer op against the fake-quant layer fed the same (dequantized) codes
    deq = {name: lower.convert_output(A[name]) for name in A}
    with torch.no_grad():
        fake_sum = A["sum"](deq["a"](qa) + deq["p"](qp))
        fake_pool = A["pool"](F.adaptive_avg_pool2d(deq["sum"](qs), 1).flatten(1))
        fake_fc = A["logits"](L["fc"](deq["pool"](ops["pool"](qs).flatten(1))))
    assert (qs.float() - _codes_of(fake_sum, A["sum"])).abs().max() <= 1
    assert (ops["pool"](qs).flatten(1).float() - _codes_of(fake_pool, A["pool"])).abs().max() <= 1
    assert (logits.float() - _codes_of(fake_fc, A["logits"])).abs().max() <= 1
    # end to end, logits codes of the whole integer net against the whole fake-quant net
    assert (logits.float() - _codes_of(fake_logits, A["logits"])).abs().max() <= 1


def test_integer_op_wrong_input_count_raises():
    act = Q.ActFakeQuant()
    act(torch.randn(5))
    with pytest.raises(TypeError, match="inputs"):
        lower.convert_add(act, act, act)(torch.zeros(3, dtype=torch.uint8))


def test_convert_conv_without_input_grid_raises():
    act = Q.ActFakeQuant()
    act(torch.randn(5))
    with pytest.raises(ValueError, match="x_quant"):
        lower.convert_conv(Q.QConv2d(nn.Conv2d(2, 2, 1), "ternary"), act)


def test_a_qat_model_takes_torch_func_transforms_as_the_float_model_does():
    # the straight-through estimator was an old-style autograd.Function: grad, vmap and per-sample
    # gradients refused the QAT model, even vmap under no_grad
    import fxslim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 4))
    x = torch.randn(4, 3, 8, 8)
    qat = fxslim.prepare(model, x[:2])
    qat(x)
    qat.eval()  # observers hold still: each sample sees the same ranges
    params = {k: v.detach() for k, v in qat.named_parameters()}

    def loss(p, sample):
        return torch.func.functional_call(qat, p, (sample[None],)).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        qat.zero_grad()
        qat(x[i:i + 1]).sum().backward()
        for name, p in qat.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(qat)(x[:, None]).squeeze(1), qat(x), atol=1e-6, rtol=1e-5)
