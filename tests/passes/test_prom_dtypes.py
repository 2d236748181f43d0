"""A PROM model prepared in float64, float16 or bfloat16 converts to an integer model that runs and
answers in the model's dtype: dequantization gives float32, so a float island (GroupNorm) met
float32 inputs with its own float64 weights and failed ("mixed dtype"), and outputs came back float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim.runtime.prom_onednn import onednn_available

RUNTIMES = ["reference"] + (["onednn"] if onednn_available() else [])


def _integer(model, x, runtime):
    qat = fxslim.prepare(model, x[:2])
    fxslim.calibrate(qat, [x])
    qat.eval()
    return qat, fxslim.convert(qat, runtime=runtime)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_float_island_runs_in_the_models_dtype(dtype, runtime):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    model = model.eval().to(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    qat, int_model = _integer(model, x, runtime)
    report = fxslim.convert_report(int_model)
    assert isinstance(report, fxslim.ConvertReport) and len(report.islands) == 1  # the GroupNorm
    with torch.no_grad():
        out, expected = int_model(x), qat(x)
    assert out.dtype == expected.dtype == dtype
    assert (out.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_all_integer_float64_model_answers_in_float64(runtime):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval().double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    qat, int_model = _integer(model, x, runtime)
    assert not fxslim.convert_report(int_model).islands
    with torch.no_grad():
        out, expected = int_model(x), qat(x)
    assert out.dtype == torch.float64
    grid = expected.unique().diff().min()  # the output quantizer's step
    assert (out - expected).abs().max() <= grid * 1.001  # within 1 LSB, as every layer


class _ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pointwise, self.fc = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 1), nn.Linear(64, 64)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=2)  # the oneDNN ops' exact path on every CPU

    def forward(self, x):
        y = torch.relu(self.grouped(torch.relu(self.pointwise(torch.relu(self.conv(x))))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_does_not_change_the_integer_codes(dtype, runtime):
    """The ops sum integer codes in float32 where that is exact; under ``torch.autocast("cpu")`` the
    reference runtime's convs and matmuls ran in float16/bfloat16 (255 LSB off in float16), and so did
    the oneDNN runtime's exact path (a grouped conv's, on every CPU)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16) * 3
    _, int_model = _integer(_ConvLinear().eval(), x, runtime)
    with torch.no_grad():
        expected = int_model(x)
        with torch.autocast("cpu", dtype=dtype):
            out = int_model(x)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("prepared, cast", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_a_qat_model_cast_after_prepare_converts_in_its_dtype_now(prepared, cast, runtime):
    # the integer model followed the dtype the graph was prepared in: float32 outputs for a float64
    # QAT model, and a float island failed with mixed dtypes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    x = torch.randn(4, 3, 16, 16, dtype=prepared)
    qat = fxslim.prepare(model.eval().to(prepared), x[:2]).to(cast)
    fxslim.calibrate(qat, [x.to(cast)])
    qat.eval()
    int_model = fxslim.convert(qat, runtime=runtime)
    with torch.no_grad():
        out, expected = int_model(x.to(cast)), qat(x.to(cast))
    assert out.dtype == expected.dtype == cast
    assert (out - expected).abs().max() <= 0.02 * expected.abs().max()
