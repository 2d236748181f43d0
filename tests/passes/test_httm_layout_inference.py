"""HTTM finds the frame layout without taking one thing for another: frame attention for global
attention under a configured frame count, a clip's channels for its frames, or a dynamic graph's
sequence length for the example's frame layout."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
import fxslim.runtime.httm as httm_runtime


class Attention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, rope: nn.Module | None = None) -> None:
        super().__init__()
        self.heads, self.rope = heads, rope
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, pos=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Rope(nn.Module):
    """2-D rotary embedding from integer positions [.., N, 2]."""

    def forward(self, t, pos):
        half = t.shape[-1] // 2
        angle = pos.to(t.dtype).repeat_interleave(half // 2, -1).unsqueeze(1) * 0.1
        angle = torch.cat([angle, angle], -1)
        a, b = t[..., :half], t[..., half:]
        return t * angle.cos() + torch.cat([-b, a], -1) * angle.sin()


class FramesAsBatch(nn.Module):
    """Frames [S, 3, H, W] as the batch: frame attention at batch S, global attention at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 7, 7)
        self.registers = nn.Parameter(torch.randn(1, 4, 32))
        self.frame, self.glob = Attention(), Attention()

    def forward(self, frames):
        s = frames.shape[0]
        t = torch.cat([self.registers.expand(s, -1, -1), self.embed(frames).flatten(2).transpose(1, 2)], 1)
        p, c = t.shape[1], t.shape[2]
        t = t + self.frame(t)
        return t + self.glob(t.reshape(1, s * p, c)).reshape(s, p, c)


def test_configured_frames_tell_frame_attention_from_global_attention_by_length():
    torch.manual_seed(0)
    model = FramesAsBatch().eval()
    x = torch.rand(4, 3, 28, 28)
    result = fxslim.optimize(model, x, passes=[fxslim.HTTM(frames=4, special_tokens=4)])
    status = {e.fqn: (e.status, e.reason) for e in result.report.entries("httm")}
    assert status == {"frame": ("skipped", "local_attention"), "glob": ("rewritten", "")}


class Clip(nn.Module):
    """A channels-first clip [B, 3, T, H, W] with RoPE positions built from its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 7, 7)
        self.attn = Attention(rope=Rope())

    def forward(self, clip):
        b, c, t, h, w = clip.shape
        x = self.embed(clip.transpose(1, 2).reshape(b * t, c, h, w)).flatten(2).transpose(1, 2).reshape(b, -1, 32)
        grid = torch.cartesian_prod(torch.arange(t), torch.arange(h // 7), torch.arange(w // 7))
        pos = (grid[:, 1:] + 1).unsqueeze(0).expand(b, -1, -1)
        return x + self.attn(x, pos)


def _layouts(module: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    calls = []
    original = httm_runtime.httm_plan

    def spy(q, k, frames, tokens_per_frame, *args, **kwargs):
        calls.append((int(frames), int(tokens_per_frame)))
        return original(q, k, frames, tokens_per_frame, *args, **kwargs)

    httm_runtime.httm_plan = spy
    try:
        with torch.no_grad():
            module(x)
    finally:
        httm_runtime.httm_plan = original
    return calls


def test_channels_first_clip_frames_are_not_read_from_its_channels():
    torch.manual_seed(0)
    model = Clip().eval()
    built_at_three = fxslim.optimize(model, torch.rand(1, 3, 3, 28, 28), passes=["httm:n_s=4,n_t=2"]).module
    assert built_at_three is not None
    assert _layouts(built_at_three, torch.rand(1, 3, 6, 28, 28)) == [(6, 16)]


class Tubelets(nn.Module):
    """VideoMAE-style: a channels-first clip [B, 3, T, H, W] cut by a conv3d into tubelets of 2
    frames, so the sequence holds T / 2 frames of (H / 8) x (W / 8) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv3d(3, 32, (2, 8, 8), (2, 8, 8))
        self.attn = Attention()

    def forward(self, clip):
        x = self.embed(clip).flatten(2).transpose(1, 2)
        return x + self.attn(x)


