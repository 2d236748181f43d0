"""CIFAR-style ResNet18/34: 3×3 stride-1 stem, no max-pool, BasicBlocks, stages 64-128-256-512.

The geometry HASTE was evaluated on (stage maps 32/16/8/4 for 32×32 inputs). Module names follow
torchvision (conv1, bn1, layer1..4 with downsample = 1×1 conv + BN, fc) so graph passes see the
usual structure. ``width`` scales every stage, ``in_channels`` is 1 for MNIST. MNIST digits are
padded from 28×28 to 32×32 (``pad_to_32``) so every stage map divides into whole 4×4 tiles, as on
CIFAR. ``pretrained_mnist_resnet18_small()`` loads the bundled width-0.25 MNIST checkpoint.
"""

from __future__ import annotations

from importlib.resources import files

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxslim.models.data import _MNIST_MEAN, _MNIST_STD

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet18",
    "resnet34",
    "pad_to_32",
    "SMALL_MNIST_CHECKPOINT",
    "pretrained_mnist_resnet18_small",
]

SMALL_MNIST_CHECKPOINT = "resnet18_w025_mnist.pt"
_STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv + BN) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for small images: [N, in_channels, H, W] -> logits [N, num_classes]."""

    def __init__(
        self, blocks: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"CifarResNet: width must be a positive float, got {width!r}")
        widths = [max(1, round(w * width)) for w in _STAGE_WIDTHS]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for index, (planes, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers = []
            for block_stride in [stride] + [1] * (count - 1):
                layers.append(BasicBlock(in_planes, planes, block_stride))
                in_planes = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR-style ResNet18 (11,173,962 parameters at width 1, 3 input channels, 10 classes)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels, width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR-style ResNet34 (21,282,122 parameters at width 1, 3 input channels, 10 classes)."""
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels, width)


def pad_to_32(images: Tensor) -> Tensor:
    """Pad normalised MNIST digits [N, 1, 28, 28] to 32×32 with the background value (raw pixel 0)."""
    if tuple(images.shape[-2:]) != (28, 28):
        raise ValueError(f"pad_to_32: images must be [..., 28, 28], got shape {tuple(images.shape)}")
    return F.pad(images, (2, 2, 2, 2), value=(0.0 - _MNIST_MEAN) / _MNIST_STD)


def pretrained_mnist_resnet18_small() -> CifarResNet:
    """ResNet18 at width 0.25 (1 input channel) trained on MNIST-5k padded to 32×32, in eval mode.

    Inputs go through ``pad_to_32``. Trained by ``python -m benchmarks.train_resnet_mnist --models
    resnet18 --width 0.25 --epochs 10 --out fxslim/models/checkpoints``.
    """
    model = resnet18(num_classes=10, in_channels=1, width=0.25)
    with (files("fxslim.models") / "checkpoints" / SMALL_MNIST_CHECKPOINT).open("rb") as handle:
        model.load_state_dict(torch.load(handle, map_location="cpu", weights_only=True))
    return model.eval()
