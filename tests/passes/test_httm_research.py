"""HTTM on multi-view transformers written like research code (tests/research_models.py):
data-dependent RoPE with an assert, positions passed as an argument, shape and channel branches,
a head attention over the frames, a ``.item()``; in a VGGT style and a π³ style.

Through ``fxslim.optimize(model, images, passes=["httm"])`` with default capture and no layout
hints: every global attention is rewritten, no frame or head attention; q=kv=1 is exact on the
example and off it; the layout follows the run-time image size and frame count.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxslim
from fxslim.models.multiview import camera_sequence
from tests.differential import differential, summary
from tests.research_models import Pi3Style, VGGTStyle

pytestmark = pytest.mark.usefixtures("one_thread")

STYLES = {"vggt": VGGTStyle, "pi3": Pi3Style}
EXACT = "httm:q=1,kv=1,outliers=0"


def _model(style: str):
    torch.manual_seed(0)
    return STYLES[style]().eval()


def _images(frames: int = 4, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _optimize(model, images, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, (images,), passes=[spec])


@pytest.mark.parametrize("style", STYLES)
def test_every_global_attention_rewritten_and_no_other(style):
    model = _model(style)
    res = _optimize(model, _images(), "httm")
    rewritten = sorted(e.fqn for e in res.report.entries("httm") if e.status == "rewritten")
    assert rewritten == ["aggregator.global_blocks.0.attn", "aggregator.global_blocks.1.attn"]
    skipped = {e.fqn: e.reason for e in res.report.entries("httm") if e.status == "skipped"}
    assert skipped == {"aggregator.frame_blocks.0.attn": "local_attention",
                       "aggregator.frame_blocks.1.attn": "local_attention",
                       "camera_head.block.attn": "no_frame_layout"}
    assert any("traced as a leaf" in reason for _, reason in res.report.untraced)  # the RoPE module


@pytest.mark.parametrize("style", STYLES)
def test_exact_limit_equals_the_model_on_every_input_variant(style):
    model, images = _model(style), _images()
    res = _optimize(model, images, EXACT)
    verdicts = differential(res.module, model, (images,))
    assert {v.status for v in verdicts} == {"same"}, summary(verdicts)
    for frames, size in ((2, 14), (6, 42)):  # the layout is read from the positions on every call
        other = _images(frames, size, seed=3)
        with torch.no_grad():
            want, got = model(other), res.module(other)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_four_dimensional_input_still_finds_the_global_attention(style):
    """[S, 3, H, W] images: the model adds the batch dim, so the example's first dim is the frame
    count; the positions, not the batch, say the global attention spans the frames."""
    model, frames = _model(style), camera_sequence(frames=6, size=28).images
    res = _optimize(model, frames, "httm:n_s=8,n_t=4")
    assert res.report.rewritten("httm") == 2
    with torch.no_grad():
        want, got = model(frames), res.module(frames)
    for key in want:
        relative = ((got[key] - want[key]).norm() / want[key].norm()).item()
        assert 0 < relative < 1e-2, (key, relative)  # changed a little, as on fxslim's vggt_small


def test_optimized_model_compiles_and_stays_exact():
    """torch.compile(backend="fxslim") cannot see positions past the RoPE's graph break; rewriting
    first and compiling the result works, at other frame counts and sizes too."""
    model, images = _model("vggt"), _images()
    compiled = torch.compile(_optimize(model, images, EXACT).module, backend="aot_eager")
    with torch.no_grad():
        for other in (images, _images(3, 14, seed=4)):
            want, got = model(other), compiled(other)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_torch_compile_backend_with_scalar_capture_rewrites_global_attention_only(style):
    """With capture_scalar_outputs, the RoPE's int(positions.max()) stays in the graph, so the
    backend reads the layout there; the head's .item() branch still breaks the graph."""
    model, images = _model(style), _images()
    seen: list = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(model, backend="fxslim",
                                 options={"passes": [EXACT], "inner": "aot_eager", "on_report": seen.append})
        with torch.no_grad():
            got, want = compiled(images), model(images)
    torch._dynamo.reset()
    entries = [e for graph in seen for report in graph for e in report.entries]
    assert len(seen) >= 2  # a graph break happened
    assert sorted(e.fqn for e in entries if e.status == "rewritten") == [
        "aggregator.global_blocks.0.attn", "aggregator.global_blocks.1.attn"]
    assert {e.reason for e in entries if e.status == "skipped"} == {"local_attention", "no_frame_layout"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_torch_compile_backend_without_scalar_capture_says_what_to_set():
    model, images = _model("vggt"), _images()
    seen: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxslim", options={"passes": ["httm"], "inner": "eager", "on_report": seen.append})
    with torch.no_grad():
        compiled(images)
    torch._dynamo.reset()
    entries = [e for graph in seen for report in graph for e in report.entries]
    assert not any(e.status == "rewritten" for e in entries)
    assert any("capture_scalar_outputs = True" in e.detail for e in entries), entries
