"""Light prediction heads for the VGGT-architecture model (fxslim.models.vggt).

- ``DPTHead``: DPT-style depth head reading 4 aggregator layers ([B, S, P, 2C] each, patch tokens
  only): LayerNorm, 1x1 projections, resizing to 4x / 2x / 1x / 0.5x of the patch grid, top-down
  RefineNet fusion, output convs, bilinear upsampling to the image size. Outputs depth (exp) and a
  confidence (1 + exp). Same structure and names as VGGT's, without the UV positional embedding and
  frame chunking; widths are configurable so small configs stay cheap.
- ``CameraHead``: reads token 0 (the camera token) of every frame from the last layer, a short
  trunk of attention blocks across frames, and an MLP to a 9-d pose encoding (one pass; VGGT
  refines 4 times with adaptive LayerNorm).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fxslim.models.vggt_layers import Block, Mlp

__all__ = ["DPTHead", "CameraHead", "FeatureFusionBlock", "ResidualConvUnit"]


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.activation(self.conv1(self.activation(x))))


class FeatureFusionBlock(nn.Module):
    """Fuse the coarser path with a skip feature, refine, upsample (to ``size`` or 2x), 1x1 conv."""

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_skip else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Depth head: ``forward({layer: [B, S, P, dim_in]}, image shape, patch_start) -> (depth, conf)``."""

    def __init__(self, dim_in: int, patch_size: int, layers: tuple[int, ...], out_channels: tuple[int, ...],
                 features: int, output_dim: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, oc, 1) for oc in out_channels)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, oc in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(oc, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_skip=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, output_dim, 1)
        )

    def forward(self, outputs: dict[int, Tensor], image_shape: torch.Size, patch_start: int) -> tuple[Tensor, Tensor]:
        b, s, _, height, width = image_shape
        gh, gw = height // self.patch_size, width // self.patch_size
        levels = []
        for i, layer in enumerate(self.layers):
            x = self.norm(outputs[layer][:, :, patch_start:])  # [B, S, h*w, dim_in]
            x = x.reshape(b * s, gh, gw, -1).permute(0, 3, 1, 2)
            x = self.resize_layers[i](self.projects[i](x))
            levels.append(getattr(self.scratch, f"layer{i + 1}_rn")(x))
        l1, l2, l3, l4 = levels
        path = self.scratch.refinenet4(l4, size=l3.shape[2:])
        path = self.scratch.refinenet3(path, l3, size=l2.shape[2:])
        path = self.scratch.refinenet2(path, l2, size=l1.shape[2:])
        path = self.scratch.refinenet1(path, l1)
        path = F.interpolate(self.scratch.output_conv1(path), size=(height, width), mode="bilinear", align_corners=True)
        out = self.scratch.output_conv2(path)  # [B*S, 2, H, W]
        depth = out[:, 0].exp().view(b, s, height, width, 1)
        conf = (1.0 + out[:, 1].exp()).view(b, s, height, width)
        return depth, conf


class CameraHead(nn.Module):
    """Pose head: camera tokens of the last layer [B, S, P, dim_in] -> pose encoding [B, S, 9]."""

    def __init__(self, dim_in: int, num_heads: int, trunk_depth: int, mlp_ratio: float = 4.0,
                 init_values: float = 0.01) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk = nn.Sequential(*(Block(dim_in, num_heads, mlp_ratio, init_values, qk_norm=False)
                                     for _ in range(trunk_depth)))
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.pose_branch = Mlp(dim_in, dim_in // 2, out=9)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.trunk(self.token_norm(tokens[:, :, 0]))
        pose = self.pose_branch(self.trunk_norm(x))
        # translation and quaternion unconstrained, field of view non-negative
        return torch.cat([pose[..., :7], F.relu(pose[..., 7:])], dim=-1)
