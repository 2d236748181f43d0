"""Multi-view transformers written the way research repositories write them, for the HTTM tests.

Nothing here is shaped for fxslim: the constructs that stop graph capture are on purpose —

- a 2-D RoPE whose cos/sin table has ``int(positions.max()) + 1`` rows (data-dependent) and that
  asserts on the feature dimension;
- positions built from the patch grid in the aggregator and passed to every block as an argument;
- special tokens (camera + registers, or registers only) prepended to every frame;
- ``len(images.shape)`` and channel-count branches, an assert in the patch embedding;
- a head that attends over the S camera tokens (batch = the model's batch, sequence = frames: not
  a global token attention);
- a ``.item()`` in the head, which breaks a dynamo graph.

Two styles: ``VGGTStyle`` (alternating frame/global blocks, one camera and R register tokens per
frame, the first frame's special tokens different from the others': a reference frame) and
``Pi3Style`` (alternating blocks, register tokens only, the same for every frame, no reference
frame). Outputs: depth [B, S, H, W] and a pose vector per frame [B, S, 9] (VGGT) or points
[B, S, H, W, 3] and a camera embedding [B, S, 12] (π³).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGGTStyle", "Pi3Style"]


class RoPE2D(nn.Module):
    """Rotary embedding over (y, x): the first half of each head's features rotates with y."""

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = base

    def _table(self, dim: int, length: int, device: torch.device, dtype: torch.dtype):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=device).float() / dim))
        angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = F.embedding(pos, cos)[:, None], F.embedding(pos, sin)[:, None]
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert tokens.size(-1) % 2 == 0, "feature dimension must be even"
        half = tokens.size(-1) // 2
        max_position = int(positions.max()) + 1
        cos, sin = self._table(half, max_position, tokens.device, tokens.dtype)
        y = self._rotate(tokens[..., :half], positions[..., 0], cos, sin)
        x = self._rotate(tokens[..., half:], positions[..., 1], cos, sin)
        return torch.cat((y, x), dim=-1)


