"""The model zoo the robustness sweep runs over: timm and torchvision architectures with random
weights (nothing is downloaded), each with the input size it is built for.

``SUBSET`` names the ~6 small models that ``make test`` sweeps; ``make bench`` sweeps them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ZooModel", "ZOO", "SUBSET", "by_name"]


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def inputs(self) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(self.input_shape, generator=generator),)


def _tv(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _tv_small_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


def _vggt_small() -> nn.Module:
    from fxslim.models.vggt import vggt_tiny

    return vggt_tiny()


_B = 2  # batch 2 everywhere: batch-1 special cases are covered by the property tests
ZOO: list[ZooModel] = [
    # torchvision CNNs
    ZooModel("tv:resnet18", "cnn", _tv("resnet18"), (_B, 3, 64, 64)),
    ZooModel("tv:resnet50", "cnn", _tv("resnet50"), (_B, 3, 64, 64)),
    ZooModel("tv:resnext50_32x4d", "cnn", _tv("resnext50_32x4d"), (_B, 3, 64, 64)),
    ZooModel("tv:vgg11_bn", "cnn", _tv("vgg11_bn"), (_B, 3, 64, 64)),
    ZooModel("tv:densenet121", "cnn", _tv("densenet121"), (_B, 3, 64, 64)),
    ZooModel("tv:googlenet", "cnn", _tv("googlenet", aux_logits=False, init_weights=False), (_B, 3, 64, 64)),
    ZooModel("tv:squeezenet1_0", "cnn", _tv("squeezenet1_0"), (_B, 3, 64, 64)),
    ZooModel("tv:convnext_tiny", "cnn", _tv("convnext_tiny"), (_B, 3, 64, 64)),
    ZooModel("tv:regnet_y_400mf", "mobile", _tv("regnet_y_400mf"), (_B, 3, 64, 64)),
    # torchvision mobile nets
    ZooModel("tv:mobilenet_v2", "mobile", _tv("mobilenet_v2"), (_B, 3, 64, 64)),
    ZooModel("tv:mobilenet_v3_small", "mobile", _tv("mobilenet_v3_small"), (_B, 3, 64, 64)),
    ZooModel("tv:mobilenet_v3_large", "mobile", _tv("mobilenet_v3_large"), (_B, 3, 64, 64)),
    ZooModel("tv:efficientnet_b0", "mobile", _tv("efficientnet_b0"), (_B, 3, 64, 64)),
    ZooModel("tv:shufflenet_v2_x0_5", "mobile", _tv("shufflenet_v2_x0_5"), (_B, 3, 64, 64)),
    ZooModel("tv:mnasnet0_5", "mobile", _tv("mnasnet0_5"), (_B, 3, 64, 64)),
    # torchvision transformers and hybrids
    ZooModel("tv:vit_small_mha", "vit", _tv_small_vit, (_B, 3, 64, 64)),
    ZooModel("tv:swin_t", "swin", _tv("swin_t"), (_B, 3, 224, 224)),
    ZooModel("tv:maxvit_t", "hybrid", _tv("maxvit_t"), (_B, 3, 224, 224)),
    # timm CNNs and mobile nets
    ZooModel("timm:resnet18d", "cnn", _timm("resnet18d"), (_B, 3, 64, 64)),
    ZooModel("timm:mobilenetv2_100", "mobile", _timm("mobilenetv2_100"), (_B, 3, 64, 64)),
    ZooModel("timm:mobilenetv3_small_100", "mobile", _timm("mobilenetv3_small_100"), (_B, 3, 64, 64)),
    ZooModel("timm:mobilenetv4_conv_small", "mobile", _timm("mobilenetv4_conv_small"), (_B, 3, 64, 64)),
    ZooModel("timm:efficientnet_b0", "mobile", _timm("efficientnet_b0"), (_B, 3, 64, 64)),
    ZooModel("timm:ghostnet_100", "mobile", _timm("ghostnet_100"), (_B, 3, 64, 64)),
    ZooModel("timm:repvit_m1", "mobile", _timm("repvit_m1"), (_B, 3, 64, 64)),
    ZooModel("timm:rexnet_100", "mobile", _timm("rexnet_100"), (_B, 3, 64, 64)),
    ZooModel("timm:lcnet_050", "mobile", _timm("lcnet_050"), (_B, 3, 64, 64)),
    ZooModel("timm:regnetx_002", "mobile", _timm("regnetx_002"), (_B, 3, 64, 64)),
    ZooModel("timm:convnext_atto", "cnn", _timm("convnext_atto"), (_B, 3, 64, 64)),
    ZooModel("timm:poolformer_s12", "cnn", _timm("poolformer_s12"), (_B, 3, 64, 64)),
    ZooModel("timm:hgnetv2_b0", "cnn", _timm("hgnetv2_b0"), (_B, 3, 64, 64)),
    ZooModel("timm:dla34", "cnn", _timm("dla34"), (_B, 3, 64, 64)),
    # timm transformers and hybrids
    ZooModel("timm:vit_tiny_patch16_224", "vit", _timm("vit_tiny_patch16_224", depth=4), (_B, 3, 224, 224)),
    ZooModel("timm:deit_tiny_patch16_224", "vit", _timm("deit_tiny_patch16_224", depth=4), (_B, 3, 224, 224)),
    ZooModel("timm:eva02_tiny_patch14_224", "vit", _timm("eva02_tiny_patch14_224", depth=4), (_B, 3, 224, 224)),
    ZooModel("timm:pit_ti_224", "vit", _timm("pit_ti_224"), (_B, 3, 224, 224)),
    ZooModel("timm:swin_tiny_patch4_window7_224", "swin", _timm("swin_tiny_patch4_window7_224"), (_B, 3, 224, 224)),
    ZooModel("timm:levit_128s", "hybrid", _timm("levit_128s"), (_B, 3, 224, 224)),
    ZooModel("timm:mobilevit_xxs", "hybrid", _timm("mobilevit_xxs"), (_B, 3, 256, 256)),
    ZooModel("timm:efficientvit_b0", "hybrid", _timm("efficientvit_b0"), (_B, 3, 224, 224)),
    ZooModel("timm:fastvit_t8", "hybrid", _timm("fastvit_t8"), (_B, 3, 256, 256)),
    ZooModel("timm:tiny_vit_5m_224", "hybrid", _timm("tiny_vit_5m_224"), (_B, 3, 224, 224)),
    ZooModel("timm:coat_lite_tiny", "hybrid", _timm("coat_lite_tiny"), (_B, 3, 224, 224)),
    ZooModel("timm:edgenext_xx_small", "hybrid", _timm("edgenext_xx_small"), (_B, 3, 256, 256)),
    # multi-view transformer (does not trace whole)
    ZooModel("fxslim:vggt_tiny", "multiview", _vggt_small, (1, 4, 3, 56, 56)),
]

SUBSET = ("tv:resnet18", "tv:mobilenet_v2", "tv:vit_small_mha", "timm:convnext_atto", "timm:levit_128s", "fxslim:vggt_tiny")


def by_name(name: str) -> ZooModel:
    for model in ZOO:
        if model.name == name:
            return model
    raise ValueError(f"zoo: unknown model {name!r}; known: {', '.join(m.name for m in ZOO)}")
