"""HASTE and HTTM ops are inference-only: forward works with grad enabled, eager and compiled;
a backward raises an error that names the op and the fix (fxslim/runtime/inference_only.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxslim
from fxslim.models.vggt import vggt_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

_CONVS = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
_HASTE = "haste:L=48,sparsity=0,skip_stem=False"


def _optimized(model, x, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, (x,), passes=[spec]).module


def test_backward_through_haste_names_the_op_and_the_fix():
    model, x = _CONVS.eval(), torch.randn(2, 3, 12, 12)
    y = _optimized(model, x, _HASTE)(x)  # grad enabled, parameters require grad: forward still works
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"fxslim::haste_conv2d has no gradient.*torch\.no_grad\(\)"):
        y.sum().backward()


def test_backward_through_httm_names_the_op():
    torch.manual_seed(0)
    model, images = vggt_tiny().eval(), torch.rand(1, 3, 3, 28, 28)
    out = _optimized(model, images, "httm:q=1,kv=1,outliers=0")(images)
    with pytest.raises(RuntimeError, match=r"fxslim::httm_attention has no gradient"):
        out["depth"].sum().backward()


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_forward_with_grad_enabled_compiles_and_runs(inner):
    """AOTAutograd traces a backward for inputs that require grad: it must trace, not raise."""
    model, x = _CONVS.eval(), torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, backend="fxslim", options={"inner": inner, "passes": [_HASTE]})
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="fxslim::haste_conv2d has no gradient"):
        y.sum().backward()


def test_no_gradient_fake_kernel_gives_the_inputs_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grad = torch.empty(2, 8)
        out = torch.ops.fxslim.no_gradient(grad, [3, 4, 5], torch.float64, "fxslim::x")
    assert tuple(out.shape) == (3, 4, 5) and out.dtype == torch.float64
