"""The torchvision MobileNetV2 the PROM benchmarks use: random weights, made non-degenerate.

With random weights and fresh BN statistics (mean 0, variance 1) BN is the identity in eval mode
and the activations of torchvision's MobileNetV2 shrink block after block (logits around 1e-9 on
the photos), below the float32 resolution of any uint8 grid. Estimating the BN running statistics
on the scikit-image photos (one train-mode pass, cumulative average) gives every layer
unit-scale inputs, like a trained network. The PROM model is then prepared on that float model,
its observers calibrated on the same photos, and converted.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from fxslim.api import prepare
from fxslim.models.data import imagenet_normalize, photos
from fxslim.passes.prom import PROM, calibrate
from fxslim.passes.prom_convert import convert

__all__ = ["photo_batch", "random_mobilenet_v2", "converted_mobilenet_v2"]


def photo_batch(size: int = 224) -> torch.Tensor:
    """The six scikit-image photos, ImageNet-normalised, [6, 3, size, size]."""
    return imagenet_normalize(photos(size))


def random_mobilenet_v2(images: torch.Tensor, seed: int = 0) -> nn.Module:
    """torchvision mobilenet_v2 with random weights and BN statistics estimated on ``images``."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
    with torch.no_grad():
        model.train()(images)
    return model.eval()


def converted_mobilenet_v2(model: nn.Module, images: torch.Tensor, config: PROM | None = None,
                           example_batch: int = 1) -> tuple[nn.Module, torch.fx.GraphModule]:
    """(prepared QAT model with observers calibrated on ``images``, converted integer model).

    ``example_batch``: the batch size the graphs' shape metadata (and so the cost model) sees.
    """
    qat = calibrate(prepare(model, (images[:example_batch],), config), [images])
    return qat, convert(qat)
