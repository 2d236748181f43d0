"""fxslim's entry points work when called inside ``torch.inference_mode()``: a model copied, traced
or converted there got inference tensors, so capture read no versions and rewrote nothing (blaming
tracing), prepare returned the float model, the result could not train, and micro_batched and the
backend failed on a model converted there."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import fxslim
from fxslim.runtime.prom_onednn import onednn_available


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1)).eval()


def test_optimize_prepare_and_estimate_inside_inference_mode_do_what_they_do_outside():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outside = fxslim.optimize(model, x, passes=["haste:L=14"])
        with torch.inference_mode():
            inside = fxslim.optimize(model, x, passes=["haste:L=14"])
            qat = fxslim.prepare(model, x)
            cost = fxslim.estimate(model, x)
            assert not torch.is_grad_enabled()  # the caller's grad mode is kept
    assert inside.report.rewritten() == outside.report.rewritten() == 2 and not inside.report.untraced
    assert not any(p.is_inference() for p in inside.module.parameters())
    assert cost.total.macs == fxslim.estimate(model, x).total.macs
    out = qat(x)  # the QAT model trains
    out.sum().backward()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad)


def test_a_model_built_inside_inference_mode_is_optimized():
    with torch.inference_mode():
        model = _model()
    result = fxslim.optimize(model, torch.randn(1, 3, 16, 16), passes=["haste:L=14"])
    assert result.report.rewritten() == 2


def test_convert_inside_inference_mode_gives_a_model_micro_batched_and_the_backend_take():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    qat = fxslim.prepare(model, x)
    fxslim.calibrate(qat, [x])
    qat.eval()
    runtime = "onednn" if onednn_available() else "reference"
    reference = fxslim.convert(qat, runtime=runtime)
    with torch.inference_mode():
        int_model = fxslim.convert(qat, runtime=runtime)
    assert not any(t.is_inference() for t in int_model.state_dict().values() if isinstance(t, torch.Tensor))
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(int_model(x), expected, atol=0, rtol=0)
        if runtime == "onednn":
            torch.testing.assert_close(fxslim.micro_batched(int_model)(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(torch.compile(int_model, backend="fxslim")(x), expected, atol=0, rtol=0)
