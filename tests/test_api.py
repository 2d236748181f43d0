"""fxslim.optimize: dispatch on the input type, never modify the caller's model, report, warn."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxslim
from tests.toy_pass import ToyScalePointwise


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_optimize_never_modifies_users_model():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x)
    res = fxslim.optimize(model, (x,), passes=["toy:scale=2"])
    for p in res.module.parameters():
        p.data.mul_(0)  # the result owns its weights
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert type(model[2]) is nn.Conv2d


@pytest.mark.parametrize("kind", ["module", "graph_module", "exported"])
def test_optimize_accepts_every_input_type(kind):
    model, x = _net(), torch.randn(2, 3, 8, 8)
    source = {"module": model, "graph_module": fx.symbolic_trace(model),
              "exported": torch.export.export(model, (x,))}[kind]
    res = fxslim.optimize(source, (x,), passes=[ToyScalePointwise(scale=2.0)])
    assert res.report.rewritten("toy") == 1
    torch.testing.assert_close(res.module(x), 2 * model(x), rtol=1e-5, atol=1e-5)


def test_optimize_report_lists_every_candidate_with_reason():
    res = fxslim.optimize(_net(), torch.randn(1, 3, 8, 8), passes="toy")
    entries = res.report.entries("toy")
    assert [(e.fqn, e.status, e.reason) for e in entries] == [("0", "skipped", "kernel_not_1x1"), ("2", "rewritten", "")]


def test_optimize_nothing_matched_warns_or_raises_in_strict_mode():
    model = nn.Sequential(nn.Conv2d(3, 3, 3)).eval()
    with pytest.warns(UserWarning, match=r"pass 'toy' rewrote nothing in Sequential \(skipped: \{'kernel_not_1x1': 1\}\)"):
        fxslim.optimize(model, torch.randn(1, 3, 8, 8), passes=["toy"])
    with pytest.raises(ValueError, match="rewrote nothing"):
        fxslim.optimize(model, torch.randn(1, 3, 8, 8), passes=["toy"], strict=True)


def test_optimize_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="at least one pass"):
        fxslim.optimize(_net(), torch.randn(1, 3, 8, 8), passes=[])
    with pytest.raises(ValueError, match="unknown pass 'hast'"):
        fxslim.optimize(_net(), torch.randn(1, 3, 8, 8), passes=["hast"])
    with pytest.raises(ValueError, match="example_inputs"):
        fxslim.optimize(_net(), None, passes=["toy"])


def test_optimize_filter_fn_and_overrides():
    model, x = _net(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxslim.optimize(model, x, passes=["toy"], filter_fn=lambda node, fqn: fqn != "2")
    assert res.report.skipped("toy")["filtered_out"] == 1
    res = fxslim.optimize(model, x, passes=["toy"], overrides={"2": ToyScalePointwise(scale=3.0)})
    torch.testing.assert_close(res.module(x), 3 * model(x), rtol=1e-5, atol=1e-5)


def test_optimize_warnings_point_at_the_callers_line():
    # entry points run through a decorator (outside inference mode): a fixed stacklevel pointed into it
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    with pytest.warns(UserWarning, match="rewrote nothing") as caught:
        fxslim.optimize(model, torch.randn(1, 4), passes=["haste"])
    assert {w.filename for w in caught} == {__file__}


def test_a_model_torch_compile_returned_is_taken_as_the_module_it_wraps():
    """``torch.compile`` returns an OptimizedModule: optimize, prepare and estimate failed on its copy
    (AttributeError ``_orig_mod``), and convert returned a copy whose forward still ran the fake-quant
    module (it reported integer ops that never ran)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(4, 3, 8, 8)
    assert fxslim.estimate(torch.compile(model), x).total.macs == fxslim.estimate(model, x).total.macs > 0
    with pytest.warns(UserWarning, match="not compiled"):
        result = fxslim.optimize(torch.compile(model), x, passes=["haste"])
    assert result.report.rewritten("haste") == fxslim.optimize(model, x, passes=["haste"]).report.rewritten("haste") >= 1
    with pytest.warns(UserWarning, match="not compiled"):
        qat = fxslim.prepare(torch.compile(model), x)
    fxslim.calibrate(qat, [x])
    qat.eval()
    with pytest.warns(UserWarning, match="fxslim.convert: took the module torch.compile wrapped"):
        from_compiled = fxslim.convert(torch.compile(qat))
    assert not any(type(m).__name__ == "ActFakeQuant" for m in from_compiled.modules())
    with torch.no_grad():
        assert torch.equal(from_compiled(x), fxslim.convert(qat)(x))
