"""Rewrites keep the model's meaning on inputs other than the example (docs/INVARIANTS.md).

One regression test per way main once changed what a model computes without a word: in-place ops
deleted, a buffer's update lost, HTTM reading another image size as another frame count, HASTE
re-striding weights, a frame attention after a graph break taken for global; and the differential
harness (tests/differential.py) at each pass's exact limit on small models.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.models.vggt import vggt_tiny
from tests.differential import differential, input_variants, summary
from tests.test_capture_research_code import _reloaded

pytestmark = pytest.mark.usefixtures("one_thread")

HASTE_EXACT = "haste:L=48,sparsity=0,skip_stem=False"  # every bucket a singleton: the dense conv
HTTM_EXACT = "httm:q=1,kv=1,outliers=0"  # every token kept: SDPA
INPLACE_STYLES = ("method", "functional", "functional_positional", "module", "clamp", "torch_function")


class _InPlaceNet(nn.Module):
    """conv -> ReLU written as an in-place op whose result is unused -> conv; style "none" is the
    same net written out of place."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.style == "none":
            y = torch.relu(y)
        elif self.style == "method":
            y.relu_()
        elif self.style == "functional":
            F.relu(y, inplace=True)
        elif self.style == "functional_positional":
            F.relu(y, True)
        elif self.style == "module":
            self.act(y)
        elif self.style == "clamp":
            y.clamp_(min=0)
        elif self.style == "torch_function":
            torch.relu_(y)
        return self.b(y)


def _net(style: str) -> nn.Module:
    torch.manual_seed(0)
    return _InPlaceNet(style).eval()


