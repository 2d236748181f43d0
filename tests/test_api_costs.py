"""OptimizeResult carries the cost before and after its passes, computed on first use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from tests.toy_pass import ToyScalePointwise


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_optimize_result_cost_before_after_and_compare():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    res = fxslim.optimize(model, (x,), passes=[ToyScalePointwise(scale=2.0)])
    assert "cost_before" not in res.__dict__  # lazy
    before, after = res.cost_before, res.cost_after
    assert before is res.cost_before  # computed once
    assert before.total.macs == after.total.macs == 2 * 64 * (8 * 3 * 9 + 4 * 8)
    # the rewritten conv keeps its module path, so the comparison lines up per module
    assert [r.fqn for r in after.rows if r.macs] == ["0", "2"]
    comp = res.compare()
    assert comp.ratio("macs") == 1.0
    fp16 = res.compare(deploy="fp16")
    assert fp16.before.conventions.deploy == "fp16" and fp16.after.total.energy_pj == pytest.approx(
        after.total.macs * 1.5)


def test_optimize_result_without_source_raises():
    res = fxslim.optimize(_net(), torch.randn(1, 3, 8, 8), passes="toy")
    res.source = None
    with pytest.raises(ValueError, match="the original model is not available"):
        res.cost_before


def test_haste_costs_after_an_export_capture_match_the_symbolic_capture():
    """The planes HASTE adds were made fake under the exported graph's mode, whose shape env gave
    their size a symbol: the conv's output had a free symbol and the estimate after failed
    ("cannot determine truth value of Relational") on every model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.rand(1, 3, 32, 32)
    after = {capture: fxslim.optimize(model, x, passes=["haste:L=8"], capture=capture).cost_after.total
             for capture in ("symbolic", "export")}
    assert after["export"].macs == after["symbolic"].macs
    assert after["export"].peak_activation_bytes == after["symbolic"].peak_activation_bytes


def test_prom_cost_after_is_the_integer_model_the_command_line_costs():
    # cost_after costed the fake-quant graph: float work plus 360x the element-wise ops of its fake
    # quantizers, an energy ratio of 1.0 where `fxslim report --passes prom` gave 15x
    from fxslim.runtime.prom_qat import ActFakeQuant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    res = fxslim.optimize(model, x, passes=["prom"])
    scales = [q.scale.clone() for q in res.module.modules() if isinstance(q, ActFakeQuant)]
    integer = fxslim.convert(fxslim.calibrate(res.module, [(x,)]).eval())
    assert res.cost_after.total == fxslim.estimate(integer, x).total
    assert res.cost_before.total.energy_pj > 5 * res.cost_after.total.energy_pj
    assert res.cost_after.total.elementwise < res.cost_before.total.elementwise
    res2 = fxslim.optimize(model, x, passes=["prom"])
    assert res2.cost_after.total == res.cost_after.total
    assert all(torch.equal(q.scale, s) for q, s in  # costing calibrates a copy, not the result's module
               zip((q for q in res2.module.modules() if isinstance(q, ActFakeQuant)), scales))


def test_comparisons_put_the_saved_state_dict_sizes_beside_the_counted_storage(tmp_path, capsys):
    """COST_MODEL.md: report the real size of the saved converted state dict beside the counted
    storage; only ``fxslim.cost_model.state_dict_bytes`` gave it, no report did."""
    from fxslim.app.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    res = fxslim.optimize(model, x, passes=["prom"])
    files = {}
    for name, m in (("before", model), ("after", res.deployed)):
        (tmp_path / name).mkdir()
        torch.save(m.state_dict(), tmp_path / name / "archive")  # the archive's name is inside the file
        files[name] = (tmp_path / name / "archive").stat().st_size
    assert res.saved_bytes == (files["before"], files["after"]) and files["after"] < files["before"]
    comp = res.compare()
    assert comp.to_dict()["saved_state_dict_bytes"] == files
    line = f"saved state dict (torch.save, bytes): {files['before']:,} -> {files['after']:,}"
    assert line in comp.to_markdown() and __import__("html").escape(line) in comp.to_html()
    assert res.compare(deploy="fp16").saved_bytes == res.saved_bytes
    assert fxslim.compare(res.cost_before, res.cost_after).saved_bytes is None  # no models: nothing to say
    for wrong in ((1,), 5, (1, -2)):
        with pytest.raises(ValueError, match=r"saved_bytes must be \(bytes before, bytes after\)"):
            fxslim.compare(res.cost_before, res.cost_after, saved_bytes=wrong)
    spec = tmp_path / "net.py"
    spec.write_text("import torch\nfrom torch import nn\n\ndef net():\n    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 1))\n")
    assert main(["report", f"{spec}:net", "--input", "1x3x16x16", "--passes", "haste:L=8", "--format", "json"]) == 0
    saved = __import__("json").loads(capsys.readouterr().out)["saved_state_dict_bytes"]
    assert saved["before"] > 0 and saved["after"] > saved["before"]  # the hyperplanes are saved too
