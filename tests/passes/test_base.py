"""The pass contract on every IR: counters, reasons, parity, idempotence, graph hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxslim.capture import capture, capture_dynamo
from fxslim.ir import meta_val
from fxslim.passes.base import PassContext, PassError, parse_pass, registered_passes, run_passes
from fxslim.policy import Policy
from tests.toy_pass import ToyScalePointwise


def _net() -> nn.Module:
    # conv3x3 -> pw -> dw -> pw(stride 2)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1, stride=2),
    ).eval()


def _graph(ir: str, model: nn.Module, x: torch.Tensor):
    if ir == "dynamo":
        return capture_dynamo(model, (x,))[0]
    return capture(model, (x,), method=ir).graphs[0]


@pytest.mark.parametrize("ir", ["symbolic", "export", "dynamo"])
def test_pass_rewrites_pointwise_and_reports_reasons(ir):
    model, x = _net(), torch.randn(2, 3, 8, 8)
    graph = _graph(ir, model, x)
    ctx = PassContext(ir=graph.ir, batch_size=2, placeholder_values=graph.placeholder_values)
    result = ToyScalePointwise(scale=2.0)(graph.gm, ctx)
    assert result.modified
    assert result.report.rewritten == 2
    assert result.report.skipped == {"kernel_not_1x1": 1, "grouped": 1}
    # parity: both pointwise convs' outputs are scaled by 2
    args = [graph.placeholder_values[n.name] if n.name in graph.placeholder_values else x
            for n in graph.gm.graph.nodes if n.op == "placeholder"] if ir == "dynamo" else [x]
    out = graph.gm(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    with torch.no_grad():
        expected = 2 * model[4](model[3](2 * model[2](model[1](model[0](x)))))
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-4)
    # hygiene: new nodes carry meta['val'] and the pass name
    new = [n for n in graph.gm.graph.nodes if n.meta.get("fxslim_pass") == "toy" and n.op == "call_function"]
    assert new and all(meta_val(n) is not None for n in new)


@pytest.mark.parametrize("ir", ["symbolic", "dynamo"])
def test_pass_second_run_is_a_no_op(ir):
    graph = _graph(ir, _net(), torch.randn(1, 3, 8, 8))
    ctx = PassContext(ir=graph.ir, batch_size=1, placeholder_values=graph.placeholder_values)
    ToyScalePointwise()(graph.gm, ctx)
    again = ToyScalePointwise()(graph.gm, ctx)
    assert not again.modified and again.report.rewritten == 0
    assert again.report.skipped["already_rewritten"] == 2


def test_pass_policy_filtered_out_reason():
    graph = _graph("symbolic", _net(), torch.randn(1, 3, 8, 8))
    ctx = PassContext(ir="module", batch_size=1, policy=Policy(overrides={"4": None}))
    result = ToyScalePointwise()(graph.gm, ctx)
    assert result.report.rewritten == 1 and result.report.skipped["filtered_out"] == 1


def test_parse_pass_from_string_and_errors():
    assert "toy" in registered_passes()
    assert parse_pass("toy:scale=3") == ToyScalePointwise(scale=3.0)
    with pytest.raises(ValueError, match="unknown pass 'nope'; known passes: .*toy"):
        parse_pass("nope:x=1")
    with pytest.raises(ValueError, match="ToyScalePointwise.scale"):
        parse_pass("toy:scale=0")
    with pytest.raises(TypeError, match="Pass objects or strings"):
        parse_pass(3)


def test_run_passes_reraises_naming_pass_and_predecessors():
    class Boom(ToyScalePointwise):
        def match(self, gm, ctx, report):
            raise RuntimeError("kaput")

    graph = _graph("symbolic", _net(), torch.randn(1, 3, 8, 8))
    ctx = PassContext(ir="module", batch_size=1)
    with pytest.raises(PassError, match=r"pass 'toy' failed on graph '<root>' after passes \['toy'\]: kaput"):
        run_passes(graph.gm, [ToyScalePointwise(), Boom()], ctx)
