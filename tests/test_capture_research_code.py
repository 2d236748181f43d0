"""Capture of research-code patterns that used to hide attention from HTTM or drop modules.

- Symbolic capture of a model that does not trace whole traces its blocks apart; an argument the
  example always leaves at its default (timm's ``attn_mask=None``, ``is_causal=False``) is then
  traced as that constant, guarded, instead of reaching attention as a graph input.
- ``capture="export"``: a failed export leaves nothing (a cached fake tensor) in the module run
  next, and the items of a ModuleList that is never called itself are exported or named eager.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.api import OptimizeResult
from fxslim.capture import capture

EXACT = dict(q=1.0, kv=1.0, outliers=0.0)  # keeps every token: outputs equal SDPA's


class _Attention(nn.Module):
    """timm's Attention signature: the mask and causal flag go straight to SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _Block(nn.Module):
    """timm's Block signature: passes ``attn_mask`` and ``is_causal`` on to attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return x + self.attn(self.norm(x), attn_mask=attn_mask, is_causal=is_causal)


class _MultiView(nn.Module):
    """[B, S, 3, 28, 28] -> frame attention over each frame's 1 + 16 tokens, then global attention
    over all S * 17. The Python loop over frames keeps the model from tracing whole."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 7, 7)
        self.cam = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.02)
        self.frame_block = _Block(dim, heads)
        self.global_block = _Block(dim, heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, S = x.shape[:2]
        t = torch.stack([self.embed(x[:, s]).flatten(2).transpose(1, 2) for s in range(S)], 1)
        t = torch.cat([self.cam.expand(B, S, 1, -1), t], 2)
        _, _, P, C = t.shape
        t = self.frame_block(t.reshape(B * S, P, C))
        return self.global_block(t.reshape(B, S * P, C), attn_mask=attn_mask, is_causal=is_causal)


def _images(frames: int = 4) -> torch.Tensor:
    return torch.rand(1, frames, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def _httm_exact(model: nn.Module, inputs: tuple) -> OptimizeResult:
    """HTTM at its exact limit, with _MultiView's layout: 1 camera token + 16 patches a frame."""
    config = fxslim.HTTM(tokens_per_frame=17, special_tokens=1, **EXACT)
    return fxslim.optimize(model, inputs, passes=[config])


def test_capture_block_argument_at_its_default_in_every_call_is_traced_as_constant():
    """No call passes a mask or ``is_causal=True``: the global attention is rewritten (not
    skipped as masked or causal) and, kept exact, equals the model."""
    torch.manual_seed(0)
    model, x = _MultiView().eval(), _images()
    res = _httm_exact(model, (x,))
    assert [p for p, _ in res.report.untraced] == [""]  # the blocks were traced apart
    assert {e.fqn: e.status for e in res.report.entries("httm")} == {
        "frame_block.attn": "skipped", "global_block.attn": "rewritten"}
    assert res.report.skipped("httm") == {"local_attention": 1}
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given", [
    {"attn_mask": torch.ones(68, 68, dtype=torch.bool).tril()},
    {"is_causal": True},
], ids=["attn_mask", "is_causal"])
def test_capture_block_argument_traced_at_its_default_raises_when_given(given):
    """The rewritten block has no code for a mask: a later call that passes one must raise, not
    silently compute unmasked attention."""
    torch.manual_seed(0)
    model, x = _MultiView().eval(), _images()
    res = _httm_exact(model, (x,))
    assert res.report.rewritten("httm") == 1
    with torch.no_grad():
        assert not torch.allclose(model(x, **given), model(x))  # the argument matters eagerly
        name = next(iter(given))
        with pytest.raises(ValueError, match=rf"{name}: the model was captured with {name}="):
            res.module(x, **given)


def test_capture_block_argument_the_example_gives_stays_an_input():
    """A mask the example passes stays a graph input: the global attention is skipped as masked
    and the model's output, mask applied, is unchanged."""
    torch.manual_seed(0)
    model, x = _MultiView().eval(), _images()
    mask = torch.ones(68, 68, dtype=torch.bool).tril()
    with pytest.warns(UserWarning, match="rewrote nothing"):
        res = _httm_exact(model, (x, mask))
    assert res.report.rewritten("httm") == 0
    assert res.report.skipped("httm") == {"local_attention": 1, "masked": 1}
    with torch.no_grad():
        torch.testing.assert_close(res.module(x, mask), model(x, mask))


class _PositionCache:
    """A plain-object cache as VGGT's PositionGetter: tensors built once per size, kept in a dict."""

    def __init__(self) -> None:
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> torch.Tensor:
        if n not in self.cache:
            self.cache[n] = torch.arange(n)
        return self.cache[n]