def test_a_channels_first_clip_does_not_give_its_colours_for_frames():
    torch.manual_seed(0)
    model = Tubelets().eval()
    for frames in (8, 2):  # 2: fewer frames than 3 colours was taken for a window over some frames
        x = torch.rand(1, 3, 2 * frames, 24, 24)
        got = fxslim.optimize(model, x, passes=["httm:tokens_per_frame=9,special_tokens=0,n_s=3,n_t=2"])
        (entry,) = got.report.entries("httm")
        assert entry.status == "rewritten", entry.reason
        assert (entry.info["tokens_per_frame"], entry.info["example_frames"]) == (9, frames)
        assert _layouts(got.module, x) == [(frames, 9)]
        by_frames = fxslim.optimize(model, x, passes=[f"httm:frames={frames},special_tokens=0,n_s=3,n_t=2"]).module
        with torch.no_grad():
            torch.testing.assert_close(got.module(x), by_frames(x), rtol=0, atol=0)


class ViewsOfDepthImages(nn.Module):
    """Multi-view RGB-D images [B, S, 4, H, W] (or 2 channels): S views, not a clip of 4 frames."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, 32, 7, 7)
        self.attn = Attention()

    def forward(self, images):
        b = images.shape[0]
        x = self.embed(images.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, -1, 32)
        return x + self.attn(x)


@pytest.mark.parametrize("channels", [2, 4])
def test_views_of_few_channels_are_not_taken_for_a_channels_first_clip(channels):
    torch.manual_seed(0)
    model = ViewsOfDepthImages(channels).eval()
    got = fxslim.optimize(model, torch.rand(1, 3, channels, 28, 28),
                          passes=["httm:tokens_per_frame=16,special_tokens=0,n_s=4,n_t=1"])
    (entry,) = got.report.entries("httm")
    assert entry.info["runtime_layout"] == "frames = images.size(1), tokens_per_frame = N // frames"
    assert _layouts(got.module, torch.rand(1, 3, channels, 56, 56)) == [(3, 64)]
    assert _layouts(got.module, torch.rand(1, 5, channels, 42, 42)) == [(5, 36)]


class PositionsFromZero(nn.Module):
    """CroCo/Fast3R-style: every frame's patches at positions from (0, 0), no special tokens, so the
    positions do not show where a frame starts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 7, 7)
        self.attn = Attention(rope=Rope())

    def forward(self, images):
        b, f, c, h, w = images.shape
        x = self.embed(images.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, -1, 32)
        pos = torch.cartesian_prod(torch.arange(h // 7), torch.arange(w // 7)).repeat(f, 1)
        return x + self.attn(x, pos.unsqueeze(0).expand(b, -1, -1))


def test_positions_that_give_no_layout_name_the_configuration_that_does():
    model, x = PositionsFromZero().eval(), torch.rand(1, 3, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (entry,) = fxslim.optimize(model, x, passes=["httm"]).report.entries("httm")
    assert entry.reason == "no_frame_layout" and "HTTM(tokens_per_frame=..., special_tokens=...)" in entry.detail
    (entry,) = fxslim.optimize(model, x, passes=["httm:tokens_per_frame=16,special_tokens=0"]).report.entries("httm")
    assert (entry.status, entry.info["example_frames"]) == ("rewritten", 3)


class DropsPaddedViews(nn.Module):
    """Views that are all zeros are padding, dropped before the global attention: the sequence holds
    the valid views, whatever the input's S."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, 8)
        self.registers = nn.Parameter(torch.randn(1, 2, 32))
        self.attn = Attention()

    def forward(self, images):
        valid = images.flatten(2).abs().amax(-1) > 0
        views = images[valid]
        t = self.embed(views).flatten(2).transpose(1, 2)
        t = torch.cat([self.registers.expand(t.shape[0], -1, -1), t], 1).reshape(1, -1, 32)
        return t + self.attn(t)


def test_frames_are_not_read_from_an_input_whose_views_a_mask_drops():
    torch.manual_seed(0)
    model, x = DropsPaddedViews().eval(), torch.rand(1, 4, 3, 32, 32)
    spec = "httm:tokens_per_frame=18,special_tokens=2,n_s=4,n_t=1"
    got = fxslim.optimize(model, x, passes=[spec])
    (entry,) = got.report.entries("httm")
    assert entry.info["runtime_layout"] == "tokens_per_frame = 18 (fixed), frames = N // 18"
    padded = x.clone()
    padded[:, 2:] = 0
    assert _layouts(got.module, padded) == [(2, 18)]  # was 4 frames of 9: the input's S
    with torch.no_grad():
        torch.testing.assert_close(got.module(padded), got.module(x[:, :2]), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (entry,) = fxslim.optimize(model, padded, passes=[spec]).report.entries("httm")
    assert entry.reason == "local_attention" and "views dropped at" in entry.detail


class KeepsSomeFeatures(nn.Module):
    """A mask the model holds (features it keeps) sizes the same on every call: the frames still
    come from the input's S."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 40, 7, 7)
        self.register_buffer("keep", torch.arange(40) < 32)
        self.attn = Attention()

    def forward(self, images):
        b = images.shape[0]
        x = self.embed(images.flatten(0, 1)).flatten(2).transpose(1, 2)[..., self.keep]
        x = x.reshape(b, -1, 32)
        return x + self.attn(x)


def test_a_mask_the_model_holds_does_not_stop_frames_following_the_input():
    torch.manual_seed(0)
    got = fxslim.optimize(KeepsSomeFeatures().eval(), torch.rand(1, 3, 3, 28, 28),
                          passes=["httm:tokens_per_frame=16,special_tokens=0,n_s=4,n_t=1"])
    assert _layouts(got.module, torch.rand(1, 4, 3, 56, 56)) == [(4, 64)]


def test_dynamic_graph_with_positions_from_input_values_is_left_dense():
    """After a graph break the positions are a graph input: with a dynamic N, the example's tokens
    per frame would be assumed for every N, so the attention stays dense (with the reason)."""

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 7, 7)
            self.attn = Attention(rope=Rope())

        def forward(self, images):  # [B, S, 3, H, W]
            b, s, _, h, w = images.shape
            x = self.embed(images.reshape(b * s, 3, h, w)).flatten(2).transpose(1, 2)
            ys, xs = torch.meshgrid(torch.arange(h // 7), torch.arange(w // 7), indexing="ij")
            frame = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1) + 1
            pos = frame.repeat(s, 1).unsqueeze(0).expand(b, -1, -1).contiguous()
            if torch.isnan(images).any():  # a data-dependent branch: graph break
                raise ValueError("NaN in images")
            x = x.reshape(b, -1, 32)
            return x + self.attn(x, pos)

    torch.manual_seed(0)
    model = Broken().eval()
    reports: list = []
    compiled = torch.compile(model, backend="fxslim", dynamic=True,
                             options={"passes": ["httm:n_s=4,n_t=2"], "inner": "eager", "on_report": reports.append})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.rand(1, 4, 3, 28, 28)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    reasons = [e.reason for batch in reports for report in batch for e in report.entries]
    assert "dynamic_frame_layout" in reasons


class _PositionsAfterBreak(nn.Module):
    """Tokens and positions made before a graph break, attention after it: in the attention's graph
    both are inputs, and 4 frames of 5 + 16 tokens and 6 frames of 5 + 9 are both N = 84."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 7, 7)
        self.special = nn.Parameter(torch.randn(1, 1, 5, 32) * 0.02)
        self.attn = Attention(rope=Rope())

    def forward(self, images):  # [B, S, 3, H, W]
        b, s, _, h, w = images.shape
        x = self.embed(images.reshape(b * s, 3, h, w)).flatten(2).transpose(1, 2).reshape(b, s, -1, 32)
        x = torch.cat([self.special.expand(b, s, -1, -1), x], 2).reshape(b, -1, 32)
        ys, xs = torch.meshgrid(torch.arange(h // 7), torch.arange(w // 7), indexing="ij")
        frame = torch.cat([torch.zeros(5, 2, dtype=torch.long), torch.stack([ys.reshape(-1), xs.reshape(-1)], -1) + 1])
        pos = frame.repeat(s, 1).unsqueeze(0).expand(b, -1, -1).contiguous()
        torch._dynamo.graph_break()
        return x + self.attn(x, pos)


def test_static_graph_with_positions_from_input_values_is_left_dense():
    """With static shapes too: a call of the same N with another layout does not recompile, so the
    example's layout ran on other frames (0.09 off optimize, which reads the positions each call)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, reports = _PositionsAfterBreak().eval(), []
    compiled = torch.compile(model, backend="fxslim", dynamic=False,
                             options={"passes": ["httm:q=0.5,kv=0.5"], "inner": "eager", "on_report": reports.append})
    with torch.no_grad():
        for x in (torch.rand(1, 4, 3, 28, 28), torch.rand(1, 6, 3, 21, 21)):  # N = 4·21 = 6·14
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    reasons = [e.reason for batch in reports for report in batch for e in report.entries]
    assert reasons == ["dynamic_frame_layout"]


class SharedBlock(nn.Module):
    """One attention module serves the frame call ([B·S, P]) and the global call ([B, S·P]); the
    input check keeps forward from tracing, so the module is traced on its own."""

    def __init__(self, global_first: bool) -> None:
        super().__init__()
        self.global_first = global_first
        self.embed = nn.Conv2d(3, 32, 7, 7)
        self.attn = Attention(rope=Rope())

    def forward(self, images):  # [B, S, 3, H, W]
        if torch.isnan(images).any():
            raise ValueError("NaN in images")
        b, s, _, h, w = images.shape
        t = self.embed(images.reshape(b * s, 3, h, w)).flatten(2).transpose(1, 2)
        ys, xs = torch.meshgrid(torch.arange(h // 7), torch.arange(w // 7), indexing="ij")
        pos = (torch.stack([ys.reshape(-1), xs.reshape(-1)], -1) + 1).expand(b * s, -1, -1)
        p = t.shape[1]
        calls = [lambda t: t + self.attn(t.reshape(b, s * p, 32), pos.reshape(b, s * p, 2)).reshape(b * s, p, 32),
                 lambda t: t + self.attn(t, pos)]
        for call in calls if self.global_first else calls[::-1]:
            t = call(t)
        return t


def test_a_module_serving_frame_and_global_calls_is_left_dense():
    torch.manual_seed(0)
    x = torch.rand(1, 4, 3, 28, 28)
    for global_first in (True, False):
        model = SharedBlock(global_first).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fxslim.optimize(model, x, passes=["httm:n_s=4,n_t=2"])
        assert [(e.status, e.reason) for e in result.report.entries("httm")] == [("skipped", "shared_by_calls")]
        with torch.no_grad():
            torch.testing.assert_close(result.module(x), model(x))


def test_a_configured_tokens_per_frame_follows_the_clip_when_dynamo_recompiles_at_another_size():
    # a recompile took its new example for the configured one: 7 frames of 30 tokens (N = 210) ran as
    # 10 frames of 21, 0.14 off fxslim.optimize, which follows the clip's frames at run time
    from fxslim.models.vggt import vggt_tiny

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = vggt_tiny(depth=2).eval()
    spec = "httm:q=0.5,kv=0.5,tokens_per_frame=21,special_tokens=5"  # 56 px: 5 + 4·4 tokens per frame
    optimized = fxslim.optimize(model, torch.rand(1, 4, 3, 56, 56), passes=[spec]).module
    compiled = torch.compile(model, backend="fxslim", dynamic=False, options={"passes": [spec], "inner": "eager"})
    with torch.no_grad():
        for shape in ((1, 4, 3, 56, 56), (1, 7, 3, 70, 70)):
            x = torch.rand(shape)
            ours, theirs = compiled(x), optimized(x)
            for key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_a_torchscript_trace_warns_that_it_keeps_the_frame_layout():
    # the trace records frames and tokens_per_frame as constants: at 1 frame of 3x the pixels
    # (the same N) it merged 3 frames' worth of the wrong tokens, silently
    torch.manual_seed(0)
    model, x = Clip().eval(), torch.rand(1, 3, 4, 28, 28)
    rewritten = fxslim.optimize(model, x, passes=["httm:n_s=4,n_t=2"]).module
    with torch.no_grad(), pytest.warns(UserWarning, match=r"torch.jit.trace keeps HTTM's frame layout \(4 frames of 16"):
        torch.jit.trace(rewritten, x, check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager calls do not warn
        with torch.no_grad():
            rewritten(torch.rand(1, 3, 6, 28, 28))
