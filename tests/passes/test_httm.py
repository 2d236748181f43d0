"""The HTTM pass: global attention -> fxslim::httm_attention on VGGT and on small inline modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxslim
import fxslim.backend
from fxslim.capture import capture
from fxslim.ir import meta_val
from fxslim.models.vggt import vggt_tiny
from fxslim.models.vggt_layers import RotaryPositionEmbedding2D, patch_positions
from fxslim.passes.base import PassContext, parse_pass
from fxslim.passes.httm import HTTM
from fxslim.runtime.frame_layout import FrameLayout, read_frame_layout
from fxslim.runtime.httm import httm_kept_lengths

_OP = torch.ops.fxslim.httm_attention.default
_ZERO = "httm:q=1,kv=1,outliers=0"  # keeps every token: outputs equal the original model's


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vggt_tiny(depth=2).eval()


def _images(frames=3, size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, frames, 3, size, size, generator=g)


def _ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _OP]


def _sdpa(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]


def _assert_outputs_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# VGGT-architecture model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optimized(tiny):
    """The tiny model after the pass, at 4 frames, with blocks small enough for its 84 tokens."""
    return fxslim.optimize(tiny, _images(frames=4), passes=["httm:n_s=8,n_t=2"], strict=True)


def test_httm_vggt_rewrites_every_global_block_and_nothing_else(tiny, optimized):
    agg = next(g.gm for g in optimized.captured.graphs if g.path == "aggregator")
    assert optimized.report.rewritten("httm") == len(_ops(agg)) == tiny.config.depth
    owners = {next(reversed(n.meta["nn_module_stack"].values()))[0] for n in _ops(agg)}
    assert owners == {f"global_blocks.{i}.attn" for i in range(tiny.config.depth)}
    # frame attention keeps its SDPA; the patch embedder conv is untouched; the camera head's
    # attention over one token per frame has no frame layout
    assert all(next(reversed(n.meta["nn_module_stack"].values()))[0].startswith("frame_blocks.") for n in _sdpa(agg))
    assert isinstance(agg.get_submodule("patch_embed.proj"), nn.Conv2d)
    assert optimized.report.skipped("httm") == {"local_attention": tiny.config.depth, "no_frame_layout": 1}


def test_httm_vggt_report_gives_layout_and_predicted_kept_lengths(optimized):
    entry = next(e for e in optimized.report.entries("httm") if e.status == "rewritten")
    kept_q, kept_kv = httm_kept_lengths(4, 21, 5, 0.9, 0.7, 8, 2, 0.1)
    assert entry.fqn == "aggregator.global_blocks.0.attn"
    assert entry.info["layout_from"] == "positions"
    assert (entry.info["example_frames"], entry.info["tokens_per_frame"]) == (4, 5 + 4 * 4)
    assert (entry.info["special_tokens"], entry.info["grid"], entry.info["frames"]) == (5, (4, 4), "N // 21")
    assert (entry.info["kept_q"], entry.info["kept_kv"]) == (kept_q, kept_kv)


def test_httm_vggt_new_nodes_carry_fake_values_and_pass_name(tiny, optimized):
    agg = next(g.gm for g in optimized.captured.graphs if g.path == "aggregator")
    new = [n for n in agg.graph.nodes if n.meta.get("fxslim_pass") == "httm"]
    # N, per-frame tokens, frames = N // P, frames_for_trace, op per global block
    assert len(new) == 5 * tiny.config.depth
    assert all(meta_val(n) is not None for n in new)
    assert all(tuple(meta_val(n).shape) == (1, 2, 84, 64) for n in _ops(agg))


def test_httm_default_config_changes_outputs_a_little(tiny, optimized):
    images = _images(frames=4, seed=2)
    with torch.no_grad():
        before, after = tiny(images), optimized.module(images)
    relative = (after["depth"] - before["depth"]).norm() / before["depth"].norm()
    assert 0 < relative < 1e-2  # LayerScale 0.01 keeps attention changes small in the residual stream


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_httm_ratio_zero_through_optimize_equals_original(tiny, method):
    images = _images()
    res = fxslim.optimize(tiny, images, passes=[_ZERO], capture=method, strict=True)
    with torch.no_grad():
        _assert_outputs_close(tiny(images), res.module(images))


def test_httm_ratio_zero_rewritten_model_runs_at_other_frame_counts(tiny):
    res = fxslim.optimize(tiny, _images(frames=3), passes=[_ZERO])
    images = _images(frames=5, seed=1)
    with torch.no_grad():
        _assert_outputs_close(tiny(images), res.module(images))


def test_httm_rewritten_model_run_on_one_frame_is_the_original(tiny):
    """One frame at run time is what the pass leaves dense at a one-frame example (``single_frame``):
    the graph rewritten at 3 frames gives the original model's outputs there, not a spatial merge."""
    res = fxslim.optimize(tiny, _images(frames=3), passes=["httm:n_s=8,n_t=2"], strict=True)
    one = _images(frames=1, seed=3)
    with torch.no_grad():
        dense, rewritten = tiny(one), res.module(one)
    assert all(torch.equal(rewritten[key], dense[key]) for key in dense)


