"""torch.compile(backend="fxslim"): entry point, inner compilers, graph breaks, dynamic shapes."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim.backend
from tests.toy_pass import ToyScalePointwise  # noqa: F401  (registers "toy")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_backend_is_found_through_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "fxslim" and ep.value == "fxslim.backend:compile_fn" for ep in eps)
    code = "import torch._dynamo as d; print('fxslim' in d.list_backends())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_backend_runs_passes_then_inner_compiler(inner):
    model, x = _net(), torch.randn(2, 3, 8, 8)
    seen: list = []
    compiled = torch.compile(model, backend="fxslim",
                             options={"on_report": seen.append, "passes": ["toy:scale=2"], "inner": inner})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), 2 * model(x), rtol=1e-4, atol=1e-4)
    (reports,) = seen
    assert reports[0].rewritten == 1


def test_backend_without_passes_matches_eager():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="fxslim", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x))


def test_backend_graph_break_and_dynamic_shapes():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    model = Broken().eval()
    seen: list = []
    compiled = torch.compile(model, backend="fxslim", dynamic=True,
                             options={"on_report": seen.append, "passes": ["toy:scale=2"], "inner": "eager"})
    with torch.no_grad():
        for n in (1, 3, 5):
            x = torch.randn(n, 3, 6, 6)
            torch.testing.assert_close(compiled(x), 2 * model.b(2 * model.a(x)), rtol=1e-4, atol=1e-4)
    reports = seen
    assert len(reports) >= 2 and all(r[0].rewritten == 1 for r in reports)


def test_backend_bad_options_raise():
    model, x = _net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(Exception, match=r"inner'\]: expected one of"):
        torch.compile(model, backend="fxslim", options={"inner": "tvm"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown \['pases'\]"):
        torch.compile(model, backend="fxslim", options={"pases": ["toy"]})(x)


def test_haste_under_dynamic_shapes_still_tells_the_stem_from_the_convs_after_batch_norm():
    """dynamic=True lifts each BN's momentum and eps to 0-d graph inputs: they are not the image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    torch._dynamo.reset()
    reports: list = []
    compiled = torch.compile(model, backend="fxslim", dynamic=True,
                             options={"passes": ["haste:L=14"], "inner": "eager", "on_report": reports.append})
    with torch.no_grad():
        compiled(torch.randn(2, 3, 32, 32))
    assert [(r.rewritten, dict(r.skipped)) for batch in reports for r in batch] == [(2, {"stem": 1})]


class _SelfNamedS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(s, x):  # noqa: N805  (research code names self otherwise)
        return s.conv(torch.relu(s.bn(s.stem(x))))


def test_backend_finds_the_weights_of_a_model_reached_as_a_global_or_under_another_name():
    """Weights were recognised by dynamo's placeholder names for ``self``/``fn``/``mod``/``model``/``m``
    only: a function calling a global model, or ``forward(s, x)``, had every conv skipped as 'stem'."""
    torch.manual_seed(0)
    net, x = _SelfNamedS().eval(), torch.randn(2, 3, 16, 16)

    def call_global(inputs):
        return net(inputs)

    expected = fxslim.optimize(net, x, passes=["haste:L=14"]).module(x)
    for fn in (net, call_global):
        reports = []
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="fxslim",
                                 options={"passes": ["haste:L=14"], "inner": "eager", "on_report": reports.extend})
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-6)
        (report,) = reports
        assert report.rewritten == 1 and dict(report.skipped) == {"stem": 1}
        # named as optimize names them, not 'L.s.stem' (a global's keep its name: 'G.net.stem')
        assert {e.fqn.removeprefix("G.net.") for e in report.entries} == {"stem", "conv"}



def test_two_models_passed_to_one_compiled_function_keep_their_names_apart():
    """Module paths from a frame's locals lost the local's name to be readable for ``forward(s, x)``:
    a function given two models then named both models' layers 'conv'."""
    torch._dynamo.reset()
    a, b, x = _SelfNamedS().eval(), _SelfNamedS().eval(), torch.randn(2, 3, 16, 16)
    reports = []
    compiled = torch.compile(lambda first, second, images: first(images) + second(images), backend="fxslim",
                             options={"passes": ["haste:L=14"], "inner": "eager", "on_report": reports.extend})
    with torch.no_grad():
        compiled(a, b, x)
    names = [e.fqn for r in reports for e in r.entries]
    assert len(names) == 4 and len(set(names)) == 4, names
    torch._dynamo.reset()