class _CachesPositions(nn.Module):
    """Fills its cache while exported (with a fake tensor), then fails to export on ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = _PositionCache()
        self.embed = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, 4]
        x = x + self.embed(self.positions(x.shape[1]))
        if x.abs().max().item() > 1e4:  # a numerical guard: not exportable
            raise ValueError("input out of range")
        return self.lin(x)


def test_capture_export_failed_whole_export_leaves_nothing_in_the_module_run_next():
    """The whole-model export fails after caching a fake tensor; the example run that follows (and
    the captured module) must see a clean cache, not crash on it."""
    model, x = _CachesPositions().eval(), torch.randn(2, 3, 4)
    captured = capture(model, (x,), method="export")
    assert sorted(g.path for g in captured.graphs) == ["embed", "lin"]
    assert not model.positions.cache  # the caller's model was not run
    with torch.no_grad():
        torch.testing.assert_close(captured.module(x), model(x))


class _GuardedBlocks(nn.Module):
    """A stem, then blocks in a ModuleList (called one by one, never as a list), behind a guard
    that does not export; ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max().item() > 1e4:
            raise ValueError("input out of range")
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_capture_export_exports_the_items_of_a_modulelist_and_drops_nothing():
    model, x = _GuardedBlocks().eval(), torch.randn(2, 4)
    captured = capture(model, (x,), method="export")
    assert [g.path for g in captured.graphs] == ["stem", "blocks.0", "blocks.1"]
    eager = dict(captured.untraced)
    assert eager.keys() == {"", "unused"} and "not called" in eager["unused"]
    accounted = [g.path for g in captured.graphs] + list(eager)
    for name, _ in model.named_parameters():  # every weight sits in a graph or in an eager module
        assert any(p and (name == p or name.startswith(f"{p}.")) for p in accounted), name
    with torch.no_grad():
        torch.testing.assert_close(captured.module(x), model(x))


class _FlagBlock(nn.Module):
    """A block told the mode by its parent (``training=self.training``) rather than reading its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pw = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        return x + self.pw(F.dropout(torch.relu(self.conv(x)), 0.5, training))


class _FlagNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.ModuleList([_FlagBlock()]), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        assert x.shape[1] == 8  # the root does not trace: its blocks are traced apart
        for block in self.blocks:
            x = block(x, training=self.training)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_capture_flag_the_parent_passes_as_its_mode_stays_an_input(mode):
    """``training=self.training`` is at its default in one mode only: traced as a constant, QAT
    after an eval-mode prepare (or convert after a train-mode one) raised ValueError."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qat = fxslim.prepare(getattr(_FlagNet(), mode)(), x[:2])
    with torch.no_grad():
        trained, evaluated = qat.train()(x), qat.eval()(x)
    assert not torch.equal(trained, evaluated)  # dropout followed the mode
    assert fxslim.convert(fxslim.calibrate(qat, [x]).eval())(x).shape == (4, 4)


class _MaskedConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(8, 24, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, -1)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=attn_mask)[:, 0]
        return x + self.proj(y.transpose(1, 2).reshape(b, c, h, w))


