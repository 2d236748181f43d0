"""Tests of the MobileNetV2-structured MNIST model and its shipped checkpoint."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from fxslim.models.data import mnist_5k
from fxslim.models.mobilenet_mnist import CHECKPOINT, MobileNetMNIST, load_mobilenet_mnist


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_mobilenet_mnist_layer_counts_match_docstring():
    convs = _convs(MobileNetMNIST())
    pointwise = [n for n, c in convs.items() if c.kernel_size == (1, 1) and c.groups == 1]
    depthwise = [n for n, c in convs.items() if c.groups > 1 and c.groups == c.in_channels == c.out_channels]
    others = set(convs) - set(pointwise) - set(depthwise)
    assert (len(pointwise), len(depthwise), sorted(others)) == (14, 7, ["features.0.0"])
    blocks = [m for m in MobileNetMNIST().features if isinstance(m, InvertedResidual)]
    assert [i + 1 for i, b in enumerate(blocks) if b.use_res_connect] == [1, 3, 5, 7]


def test_mobilenet_mnist_uses_torchvision_module_names():
    names = dict(MobileNetMNIST().named_modules())
    for name in ("features.0.0", "features.0.1", "features.1.conv.0.0", "features.1.conv.1",
                 "features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2", "features.2.conv.3",
                 "features.8.0", "classifier.1"):
        assert name in names
    assert isinstance(names["classifier.1"], nn.Linear)


def test_mobilenet_mnist_forward_gives_logits_per_class():
    model = MobileNetMNIST().eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_mobilenet_mnist_checkpoint_is_small():
    ref = resources.files("fxslim.models").joinpath(CHECKPOINT)
    with resources.as_file(ref) as path:
        assert path.stat().st_size < 5 * 1024 * 1024


@pytest.mark.slow
def test_load_mobilenet_mnist_reaches_97_percent_on_test_split():
    model = load_mobilenet_mnist()
    split = mnist_5k()
    with torch.no_grad():
        predictions = torch.cat([model(split.x_test[i : i + 250]).argmax(1) for i in range(0, len(split.x_test), 250)])
    assert float((predictions == split.y_test).float().mean()) >= 0.97
