"""Small model builders shared by tests (random weights, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn


def tv_small_vit() -> nn.Module:
    """torchvision VisionTransformer with nn.MultiheadAttention (the MHA form), tiny."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()


def timm_vit_tiny() -> nn.Module:
    """timm vit_tiny (SDPA form), depth reduced to 2 to keep tests fast."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", depth=2).eval()


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A model and example inputs by short name."""
    import torchvision

    builders = {
        "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (2, 3, 64, 64)),
        "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 64, 64)),
        "tv_small_vit": (tv_small_vit, (2, 3, 32, 32)),
        "timm_vit_tiny": (timm_vit_tiny, (2, 3, 224, 224)),
        "swin_t": (lambda: torchvision.models.swin_t(), (2, 3, 224, 224)),
    }
    factory, shape = builders[name]
    torch.manual_seed(0)
    return factory().eval(), (torch.randn(shape),)