class _KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks = nn.Conv2d(3, 8, 3, padding=1), nn.ModuleList([_MaskedConvBlock(), _MaskedConvBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        assert x.shape[1] == 8
        for block in self.blocks:
            x = block(x, attn_mask=None)
        return x.mean((2, 3))


def test_prom_integer_model_of_blocks_traced_apart_takes_their_arguments_by_keyword():
    """The integer parts named their inputs after the graph's placeholders (``attn_mask_1``), so the
    parent's ``block(x, attn_mask=None)`` raised TypeError."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qat = fxslim.calibrate(fxslim.prepare(_KeywordNet().eval(), x[:2]), [x]).eval()
    with torch.no_grad():
        assert torch.equal(fxslim.convert(qat)(x), qat(x))


class _VarargsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.conv(x) * scale


class _VarargsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), _VarargsBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        assert x.shape[1] == 8
        return self.block(x, scale=1.0)


def test_capture_keyword_only_argument_after_varargs_still_traces():
    """fx cannot write ``forward(x, *extra, scale=1.0)`` with ``scale`` a constant (a default before
    an argument without one): the block stayed eager; it is traced without the constant instead."""
    captured = capture(_VarargsNet().eval(), (torch.randn(2, 3, 8, 8),))
    assert "block" in [graph.path for graph in captured.graphs]


def _reloaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_parts_traced_with_a_constant_argument_save_and_load_with_their_guard():
    """torch.load rebuilds a GraphModule by tracing its code, where the guard compared a Proxy (and
    fx's own _assert_is_none could not be found): the optimized and the converted models of blocks
    traced with attn_mask=None failed to load."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    optimized = fxslim.optimize(_KeywordNet().eval(), x, passes=["haste:L=8"]).module
    qat = fxslim.calibrate(fxslim.prepare(_KeywordNet().eval(), x[:2]), [x]).eval()
    for model in (optimized, fxslim.convert(qat)):
        loaded = _reloaded(model)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        with pytest.raises(ValueError, match="attn_mask"):
            loaded.blocks[0](torch.randn(4, 8, 8, 8), attn_mask=torch.zeros(64, 64, dtype=torch.bool))


def test_capture_in_both_modes_leaves_the_random_generator_as_it_was():
    """The example's run in train mode drew dropout masks from the global generator: code seeded
    before optimize drew other numbers after it."""
    torch.manual_seed(0)
    model, x = _FlagNet().eval(), torch.randn(4, 3, 8, 8)
    state = torch.get_rng_state()
    fxslim.optimize(model, x, passes=["haste:L=8"])
    assert torch.equal(torch.get_rng_state(), state)


class _SizeCache(dict):
    """An LRU-style cache: a dict subclass."""


class _PositionGetter:
    """VGGT's PositionGetter: a plain object (not a module) caching each size's positions in a dict."""

    def __init__(self, cache: dict) -> None:
        self.cache = cache

    def __call__(self, n: int, device: torch.device) -> torch.Tensor:
        if n not in self.cache:
            self.cache[n] = torch.arange(n, device=device)
        return self.cache[n]


class _SlottedPositions:
    __slots__ = ("cache",)

    def __init__(self) -> None:
        self.cache = {}

    __call__ = _PositionGetter.__call__


class _CachedRope(nn.Module):
    """Reads its cached positions' maximum as a Python int (VGGT's RoPE): no trace, and no fake run.
    ``holder``: where the cache lives."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        getter = _SlottedPositions() if holder == "slots" else _PositionGetter(
            _SizeCache() if holder == "dict_subclass" else {})
        self.positions = (getter,) if holder == "tuple" else getter

    @property
    def getter(self):
        return self.positions[0] if isinstance(self.positions, tuple) else self.positions

    def forward(self, x):
        pos = self.getter(x.shape[-1], x.device)
        table = torch.linspace(0, 1, int(pos.max()) + 1, device=x.device)
        return x * table[pos]


class _WithCachedRope(nn.Module):
    def __init__(self, holder: str) -> None:
        super().__init__()
        self.conv, self.rope = nn.Conv2d(3, 8, 3, padding=1), _CachedRope(holder)

    def forward(self, x):
        return self.rope(self.conv(x))


@pytest.mark.parametrize("holder", ["object", "dict_subclass", "tuple", "slots"])
def test_a_cache_in_a_plain_object_keeps_no_fake_tensor_from_shape_propagation(holder):
    """Shape propagation ran the module on fake tensors first, which cached a FakeTensor in the
    object's dict; the real-value run it falls back to then read it and failed (and where no run read
    it, the model returned kept it, failing on its first call). Also a dict subclass, an object in a
    tuple, and one with ``__slots__``."""
    torch.manual_seed(0)
    model, x = _WithCachedRope(holder).eval(), torch.randn(2, 3, 16, 16)
    result = fxslim.optimize(model, x, passes=["haste:L=48,sparsity=0,skip_stem=False"])
    assert result.report.rewritten("haste") == 1
    assert not model.rope.getter.cache  # the user's model was not run
    cached = [v for v in result.module.rope.getter.cache.values()]
    assert all(type(v) is torch.Tensor for v in cached)
    with torch.no_grad():
        assert (result.module(x) - model(x)).abs().max() < 1e-5


class _HeadInFloat32(nn.Module):
    """VGGT's heads: run in float32 under ``torch.autocast(enabled=False)`` whatever the caller's autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.body(x))
        with torch.autocast("cpu", enabled=False):
            return self.head(y.float())


def test_a_forward_entering_autocast_stays_eager():
    """A symbolic trace drops ``with torch.autocast(...)``: under the caller's bfloat16 autocast the
    rewritten model's head ran in bfloat16 and returned bfloat16 where the model returns float32."""
    torch.manual_seed(0)
    model, x = _HeadInFloat32().eval(), torch.randn(2, 3, 16, 16)
    result = fxslim.optimize(model, x, passes=["haste:L=48,sparsity=0,skip_stem=False"])
    assert any("autocast" in reason for path, reason in result.report.untraced if path == "")
    assert result.report.rewritten("haste") == 2  # its children, traced apart
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = result.module(x), model(x)
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5


class _AttentionUnderCudaAutocast(nn.Module):
    """Fast3R's attention as it ships: SDPA inside ``torch.autocast("cuda", dtype=torch.bfloat16)``,
    then a branch on the dtype. On CPU tensors the CUDA autocast changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        dtype = k.dtype
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.scaled_dot_product_attention(q, k, v)
            if dtype == torch.float32:
                y = y.to(torch.float32)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


def test_an_autocast_for_another_device_than_the_examples_is_traced_and_the_device_guarded():
    """It kept every Fast3R attention eager: HTTM saw none. The graph holds for the example's
    device: a guard on each input's device (a CUDA call would autocast), and CPU autocast still
    keeps a module eager (``test_a_forward_entering_autocast_stays_eager``)."""
    import warnings

    model, x = _AttentionUnderCudaAutocast().eval(), torch.randn(2, 10, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast"
        captured = capture(model, (x,))
        assert captured.untraced == []
        (graph,) = captured.graphs
        guards = [n.args[:3] for n in graph.gm.graph.nodes if "check_traced_attribute" in str(n.target)]
        assert (graph.gm.graph.find_nodes(op="placeholder")[0], "device", torch.device("cpu")) in guards
        other = torch.randn(3, 7, 16)
        with torch.no_grad():
            torch.testing.assert_close(graph.gm(other), model(other))


class _InferenceOnly(nn.Module):
    """Refuses train mode in its own ``train()``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("inference only")
        return super().train(False)

    def forward(self, x):
        return self.conv(x).relu()


class _BranchesOnData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.conv = _InferenceOnly(), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.conv(y)


def test_a_module_refusing_the_other_mode_is_still_captured():
    """Capture runs a copy in the other mode to find constant arguments; a ``train()`` that raises
    means the model does not run there, as a forward that raises does (not a failed optimize)."""
    result = fxslim.optimize(_BranchesOnData().eval(), torch.randn(1, 3, 16, 16),
                             passes=["haste:L=16,sparsity=0,skip_stem=False"])
    assert result.report.rewritten("haste") == 2


class _Float32InEval(nn.Module):
    """Enters ``torch.autocast(enabled=False)`` in eval mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        with contextlib.nullcontext() if self.training else torch.autocast("cpu", enabled=False):
            return self.conv(x)


def test_autocast_entered_in_the_other_mode_keeps_the_graph_in_the_mode_traced():
    """Traced in train mode, the graph followed ``.eval()`` (the two modes' graphs are the same) and ran
    without the autocast context the model enters there."""
    from fxslim.capture import trace
    from fxslim.ir import META_FROZEN_MODE

    assert trace(_Float32InEval().train()).meta.get(META_FROZEN_MODE) == "train"


def test_autocast_watches_nest_and_put_autocast_back():
    """An inner watch's exit removed the outer's list (``[] == []``): the outer counted nothing and
    autocast stayed patched for good."""
    from fxslim.capture import _autocast_entries

    enter = torch.amp.autocast_mode.autocast.__enter__
    with _autocast_entries() as outer:
        with _autocast_entries() as inner:
            pass
        with torch.autocast("cpu", enabled=False):
            pass
    assert (len(outer), len(inner)) == (1, 0)
    assert torch.amp.autocast_mode.autocast.__enter__ is enter


class _Cond(nn.Module):
    """A data-dependent branch written with torch.cond."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 16)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.a(x).sum(0), lambda x: self.b(x)[:, :8].sum(0), (x,))


def test_a_model_with_torch_cond_is_estimated_and_optimized():
    # the example run's and the cost model's dispatch modes had no rule for torch.cond: NotImplementedError
    torch.manual_seed(0)
    model, x = _Cond().eval(), torch.randn(2, 8)
    report = fxslim.estimate(model, x)
    assert "cond" in report.unknown_ops  # not priced, and said so, as under capture="export"
    result = fxslim.optimize(model, x, passes=["haste:L=14"])
    with torch.no_grad():
        for sample in (x, -x.abs()):
            torch.testing.assert_close(result.module(sample), model(sample))


class _LeafInFloat32(nn.Module):
    fxslim_leaf = True  # never traced: its autocast is its own

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return x * 2


class _BranchAfterLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.leaf, self.head = nn.Conv2d(3, 8, 3, padding=1), _LeafInFloat32(), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.leaf(self.conv(x))
        if y.dtype == torch.float32:
            y = y.relu()
        return self.head(y)


def test_the_example_a_dtype_comparison_needs_runs_outside_the_trace():
    """It ran inside the trace's watches: the leaf's autocast counted as the root's, which stayed
    eager ("enters torch.autocast"); its draws would have counted too, and it ran with nn.Module's
    methods patched by the trace."""
    model, x = _BranchAfterLeaf().eval(), torch.randn(2, 3, 8, 8)
    captured = capture(model, (x,))
    assert captured.untraced == [] and [g.path for g in captured.graphs] == [""]
    with torch.no_grad():
        torch.testing.assert_close(captured.graphs[0].gm(x), model(x))
