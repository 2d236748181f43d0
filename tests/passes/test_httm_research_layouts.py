"""HTTM on research-code layouts that fooled the scope and layout inference: a model fed its frames
as the batch and traced in parts, a pose head over per-frame tokens, a configured tokens_per_frame
at another image size, a temporal window over some of the frames; and the skip details that say
what to do (a RoPE table cached in a dict under torch.compile, a list of per-view images, manual
attention)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
import fxslim.runtime.httm as httm_runtime
from tests.passes.test_httm_layout_inference import Attention, FramesAsBatch
from tests.research_models import Block, RoPE2D, VGGTStyle, grid_positions

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = "httm:q=1,kv=1,outliers=0"


def _optimize(model: nn.Module, inputs: tuple, spec) -> fxslim.OptimizeResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, inputs, passes=[spec])


def _status(result) -> dict[str, tuple[str, str]]:
    return {e.fqn: (e.status, e.reason) for e in result.report.entries("httm")}


def _details(result) -> dict[str, str]:
    return {e.fqn: e.detail for e in result.report.entries("httm")}


def _layouts(module: nn.Module, *inputs) -> list[tuple[int, int, int]]:
    """(N, frames, tokens_per_frame) of every HTTM call while ``module`` runs on ``inputs``."""
    calls = []
    original = httm_runtime.httm_plan

    def spy(q, k, frames, tokens_per_frame, *args, **kwargs):
        calls.append((q.shape[2], int(frames), int(tokens_per_frame)))
        return original(q, k, frames, tokens_per_frame, *args, **kwargs)

    httm_runtime.httm_plan = spy
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        httm_runtime.httm_plan = original
    return calls


# ----------------------------------------------------------------------------------------------
# (A) configured frames: frame attention traced apart, a head over per-frame tokens


class CheckedFramesAsBatch(FramesAsBatch):
    """FramesAsBatch ([S, 3, H, W] -> frame attention [S, 20, C], global [1, S·20, C]) with an
    input assert: forward does not trace, so each attention is traced on its own."""

    def forward(self, frames):
        assert frames.shape[1] == 3, "expected RGB frames"
        return super().forward(frames)


def test_configured_frames_traced_apart_frame_attention_left_dense_global_rewritten():
    torch.manual_seed(0)
    model, x = CheckedFramesAsBatch().eval(), torch.rand(4, 3, 28, 28)
    result = _optimize(model, (x,), fxslim.HTTM(frames=4, special_tokens=4, n_s=4, n_t=2))
    assert result.report.untraced  # the assert: traced in parts
    # the frame attention [4, 20] would pass for 4 frames of 5 tokens at the example's batch 4
    assert _status(result) == {"frame": ("skipped", "unknown_batch"), "glob": ("rewritten", "")}
    assert "may hold the frames" in _details(result)["frame"]
    # only the global attention merges: 80 tokens = 4 frames x 20 (4 registers + 4x4 patches)
    assert _layouts(result.module, x) == [(80, 4, 20)]
    exact = _optimize(model, (x,), fxslim.HTTM(frames=4, special_tokens=4, q=1, kv=1, outliers=0)).module
    other = torch.rand(4, 3, 21, 21)  # 4 registers + 3x3 patches
    assert _layouts(exact, other) == [(52, 4, 13)]
    with torch.no_grad():
        torch.testing.assert_close(exact(other), model(other), atol=1e-5, rtol=1e-5)


class ClipGlobal(nn.Module):
    """[B, S, 3, H, W] images, 5 special tokens per frame, one global attention without positions."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed, self.attn = nn.Conv2d(3, dim, 7, 7), Attention(dim)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)

    def forward(self, images):
        t, _ = _frame_tokens(self, images)
        return self.attn(t.reshape(images.shape[0], -1, t.shape[-1]))


def test_configured_frames_follow_the_frames_of_a_clip_input():
    # HTTM(frames=3) called with 5 frames told the op 3 frames of 5/3 of a frame's tokens: the
    # special tokens of the frames in between were merged as patches, without a word
    torch.manual_seed(0)
    model = ClipGlobal().eval()
    result = _optimize(model, (torch.rand(1, 3, 3, 21, 21),), fxslim.HTTM(frames=3, special_tokens=5))
    assert _status(result) == {"attn": ("rewritten", "")}
    assert _layouts(result.module, torch.rand(1, 5, 3, 21, 21)) == [(5 * 14, 5, 14)]  # 5 special + 3x3 patches


