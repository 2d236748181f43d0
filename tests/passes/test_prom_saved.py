"""PROM models saved whole (torch.save / pickle): the integer model comes back as itself, and a
prepared model that lost its shapes says how to convert it."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import fxslim


class Net(nn.Module):
    """A BN after a softmax stays a float island: train() would switch it to batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn(torch.softmax(self.conv(x), 1))).mean((2, 3))


def _reloaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(scope="module")
def qat():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return fxslim.calibrate(fxslim.prepare(Net().eval(), x), [x]).eval(), x


def test_an_integer_model_saved_whole_stays_inference_only_with_its_report_and_shapes(qat):
    model, x = qat
    integer = fxslim.convert(model)
    loaded = _reloaded(integer)
    assert isinstance(loaded, fxslim.passes.prom_convert.IntegerModel)
    assert fxslim.convert_report(loaded) == fxslim.convert_report(integer)
    with torch.no_grad():
        expected = integer(x)
        with pytest.warns(UserWarning, match="keeps it in eval mode"):
            loaded.train()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(fxslim.micro_batched(loaded)(x), expected, rtol=0, atol=0)  # needs node shapes


def test_a_prepared_model_saved_whole_says_how_to_convert_it(qat):
    model, _ = qat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _reloaded(model)
    with pytest.raises(ValueError, match=r"no shape metadata .*save qat\.state_dict\(\)"):
        fxslim.convert(loaded)
