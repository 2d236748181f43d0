"""Tests of the CIFAR-style ResNets and the bundled small MNIST checkpoint."""

from __future__ import annotations

import pytest
import torch

from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, pretrained_mnist_resnet18_small, resnet18, resnet34


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_width1_rgb_has_known_cifar_parameter_count():
    assert _count(resnet18(num_classes=10, in_channels=3)) == 11_173_962


def test_resnet34_width1_rgb_has_known_cifar_parameter_count():
    assert _count(resnet34(num_classes=10, in_channels=3)) == 21_282_122


def test_resnet18_torchvision_module_names_and_no_maxpool():
    model = resnet18(in_channels=1, width=0.25)
    names = dict(model.named_modules())
    assert {"conv1", "bn1", "layer1", "layer4", "fc", "layer2.0.downsample.0", "layer2.0.downsample.1"} <= set(names)
    assert "layer1.0.downsample" not in names or names["layer1.0.downsample"] is None
    assert names["conv1"].kernel_size == (3, 3) and names["conv1"].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert names["layer2.0.downsample.0"].kernel_size == (1, 1)


@pytest.mark.parametrize("width,channels", [(0.25, (16, 32, 64, 128)), (0.5, (32, 64, 128, 256))])
def test_resnet18_width_scales_stage_channels(width, channels):
    model = resnet18(in_channels=1, width=width)
    got = tuple(getattr(model, f"layer{i}")[0].conv2.out_channels for i in range(1, 5))
    assert got == channels and model.fc.in_features == channels[-1]


@pytest.mark.parametrize("size", [28, 32])
def test_resnet34_forward_gives_logits(size):
    model = resnet34(num_classes=7, in_channels=1, width=0.125).eval()
    assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_pad_to_32_pads_with_background_value():
    split = mnist_5k()
    padded = pad_to_32(split.x_test[:4])
    assert padded.shape == (4, 1, 32, 32)
    assert torch.allclose(padded[..., 0, :], split.x_test.min().expand(4, 1, 32))
    with pytest.raises(ValueError, match="28, 28"):
        pad_to_32(torch.zeros(1, 1, 32, 32))


def test_pretrained_mnist_resnet18_small_is_accurate():
    model = pretrained_mnist_resnet18_small()
    split = mnist_5k()
    with torch.no_grad():
        logits = model(pad_to_32(split.x_test[:500]))
    assert not model.training
    assert float((logits.argmax(1) == split.y_test[:500]).float().mean()) > 0.95
