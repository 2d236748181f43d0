"""Multi-view image sequences made from real photos, for VGGT-style models and the HTTM pass.

A simulated camera moves over one scikit-image photo: each frame is a square window of the photo,
warped by a smooth random trajectory (translation, small in-plane rotation, small zoom), so
neighbouring frames overlap heavily, as in a video. Everything is deterministic from the seed.
Two extremes for tests: ``identical_frames`` (one view repeated: maximal temporal redundancy) and
``independent_frames`` (a random photo and window per frame: no designed overlap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fxslim.models.data import PHOTO_NAMES, photo

__all__ = ["MultiViewSequence", "camera_sequence", "identical_frames", "independent_frames"]


@dataclass(frozen=True)
class MultiViewSequence:
    """Frames [S, 3, size, size] in [0, 1] and the simulated camera of each frame.

    centers [S, 2] (x, y) in pixels of the resized photo, rotations [S] in radians, zooms [S]
    (>1 = closer), window: side of the unzoomed window in pixels of the resized photo.
    """

    images: Tensor
    centers: Tensor
    rotations: Tensor
    zooms: Tensor
    window: float
    name: str


def _warp(source: Tensor, centers: Tensor, rotations: Tensor, zooms: Tensor, window: float, size: int) -> Tensor:
    """Sample a rotated, zoomed square window around each center: [S, 3, size, size]."""
    _, height, width = source.shape
    half = window / 2.0 / zooms
    cos, sin = rotations.cos(), rotations.sin()
    theta = torch.stack([
        torch.stack([2 * half * cos / width, -2 * half * sin / width, 2 * centers[:, 0] / width - 1], dim=-1),
        torch.stack([2 * half * sin / height, 2 * half * cos / height, 2 * centers[:, 1] / height - 1], dim=-1),
    ], dim=1)
    grid = F.affine_grid(theta, [len(centers), 3, size, size], align_corners=False)
    frames = F.grid_sample(source.expand(len(centers), -1, -1, -1), grid, mode="bilinear",
                           padding_mode="border", align_corners=False)
    return frames.clamp(0.0, 1.0)


def _scaled_photo(full: Tensor, size: int, crop: float) -> Tensor:
    """Resize a photo [3, H, W] so a window of ``crop`` x its shorter side is ``size`` pixels."""
    scale = size / (crop * min(full.shape[1:]))
    hw = (round(full.shape[1] * scale), round(full.shape[2] * scale))
    return F.interpolate(full[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0.0, 1.0)


def _check(frames: int, size: int) -> None:
    if frames < 1:
        raise ValueError(f"multiview: frames must be >= 1, got {frames}")
    if size < 8:
        raise ValueError(f"multiview: size must be >= 8, got {size}")


def camera_sequence(name: str = "astronaut", frames: int = 16, size: int = 224, seed: int = 0, step: float = 0.04,
                    crop: float = 0.5, max_rotation_deg: float = 5.0, max_zoom: float = 0.1) -> MultiViewSequence:
    """A smooth camera path over photo ``name``.

    step: translation per frame as a fraction of the window side (0.04 -> neighbours overlap ~96 %);
    crop: window side as a fraction of the photo's shorter side; rotation and zoom vary smoothly
    within +-max_rotation_deg and 1 +- max_zoom. The path reflects off the photo's borders.
    """
    _check(frames, size)
    if not 0.0 < crop <= 0.7:
        raise ValueError(f"camera_sequence: crop must be in (0, 0.7] so rotated windows fit, got {crop}")
    if not 0.0 <= max_zoom < 0.5:
        raise ValueError(f"camera_sequence: max_zoom must be in [0, 0.5), got {max_zoom}")
    generator = torch.Generator().manual_seed(seed)
    # resize so one window is about `size` pixels: sampling then needs no anti-aliasing
    source = _scaled_photo(photo(name), size, crop)
    height, width = source.shape[1:]
    window = crop * min(height, width)
    angle = math.radians(min(max_rotation_deg, 45.0))
    reach = window / 2 * (math.cos(angle) + math.sin(angle)) / (1 - max_zoom)  # corner of a rotated, zoomed-out window
    low = torch.tensor([reach, reach])
    high = torch.tensor([max(width - reach, reach), max(height - reach, reach)])
    center = low + torch.rand(2, generator=generator) * (high - low)
    heading = float(torch.rand(1, generator=generator)) * 2 * math.pi
    centers = []
    for _ in range(frames):
        centers.append(center.clone())
        heading += 0.3 * float(torch.randn(1, generator=generator))
        center = center + step * window * torch.tensor([math.cos(heading), math.sin(heading)])
        for axis in range(2):  # reflect off the borders
            if center[axis] < low[axis] or center[axis] > high[axis]:
                center[axis] = center[axis].clamp(low[axis], high[axis])
                heading = math.pi - heading if axis == 0 else -heading
    t = torch.linspace(0.0, 1.0, frames)
    phase = torch.rand(2, generator=generator) * 2 * math.pi
    rotations = math.radians(max_rotation_deg) * torch.sin(2 * math.pi * t + phase[0])
    zooms = 1.0 + max_zoom * torch.sin(2 * math.pi * t + phase[1])
    centers_t = torch.stack(centers)
    images = _warp(source, centers_t, rotations, zooms, window, size)
    return MultiViewSequence(images, centers_t, rotations, zooms, window, name)


def identical_frames(name: str = "astronaut", frames: int = 8, size: int = 224) -> Tensor:
    """One view of photo ``name`` repeated ``frames`` times: [S, 3, size, size]."""
    _check(frames, size)
    return photo(name, size).unsqueeze(0).repeat(frames, 1, 1, 1)


def independent_frames(frames: int = 8, size: int = 224, seed: int = 0) -> Tensor:
    """Unrelated views: per frame a random photo, window position, rotation and mirror: [S, 3, size, size].

    Photos repeat when frames > 6, but windows are drawn independently, so there is no designed overlap.
    """
    _check(frames, size)
    generator = torch.Generator().manual_seed(seed)
    loaded: dict[str, Tensor] = {}
    out = []
    for _ in range(frames):
        name = PHOTO_NAMES[int(torch.randint(len(PHOTO_NAMES), (1,), generator=generator))]
        crop = 0.3 + 0.3 * float(torch.rand(1, generator=generator))
        if name not in loaded:
            loaded[name] = photo(name)
        source = _scaled_photo(loaded[name], size, crop)
        height, width = source.shape[1:]
        window = crop * min(height, width)
        reach = window / 2 * math.sqrt(2)
        center = torch.tensor([reach + float(torch.rand(1, generator=generator)) * max(width - 2 * reach, 0.0),
                               reach + float(torch.rand(1, generator=generator)) * max(height - 2 * reach, 0.0)])
        rotation = torch.tensor([(float(torch.rand(1, generator=generator)) - 0.5) * math.pi / 6])
        frame = _warp(source, center[None], rotation, torch.ones(1), window, size)[0]
        if float(torch.rand(1, generator=generator)) < 0.5:
            frame = frame.flip(-1)
        out.append(frame)
    return torch.stack(out)