class _BreakBetweenConvs(nn.Module):
    """conv, a graph break, an elementwise op alone in its graph, a graph break, conv."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        y = y * 2
        torch._dynamo.graph_break()
        return self.b(y)


def test_strict_ignores_a_graph_without_layers_and_names_where_a_pass_rewrote_nothing():
    """A graph break left a graph with no conv in it, and ``strict`` failed the whole compile there,
    though the pass rewrote every conv of the model."""
    torch._dynamo.reset()
    model, x = _BreakBetweenConvs().eval(), torch.randn(2, 3, 16, 16)
    seen = []
    compiled = torch.compile(model, backend="fxslim", options={
        "passes": ["haste:L=48,sparsity=0,skip_stem=False"], "inner": "eager", "strict": True, "on_report": seen.append})
    with torch.no_grad():
        compiled(x)
    assert [sum(r.rewritten for r in graph) for graph in seen] == [1, 0, 1]
    torch._dynamo.reset()
    refused = torch.compile(model, backend="fxslim", options={"passes": ["haste"], "inner": "eager", "strict": True})
    with pytest.raises(Exception, match=r"rewrote nothing in a graph of 'a' and the layers next to it \(skipped: {'stem': 1}"):
        refused(x)
    torch._dynamo.reset()


class _BreakInBlocks(nn.Module):
    """A stem, then blocks whose forward breaks the graph between their convs; the image is passed
    on through a graph break before the stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_BreakBetweenConvs(channels=8), _BreakBetweenConvs(channels=8))

    def forward(self, x):
        x = x * 2
        torch._dynamo.graph_break()
        return self.blocks(torch.relu(self.stem(x)))


def test_haste_under_compile_rewrites_the_convs_after_a_graph_break_as_optimize_does():
    """A graph dynamo compiles after a graph break, or for a block's forward on its own, reads that
    block's activations as graph inputs: every first conv of such a graph was skipped as 'stem', so a
    model with breaks inside its blocks kept most of its convs dense under torch.compile."""
    torch._dynamo.reset()
    model, x = _BreakInBlocks().eval(), torch.randn(2, 3, 16, 16)
    seen = []
    compiled = torch.compile(model, backend="fxslim", options={
        "passes": ["haste:L=48,sparsity=0"], "inner": "eager", "on_report": seen.extend})
    with torch.no_grad():
        out = compiled(x)
    status = [(e.fqn, e.status, e.reason) for r in seen for e in r.entries]
    assert ("stem", "skipped", "stem") in status  # the image reaches it through the graph break
    assert [s for s in status if s[0] != "stem"] == [("a", "rewritten", ""), ("b", "rewritten", "")]
    expected = fxslim.optimize(model, x, passes=["haste:L=48,sparsity=0"]).report
    assert expected.rewritten() == 4 and dict(expected.skipped()) == {"stem": 1}
    torch.testing.assert_close(out, model(x), rtol=0, atol=0.05)  # the exact limit, up to its rounding
    torch._dynamo.reset()


class _OneBrokenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), _BreakBetweenConvs(channels=8)

    def forward(self, x):
        return self.body(self.stem(x))


def test_layers_after_a_graph_break_inside_a_block_keep_their_names_and_overrides():
    """Dynamo compiles a block's forward on its own when it breaks inside it, and its nodes name
    layers from the block ("b" for "body.b"): an override naming "body.b" was silently ignored.
    Where the model has several such blocks, one graph serves them all: a warning says so."""
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    seen = []
    compiled = torch.compile(_OneBrokenBlock().eval(), backend="fxslim", options={
        "passes": ["haste:L=48,sparsity=0"], "inner": "eager", "on_report": seen.extend,
        "overrides": {"body.b": None}})
    with torch.no_grad():
        compiled(x)
    assert [(e.fqn, e.status, e.reason) for r in seen for e in r.entries] == [
        ("stem", "skipped", "stem"), ("body.a", "rewritten", ""), ("body.b", "skipped", "filtered_out")]
    torch._dynamo.reset()
    compiled = torch.compile(_BreakInBlocks().eval(), backend="fxslim", options={
        "passes": ["haste:L=48,sparsity=0"], "inner": "eager", "overrides": {"blocks.1.b": None}})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"once for the 2 _BreakBetweenConvs modules \(blocks.0, "
                                                          r"blocks.1\).*overrides or filter_fn naming one block"):
        compiled(x)
    torch._dynamo.reset()
    compiled = torch.compile(_BreakInBlocks().eval(), backend="fxslim", options={  # naming no block's layer
        "passes": ["haste:L=48,sparsity=0"], "inner": "eager", "overrides": {"stem": None}})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled(x)
    torch._dynamo.reset()


class _GrayFirst(nn.Module):
    """Preprocessing that changes the image's channels, a graph break, then the stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        self.hint = self.head(x.mean((2, 3)))  # a linear before the break that does not lead to the stem
        x = x.mean(1, keepdim=True)
        torch._dynamo.graph_break()
        return self.conv(torch.relu(self.stem(x)))


class _Nested(nn.Module):
    """The model's own ``blk.a``, and a block deeper down that breaks the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blk = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential()
        self.blk.a = nn.Conv2d(8, 8, 3, padding=1)
        self.body = nn.Sequential(_BreakBetweenConvs(channels=8))

    def forward(self, x):
        return self.body(self.blk(self.stem(x)))