class Attention(nn.Module):
    kernel_by_dtype = False  # π³ picks the SDPA kernel by the dtype (pi3/models/layers/attention.py)

    def __init__(self, dim: int, heads: int, rope: RoPE2D | None) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // heads)
        self.k_norm = nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        if self.kernel_by_dtype and q.dtype == torch.bfloat16:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                x = F.scaled_dot_product_attention(q, k, v)
        elif self.kernel_by_dtype:
            backends = [torch.nn.attention.SDPBackend.MATH, torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]
            with torch.nn.attention.sdpa_kernel(backends):
                x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 0.01) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block with LayerScale (0.01 at init, as DINOv2-based multi-view models have)."""

    def __init__(self, dim: int, heads: int, rope: RoPE2D | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, rope)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        assert H % self.patch == 0 and W % self.patch == 0, f"image size {H}x{W} is not a multiple of the patch"
        return self.proj(x).flatten(2).transpose(1, 2)


def grid_positions(batch: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack((ys, xs), dim=-1).reshape(1, h * w, 2).expand(batch, -1, -1).clone()


class Aggregator(nn.Module):
    """Patch tokens + per-frame special tokens, then alternating frame and global attention."""

    def __init__(self, dim: int, heads: int, depth: int, patch: int, registers: int, camera: bool,
                 reference_frame: bool) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.rope = RoPE2D()
        self.frame_blocks = nn.ModuleList(Block(dim, heads, self.rope) for _ in range(depth))
        self.global_blocks = nn.ModuleList(Block(dim, heads, self.rope) for _ in range(depth))
        sets = 2 if reference_frame else 1
        self.camera_token = nn.Parameter(torch.randn(1, sets, 1, dim) * 0.02) if camera else None
        self.register_token = nn.Parameter(torch.randn(1, sets, registers, dim) * 0.02)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1))

    @staticmethod
    def _per_frame(token: torch.Tensor, B: int, S: int) -> torch.Tensor:
        """[1, sets, n, C] -> [B*S, n, C]: set 0 for the first frame, set 1 (if any) for the rest."""
        first = token[:, :1].expand(B, 1, *token.shape[2:])
        rest = token[:, -1:].expand(B, S - 1, *token.shape[2:])
        return torch.cat((first, rest), dim=1).reshape(B * S, *token.shape[2:])

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        if len(images.shape) == 4:
            images = images.unsqueeze(0)
        B, S, C_in, H, W = images.shape
        if C_in != 3:
            raise ValueError(f"expected RGB images, got {C_in} channels")
        images = (images - self.mean) / self.std
        tokens = self.patch_embed(images.view(B * S, C_in, H, W))
        specials = [self._per_frame(self.register_token, B, S)]
        if self.camera_token is not None:
            specials.insert(0, self._per_frame(self.camera_token, B, S))
        special = torch.cat(specials, dim=1)
        n_special = special.shape[1]
        tokens = torch.cat((special, tokens), dim=1)
        p = self.patch_embed.patch
        pos = grid_positions(B * S, H // p, W // p, images.device) + 1
        pos = torch.cat((torch.zeros(B * S, n_special, 2, dtype=pos.dtype, device=pos.device), pos), dim=1)
        _, P, C = tokens.shape
        outputs = []
        for frame_block, global_block in zip(self.frame_blocks, self.global_blocks):
            tokens = frame_block(tokens.view(B * S, P, C), pos=pos.view(B * S, P, 2))
            frame_out = tokens.view(B, S, P, C)
            tokens = global_block(tokens.view(B, S * P, C), pos=pos.view(B, S * P, 2))
            outputs.append(torch.cat((frame_out, tokens.view(B, S, P, C)), dim=-1))
        return outputs, n_special


class CameraHead(nn.Module):
    """One token per frame, attention across the S frames, then a per-frame vector."""

    def __init__(self, dim: int, heads: int, out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(2 * dim, dim)
        self.block = Block(dim, heads, None)
        self.out = nn.Linear(dim, out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, S, 2C]
        x = self.block(self.inp(tokens))
        if x.abs().max().item() > 1e4:  # a numerical guard: a graph break under dynamo
            x = x.clamp(-1e4, 1e4)
        return self.out(x)


class DenseHead(nn.Module):
    def __init__(self, dim: int, patch: int, channels: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(2 * dim, channels * patch * patch)
        self.channels = channels

    def forward(self, tokens: torch.Tensor, n_special: int, H: int, W: int) -> torch.Tensor:
        B, S, _, _ = tokens.shape
        h, w = H // self.patch, W // self.patch
        x = self.proj(tokens[:, :, n_special:]).view(B * S, h, w, self.channels, self.patch, self.patch)
        x = x.permute(0, 3, 1, 4, 2, 5).reshape(B, S, self.channels, H, W)
        return x


class VGGTStyle(nn.Module):
    """Camera + register tokens, a reference frame; depth and per-frame pose."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 2, patch: int = 7, registers: int = 4) -> None:
        super().__init__()
        self.aggregator = Aggregator(dim, heads, depth, patch, registers, camera=True, reference_frame=True)
        self.camera_head = CameraHead(dim, heads, 9)
        self.depth_head = DenseHead(dim, patch, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(images.shape) == 4:
            images = images.unsqueeze(0)
        outputs, n_special = self.aggregator(images)
        last = outputs[-1]
        pose = self.camera_head(last[:, :, 0])
        depth = self.depth_head(last, n_special, images.shape[-2], images.shape[-1])[:, :, 0]
        return {"depth": depth, "pose_enc": pose}


class Pi3Style(nn.Module):
    """Register tokens only, the same for every frame (no reference frame); points and cameras."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 2, patch: int = 7, registers: int = 5) -> None:
        super().__init__()
        self.aggregator = Aggregator(dim, heads, depth, patch, registers, camera=False, reference_frame=False)
        self.camera_head = CameraHead(dim, heads, 12)
        self.point_head = DenseHead(dim, patch, 3)
        for module in self.modules():
            if isinstance(module, Attention):
                module.kernel_by_dtype = True

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(images.shape) == 4:
            images = images.unsqueeze(0)
        outputs, n_special = self.aggregator(images)
        last = outputs[-1]
        camera = self.camera_head(last[:, :, :n_special].mean(dim=2))
        points = self.point_head(last, n_special, images.shape[-2], images.shape[-1]).permute(0, 1, 3, 4, 2)
        return {"points": points, "camera": camera}