class PoseHead(nn.Module):
    """[B, S, 3, H, W] -> frame attention [B·S, 16], global [B, S·16], then a pose head attending
    over the S per-frame mean tokens [B, S] (one token per frame)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.frame_attn, self.global_attn, self.head_attn = Attention(dim), Attention(dim), Attention(dim)
        self.pose = nn.Linear(dim, 9)

    def forward(self, x):
        b, s = x.shape[:2]
        t = self.embed(x.flatten(0, 1)).flatten(2).transpose(1, 2)
        p, c = t.shape[1:]
        t = (t + self.frame_attn(t)).reshape(b, s * p, c)
        t = t + self.global_attn(t)
        feats = t.reshape(b, s, p, c).mean(2)
        return self.pose(feats + self.head_attn(feats)), t


def test_configured_frames_head_attention_over_one_token_per_frame_left_dense():
    torch.manual_seed(0)
    model, x = PoseHead().eval(), torch.rand(1, 3, 3, 28, 28)
    result = _optimize(model, (x,), fxslim.HTTM(frames=3, special_tokens=0, n_s=4, n_t=2))
    assert _status(result) == {"frame_attn": ("skipped", "local_attention"), "global_attn": ("rewritten", ""),
                               "head_attn": ("skipped", "one_token_per_frame")}
    assert _layouts(result.module, x) == [(48, 3, 16)]  # the global attention only; the head's N = 3 stays dense


# ----------------------------------------------------------------------------------------------
# (B) configured tokens_per_frame at another image size


class CameraTokenViT(nn.Module):
    """[B, S, 3, H, W], one camera token per frame, no RoPE: P = 1 + (H/7)·(W/7)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.cam = nn.Parameter(torch.randn(1, 1, dim))
        self.frame_attn, self.global_attn = Attention(dim), Attention(dim)

    def forward(self, x):
        b, s = x.shape[:2]
        t = self.embed(x.flatten(0, 1)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cam.expand(b * s, 1, -1), t], 1)
        p, c = t.shape[1:]
        t = (t + self.frame_attn(t)).reshape(b, s * p, c)
        return t + self.global_attn(t)


def test_configured_tokens_per_frame_follows_the_input_frame_count_at_other_sizes():
    torch.manual_seed(0)
    model = CameraTokenViT().eval()
    result = _optimize(model, (torch.rand(1, 4, 3, 28, 28),),
                       fxslim.HTTM(tokens_per_frame=17, special_tokens=1, q=1, kv=1, outliers=0))
    assert _status(result)["global_attn"] == ("rewritten", "")
    # 42 px: P = 1 + 6x6 = 37; 17 frames x 37 = 629 tokens split into 37 "frames" of 17 before
    for frames, size, per_frame in ((17, 42, 37), (4, 42, 37), (6, 28, 17)):
        x = torch.rand(1, frames, 3, size, size)
        assert _layouts(result.module, x) == [(frames * per_frame, frames, per_frame)]
        with torch.no_grad():
            torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# (C) a temporal window over some of the frames


