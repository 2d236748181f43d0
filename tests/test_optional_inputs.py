"""A forward argument with a None default that the example gave is traced with a value, so the
graph holds only the branch for a given value: a later call that leaves it out passed None into
that branch and failed with unrelated errors (``'NoneType' object has no attribute 'numel'``) in
every rewritten model. Each now refuses with a ValueError naming the argument."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import fxslim
from fxslim.runtime.prom_onednn import onednn_available, vnni_available


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 16, 1)

    def forward(self, x, bias=None):
        h = torch.relu(self.stem(x))
        if bias is not None:
            h = h + bias
        return self.pw(torch.relu(self.conv(h)))


def _models():
    torch.manual_seed(0)
    model = Net().eval()
    x, bias = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        haste = fxslim.optimize(model, (x, bias), passes=["haste:L=14"]).module
    qat = fxslim.prepare(model, (x, bias))
    fxslim.calibrate(qat, [(x, bias)])
    qat.eval()
    models = {"haste": haste, "prom_qat": qat, "prom_reference": fxslim.convert(qat)}
    if onednn_available() and vnni_available():
        models["prom_onednn"] = fxslim.convert(qat, runtime="onednn")
    return models, x, bias


def test_leaving_out_an_argument_the_example_gave_is_refused_by_name():
    models, x, bias = _models()
    for name, model in models.items():
        with torch.no_grad():
            assert model(x, bias).shape == (2, 16, 16, 16), name  # given: runs
            with pytest.raises(ValueError, match="bias: the model was captured with bias given"):
                model(x)


def test_the_guard_survives_a_save_and_load():
    models, x, _ = _models()
    buffer = io.BytesIO()
    torch.save(models["haste"], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad(), pytest.raises(ValueError, match="bias"):
        loaded(x)
