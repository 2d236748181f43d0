"""Tests of the VGGT-architecture model: names/shapes, RoPE, layout metadata, tracing, HTTM swap-in."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F

import fxslim  # noqa: F401  (registers the ops)
from fxslim.models.vggt import (
    CONFIGS,
    VGGTConfig,
    RotaryPositionEmbedding2D,
    patch_positions,
    vggt_1b,
    vggt_tiny,
)
from fxslim.models.vggt_layers import Attention
from fxslim.runtime.frame_layout import frame_layout_from_positions


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vggt_tiny().eval()


def _images(frames=3, size=56, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (frames, 3, size, size) if batch is None else (batch, frames, 3, size, size)
    return torch.rand(shape, generator=g)


class _LeafTracer(torch.fx.Tracer):
    """Treats modules that set ``fxslim_leaf`` as opaque, as fxslim's capture code does."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return getattr(m, "fxslim_leaf", False) or super().is_leaf_module(m, qualname)


def _trace(module: torch.nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(module, _LeafTracer().trace(module))


# ----------------------------------------------------------------------------------------------
# Names and shapes (docs/background/httm.md section 4.4)
# ----------------------------------------------------------------------------------------------

# per-block state dict of VGGT-1B's aggregator blocks, C = 1024, d = 64
_VGGT_BLOCK_KEYS = {
    "norm1.weight": (1024,), "norm1.bias": (1024,),
    "attn.qkv.weight": (3072, 1024), "attn.qkv.bias": (3072,),
    "attn.q_norm.weight": (64,), "attn.q_norm.bias": (64,),
    "attn.k_norm.weight": (64,), "attn.k_norm.bias": (64,),
    "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
    "ls1.gamma": (1024,),
    "norm2.weight": (1024,), "norm2.bias": (1024,),
    "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,),
    "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,),
    "ls2.gamma": (1024,),
}


def test_vggt_1b_aggregator_blocks_have_vggt_state_dict_names_and_shapes():
    with torch.device("meta"):
        model = vggt_1b()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for kind in ("global_blocks", "frame_blocks"):
        for i in (0, 23):
            prefix = f"aggregator.{kind}.{i}."
            block = {k[len(prefix):]: s for k, s in state.items() if k.startswith(prefix)}
            assert block == _VGGT_BLOCK_KEYS
    assert "aggregator.global_blocks.24.norm1.weight" not in state
    assert state["aggregator.camera_token"] == (1, 2, 1, 1024)
    assert state["aggregator.register_token"] == (1, 2, 4, 1024)
    assert state["aggregator.patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert not any("_resnet" in k or "rope" in k for k in state)  # buffers/RoPE are not checkpoint state


def test_vggt_1b_block_parameter_count_matches_vggt():
    # VGGT-1B: 24 global blocks = 302.4 M parameters (about 12.6 M each)
    with torch.device("meta"):
        model = vggt_1b()
    count = sum(p.numel() for p in model.aggregator.global_blocks.parameters())
    assert round(count / 1e6, 1) == 302.4


def test_vggt_config_layers_read_scale_with_depth():
    assert CONFIGS["vggt_1b"].layers_read == (4, 11, 17, 23)
    assert CONFIGS["vggt_small"].layers_read == (1, 3, 5, 7)
    assert CONFIGS["vggt_tiny"].layers_read == (0, 1, 2, 3)
    assert VGGTConfig(depth=12).layers_read[-1] == 11
    with pytest.raises(ValueError, match="num_heads"):
        VGGTConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="head_layers"):
        VGGTConfig(depth=4, head_layers=(0, 1, 2, 4))


# ----------------------------------------------------------------------------------------------
# RoPE and positions
# ----------------------------------------------------------------------------------------------


def test_patch_positions_special_tokens_zero_patches_shifted_row_major():
    pos = patch_positions(2, 2, 3, 5)
    assert pos.shape == (2, 11, 2)
    assert pos[0, :5].abs().sum() == 0
    assert pos[0, 5:].tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]