class _BreakAfterBody(nn.Module):
    """A print-like break in the model's own forward between its body and its head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.head = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                           nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        y = self.body(torch.relu(self.stem(x)))
        torch._dynamo.graph_break()
        return self.head(y)


class _DoubleConvs(nn.Module):
    """A U-Net's encoder: one block class for the stem's block and the later ones, breaking inside."""

    def __init__(self) -> None:
        super().__init__()
        self.inc, self.down1, self.down2 = _BreakBetweenConvs(3), _BreakBetweenConvs(8), _BreakBetweenConvs(8)

    def forward(self, x):
        x = self.inc(x)
        return self.down2(F.max_pool2d(self.down1(F.max_pool2d(x, 2)), 2))


@pytest.mark.parametrize("case", ["dynamic", "preprocessed", "bound_method", "root_break", "unet"])
def test_graph_breaks_give_the_rewrite_optimize_gives(case):
    """Reviews of the change above: dynamic shapes crashed the first recompile (a SymInt shape in a
    set); a stem after channel-changing preprocessing and a break was rewritten; compiling
    ``model.forward`` placed a nested block under its parent rather than the model, so an override
    for the model's own ``blk.a`` also kept ``body.0.a`` dense; a U-Net's later blocks, of the stem
    block's class, were taken for the stem; so was the head after a print in the model's forward."""
    torch._dynamo.reset()
    spec = "haste:L=48,sparsity=0"
    model = {"dynamic": _BreakInBlocks, "preprocessed": _GrayFirst, "bound_method": _Nested, "root_break": _BreakAfterBody,
             "unet": _DoubleConvs}[case]().eval()
    overrides = {"blk.a": None} if case == "bound_method" else {}
    seen = []
    compiled = torch.compile(model.forward if case == "bound_method" else model, backend="fxslim", options={
        "passes": [spec], "inner": "eager", "on_report": seen.append, "overrides": overrides})
    batches = (1, 3, 5) if case == "dynamic" else (2,)
    with torch.no_grad():
        for n in batches:
            x = torch.randn(n, 3, 16, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0.05)
    expected = fxslim.optimize(model, torch.randn(2, 3, 16, 16), passes=[spec], overrides=overrides).report
    # two blocks share one compiled graph, named from the block (the warning's case): compare by layer
    name = (lambda fqn: fqn.rpartition(".")[2]) if case in ("dynamic", "unet") else (lambda fqn: fqn)
    decisions = sorted((name(e.fqn), e.status, e.reason) for e in expected.entries())
    got = sorted((name(e.fqn), e.status, e.reason) for graph in seen for r in graph for e in r.entries)
    assert set(got) == set(decisions)
    assert got.count(("a", "skipped", "stem")) == (case == "unet")  # the later blocks' graphs: not the stem's
    assert len(seen) > (3 if case == "dynamic" else 1)  # graphs compiled again at other batches agree too
    torch._dynamo.reset()
    seen.clear()  # after a reset, dynamo makes new code objects for the same code: the same decisions
    with torch.no_grad():
        compiled(torch.randn(2, 3, 16, 16))
    assert {(name(e.fqn), e.status, e.reason) for graph in seen for r in graph for e in r.entries} == set(decisions)
    torch._dynamo.reset()


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, self.stem(x), use_reentrant=False)


def test_layers_inside_a_checkpoint_are_reported_as_skipped():
    """Dynamo puts a checkpointed block into a higher-order op's own graph, which the passes do not
    rewrite: its conv ran dense with no report entry, and ``strict`` passed with nothing rewritten."""
    torch._dynamo.reset()
    seen = []
    model, x = _Checkpointed().eval(), torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="fxslim", options={
        "passes": ["haste:L=48,sparsity=0,skip_stem=False"], "inner": "eager", "on_report": seen.append})
    with torch.no_grad():
        compiled(x)
    entries = {(e.fqn, e.status, e.reason) for graph in seen for r in graph for e in r.entries}
    assert entries == {("stem", "rewritten", ""), ("block", "skipped", "inside_subgraph")}
    torch._dynamo.reset()


def test_torch_compile_mode_reaches_inductor(monkeypatch):
    # mode was taken and dropped: inductor compiled in default mode, with no word
    import torch._inductor.compile_fx as inductor

    seen = []

    def compile_fx(gm, example_inputs, config_patches=None, **_):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    torch._dynamo.reset()
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="fxslim", mode="max-autotune-no-cudagraphs")(x)
        torch.testing.assert_close(out, model(x))
    torch._dynamo.reset()
    from torch._inductor import list_mode_options

    assert seen == [list_mode_options("max-autotune-no-cudagraphs")] and seen[0]["max_autotune"]