def _x(batch: int = 2, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _optimize(model, x, passes, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, (x,), passes=passes, **kwargs)


# ----------------------------------------------------------------------------------------------
# In-place ops and buffer writes


@pytest.mark.parametrize("style", INPLACE_STYLES)
def test_in_place_op_survives_haste(style):
    model, x = _net(style), _x()
    res = _optimize(model, x, [HASTE_EXACT])
    assert res.report.rewritten("haste") == 2
    torch.testing.assert_close(res.module(x), model(x.clone()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", ("method", "functional", "module", "torch_function"))
def test_in_place_op_survives_prom_prepare_and_convert(style):
    x, calib = _x(), [(_x(seed=s),) for s in range(3)]
    quantized = {}
    for variant in (style, "none"):
        qat = fxslim.calibrate(fxslim.prepare(_net(variant), (x,)), calib).eval()
        quantized[variant] = (qat, fxslim.convert(qat))
    with torch.no_grad():
        torch.testing.assert_close(quantized[style][0](x), quantized["none"][0](x), rtol=0, atol=0)
        torch.testing.assert_close(quantized[style][1](x), quantized["none"][1](x), rtol=0, atol=0)


@pytest.mark.parametrize("style", ("method", "functional", "clamp"))
def test_in_place_op_survives_the_compile_backend(style):
    model, x = _net(style), _x()
    compiled = torch.compile(model, backend="fxslim", options={"inner": "aot_eager", "passes": [HASTE_EXACT]})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.clone()), model(x.clone()), rtol=1e-4, atol=1e-4)


class _Counter(nn.Module):
    """A buffer updated in forward (a call counter) next to two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("unused", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.b(torch.relu(self.a(x)))


def test_buffer_updated_in_forward_keeps_updating_and_stays_in_state_dict():
    torch.manual_seed(0)
    model, x = _Counter().eval(), _x()
    res = _optimize(model, x, [HASTE_EXACT])
    assert res.report.rewritten("haste") == 2  # the convs are still rewritten, the root stays eager
    assert any("add_" in reason or "in place" in reason for _, reason in res.report.untraced)
    assert set(model.state_dict()) <= set(res.module.state_dict())  # plus HASTE's hyperplanes
    assert res.module.calls.item() == 0  # optimizing ran the example, but undid what it did to buffers
    res.module(x)
    res.module(x)
    assert res.module.calls.item() == 2 and model.calls.item() == 0


def test_traced_module_keeps_buffers_its_forward_never_reads():
    torch.manual_seed(0)
    model, x = _net("none"), _x()
    model.register_buffer("running_thing", torch.arange(3.0))
    res = _optimize(model, x, [HASTE_EXACT])
    assert set(model.state_dict()) <= set(res.module.state_dict())  # plus HASTE's hyperplanes
    missing, unexpected = res.module.load_state_dict(model.state_dict(), strict=False)  # a checkpoint of the original
    assert not unexpected and all(key.endswith("haste_planes") for key in missing)


# ----------------------------------------------------------------------------------------------
# HASTE weights


def test_haste_leaves_weights_viewable_and_saveable():
    safetensors = pytest.importorskip("safetensors.torch")

    class ViewsItsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x)) + self.b.weight.view(-1).sum()

    torch.manual_seed(0)
    model, x = ViewsItsWeight().eval(), _x()
    res = _optimize(model, x, [HASTE_EXACT])
    assert res.report.rewritten("haste") == 2
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-4)
    state = {k: v for k, v in res.module.state_dict().items()}
    assert all(v.is_contiguous() for v in state.values())
    safetensors.save(state)  # raises on non-contiguous tensors


# ----------------------------------------------------------------------------------------------
# HTTM: other image sizes, frame attention after a graph break


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vggt_tiny().eval()


def _images(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_httm_follows_the_image_size_at_run_time(tiny):
    res = _optimize(tiny, _images(3, 28), [HTTM_EXACT])
    assert res.report.rewritten("httm") == tiny.config.depth
    for frames, size in ((3, 14), (2, 42), (4, 28)):  # 14 px: 18 tokens, once misread as 2 frames x 9
        images = _images(frames, size, seed=1)
        with torch.no_grad():
            want, got = tiny(images), res.module(images)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_httm_report_says_how_the_layout_is_found_at_run_time(tiny):
    res = _optimize(tiny, _images(3, 28), [HTTM_EXACT])
    runtime = {e.info["runtime_layout"] for e in res.report.entries("httm") if e.status == "rewritten"}
    assert len(runtime) == 1 and "size(-2)" in next(iter(runtime))


class _Views(nn.Module):
    """Multi-view images to per-token outputs through global attention, with no RoPE positions (the
    layout comes from ``HTTM(tokens_per_frame=...)`` and the 5-d input): [B, S, 3, H, W] images, or a
    channels-first clip [B, 3, T, H, W]; optional masks [B, S, 1, H, W] scale the images."""

    def __init__(self, channels_first: bool = False, dim: int = 16, patch: int = 7) -> None:
        super().__init__()
        self.channels_first = channels_first
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.special = nn.Parameter(torch.randn(1, 2, dim))
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_first:
            images = images.transpose(1, 2)
        if masks is not None:
            images = images * masks
        b, s, c, h, w = images.shape
        t = self.embed(images.reshape(b * s, c, h, w)).flatten(2).transpose(1, 2)
        t = torch.cat([self.special.expand(b * s, -1, -1), t], 1).reshape(b, -1, t.shape[-1])
        q, k, v = self.qkv(t).reshape(b, t.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


_VIEWS_HTTM = "httm:tokens_per_frame=18,special_tokens=2,n_s=4,n_t=2"  # 2 + 4·4 tokens at 28 px


@pytest.mark.parametrize("channels_first", [False, True])
def test_httm_reads_the_frames_of_an_input_with_as_many_frames_as_channels(channels_first):
    """An example of 3 RGB views ([B, 3, 3, H, W], or a channels-first clip of 3 frames) cannot say
    which dim holds the frames: the rewritten graph reads it at run time (it kept the example's tokens
    per frame at every size, and merged across frames there), and computes what a frames-first
    model rewritten at a 4-frame example computes."""
    torch.manual_seed(0)
    reference = _Views().eval()
    model = _Views(channels_first).eval()
    model.load_state_dict(reference.state_dict())

    def views(frames: int, size: int, seed: int) -> torch.Tensor:
        return torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def laid_out(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).contiguous() if channels_first else x

    at_3 = _optimize(model, laid_out(views(3, 28, 0)), [_VIEWS_HTTM], strict=True)
    at_4 = _optimize(reference, views(4, 28, 0), [_VIEWS_HTTM], strict=True)
    (layout,) = {e.info["runtime_layout"] for e in at_3.report.entries("httm") if e.status == "rewritten"}
    assert "clip_frames" in layout
    for frames, size in ((3, 14), (2, 35), (5, 21)):
        x = views(frames, size, frames)
        with torch.no_grad():
            assert torch.equal(at_3.module(laid_out(x)), at_4.module(x))


def test_httm_reads_the_frames_of_images_given_with_masks():
    """Two [B, S, C, H, W] inputs (images and their masks) hold the same frames: the layout follows
    them, as with the images alone (it stayed at the example's tokens per frame)."""
    torch.manual_seed(0)
    model = _Views().eval()
    images = torch.rand(1, 4, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_masks = fxslim.optimize(model, (images, torch.ones(1, 4, 1, 28, 28)), passes=[_VIEWS_HTTM], strict=True)
    alone = _optimize(model, images, [_VIEWS_HTTM], strict=True)
    x = torch.rand(1, 3, 3, 21, 35)
    with torch.no_grad():
        assert torch.equal(with_masks.module(x, torch.ones(1, 3, 1, 21, 35)), alone.module(x))


class _FrameThenGlobal(nn.Module):
    """Frame attention over [B*S, P, C] then, after a graph break, the same attention module over
    [B*S, P, C] again: both are frame attention, whatever the first input of the second graph is."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def attend(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, P, C]
        b, s, p, c = x.shape
        frames = self.attend(x.reshape(b * s, p, c))
        torch._dynamo.graph_break()
        return self.attend(frames).reshape(b, s, p, c)


def test_frame_attention_after_graph_break_is_not_rewritten_as_global():
    torch.manual_seed(0)
    model, x = _FrameThenGlobal().eval(), torch.randn(2, 3, 7, 16)
    seen: list = []
    compiled = torch.compile(model, backend="fxslim",
                             options={"on_report": seen.append, "inner": "eager",
                                      "passes": ["httm:tokens_per_frame=7,special_tokens=1"]})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    entries = [e for graph in seen for r in graph for e in r.entries]
    assert len(entries) == 2 and all(e.status == "skipped" for e in entries), entries


# ----------------------------------------------------------------------------------------------
# The differential harness


def test_input_variants_cover_batch_size_and_nan():
    names = [v.name for v in input_variants((_x(),))]
    assert names == ["example", "batch", "size 6x6", "size 24x24", "nan"]
    nan = input_variants((_x(),))[-1].inputs[0]
    assert nan.isnan().sum() == 1 and nan[1].isnan().any()


def test_differential_flags_a_silent_difference():
    """The harness itself: a model that differs from its reference off the example is 'differs'."""

    class OffByBatch(nn.Module):
        def forward(self, x):
            return x * (2.0 if x.shape[0] == 2 else 3.0)

    class Double(nn.Module):
        def forward(self, x):
            return x * 2.0

    class MovesNaNSample(nn.Module):  # the finite values of a sample holding a NaN move (HASTE's tiles did)
        def forward(self, x):
            return x * 2.0 + x.flatten(1).isnan().any(1).view(-1, *[1] * (x.dim() - 1))

    verdicts = {v.variant: v.status for v in differential(OffByBatch(), Double(), (_x(),))}
    assert verdicts["example"] == "same" and verdicts["batch"] == "differs" and verdicts["nan"] == "differs"
    verdicts = {v.variant: v.status for v in differential(MovesNaNSample(), Double(), (_x(),))}
    assert verdicts["batch"] == "same" and verdicts["nan"] == "differs"


@pytest.mark.parametrize("style", ("none", "method"))
def test_differential_haste_exact_on_every_variant(style):
    model, x = _net(style), _x()
    res = _optimize(model, x, [HASTE_EXACT])
    verdicts = differential(res.module, model, (x,))
    assert {v.status for v in verdicts} == {"same"}, summary(verdicts)


def test_differential_httm_exact_on_vggt(tiny):
    images = _images(3, 28)
    res = _optimize(tiny, images, [HTTM_EXACT])
    verdicts = differential(res.module, tiny, (images,))
    assert len(verdicts) == 4 and {v.status for v in verdicts} == {"same"}, summary(verdicts)


def test_safetensors_round_trip_of_a_rewritten_model():
    safetensors = pytest.importorskip("safetensors.torch")
    model, x = _net("none"), _x()
    res = _optimize(model, x, [HASTE_EXACT])
    blob = safetensors.save(dict(res.module.state_dict()))
    loaded = safetensors.load(blob)
    assert all(torch.equal(loaded[k], v) for k, v in res.module.state_dict().items())
    buffer = io.BytesIO()
    torch.save(res.module.state_dict(), buffer)
    assert buffer.tell() > 0


def test_differential_counts_an_exported_models_shape_guard_as_a_refusal(tiny):
    images = _images(3, 28)
    res = _optimize(tiny, images, [HTTM_EXACT], capture="export")
    verdicts = {v.variant: v for v in differential(res.module, tiny, (images,))}
    assert verdicts["example"].status == "same"
    assert verdicts["size 14x14"].status == "refused" and "Guard failed" in verdicts["size 14x14"].detail


# ----------------------------------------------------------------------------------------------
# Clear errors met on the way


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3)

    def forward(self, x, mask=None):
        y = self.a(x)
        if mask is not None:
            y = y * mask
        return self.b(y)


def test_default_argument_the_example_leaves_out_is_traced_at_its_default_and_guarded():
    torch.manual_seed(0)
    model, x = _Masked().eval(), _x()
    res = _optimize(model, x, [HASTE_EXACT])
    assert res.report.rewritten("haste") == 2 and not res.report.untraced
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"mask: the model was captured with mask=None .* Pass mask in example_inputs"):
        res.module(x, torch.ones(1, 8, 1, 1))


def test_conv_the_example_never_reaches_is_skipped_as_not_reached():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            if y.sum() > 1e9:  # data-dependent: the root stays eager, a and b are traced alone
                return self.b(y)
            return y

    res = _optimize(Branchy().eval(), _x(), ["haste:skip_stem=False"])
    entries = {e.fqn: e for e in res.report.entries("haste")}
    assert entries["b"].reason == "not_reached" and "not reached by the example" in entries["b"].detail


@pytest.mark.parametrize("spec,match", [
    ("haste:seed=18446744073709551615", r"HASTE\.seed: expected 0 <= seed <= 4294967295"),
    ("haste:tile=100000", r"HASTE\.tile: expected 1 <= tile <= 64"),
    ("httm:n_s=9223372036854775808", r"HTTM\.n_s: expected 1 <= n_s <= 9223372036854775807"),
    ("httm:n_t=9223372036854775808", r"HTTM\.n_t: expected 1 <= n_t <= 9223372036854775807"),
])
def test_config_ints_beyond_what_the_ops_take_are_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match):
        fxslim.parse_pass(spec)


def test_compile_reports_go_to_the_callback_of_that_compile_only():
    first, second = [], []
    model, x = _net("none"), _x()
    for sink in (first, second):
        compiled = torch.compile(model, backend="fxslim",
                                 options={"inner": "eager", "passes": [HASTE_EXACT], "on_report": sink.append})
        with torch.no_grad():
            compiled(x)
        torch._dynamo.reset()
    assert len(first) == len(second) == 1 and first[0][0].rewritten == 2
    with pytest.raises(Exception, match=r"on_report'\]: expected a callable"):
        torch.compile(model, backend="fxslim", options={"on_report": 3})(x)


def test_httm_layouts_read_at_run_time_survive_save_and_load():
    """``torch.load`` rebuilds a GraphModule by tracing its code again: the layout functions a rewritten
    graph calls (``frame_layout_from_positions`` from RoPE positions, ``clip_frames`` for S == C) ran
    on the tracer's proxies and failed ("symbolically traced variables cannot be used as inputs to
    control flow"). They record themselves, and the reloaded model computes the same."""
    from tests.research_models import VGGTStyle

    torch.manual_seed(0)
    views = torch.rand(1, 3, 3, 28, 28)
    cases = [(VGGTStyle().eval(), torch.rand(1, 4, 3, 28, 28), "httm:n_s=4,n_t=2", "frame_layout_from_positions"),
             (_Views().eval(), views, _VIEWS_HTTM, "clip_frames")]
    for model, x, spec, layout in cases:
        result = _optimize(model, x, [spec], strict=True)
        assert any(layout in e.info["runtime_layout"] for e in result.report.entries("httm") if e.status == "rewritten")
        loaded = _reloaded(result.module)
        again = _optimize(loaded, x, [spec])  # captured again: the rewritten attentions are seen and kept
        assert again.report.skipped("httm")["already_rewritten"] == result.report.rewritten("httm")
        for other in (x, torch.rand(1, 2, 3, 21, 35)):
            with torch.no_grad():
                want = result.module(other)
                for got in (loaded(other), again.module(other)):
                    assert all(map(torch.equal, _leaves(got), _leaves(want))) and _leaves(got)


def _leaves(out) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_leaves(out)


def test_httm_layout_from_positions_takes_an_empty_batch():
    """A layout read from RoPE positions failed on an empty batch (IndexError on ``pos[0]``), where a
    model whose positions come from a cache returns empty outputs: it is one frame, whose attention
    is SDPA's, empty."""
    from fxslim.runtime.frame_layout import frame_layout_from_positions

    layout = frame_layout_from_positions(torch.zeros(0, 4 * 21, 2, dtype=torch.long), 5)
    assert (layout.frames, layout.tokens_per_frame) == (1, 4 * 21)
    q = torch.rand(0, 2, 4 * 21, 8)
    out = torch.ops.fxslim.httm_attention(q, q, q, layout.frames, layout.tokens_per_frame, layout.special_tokens)
    assert out.shape == q.shape