def test_rope_first_half_rotates_with_y_second_half_with_x():
    rope = RotaryPositionEmbedding2D(100.0)
    x = torch.randn(1, 2, 4, 16)
    zero = torch.zeros(1, 4, 2, dtype=torch.long)
    torch.testing.assert_close(rope(x, zero), x)  # position (0, 0): identity
    moved_x = zero.clone()
    moved_x[..., 1] = 3
    out = rope(x, moved_x)
    torch.testing.assert_close(out[..., :8], x[..., :8])  # y half untouched
    assert not torch.allclose(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations keep norms


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryPositionEmbedding2D(100.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    pq, pk = torch.tensor([[[4, 7]]]), torch.tensor([[[1, 2]]])
    shift = torch.tensor([[[5, 3]]])
    score = (rope(q, pq) * rope(k, pk)).sum()
    shifted = (rope(q, pq + shift) * rope(k, pk + shift)).sum()
    torch.testing.assert_close(score, shifted, atol=1e-4, rtol=1e-4)


def test_vggt_rope_is_one_shared_leaf_module(tiny):
    ropes = {id(m.attn.rope) for m in [*tiny.aggregator.frame_blocks, *tiny.aggregator.global_blocks]}
    assert ropes == {id(tiny.aggregator.rope)}
    assert RotaryPositionEmbedding2D.fxslim_leaf is True


def test_aggregator_special_tokens_mark_the_first_frame(tiny):
    token = torch.zeros(1, 2, 1, 4)
    token[0, 0], token[0, 1] = 1.0, 2.0
    expanded = tiny.aggregator._special_tokens(token, 2, 3)  # [B*S, 1, C]
    assert expanded[:, 0, 0].tolist() == [1.0, 2.0, 2.0, 1.0, 2.0, 2.0]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def test_vggt_tiny_forward_shapes_for_batched_and_unbatched_input(tiny):
    with torch.no_grad():
        single = tiny(_images(3))
        batched = tiny(_images(2, size=42, batch=2))
    assert single["depth"].shape == (1, 3, 56, 56, 1)
    assert single["depth_conf"].shape == (1, 3, 56, 56)
    assert single["pose_enc"].shape == (1, 3, 9)
    assert batched["depth"].shape == (2, 2, 42, 42, 1)
    assert all(torch.isfinite(v).all() for v in single.values())
    assert bool((single["depth"] > 0).all()) and bool((single["depth_conf"] > 1).all())


def test_aggregator_returns_only_the_layers_the_heads_read():
    torch.manual_seed(0)
    lean = vggt_tiny(depth=6).eval()
    full = vggt_tiny(depth=6, keep_all_layers=True).eval()
    full.load_state_dict(lean.state_dict())
    images = _images(2, size=28, batch=1)
    with torch.no_grad():
        lean_out, start = lean.aggregator(images)
        full_out, _ = full.aggregator(images)
    assert start == 5
    assert sorted(lean_out) == [0, 2, 3, 5] and sorted(full_out) == list(range(6))
    assert lean_out[5].shape == (1, 2, 5 + 4, 2 * 128)  # frame and global outputs concatenated
    torch.testing.assert_close(lean_out[3], full_out[3])


def test_vggt_bad_inputs_raise_value_error(tiny):
    with pytest.raises(ValueError, match="images"):
        tiny(torch.rand(3, 56, 56))
    with pytest.raises(ValueError, match="patch_size"):
        tiny(torch.rand(2, 3, 50, 56))


# ----------------------------------------------------------------------------------------------
# Layout metadata and tracing (what the HTTM pass relies on)
# ----------------------------------------------------------------------------------------------


def test_global_attention_layout_readable_from_metadata_and_positions(tiny):
    agg = tiny.aggregator
    assert all(b.attn.fxslim_frame_layout == {"scope": "global", "special_tokens": 5} for b in agg.global_blocks)
    assert all(b.attn.fxslim_frame_layout["scope"] == "frame" for b in agg.frame_blocks)
    seen = []
    handle = agg.global_blocks[1].attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["pos"]),
                                                                with_kwargs=True)
    with torch.no_grad():
        tiny(_images(3, size=56))
    handle.remove()
    assert frame_layout_from_positions(seen[0]) == agg.frame_layout(3, 56, 56)
    assert agg.frame_layout(3, 56, 56).tokens_per_frame == 5 + 16