@pytest.mark.parametrize("dynamic", [False, True])
def test_httm_ratio_zero_through_torch_compile_equals_original(tiny, dynamic):
    seen: list = []
    compiled = torch.compile(tiny, backend="fxslim", dynamic=dynamic,
                             options={"on_report": seen.append, "passes": [_ZERO], "inner": "aot_eager"})
    for frames in (3, 5) if dynamic else (3,):  # dynamic: frames is a SymInt in the graph
        images = _images(frames=frames)
        with torch.no_grad():
            _assert_outputs_close(tiny(images), compiled(images))
    reports = seen
    assert reports and all(r[0].rewritten == tiny.config.depth for r in reports)


def test_httm_second_run_is_a_no_op(tiny):
    graph = next(g for g in capture(tiny, (_images(),)).graphs if g.path == "aggregator")
    ctx = PassContext(ir="module", batch_size=1, path="aggregator")
    first = HTTM()(graph.gm, ctx)
    code = graph.gm.code
    again = HTTM()(graph.gm, ctx)
    assert first.modified and not again.modified and again.report.rewritten == 0
    assert again.report.skipped["already_rewritten"] == tiny.config.depth
    assert graph.gm.code == code


def test_httm_optimize_leaves_users_model_unchanged(tiny):
    images = _images()
    state = copy.deepcopy(tiny.state_dict())
    with torch.no_grad():
        before = tiny(images)
    res = fxslim.optimize(tiny, images, passes=["httm"])
    for p in res.module.parameters():
        p.data.add_(1.0)  # the result owns its weights
    assert all(torch.equal(state[k], v) for k, v in tiny.state_dict().items())
    assert not any(isinstance(m, fx.GraphModule) for m in tiny.modules())
    with torch.no_grad():
        _assert_outputs_close(before, tiny(images))


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_httm_string_form_takes_kept_ratios():
    cfg = parse_pass("httm:q=0.2,kv=0.3")
    assert cfg == HTTM() and (cfg.q_removed, cfg.kv_removed) == (0.9, 0.7)  # 1 - 0.2 + 0.1 outliers, 1 - 0.3
    lossless = parse_pass(_ZERO)
    assert (lossless.q_removed, lossless.kv_removed, lossless.outliers) == (0.0, 0.0, 0.0)
    no_filter = parse_pass("httm:q=0.2,kv=0.3,outliers=0,mode=uniform,tokens_per_frame=261")
    assert (no_filter.q_removed, no_filter.mode, no_filter.tokens_per_frame) == (0.8, "uniform", 261)
    assert parse_pass(no_filter.to_string()) == no_filter
    assert HTTM.from_dict(no_filter.to_dict()) == no_filter


@pytest.mark.parametrize("field,value", [
    ("q", 0.0), ("q", 1.5), ("kv", 0.0), ("kv", 2.0), ("outliers", -0.1), ("outliers", 0.2), ("n_s", 0),
    ("n_t", 0), ("n_s", 2.5), ("mode", "random"), ("dst_rule", "best"), ("seed", -1), ("frames", 0),
    ("tokens_per_frame", 0), ("special_tokens", -1), ("proportional_attention", 1),
])
def test_httm_bad_config_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"HTTM\.{field}: expected"):
        HTTM(**{field: value})


@pytest.mark.parametrize("kwargs,field", [
    ({"q": 1e-13, "outliers": 0.0}, "q"), ({"q": 0.3, "outliers": 0.2999999999999}, "q"), ({"kv": 1e-13}, "kv"),
])
def test_httm_kept_fraction_that_rounds_to_zero_raises_value_error_naming_field(kwargs, field):
    # the removed fractions are rounded to 12 digits: these would become "remove everything" (1.0),
    # which the op refuses only when the pass runs, naming its own q_ratio / kv_ratio
    with pytest.raises(ValueError, match=rf"HTTM\.{field}: expected"):
        HTTM(**kwargs)
    assert HTTM(q=1e-12, outliers=0.0).q_removed < 1.0 and HTTM(kv=1e-12).kv_removed < 1.0


