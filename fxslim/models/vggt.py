"""A VGGT-architecture multi-view transformer with random weights, for the HTTM pass and cost model.

Written from the published architecture description (no upstream code): the aggregator alternates
frame attention (tokens viewed [B*S, P, C]) and global attention over all frames ([B, S*P, C]),
with one camera and four register tokens per frame, qk-norm and 2D RoPE. Module names and parameter
shapes of the aggregator follow VGGT's, so a real checkpoint's aggregator blocks would load
(``aggregator.global_blocks.{i}.attn.qkv.weight`` [3C, C], ``...ls1.gamma`` [C], ...). The patch
embedder is a strided conv (``aggregator.patch_embed``: images [N, 3, H, W] -> tokens [N, h*w, C]),
a stand-in for DINOv2 with the same interface. The heads (vggt_heads.py) are lighter than VGGT's.

Frame layout for graph passes, without importing this module: every aggregator attention carries a
plain dict ``fxslim_frame_layout`` ({"scope": "frame" | "global", "special_tokens": 5}); the RoPE
positions (``pos``, an input of every attention) give the rest, see
``fxslim.runtime.frame_layout.frame_layout_from_positions``. The RoPE module sets ``fxslim_leaf = True``:
trace each ``Attention``/``Block`` with it as a leaf; the whole model is not meant to trace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import Tensor

from fxslim.models.vggt_heads import CameraHead, DPTHead
from fxslim.models.vggt_layers import (
    Attention,
    Block,
    ConvPatchEmbed,
    LayerScale,
    Mlp,
    RotaryPositionEmbedding2D,
    patch_positions,
)
from fxslim.runtime.frame_layout import FrameLayout

__all__ = [
    "VGGTConfig",
    "CONFIGS",
    "VGGT",
    "Aggregator",
    "Block",
    "Attention",
    "Mlp",
    "LayerScale",
    "RotaryPositionEmbedding2D",
    "ConvPatchEmbed",
    "patch_positions",
    "vggt_1b",
    "vggt_small",
    "vggt_tiny",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_VGGT_HEAD_LAYERS = (4, 11, 17, 23)


@dataclass(frozen=True)
class VGGTConfig:
    """Sizes of a VGGT-architecture model. Defaults are VGGT-1B's aggregator.

    ``head_layers``: the 4 aggregator layers the depth head reads; None = (4, 11, 17, 23) at depth
    24, else evenly spaced ending at depth - 1. ``keep_all_layers``: the aggregator returns every
    layer (as VGGT does) instead of only the layers the heads read (as the memory-lean VGGT* does).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_frequency: float = 100.0
    init_values: float = 0.01
    head_layers: tuple[int, ...] | None = None
    keep_all_layers: bool = False
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    camera_head: bool = True
    camera_trunk_depth: int = 4

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "dpt_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"VGGTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"VGGTConfig: embed_dim must be divisible by num_heads={self.num_heads}, got {self.embed_dim}"
            )
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"VGGTConfig: head dim (embed_dim / num_heads) must be a multiple of 4 for 2D RoPE, "
                f"got {self.embed_dim // self.num_heads}"
            )
        if len(self.dpt_out_channels) != 4:
            raise ValueError(f"VGGTConfig: dpt_out_channels must have 4 entries, got {self.dpt_out_channels}")
        if self.head_layers is not None and (
            len(self.head_layers) != 4 or not all(0 <= i < self.depth for i in self.head_layers)
        ):
            raise ValueError(f"VGGTConfig: head_layers must be 4 indices in [0, {self.depth}), got {self.head_layers}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def layers_read(self) -> tuple[int, ...]:
        """Aggregator layers the depth head reads (the camera head reads the last one)."""
        if self.head_layers is not None:
            return tuple(self.head_layers)
        if self.depth == 24:
            return _VGGT_HEAD_LAYERS
        return tuple(max(0, (i + 1) * self.depth // 4 - 1) for i in range(4))

    @property
    def layers_kept(self) -> tuple[int, ...]:
        if self.keep_all_layers:
            return tuple(range(self.depth))
        return tuple(sorted(set(self.layers_read) | {self.depth - 1}))


CONFIGS = {
    "vggt_1b": VGGTConfig(),
    "vggt_small": VGGTConfig(embed_dim=256, depth=8, num_heads=4, dpt_features=64,
                             dpt_out_channels=(32, 64, 128, 128), camera_trunk_depth=1),
    "vggt_tiny": VGGTConfig(embed_dim=128, depth=4, num_heads=2, dpt_features=32,
                            dpt_out_channels=(16, 32, 64, 64), camera_trunk_depth=1),
}


# ----------------------------------------------------------------------------------------------
# Aggregator and model
# ----------------------------------------------------------------------------------------------


class Aggregator(nn.Module):
    """Alternating frame/global attention over [B, S, P, C] tokens.

    ``forward(images [B, S, 3, H, W] in [0, 1]) -> ({layer: [B, S, P, 2C]}, patch_start_idx)``;
    each kept entry is the frame-block output and the global-block output of that layer, concatenated
    on channels. Only ``config.layers_kept`` are returned (the rest would cost depth*S*P*2C floats).
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        c, special = config.embed_dim, 1 + config.num_register_tokens
        self.config = config
        self.patch_start_idx = special
        self.patch_embed = ConvPatchEmbed(config.patch_size, c)
        self.rope = RotaryPositionEmbedding2D(config.rope_frequency)
        blocks = dict(dim=c, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, init_values=config.init_values,
                      rope=self.rope, special_tokens=special)
        self.frame_blocks = nn.ModuleList(Block(scope="frame", **blocks) for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(Block(scope="global", **blocks) for _ in range(config.depth))
        # index 0: the first (reference) frame, index 1: every other frame
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, c) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, config.num_register_tokens, c) * 1e-6)
        self.register_buffer("_resnet_mean", torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def frame_layout(self, frames: int, height: int, width: int) -> FrameLayout:
        """Layout of the global-attention sequence for S frames of H x W images."""
        p = self.config.patch_size
        h, w = height // p, width // p
        return FrameLayout(frames, self.patch_start_idx + h * w, self.patch_start_idx, h, w)

    def _special_tokens(self, token: Tensor, batch: int, frames: int) -> Tensor:
        first = token[:, :1].expand(batch, 1, -1, -1)
        others = token[:, 1:].expand(batch, frames - 1, -1, -1)
        return torch.cat([first, others], dim=1).reshape(batch * frames, token.shape[2], token.shape[3])

    def forward(self, images: Tensor) -> tuple[dict[int, Tensor], int]:
        b, s, _, height, width = images.shape
        p = self.config.patch_size
        images = (images - self._resnet_mean) / self._resnet_std
        patches = self.patch_embed(images.reshape(b * s, 3, height, width))
        tokens = torch.cat([self._special_tokens(self.camera_token, b, s),
                            self._special_tokens(self.register_token, b, s), patches], dim=1)
        n_tok, c = tokens.shape[1], tokens.shape[2]
        pos = patch_positions(b * s, height // p, width // p, self.patch_start_idx, images.device)
        global_pos = pos.reshape(b, s * n_tok, 2)  # the same per-frame positions for every frame
        kept = set(self.config.layers_kept)
        outputs = {}
        for i in range(self.config.depth):
            tokens = self.frame_blocks[i](tokens, pos=pos)
            frame_out = tokens.view(b, s, n_tok, c)
            tokens = self.global_blocks[i](tokens.view(b, s * n_tok, c), pos=global_pos)
            global_out = tokens.view(b, s, n_tok, c)
            tokens = tokens.view(b * s, n_tok, c)
            if i in kept:
                outputs[i] = torch.cat([frame_out, global_out], dim=-1)
        return outputs, self.patch_start_idx


class VGGT(nn.Module):
    """VGGT-architecture model: aggregator + DPT-style depth head (+ camera head).

    ``forward(images [B, S, 3, H, W] or [S, 3, H, W], values in [0, 1]; H, W multiples of the patch
    size)`` -> dict with ``depth`` [B, S, H, W, 1], ``depth_conf`` [B, S, H, W] and, with the camera
    head, ``pose_enc`` [B, S, 9] (translation 3, quaternion 4, field of view 2).
    """

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VGGTConfig()
        self.aggregator = Aggregator(config)
        self.depth_head = DPTHead(2 * config.embed_dim, config.patch_size, config.layers_read,
                                  config.dpt_out_channels, config.dpt_features)
        self.camera_head = (CameraHead(2 * config.embed_dim, config.num_heads, config.camera_trunk_depth,
                                       config.mlp_ratio, config.init_values) if config.camera_head else None)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"VGGT: images must be [B, S, 3, H, W] or [S, 3, H, W], got shape {tuple(images.shape)}")
        p = self.config.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"VGGT: H and W must be multiples of patch_size={p}, got {tuple(images.shape[-2:])}")
        outputs, patch_start = self.aggregator(images)
        depth, depth_conf = self.depth_head(outputs, images.shape, patch_start)
        result = {"depth": depth, "depth_conf": depth_conf}
        if self.camera_head is not None:
            result["pose_enc"] = self.camera_head(outputs[self.config.depth - 1])
        return result


def _build(name: str, overrides: dict) -> VGGT:
    return VGGT(replace(CONFIGS[name], **overrides))


def vggt_1b(**overrides) -> VGGT:
    """VGGT-1B sizes (img 518, patch 14, 1024 wide, 24 deep, 16 heads): for cost predictions / meta device."""
    return _build("vggt_1b", overrides)


def vggt_small(**overrides) -> VGGT:
    """256 wide, 8 deep, 4 heads of dim 64: benchmarks and model-level experiments on CPU."""
    return _build("vggt_small", overrides)


def vggt_tiny(**overrides) -> VGGT:
    """128 wide, 4 deep, 2 heads of dim 64: unit tests."""
    return _build("vggt_tiny", overrides)