def _frame_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B·S, P, C] tokens (5 special + the 7 px patches of each frame) and their VGGT-style positions."""
    b, s, _, h, w = images.shape
    t = model.embed(images.flatten(0, 1)).flatten(2).transpose(1, 2)
    t = torch.cat([model.special.expand(b * s, -1, -1), t], 1)
    pos = grid_positions(b * s, h // 7, w // 7, images.device) + 1
    return t, torch.cat([pos.new_zeros(b * s, 5, 2), pos], 1)


class TemporalWindow(nn.Module):
    """VGGT-style positions; frame attention [B·S, P], window attention over pairs of frames
    [B·S/2, 2P], global attention [B, S·P] (P = 5 special tokens + 3x3 patches)."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        rope = RoPE2D()
        self.frame_block, self.window_block, self.global_block = (Block(dim, heads, rope) for _ in range(3))

    def forward(self, images):
        b, s = images.shape[:2]
        t, pos = _frame_tokens(self, images)
        p, c = t.shape[1:]
        t = self.frame_block(t, pos=pos)
        t = self.window_block(t.reshape(b * s // 2, 2 * p, c), pos=pos.reshape(b * s // 2, 2 * p, 2))
        return self.global_block(t.reshape(b, s * p, c), pos=pos.reshape(b, s * p, 2))


def test_window_over_two_of_four_frames_left_dense():
    torch.manual_seed(0)
    model, x = TemporalWindow().eval(), torch.rand(1, 4, 3, 21, 21)
    result = _optimize(model, (x,), "httm:n_s=4,n_t=2")
    assert _status(result) == {"frame_block.attn": ("skipped", "local_attention"),
                               "window_block.attn": ("skipped", "local_attention"),
                               "global_block.attn": ("rewritten", "")}
    assert "window over some of the frames" in _details(result)["window_block.attn"]
    assert _layouts(result.module, x) == [(56, 4, 14)]  # 4 frames of 5 + 3x3


class LoopedWindow(TemporalWindow):
    """The window written as a loop over pairs of frames at the model's batch [B, 2P] (no reshape
    of frames into the batch), beside global attention over all S frames: the batch alone said
    global, so the window was rewritten."""

    def forward(self, images):
        b, s = images.shape[:2]
        t, pos = _frame_tokens(self, images)
        p, c = t.shape[1:]
        t, pos = t.reshape(b, s, p, c), pos.reshape(b, s, p, 2)
        windows = [self.window_block(t[:, i:i + 2].reshape(b, -1, c), pos=pos[:, i:i + 2].reshape(b, -1, 2))
                   for i in range(0, s, 2)]
        return self.global_block(torch.cat(windows, 1), pos=pos.reshape(b, s * p, 2))


@pytest.mark.parametrize("batch", [1, 2])
def test_window_looped_at_the_models_batch_left_dense(batch):
    torch.manual_seed(0)
    model, x = LoopedWindow().eval(), torch.rand(batch, 4, 3, 21, 21)
    result = _optimize(model, (x,), EXACT)
    assert _status(result) == {"window_block.attn": ("skipped", "local_attention"),
                               "global_block.attn": ("rewritten", "")}
    assert "sequences of 2 frames where the input has 4" in _details(result)["window_block.attn"]
    other = torch.rand(batch, 6, 3, 28, 21)
    with torch.no_grad():
        torch.testing.assert_close(result.module(other), model(other), atol=1e-5, rtol=1e-5)


class ClipCrossAttention(nn.Module):
    """Queries from one clip's tokens, keys and values from another's ([B, S·P, C] each, VGGT-style
    positions): one SDPA call on q, k of one shape, so it passed for self-attention over all frames."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.rope = heads, RoPE2D()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def tokens(self, clip):
        t, pos = _frame_tokens(self, clip)
        return t.reshape(clip.shape[0], -1, t.shape[-1]), pos.reshape(clip.shape[0], -1, 2)

    def forward(self, left, right):
        (a, pos_a), (b, pos_b) = self.tokens(left), self.tokens(right)
        n, c = a.shape[1:]
        q = self.q(a).reshape(a.shape[0], n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(b).reshape(b.shape[0], b.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.rope(q, pos_a), self.rope(k, pos_b), v)
        return self.proj(out.transpose(1, 2).reshape(a.shape[0], n, c))


def test_cross_attention_between_two_clips_of_one_shape_is_left_dense():
    torch.manual_seed(0)
    model = ClipCrossAttention().eval()
    clips = (torch.rand(1, 3, 3, 21, 21), torch.rand(1, 3, 3, 21, 21))
    result = _optimize(model, clips, EXACT)
    assert _status(result) == {"": ("skipped", "cross_attention")}
    assert "q is projected from" in _details(result)[""]
    longer = (torch.rand(1, 2, 3, 21, 21), torch.rand(1, 4, 3, 21, 21))  # the rewrite refused this
    with torch.no_grad():
        torch.testing.assert_close(result.module(*longer), model(*longer))


class SharedProjectionCross(nn.Module):
    """Clip A's queries attend to clip B's keys and values, all from one qkv linear over both clips,
    concatenated on the sequence (``stack="sequence"``) or on the batch dim: the projections of q and
    k read one node, so that check passed, and the rewrite refused clips of other lengths."""

    def __init__(self, stack: str, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.stack, self.heads, self.rope = stack, heads, RoPE2D()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def tokens(self, clip):
        t, pos = _frame_tokens(self, clip)
        return t.reshape(clip.shape[0], -1, t.shape[-1]), pos.reshape(clip.shape[0], -1, 2)

    def forward(self, left, right):
        (a, pos_a), (b, pos_b) = self.tokens(left), self.tokens(right)
        batch, n, c = a.shape
        if self.stack == "sequence":
            q, k, v = self.qkv(torch.cat([a, b], 1)).view(batch, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = q[:, :, :n], k[:, :, n:], v[:, :, n:]
        else:
            q, k, v = self.qkv(torch.cat([a, b], 0)).view(2 * batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = q[:batch], k[batch:], v[batch:]
        out = F.scaled_dot_product_attention(self.rope(q, pos_a), self.rope(k, pos_b), v)
        return self.proj(out.transpose(1, 2).reshape(batch, n, c))


@pytest.mark.parametrize("stack", ["sequence", "batch"])
def test_cross_attention_through_one_shared_projection_is_left_dense(stack):
    torch.manual_seed(0)
    model = SharedProjectionCross(stack).eval()
    clips = (torch.rand(1, 3, 3, 21, 21), torch.rand(1, 3, 3, 21, 21))
    result = _optimize(model, clips, "httm")
    assert _status(result) == {"": ("skipped", "cross_attention")}
    assert "where q holds 42" in _details(result)[""]
    with torch.no_grad():
        torch.testing.assert_close(result.module(*clips), model(*clips))
        if stack == "sequence":  # the rewrite refused this
            longer = (torch.rand(1, 2, 3, 21, 21), torch.rand(1, 4, 3, 21, 21))
            torch.testing.assert_close(result.module(*longer), model(*longer))


class SpecialsAfterProjection(nn.Module):
    """Global attention whose special tokens' q, k, v are learned and concatenated after the patch
    projection, or whose q and k get a position table projected once for the batch: the projections
    saw fewer rows than q holds, and both were taken for cross-attention."""

    def __init__(self, variant: str, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.variant, self.heads, self.rope = variant, heads, RoPE2D()
        self.embed, self.qkv, self.pos_proj = nn.Conv2d(3, dim, 7, 7), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.special_qkv = nn.Parameter(torch.randn(1, 1, 5, 3 * dim) * 0.02)
        self.pos_table = nn.Parameter(torch.randn(1, 256, dim) * 0.02)

    def forward(self, images):
        b, s = images.shape[:2]
        t, pos = _frame_tokens(self, images)
        pos, c = pos.reshape(b, -1, 2), t.shape[-1]
        if self.variant == "specials_after":
            patches = self.qkv(t[:, 5:].reshape(b, s, -1, c))
            qkv = torch.cat([self.special_qkv.expand(b, s, -1, -1), patches], 2)
        else:
            qkv = self.qkv(t.reshape(b, -1, c))
        n = pos.shape[1]
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.variant == "position_table":
            table = self.pos_proj(self.pos_table[:, :n]).view(1, n, self.heads, -1).transpose(1, 2)
            q, k = q + table, k + table
        return F.scaled_dot_product_attention(self.rope(q, pos), self.rope(k, pos), v)


@pytest.mark.parametrize("variant", ["specials_after", "position_table"])
def test_projections_of_fewer_rows_than_q_are_still_self_attention(variant):
    torch.manual_seed(0)
    model, x = SpecialsAfterProjection(variant).eval(), torch.rand(2, 3, 3, 21, 21)
    result = _optimize(model, (x,), EXACT)
    assert _status(result) == {"": ("rewritten", "")}
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)


class PositionAddedToQK(nn.Module):
    """DETR's self-attention: q and k projected from x + a frame embedding, v from x. One sequence
    attending to itself, which was skipped as cross-attention (q and v read other nodes)."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.rope = heads, RoPE2D()
        self.embed, self.frame_embed = nn.Conv2d(3, dim, 7, 7), nn.Embedding(8, dim)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, images):
        b, s = images.shape[:2]
        t, pos = _frame_tokens(self, images)
        t, pos = t.reshape(b, -1, t.shape[-1]), pos.reshape(b, -1, 2)
        n = t.shape[1]
        qk_in = t + self.frame_embed(torch.arange(s)).repeat_interleave(n // s, 0)
        q, k, v = (lin(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for lin, x in ((self.q, qk_in), (self.k, qk_in), (self.v, t)))
        return F.scaled_dot_product_attention(self.rope(q, pos), self.rope(k, pos), v)


def test_position_embedding_added_to_q_and_k_only_is_self_attention():
    torch.manual_seed(0)
    model = PositionAddedToQK().eval()
    result = _optimize(model, (torch.rand(1, 3, 3, 21, 21),), EXACT)
    assert _status(result) == {"": ("rewritten", "")}
    other = torch.rand(2, 5, 3, 28, 21)
    with torch.no_grad():
        torch.testing.assert_close(result.module(other), model(other), atol=1e-5, rtol=1e-5)


def test_position_embedding_added_to_q_and_k_is_self_attention_under_dynamic_shapes():
    # dynamo passes sizes and Embedding.norm_type as placeholders: the embedding counted as an input
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, x, reports = PositionAddedToQK().eval(), torch.rand(1, 3, 3, 21, 21), []
    compiled = torch.compile(model, backend="fxslim", dynamic=True,
                             options={"passes": [EXACT], "inner": "eager", "on_report": reports.extend})
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):  # the RoPE's int(max)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    assert [(e.status, e.reason) for r in reports for e in r.entries] == [("rewritten", "")]


class ViewPairs(nn.Module):
    """A list of per-view images at batch 1: attention over pairs of views, then over all of them.
    At batch 1 every attention was taken for global, so the window over two views was rewritten."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.rope = RoPE2D()
        self.window_block, self.global_block = Block(dim, heads, self.rope), Block(dim, heads, self.rope)

    def forward(self, views):
        pairs = [_frame_tokens(self, torch.stack(views[i:i + 2], 1)) for i in range(0, len(views), 2)]
        tokens = [self.window_block(t.reshape(1, -1, t.shape[-1]), pos=pos.reshape(1, -1, 2)) for t, pos in pairs]
        pos = torch.cat([pos.reshape(1, -1, 2) for _, pos in pairs], 1)
        return self.global_block(torch.cat(tokens, 1), pos=pos)


def test_window_over_some_views_of_a_list_input_left_dense():
    torch.manual_seed(0)
    model = ViewPairs().eval()
    views = [torch.rand(1, 3, 21, 21) for _ in range(4)]
    result = _optimize(model, (views,), EXACT)
    assert _status(result) == {"window_block.attn": ("skipped", "local_attention"),
                               "global_block.attn": ("rewritten", "")}
    assert "the input is a list of 4 views" in _details(result)["window_block.attn"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(views), model(views), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_window_over_some_views_of_a_list_input_left_dense_under_torch_compile(dynamic):
    # the backend never counted the views of a list input: the window over two views was rewritten
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, reports = ViewPairs().eval(), []
    views = [torch.rand(1, 3, 21, 21) for _ in range(4)]
    compiled = torch.compile(model, backend="fxslim", dynamic=dynamic,
                             options={"passes": [EXACT], "inner": "eager", "on_report": reports.extend})
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):  # the RoPE's int(max)
        torch.testing.assert_close(compiled(views), model(views), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    status = {(e.fqn, e.status, e.reason) for r in reports for e in r.entries}
    assert status == {("window_block.attn", "skipped", "local_attention"), ("global_block.attn", "rewritten", "")}


class ViewsWithMaps(nn.Module):
    """A list of views, each an image and a same-shaped map: two 4-d tensors of one shape per view."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed, self.embed_map = nn.Conv2d(3, dim, 7, 7), nn.Conv2d(3, dim, 7, 7)
        self.special = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.global_block = Block(dim, heads, RoPE2D())

    def forward(self, views):
        images = torch.stack([v["img"] for v in views], 1)
        t, pos = _frame_tokens(self, images)
        maps = self.embed_map(torch.cat([v["normal"] for v in views])).flatten(2).transpose(1, 2)
        t = t + F.pad(maps, (0, 0, 5, 0))
        return self.global_block(t.reshape(1, -1, t.shape[-1]), pos=pos.reshape(1, -1, 2))


def test_attention_over_every_view_of_a_list_with_two_maps_per_view_is_global():
    # counting 4-d tensors of one shape made these 4 views 8, and the attention a window
    torch.manual_seed(0)
    model = ViewsWithMaps().eval()
    views = [{"img": torch.rand(1, 3, 21, 21), "normal": torch.rand(1, 3, 21, 21)} for _ in range(4)]
    result = _optimize(model, (views,), EXACT)
    assert _status(result) == {"global_block.attn": ("rewritten", "")}


# ----------------------------------------------------------------------------------------------
# (D, E, F) skips that say what to do


class CachedRoPE2D(RoPE2D):
    """VGGT's RoPE keeps its cos/sin tables in a dict keyed by int(positions.max()) + 1: dynamo
    breaks the graph there even with capture_scalar_outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict = {}

    def _table(self, dim, length, device, dtype):
        key = (dim, length, device, dtype)
        if key not in self.cache:
            self.cache[key] = super()._table(dim, length, device, dtype)
        return self.cache[key]


def test_compile_with_a_dict_cached_rope_says_to_rewrite_first_and_compile_after():
    torch.manual_seed(0)
    model, images = VGGTStyle(depth=1).eval(), torch.rand(1, 3, 3, 14, 14)
    rope = CachedRoPE2D()
    for module in model.modules():
        if getattr(module, "rope", None) is not None:
            module.rope = rope
    seen: list = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        compiled = torch.compile(model, backend="fxslim", options={"passes": ["httm"], "inner": "eager",
                                                                   "on_report": seen.append})
        compiled(images)
    entries = [e for graph in seen for report in graph for e in report.entries]
    assert not any(e.status == "rewritten" for e in entries)
    # the frame attention (batch 3) and the global one (batch 1) sit after the break, with no positions
    assert {e.reason for e in entries} == {"unknown_batch", "no_frame_layout"}
    assert all("torch.compile(fxslim.optimize(model, inputs" in e.detail for e in entries), entries
    # the fix the detail gives: rewrite, then compile the result
    optimized = _optimize(model, (images,), EXACT).module
    assert _layouts(optimized, images) == [(3 * 9, 3, 9)]  # 3 frames of 5 special tokens + 2x2 patches
    torch._dynamo.reset()
    with torch.no_grad():
        got, want = torch.compile(optimized, backend="eager")(images), model(images)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


class ViewList(nn.Module):
    """DUSt3R-style input: a list of per-view images [B, 3, H, W], concatenated in forward."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.frame_block, self.global_block = Block(dim, heads, None), Block(dim, heads, None)

    def forward(self, views):
        tokens = torch.cat([self.embed(v).flatten(2).transpose(1, 2) for v in views], 0)  # [S·B, P, C]
        b, s, (p, c) = views[0].shape[0], len(views), tokens.shape[1:]
        tokens = self.frame_block(tokens)
        return self.global_block(tokens.view(s, b, p, c).transpose(0, 1).reshape(b, s * p, c))


class StackedViews(nn.Module):
    """The fix the skip detail gives: one [B, S, 3, H, W] tensor in, the list made inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(list(images.unbind(1)))


def test_list_of_views_input_says_to_stack_the_views_and_that_works():
    torch.manual_seed(0)
    model, views = ViewList().eval(), [torch.rand(2, 3, 21, 21) for _ in range(3)]
    spec = fxslim.HTTM(tokens_per_frame=9, special_tokens=0, n_s=4, n_t=2)
    result = _optimize(model, (views,), spec)
    assert _status(result)["frame_block.attn"] == ("skipped", "unknown_batch")
    assert "return model(list(images.unbind(1)))" in _details(result)["frame_block.attn"]
    stacked = _optimize(StackedViews(model), (torch.stack(views, 1),), spec)
    assert _status(stacked) == {"model.frame_block.attn": ("skipped", "local_attention"),
                                "model.global_block.attn": ("rewritten", "")}


class ManualAttention(nn.Module):
    """Global attention written out (softmax of q @ k^T), as timm/VGGT do with fused_attn=False."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


def test_manual_attention_skip_says_to_call_sdpa():
    result = _optimize(ManualAttention().eval(), (torch.randn(1, 21, 16),), "httm")
    (entry,) = result.report.entries("httm")
    assert entry.reason == "not_sdpa"
    assert "F.scaled_dot_product_attention" in entry.detail and "fused_attn=True" in entry.detail


@pytest.mark.parametrize(("batch", "frames"), [(2, 2), (4, 2), (6, 3)])
def test_configured_frames_with_a_batch_that_is_a_multiple_keeps_rewriting_global_attention(batch, frames):
    """[B, S, 3, H, W] images with B a multiple of S: the frames have a dim of their own, so the
    batch cannot be them. Only this graph's inputs were looked at, and VGGTStyle's blocks, traced
    apart, do not see the images: every global attention was declined as unknown_batch."""
    torch.manual_seed(0)
    model, x = VGGTStyle().eval(), torch.rand(batch, frames, 3, 14, 14)
    result = _optimize(model, (x,), fxslim.HTTM(q=1.0, kv=1.0, outliers=0.0, frames=frames))
    globals_ = {fqn: status for fqn, status in _status(result).items() if "global_blocks" in fqn}
    assert globals_ and all(status == ("rewritten", "") for status in globals_.values())
    with torch.no_grad():
        got, want = result.module(x), model(x)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
