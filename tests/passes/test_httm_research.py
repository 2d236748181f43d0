"""HTTM on multi-view transformers written like research code (tests/research_models.py):
data-dependent RoPE with an assert, positions passed as an argument, shape and channel branches,
a head attention over the frames, a ``.item()``; in a VGGT style and a π³ style.

Through ``fxslim.optimize(model, images, passes=["httm"])`` with default capture and no layout
hints: every global attention is rewritten, no frame or head attention; q=kv=1 is exact on the
example and off it; the layout follows the run-time image size and frame count. The same through
``capture="export"`` (the parts that export) and the torch.compile backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxslim
from fxslim.models.multiview import camera_sequence
from fxslim.models.vggt import vggt_tiny
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


@pytest.mark.parametrize("style", STYLES)
def test_export_capture_exports_what_exports_and_rewrites_global_attention_only(style):
    """torch.export cannot take the head's ``.item()`` branch; the aggregator exports (strict
    export turns ``int(positions.max())`` into an unbacked size), so its global attentions are
    rewritten and the head stays eager, named in the report."""
    model, images = _model(style), _images()
    res = _optimize_export(model, images, EXACT)
    assert "aggregator" in res.report.graphs
    eager = dict(res.report.untraced)
    assert "not exportable" in eager[""] and "camera_head" in eager and "item" not in eager.get("aggregator", "")
    rewritten = sorted(e.fqn for e in res.report.entries("httm") if e.status == "rewritten")
    assert rewritten == ["aggregator.global_blocks.0.attn", "aggregator.global_blocks.1.attn"]
    assert {e.reason for e in res.report.entries("httm") if e.status == "skipped"} == {"local_attention", "no_frame_layout"}
    verdicts = {v.variant: v for v in differential(res.module, model, (images,))}
    assert verdicts["example"].status == "same", summary(list(verdicts.values()))
    assert all(v.status in ("same", "refused", "n/a") for v in verdicts.values()), summary(list(verdicts.values()))


def _optimize_export(model, images, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, (images,), passes=[spec], capture="export")


def _layer_scale_one(model):
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(1.0)
    return model


def _relative(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_defaults_change_the_output_as_much_as_on_fxslims_own_vggt():
    """Paper defaults, 8 frames of a photo sequence, LayerScale 1: eager, export and compile give
    one plan, so one error; it is of the order of the change HTTM makes to the last aggregator
    tokens of fxslim's own VGGT (whose DPT depth head then hides most of it)."""
    images = camera_sequence(frames=8, size=56).images[None]
    model = _layer_scale_one(_model("vggt"))
    with torch.no_grad():
        want = model(images)["depth"]
        errors = {"symbolic": _relative(_optimize(model, images, "httm").module(images)["depth"], want),
                  "export": _relative(_optimize_export(model, images, "httm").module(images)["depth"], want)}
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(model, backend="fxslim", options={"passes": ["httm"], "inner": "aot_eager"})
            errors["compile"] = _relative(compiled(images)["depth"], want)
        torch._dynamo.reset()

        torch.manual_seed(0)
        own = vggt_tiny(init_values=1.0).eval()
        optimized = _optimize(own, images, "httm").module
        last = own.config.depth - 1
        own_change = _relative(optimized.aggregator(images)[0][last], own.aggregator(images)[0][last])
    assert 0 < errors["symbolic"] < 0.1, errors
    assert errors["export"] == pytest.approx(errors["symbolic"], rel=1e-3), errors
    assert errors["compile"] == pytest.approx(errors["symbolic"], rel=1e-3), errors
    assert errors["symbolic"] < 2 * own_change, (errors, own_change)
