"""Layers of the VGGT-architecture model: 2D RoPE, qk-norm attention, pre-norm block, conv patch embed.

Names and parameter shapes follow VGGT's aggregator blocks (``norm1``, ``attn.qkv``, ``attn.q_norm``,
``attn.k_norm``, ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``).
``Attention.forward(x, pos)`` calls ``F.scaled_dot_product_attention`` on q, k after q/k LayerNorm
and RoPE: that call is what the HTTM pass replaces in the global blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RotaryPositionEmbedding2D",
    "Attention",
    "LayerScale",
    "Mlp",
    "Block",
    "ConvPatchEmbed",
    "patch_positions",
]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE: the first half of the head dim rotates with y, the second half with x.

    tokens [B, H, N, d], positions [B, N, 2] (y, x) -> [B, H, N, d]. Rotate-half form; frequency
    ``base ** (-2i / (d/2))`` per axis. No parameters; shared by all aggregator blocks.
    """

    fxslim_leaf = True  # graph capture keeps this module opaque (position-dependent tables)

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = frequency

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        y_half, x_half = tokens.chunk(2, dim=-1)
        return torch.cat([self._rotate(y_half, positions[..., 0]), self._rotate(x_half, positions[..., 1])], dim=-1)

    def _rotate(self, x: Tensor, coordinate: Tensor) -> Tensor:
        dim = x.shape[-1]
        inv_freq = self.frequency ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
        angles = coordinate.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, N, dim/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, N, dim]
        return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with qk-norm and optional RoPE; ``forward(x [B, N, C], pos [B, N, 2])``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope: RotaryPositionEmbedding2D | None = None,
                 scope: str | None = None, special_tokens: int = 5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.fxslim_frame_layout = None if scope is None else {"scope": scope, "special_tokens": special_tokens}

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim if out is None else out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x), pos)), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 0.01,
                 qk_norm: bool = True, rope: RotaryPositionEmbedding2D | None = None, scope: str | None = None,
                 special_tokens: int = 5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm, rope, scope, special_tokens)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ConvPatchEmbed(nn.Module):
    """images [N, 3, H, W] -> patch tokens [N, (H/p)*(W/p), C] (row-major), one strided conv."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def patch_positions(batch: int, grid_h: int, grid_w: int, special_tokens: int, device=None) -> Tensor:
    """RoPE positions [batch, special + h*w, 2] (y, x): (0, 0) for special tokens, (y+1, x+1) for patches."""
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1) + 1
    pos = torch.cat([torch.zeros(special_tokens, 2, dtype=grid.dtype, device=device), grid])
    return pos.expand(batch, -1, -1)