@pytest.mark.parametrize("kind", ["frame_blocks", "global_blocks"])
def test_attention_and_block_symbolic_trace_with_rope_as_leaf(tiny, kind):
    agg = tiny.aggregator
    x = torch.randn(1, 2 * 21, 128)
    pos = patch_positions(2, 4, 4, 5).reshape(1, 2 * 21, 2)
    for i, block in enumerate(getattr(agg, kind)):
        for module in (block.attn, block):
            gm = _trace(module)
            sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
            ropes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("rope")]
            assert len(sdpa) == 1 and len(ropes) == 2, f"{kind}.{i}"
            with torch.no_grad():
                torch.testing.assert_close(gm(x, pos), module(x, pos))


def _swap_sdpa_for_httm(attn: Attention, **op_kwargs) -> torch.fx.GraphModule:
    """What the HTTM pass will do: SDPA(q, k, v) -> fxslim::httm_attention(q, k, v, <layout>, <config>)."""
    gm = _trace(attn)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            node.target = torch.ops.fxslim.httm_attention
            node.args, node.kwargs = node.args[:3], op_kwargs
    gm.graph.lint()
    gm.recompile()
    return gm


def _with_httm(model, frames, size, **config):
    layout = model.aggregator.frame_layout(frames, size, size)
    patched = vggt_tiny().eval()
    patched.load_state_dict(model.state_dict())
    for block in patched.aggregator.global_blocks:
        block.attn = _swap_sdpa_for_httm(block.attn, frames=layout.frames,
                                         tokens_per_frame=layout.tokens_per_frame,
                                         special_tokens=layout.special_tokens, **config)
    return patched


def test_vggt_outputs_unchanged_when_httm_at_ratio_zero_replaces_global_sdpa(tiny):
    images = _images(4, size=56)
    patched = _with_httm(tiny, 4, 56, q_ratio=0.0, kv_ratio=0.0, outlier_fraction=0.0, n_s=8, n_t=2)
    assert isinstance(patched.aggregator.global_blocks[0].attn, torch.fx.GraphModule)
    assert not isinstance(patched.aggregator.frame_blocks[0].attn, torch.fx.GraphModule)
    with torch.no_grad():
        reference, merged = tiny(images), patched(images)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-5, rtol=1e-4)


def test_vggt_with_default_httm_runs_and_changes_outputs_a_little(tiny):
    images = _images(4, size=56)
    patched = _with_httm(tiny, 4, 56, n_s=8, n_t=4)
    with torch.no_grad():
        reference, merged = tiny(images), patched(images)
    for key in reference:
        assert merged[key].shape == reference[key].shape
        assert torch.isfinite(merged[key]).all()
    assert not torch.equal(merged["depth"], reference["depth"])
    relative = (merged["depth"] - reference["depth"]).norm() / reference["depth"].norm()
    assert relative < 1e-2  # LayerScale 0.01 keeps attention changes small in the residual stream


def test_capture_traces_aggregator_with_global_sdpa_over_all_frames(tiny):
    from fxslim.capture import capture

    captured = capture(tiny, (_images(3, size=56, batch=1),))
    graph = next(g for g in captured.graphs if g.path == "aggregator")
    sdpa = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    owners = {n.name: next(reversed(n.meta["nn_module_stack"].values()))[0] for n in sdpa}
    global_nodes = [n for n in sdpa if owners[n.name].startswith("global_blocks.")]
    assert len(sdpa) == 2 * tiny.config.depth and len(global_nodes) == tiny.config.depth
    layout = tiny.aggregator.frame_layout(3, 56, 56)
    for node in global_nodes:  # q, k, v [B, H, S*P, d]: one sequence over all frames
        assert tuple(node.args[0].meta["val"].shape) == (1, 2, layout.frames * layout.tokens_per_frame, 64)