def test_httm_special_tokens_above_tokens_per_frame_raises():
    with pytest.raises(ValueError, match=r"HTTM\.special_tokens: expected <= tokens_per_frame=4, got 5"):
        HTTM(special_tokens=5, tokens_per_frame=4)


# ----------------------------------------------------------------------------------------------
# Inline modules: one global attention over S frames of P = specials + h*w tokens
# ----------------------------------------------------------------------------------------------


class _GlobalAttention(nn.Module):
    """x [B, S*P, C] -> qkv -> RoPE with positions built from the shape -> one attention variant."""

    def __init__(self, variant: str = "plain", grid: tuple[int, int] = (2, 3), specials: int = 1,
                 dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.variant, self.grid, self.specials, self.heads = variant, grid, specials, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rope = RotaryPositionEmbedding2D()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        p = self.specials + self.grid[0] * self.grid[1]
        pos = patch_positions(1, *self.grid, self.specials).repeat(1, n // p, 1).expand(b, -1, -1)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.variant != "no_rope":
            q, k = self.rope(q, pos), self.rope(k, pos)
        if self.variant == "masked":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=x.new_zeros(n, n))
        elif self.variant == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.variant == "dropout":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        elif self.variant == "cross":
            out = F.scaled_dot_product_attention(q, k[:, :, : n // 2], v[:, :, : n // 2])
        elif self.variant == "gqa":
            out = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        elif self.variant == "three_d":
            out = F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0]).unsqueeze(1)
        elif self.variant == "manual":
            out = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return out.transpose(1, 2).reshape(b, n, -1)


def _run_pass(module: nn.Module, x: torch.Tensor, cfg: HTTM | str = "httm", overrides=None):
    res = fxslim.optimize(module, x, passes=[cfg], overrides=overrides)
    return res, res.report.entries("httm")


def _tokens(frames: int, module: _GlobalAttention, batch: int = 2) -> torch.Tensor:
    p = module.specials + module.grid[0] * module.grid[1]
    return torch.randn(batch, frames * p, 16)


def test_httm_inline_global_attention_rewritten_with_its_scale():
    module = _GlobalAttention().eval()
    x = _tokens(4, module)
    res, entries = _run_pass(module, x, _ZERO)
    assert [(e.status, e.info["tokens_per_frame"], e.info["special_tokens"]) for e in entries] == [("rewritten", 7, 1)]
    (op,) = _ops(res.module)
    assert op.kwargs["scale"] == 0.3 and op.kwargs["special_tokens"] == 1
    torch.testing.assert_close(res.module(x), module(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant,reason", [
    ("masked", "masked"), ("causal", "causal"), ("dropout", "dropout"), ("cross", "cross_attention"),
    ("three_d", "unsupported_shape"), ("manual", "not_sdpa"), ("no_rope", "no_frame_layout"),
    ("gqa", "unsupported_shape"),
])
def test_httm_inline_attention_variant_skipped_with_reason(variant, reason):
    module = _GlobalAttention(variant).eval()
    with pytest.warns(UserWarning, match="rewrote nothing"):
        res, entries = _run_pass(module, _tokens(3, module))
    assert [(e.status, e.reason) for e in entries] == [("skipped", reason)]
    assert not _ops(res.module)


def test_httm_grouped_query_attention_is_skipped_for_its_heads_not_its_shape():
    module = _GlobalAttention("gqa").eval()
    with pytest.warns(UserWarning, match="rewrote nothing"):
        _, (entry,) = _run_pass(module, _tokens(3, module))
    assert "grouped-query attention (enable_gqa=True)" in entry.detail and "expected [B, H, N, d]" not in entry.detail


@pytest.mark.parametrize("cfg,frames,reason", [
    (HTTM(tokens_per_frame=5), 3, "frame_layout_mismatch"),  # 21 tokens are not 5-token frames
    (HTTM(frames=4), 3, "frame_layout_mismatch"),
    (HTTM(special_tokens=3), 3, "frame_layout_mismatch"),  # the positions show 1 special token
    (HTTM(), 1, "single_frame"),
])
def test_httm_inline_layout_problems_skipped_with_reason(cfg, frames, reason):
    module = _GlobalAttention().eval()
    with pytest.warns(UserWarning, match="rewrote nothing"):
        _, entries = _run_pass(module, _tokens(frames, module), cfg)
    assert [(e.status, e.reason) for e in entries] == [("skipped", reason)]


def test_httm_inline_policy_override_skips_as_filtered_out():
    module = _GlobalAttention().eval()
    with pytest.warns(UserWarning, match="rewrote nothing"):
        _, entries = _run_pass(module, _tokens(3, module), overrides={"kind:global_attention": None})
    assert [(e.status, e.reason) for e in entries] == [("skipped", "filtered_out")]


def test_httm_config_layout_used_without_positions():
    module = _GlobalAttention("no_rope").eval()
    x = _tokens(3, module)
    res, entries = _run_pass(module, x, HTTM(q=1.0, kv=1.0, outliers=0.0, tokens_per_frame=7, special_tokens=1))
    assert [(e.status, e.info["layout_from"], e.info["example_frames"]) for e in entries] == [("rewritten", "config", 3)]
    torch.testing.assert_close(res.module(x), module(x), atol=1e-5, rtol=1e-4)


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _GlobalAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


@pytest.mark.parametrize("metadata,reason", [({"scope": "frame"}, "local_attention"),
                                              ({"scope": "global", "special_tokens": 2}, "frame_layout_mismatch")])
def test_httm_owning_module_metadata_is_read(metadata, reason):
    module = _Wrapped().eval()
    x = _tokens(3, module.attn)
    graph = capture(module, (x,)).graphs[0]
    graph.gm.get_submodule("attn").fxslim_frame_layout = metadata
    result = HTTM()(graph.gm, PassContext(ir="module", batch_size=2))
    assert [(e.status, e.reason) for e in result.report.entries] == [("skipped", reason)]


@settings(max_examples=25, deadline=None)
@given(frames=st.integers(1, 6), grid_h=st.integers(1, 5), grid_w=st.integers(1, 5), specials=st.integers(0, 5),
       batch=st.integers(1, 2))
def test_httm_layout_from_positions_recovers_vggt_layout(frames, grid_h, grid_w, specials, batch):
    per_frame = patch_positions(1, grid_h, grid_w, specials)
    pos = per_frame.repeat(1, frames, 1).expand(batch, -1, -1)
    layout, detail = read_frame_layout(pos)
    assert layout == FrameLayout(frames, specials + grid_h * grid_w, specials, grid_h, grid_w), detail


def test_httm_layout_from_positions_rejects_non_repeating_positions():
    pos = patch_positions(1, 2, 2, 1).repeat(1, 3, 1).clone()
    pos[0, 7:] = pos[0, 7:].flip(0)  # frames 1 and 2 reversed: not a frame-major sequence
    layout, detail = read_frame_layout(pos)
    assert layout is None and detail


@settings(max_examples=8, deadline=None)
@given(frames=st.integers(2, 4), grid_h=st.integers(1, 3), grid_w=st.integers(2, 3), specials=st.integers(0, 2),
       seed=st.integers(0, 100))
def test_httm_inline_ratio_zero_rewrite_equals_eager(frames, grid_h, grid_w, specials, seed):
    torch.manual_seed(seed)
    module = _GlobalAttention(grid=(grid_h, grid_w), specials=specials).eval()
    x = _tokens(frames, module)
    res, entries = _run_pass(module, x, HTTM(q=1.0, kv=1.0, outliers=0.0, n_s=2, n_t=2))
    assert [e.status for e in entries] == ["rewritten"]
    torch.testing.assert_close(res.module(x), module(x), atol=1e-5, rtol=1e-4)


def test_httm_tokens_per_frame_given_takes_the_special_tokens_from_the_positions():
    """``HTTM(tokens_per_frame=P)`` without ``special_tokens`` assumed VGGT's 5 on a model with 1 camera
    + 8 register tokens per frame, whose RoPE positions say 9: registers 5-8 merged across frames."""
    from tests.research_models import VGGTStyle

    torch.manual_seed(0)
    model, x = VGGTStyle(registers=8).eval(), torch.rand(1, 4, 3, 28, 28)  # 1 + 8 + 4·4 tokens per frame
    result = fxslim.optimize(model, x, passes=[HTTM(tokens_per_frame=25, n_s=4, n_t=2)], strict=True)
    rewritten = [e for e in result.report.entries("httm") if e.status == "rewritten"]
    assert rewritten and {e.info["special_tokens"] for e in rewritten} == {9}
