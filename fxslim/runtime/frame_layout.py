"""The frame layout of a multi-view token sequence, read from VGGT-style RoPE positions.

VGGT-family models (VGGT, π³, and fxslim's own ``fxslim.models.vggt``) lay global-attention
tokens out frame-major: each frame is ``special_tokens`` tokens at position (0, 0) (camera,
registers) followed by its patches at (y + 1, x + 1). The HTTM pass reads this layout once at
rewrite time to find which attentions span frames; a rewritten eager graph reads it again on every
call, from the positions that call gets, so other image sizes and frame counts stay exact. Both
go through ``read_frame_layout``; data-dependent, so it runs outside traced code: traced (a
rewritten GraphModule is traced again when ``torch.load`` or ``pickle`` rebuilds it, or when
fxslim captures it again), the functions a graph calls record the call instead of running.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import Tensor

from fxslim.warn import warn_user

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["FrameLayout", "read_frame_layout", "frame_layout_from_positions", "clip_frames", "frames_for_trace"]


@dataclass(frozen=True)
class FrameLayout:
    """Frame structure of a global-attention sequence: N = frames * tokens_per_frame, frame-major."""

    frames: int
    tokens_per_frame: int
    special_tokens: int
    grid_h: int
    grid_w: int


def read_frame_layout(pos: Tensor, n: int | None = None) -> tuple[FrameLayout | None, str]:
    """(layout, "") from positions ``[..., N, 2]`` (y, x), or (None, why not) when they are not a
    frame-major VGGT sequence of ``n`` tokens (default: N) that is the same in every batch row."""
    if pos.dim() < 2 or pos.shape[-1] != 2:
        return None, f"positions must be [..., N, 2], got shape {tuple(pos.shape)}"
    n = pos.shape[-2] if n is None else n
    pos = pos.reshape(-1, pos.shape[-2], 2)
    if pos.shape[0] == 0:
        return None, "an empty batch has no positions to read"
    if pos.shape[1] != n or not torch.equal(pos, pos[:1].expand_as(pos)):
        return None, "positions differ across the batch"
    first = pos[0]
    zero = (first == 0).all(dim=-1)
    grid_h, grid_w, specials_total = int(first[:, 0].max()), int(first[:, 1].max()), int(zero.sum())
    patches = grid_h * grid_w
    if patches == 0 or (n - specials_total) % patches:
        return None, f"N={n} with {specials_total} (0, 0) tokens is not a whole number of {grid_h}x{grid_w} grids"
    frames = (n - specials_total) // patches
    if specials_total % frames:
        return None, f"{specials_total} special tokens do not split over {frames} frames"
    specials = specials_total // frames
    p = specials + patches
    per_frame = first.view(frames, p, 2)
    if not torch.equal(per_frame, per_frame[:1].expand_as(per_frame)):
        return None, "positions do not repeat every frame (not a frame-major sequence)"
    if not bool(zero[:specials].all()) or bool(zero[specials:p].any()):
        return None, "special tokens are not first in each frame"
    return FrameLayout(frames, p, specials, grid_h, grid_w), ""


def _recorded_when_traced(fn: F) -> F:
    """``fn``, which called on an fx Proxy adds a call of itself to the graph being traced."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_recorded_when_traced
def frame_layout_from_positions(pos: Tensor, special_tokens: int | None = None) -> FrameLayout:
    """``read_frame_layout`` that raises ValueError when the positions are not a frame layout, or
    (``special_tokens`` given: what the graph was rewritten for) when a frame now holds another
    number of special tokens. An empty batch is one frame (attention over nothing merges nothing)."""
    if pos.dim() >= 2 and pos.numel() == 0 and pos.shape[-2] > 0:
        n = pos.shape[-2]
        return FrameLayout(1, n, min(special_tokens or 0, n), 0, 0)
    layout, why = read_frame_layout(pos)
    if layout is None:
        raise ValueError(f"frame_layout_from_positions: {why}")
    if special_tokens is not None and layout.special_tokens != special_tokens:
        raise ValueError(f"frame_layout_from_positions: the graph was rewritten for {special_tokens} special tokens "
                         f"per frame, these positions have {layout.special_tokens}")
    return layout


@_recorded_when_traced
def clip_frames(images: Tensor, channels: int) -> int:
    """The frame count of a 5-d multi-view input whose example had as many frames as ``channels``
    (``[B, S, C, H, W]`` with S == C, as 3 RGB views, or a channels-first clip ``[B, C, T, H, W]``
    with T == C, which the example cannot tell apart): the channels stay at every call, so the frames
    are on dim 1 while dim 2 still holds ``channels``, else on dim 2."""
    return images.size(1) if images.size(2) == channels else images.size(2)


@_recorded_when_traced
def frames_for_trace(frames: int, tokens_per_frame: int) -> int:
    """``frames``, read on this call; under ``torch.jit.trace`` a warning that the trace keeps it and
    ``tokens_per_frame`` as constants (TorchScript records no Python int arithmetic), so the traced
    model merges the wrong tokens at another layout of the same length."""
    if torch.jit.is_tracing():
        warn_user(f"torch.jit.trace keeps HTTM's frame layout ({frames} frames of {tokens_per_frame} tokens) as "
                  "constants: the traced model merges the wrong tokens when called with another layout of the "
                  "same length (1 frame of 3x the pixels); torch.export and torch.compile follow the layout")
    return frames
