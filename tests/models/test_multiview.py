"""Tests of the multi-view photo sequences (simulated camera motion over scikit-image photos)."""

from __future__ import annotations

import math

import pytest
import torch

from fxslim.models.data import photo
from fxslim.models.multiview import _warp, camera_sequence, identical_frames, independent_frames


pytestmark = pytest.mark.usefixtures("one_thread")


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


@pytest.mark.parametrize("frames", [8, 32])
def test_camera_sequence_shape_range_and_determinism(frames):
    seq = camera_sequence("coffee", frames=frames, seed=3)
    assert seq.images.shape == (frames, 3, 224, 224)
    assert float(seq.images.min()) >= 0.0 and float(seq.images.max()) <= 1.0
    again = camera_sequence("coffee", frames=frames, seed=3)
    assert torch.equal(seq.images, again.images)
    other = camera_sequence("coffee", frames=frames, seed=4)
    assert not torch.equal(seq.images, other.images)


def test_camera_sequence_neighbours_closer_than_distant_or_independent_frames():
    seq = camera_sequence("astronaut", frames=16, seed=0)
    neighbours = sum(_mean_abs(seq.images[i], seq.images[i + 1]) for i in range(15)) / 15
    distant = _mean_abs(seq.images[0], seq.images[15])
    unrelated = independent_frames(16, seed=0)
    independent = sum(_mean_abs(unrelated[i], unrelated[i + 1]) for i in range(15)) / 15
    assert neighbours < distant and neighbours < independent


def test_camera_sequence_motion_stays_in_bounds():
    seq = camera_sequence("chelsea", frames=32, seed=1, max_rotation_deg=4.0, max_zoom=0.05)
    assert float(seq.rotations.abs().max()) <= math.radians(4.0) + 1e-6
    assert float((seq.zooms - 1).abs().max()) <= 0.05 + 1e-6
    steps = (seq.centers[1:] - seq.centers[:-1]).norm(dim=-1)
    assert float(steps.max()) <= 0.04 * seq.window + 1e-3  # translation per frame bounded by `step`


def test_warp_without_rotation_or_zoom_is_a_crop():
    source = photo("rocket", (120, 160))
    x0, y0, size = 30, 20, 64
    center = torch.tensor([[x0 + size / 2, y0 + size / 2]])
    frame = _warp(source, center, torch.zeros(1), torch.ones(1), float(size), size)[0]
    torch.testing.assert_close(frame, source[:, y0:y0 + size, x0:x0 + size], atol=1e-5, rtol=0)


def test_identical_and_independent_frames():
    same = identical_frames("chelsea", frames=5, size=112)
    assert same.shape == (5, 3, 112, 112)
    assert all(torch.equal(same[0], same[i]) for i in range(5))
    unrelated = independent_frames(6, size=112, seed=2)
    assert unrelated.shape == (6, 3, 112, 112)
    assert min(_mean_abs(unrelated[i], unrelated[j]) for i in range(6) for j in range(i + 1, 6)) > 0.02
    assert torch.equal(unrelated, independent_frames(6, size=112, seed=2))


@pytest.mark.parametrize("kwargs, name", [
    ({"frames": 0}, "frames"),
    ({"size": 4}, "size"),
    ({"crop": 0.9}, "crop"),
    ({"max_zoom": 0.6}, "max_zoom"),
    ({"name": "lena"}, "name"),
])
def test_camera_sequence_bad_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        camera_sequence(**kwargs)
