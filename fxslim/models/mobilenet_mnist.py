"""A MobileNetV2-structured network for 1×28×28 digits, the small PROM reference model.

Built from torchvision's own blocks (``Conv2dNormActivation``, ``InvertedResidual``) with
torchvision's module names and forward (``features`` → adaptive_avg_pool2d → flatten →
``classifier``), so a graph pass sees the same patterns as on ``torchvision.models.mobilenet_v2``:

- ``features.0``: 3×3 conv 1→16, stride 2 as in torchvision, BN, ReLU6 (28 → 14 pixels).
- ``features.1``–``features.7``: inverted residual blocks (expand 1×1 → depthwise 3×3 → project
  1×1, ReLU6 after the first two, BN everywhere, residual where stride 1 and in == out), settings
  (t, c, n, s) = (1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 1), (4, 64, 2, 2): 14 → 7 → 4 pixels.
- ``features.8``: 1×1 conv 64→256, BN, ReLU6; then global average pool and
  ``classifier`` = Dropout(0.2), Linear(256, 10).

Layer counts (pinned by tests/models/test_mobilenet_mnist.py): 14 pointwise 1×1 convs (6 expand,
7 project, the last one), 7 depthwise 3×3 convs, 1 other conv (the stem), 1 linear, 4 residual adds
(features.1, 3, 5 and 7).

``load_mobilenet_mnist()`` returns the float model trained by benchmarks/train_mobilenet_mnist.py
on ``fxslim.models.data.mnist_5k()`` (checkpoint shipped in the package).
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["MobileNetMNIST", "INVERTED_RESIDUAL_SETTING", "CHECKPOINT", "load_mobilenet_mnist"]

INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 1), (4, 64, 2, 2))
CHECKPOINT = "checkpoints/mobilenet_mnist.pt"  # relative to the fxslim.models package


class MobileNetMNIST(nn.Module):
    """MobileNetV2 layout for [N, 1, 28, 28] inputs → [N, num_classes] logits."""

    def __init__(self, num_classes: int = 10, stem_channels: int = 16, last_channel: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Conv2dNormActivation(1, stem_channels, kernel_size=3, stride=2, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        ]
        channels = stem_channels
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, expand_ratio=t, norm_layer=nn.BatchNorm2d))
                channels = c
        layers.append(
            Conv2dNormActivation(channels, last_channel, kernel_size=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*layers)
        self.last_channel = last_channel
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's MobileNetV2 initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def load_mobilenet_mnist() -> MobileNetMNIST:
    """The trained float model (eval mode) from the checkpoint shipped with fxslim."""
    model = MobileNetMNIST()
    with resources.as_file(resources.files("fxslim.models").joinpath(CHECKPOINT)) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
