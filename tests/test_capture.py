"""Graph capture: copies only, leaf policy, partial tracing of models that do not trace whole."""

from __future__ import annotations

import copy
import functools
import random
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.fx as fx
from torch import nn

import fxslim
from fxslim.capture import CaptureError, UnfaithfulTrace, capture, capture_dynamo, placeholder_fqns, trace
from fxslim.ir import META_FROZEN_MODE, meta_val


class _DataDependent(nn.Module):
    """Python control flow on tensor values: symbolic tracing fails here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.tricky = _DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.tricky(self.stem(x)))


class _Leafy(nn.Module):
    fxslim_leaf = True

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # untraceable, but a leaf


def test_capture_partial_traces_largest_submodules_and_reports_rest():
    x = torch.randn(1, 3, 8, 8)
    model = _Outer().eval()
    cap = capture(model, (x,))
    assert not cap.whole
    # the root traces with the untraceable class as a leaf; that leaf's insides are traced apart
    assert sorted(g.path for g in cap.graphs) == ["", "tricky.conv"]
    assert [p for p, _ in cap.untraced] == ["tricky"]
    assert cap.untraced[0][1].startswith("traced as a leaf: TraceError")
    # every node of every traced part has a shape
    for g in cap.graphs:
        assert all(meta_val(n) is not None for n in g.gm.graph.nodes if n.op not in ("output",))
    with torch.no_grad():
        torch.testing.assert_close(cap.module(x), model(x))


def test_capture_never_modifies_or_shares_the_users_model():
    model = _Outer().eval()
    x = torch.randn(1, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    cap = capture(model, (x,))
    for g in cap.graphs:
        for p in g.gm.parameters():
            p.data.add_(1.0)  # mutate the copy
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected)


def test_trace_honours_fxslim_leaf_attribute():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _Leafy())
    gm = trace(model)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_trace_accepts_leaf_modules_argument():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _DataDependent())
    with pytest.raises(Exception):
        trace(model)
    gm = trace(model, leaf_modules=(_DataDependent,))
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 2


def test_trace_works_on_a_copy_each_time():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    a, b = trace(model), trace(model)
    assert a.get_submodule("0") is not model[0] and a.get_submodule("0") is not b.get_submodule("0")


def test_capture_untraceable_leaf_model_raises_with_fix():
    class Only(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match="leaf_modules"):
        capture(Only(), (torch.randn(2),))


def test_a_traced_check_that_fails_does_not_print_proxies():
    # timm's PatchEmbed: _assert(H == self.h, f"Input height ({H}) doesn't match model ({self.h}).")
    class Checked(nn.Module):
        def forward(self, x):
            torch._assert(x.shape[-1] == 8, f"width ({x.shape[-1]}) must be 8")
            return x + 1

    gm = trace(Checked())
    assert torch.equal(gm(torch.zeros(2, 8)), torch.ones(2, 8))
    with pytest.raises(AssertionError, match=r"^width \(\?\) must be 8 \[\?: a size or value") as err:
        gm(torch.zeros(2, 9))
    assert "Proxy" not in str(err.value)


def test_capture_requires_example_inputs_for_modules():
    with pytest.raises(ValueError, match="example_inputs"):
        capture(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="method"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")
    with pytest.raises(TypeError, match="nn.Module"):
        capture("resnet", (torch.randn(1, 2),))


def test_capture_exported_program_and_graph_module_are_copied():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 4)
    ep = torch.export.export(model, (x,))
    cap = capture(ep)
    assert cap.graphs[0].ir == "aten"
    assert cap.module.get_parameter("0.weight") is not ep.module().get_parameter("0.weight")
    gm = fx.symbolic_trace(model)
    cap = capture(gm, (x,))
    assert cap.graphs[0].ir == "module" and cap.module is not gm
    assert meta_val(list(cap.module.graph.nodes)[1]).shape == (1, 4, 4, 4)


def test_capture_dynamo_maps_placeholders_to_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    (graph,) = capture_dynamo(model, (torch.randn(1, 3, 4, 4),))
    names = placeholder_fqns(graph.gm)
    assert sorted(names.values()) == sorted(
        ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    )
    for pname, fqn in names.items():
        assert torch.equal(graph.placeholder_values[pname], model.get_parameter(fqn) if "running" not in fqn else model.get_buffer(fqn))


def test_capture_dynamo_graph_break_gives_several_graphs():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    graphs = capture_dynamo(Broken(), (torch.randn(1, 3, 4, 4),))
    assert len(graphs) == 2


class _ValueBranch(nn.Module):
    """A Python branch on a tensor value: no exporter takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max().item() > 1e4:
            x = x / 1e4
        return self.conv(x)


class _TableFromValues(nn.Module):
    """Rows of a table sized by ``int(t.max()) + 1``: non-strict export needs a concrete size,
    strict export keeps it unbacked."""

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        table = torch.arange(int(index.max()) + 1, dtype=x.dtype)
        return x + table[index].sum()


class _PartlyExportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.table = _TableFromValues()
        self.head = _ValueBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.arange(3) * 2
        return self.head(self.table(self.stem(x), index))


def test_capture_export_exports_the_largest_exportable_parts(capsys):
    model, x = _PartlyExportable().eval(), torch.randn(2, 3, 8, 8)
    captured = capture(model, (x,), method="export")
    assert "def forward" not in capsys.readouterr().err  # no partial graph per failed attempt; the report says why
    assert captured.method == "export"
    assert sorted(g.path for g in captured.graphs) == ["head.conv", "stem", "table"]
    eager = dict(captured.untraced)
    assert "not exportable" in eager[""] and "not exportable" in eager["head"]
    assert all(g.ir == "aten" for g in captured.graphs)
    table = next(g for g in captured.graphs if g.path == "table")
    assert all(not isinstance(d, torch.SymInt) for n in table.gm.graph.nodes  # the example's size, not u0
               for d in getattr(meta_val(n), "shape", ()))
    with torch.no_grad():
        torch.testing.assert_close(captured.module(x), model(x))
    assert not any(isinstance(m, fx.GraphModule) for m in model.modules())  # the caller's model is untouched


class _SharedByTwoShapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.other = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 1e9:
            return x
        return self.shared(self.other(x)).sum() + self.shared(x[:1]).sum()


def test_capture_export_keeps_modules_called_with_two_shapes_eager():
    """An exported program holds one input shape, so a module the example calls with two, and
    everything in it, stays eager."""
    model, x = _SharedByTwoShapes().eval(), torch.randn(3, 4)
    captured = capture(model, (x,), method="export")
    eager = dict(captured.untraced)
    assert "different shapes" in eager["shared"] and "different shapes" in eager["shared.0"]
    assert [g.path for g in captured.graphs] == ["other"]
    with torch.no_grad():
        torch.testing.assert_close(captured.module(x), model(x))


def test_capture_export_raises_the_export_error_when_no_part_exports():
    with pytest.raises(Exception, match="data-dependent"):
        capture(nn.Sequential(_OnlyBranch()), (torch.randn(2, 4),), method="export")


class _OnlyBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum().item() > 0 else x


class _PartlyTraceableWithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4, "images must be [B, C, H, W]"  # an assert on a Proxy: the root does not trace
        return self.head(self.stem(x))


def test_capture_in_parts_on_the_meta_device():
    """A model built on the meta device (sizes only, as for VGGT-1B costs) captures in parts: the
    example run's buffer restore has no values to compare."""
    with torch.device("meta"):
        model = _PartlyTraceableWithBuffers().eval()
        x = torch.empty(2, 3, 8, 8)
    captured = capture(model, (x,))
    assert [g.path for g in captured.graphs] == ["stem", "head"]
    assert meta_val(next(n for n in captured.graphs[0].gm.graph.nodes if n.op == "output").args[0]).shape == (2, 4, 8, 8)


class _LayerDrop(nn.Module):
    """Stochastic depth written with a draw no Proxy reaches: a trace would decide the branch once."""

    def __init__(self, draw) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.draw = draw
        self.generator, self.rng = torch.Generator().manual_seed(1), np.random.default_rng(1)  # private ones

    def forward(self, x):
        h = self.a(x)
        if self.training and self.draw(self) < 0.5:
            return self.b(h) * 0
        return self.b(h)


def _draws_after_seeding(work) -> tuple[float, float, float]:
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    work()
    return float(torch.rand(())), random.random(), float(np.random.rand())


@pytest.mark.parametrize("draw", [lambda m: torch.rand(()), lambda m: random.random(), lambda m: np.random.rand(),
                                  lambda m: torch.rand((), generator=m.generator), lambda m: m.rng.random()],
                         ids=["torch", "python", "numpy", "torch_generator", "numpy_generator"])
def test_trace_refuses_a_forward_that_draws_random_numbers_outside_the_graph(draw):
    import fxslim

    model, x = _LayerDrop(draw).train(), torch.randn(2, 3, 16, 16)
    with pytest.raises(UnfaithfulTrace, match="draws random numbers"):
        trace(model)
    expected = _draws_after_seeding(lambda: None)
    result = None

    def optimize():
        nonlocal result
        result = fxslim.optimize(model, x, passes=["haste:L=53"])

    assert _draws_after_seeding(optimize) == expected  # the caller's random streams did not move
    assert [reason for fqn, reason in result.report.untraced if fqn == ""] and "draws random numbers" in result.report.untraced[0][1]
    with torch.no_grad():
        dropped = [bool((result.module(x) == 0).all()) for _ in range(40)]
    assert any(dropped) and not all(dropped)  # both branches, as the model takes them


class _ScalesItsInput(nn.Module):
    """Scales its input in place, keeps a data-dependent number of values (fake shapes cannot follow:
    capture runs the real example) and drops out of them, drawing from torch's stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x.mul_(2)
        y = self.conv(self.stem(x))
        return y + F.dropout(y[y > 0], 0.5, True).sum()


def test_capture_on_real_values_leaves_the_example_and_random_streams_alone():
    import fxslim

    model, x = _ScalesItsInput().eval(), torch.randn(2, 3, 16, 16)
    example = x.clone()
    expected = _draws_after_seeding(lambda: None)
    assert _draws_after_seeding(lambda: fxslim.optimize(model, x, passes=["haste:L=53"])) == expected
    assert torch.equal(x, example)


class _KeepsTrack(nn.Module):
    """Stays eager (a branch on a value) around convs that are rewritten, and keeps state in plain
    attributes: a call counter, a list, a buffer assigned anew on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.calls, self.means = 0, []
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        self.calls += 1
        y = self.conv(self.stem(x))
        self.means.append(float(y.mean()))
        self.ema = 0.5 * self.ema + 0.5 * y.mean((0, 2, 3))
        if y.sum() > 0:
            y = y * 1.0
        return y + self.ema[None, :, None, None]


def test_capture_example_run_leaves_no_state_in_the_returned_model():
    import fxslim

    model, x = _KeepsTrack().eval(), torch.randn(2, 3, 16, 16)
    result = fxslim.optimize(model, x, passes=["haste:L=53"])
    assert result.report.rewritten("haste") == 1 and [fqn for fqn, _ in result.report.untraced] == [""]
    rewritten = result.module
    assert (rewritten.calls, rewritten.means) == (0, []) and not rewritten.ema.any()
    with torch.no_grad():
        first = rewritten(x)
    assert rewritten.calls == 1 and len(rewritten.means) == 1
    torch.testing.assert_close(first, model(x))


class _MaybeSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if skip is not None:
            y = y + skip
        return y


class _CallsBothWays(nn.Module):
    """Stays eager (a branch on a value) and calls its block without the optional argument, then with it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), _MaybeSkip()

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 0:
            y = -y
        return self.block(self.block(y), skip=y)


@pytest.mark.parametrize("passes", [["haste:L=53"], ["prom"]])
def test_capture_keeps_a_module_called_with_and_without_an_optional_argument_eager(passes):
    """One trace takes ``if skip is not None`` one way for every call: capture crashed on its own
    example run (Tensor + None); the block stays eager, naming the argument, and its conv is traced."""
    import fxslim

    model, x = _CallsBothWays().eval(), torch.randn(2, 3, 16, 16)
    result = fxslim.optimize(model, x, passes=passes)
    untraced = dict(result.report.untraced)
    assert "called with and without 'skip'" in untraced["block"]
    assert "block.conv" in {g.path for g in capture(model, (x,)).graphs}
    if passes == ["haste:L=53"]:
        with torch.no_grad():
            torch.testing.assert_close(result.module(x), model(x))


class _Window(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.resolution = nn.Conv2d(8, 8, 3, padding=1), 4

    def forward(self, x):
        return torch.relu(self.conv(x))


class _WindowParent(nn.Module):
    """Branches on a shape and on its child's plain attribute, as timm's LocalWindowAttention: it
    stays eager, the child is traced apart and must keep ``resolution``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.attn, self.head = nn.Conv2d(3, 8, 3, padding=1), _Window(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[2] == self.attn.resolution:
            return self.head(self.attn(x))
        return self.head(x + self.attn(x))


def test_modules_traced_apart_keep_their_plain_attributes():
    """prepare crashed with "'_Window' object has no attribute 'resolution'" (timm's efficientvit_m0),
    and timm's features_only models lost ``feature_info``."""
    import timm

    import fxslim

    torch.manual_seed(0)
    model, x = _WindowParent().eval(), torch.randn(2, 3, 16, 16)
    qat = fxslim.calibrate(fxslim.prepare(model, x), [x]).eval()
    integer = fxslim.convert(qat)
    assert isinstance(qat.attn, fx.GraphModule) and qat.attn.resolution == 4 and integer.attn.resolution == 4
    assert copy.deepcopy(qat).attn.resolution == 4  # fx's deepcopy keeps only what it is told to (convert copies)
    with torch.no_grad():
        assert integer(x).shape == model(x).shape
        result = fxslim.optimize(model, x, passes=["haste:L=53"])
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)
    features = timm.create_model("resnet18", pretrained=False, features_only=True).eval()
    traced = fxslim.optimize(features, torch.randn(1, 3, 64, 64), passes=["haste:L=53"]).module
    assert traced.feature_info.channels() == features.feature_info.channels()
    assert traced.feature_info is not features.feature_info  # a copy: the rewrite shares nothing with the model


class _StoresAttention(nn.Module):
    """Research code that keeps its last attention map for plotting."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.attn_map, self.size = nn.Conv2d(3, 8, 3, padding=1), None, 7

    def forward(self, x):
        y = self.conv(x)
        self.attn_map = y.detach().mean(1)
        return y


def test_trace_warns_about_attributes_forward_stores_and_copies_none_of_its_proxies():
    """A trace records no assignment: ``attn_map`` stops changing, which was silent, and the Proxy
    the trace stored there was copied onto the GraphModule as an attribute."""
    with pytest.warns(UserWarning, match="forward stores 'attn_map' on the module"):
        gm = trace(_StoresAttention())
    assert gm.attn_map is None and gm.size == 7


class _SetsUpOnFirstCall(nn.Module):
    """torchvision's ``MultiScaleRoIAlign`` as every R-CNN holds it before its first forward: the
    call stores ``scales`` (computed from the features by an ``fx.wrap``-ed function) on the module."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool = torchvision.ops.MultiScaleRoIAlign(["0", "1"], 7, 2)

    def forward(self, x, boxes):
        from collections import OrderedDict

        f0 = self.conv(self.stem(x))
        return self.pool(OrderedDict([("0", f0), ("1", F.max_pool2d(f0, 2))]), boxes, [(64, 64)] * x.shape[0])


@pytest.mark.parametrize("passes", [["haste"], ["prom"]])
def test_a_module_that_sets_itself_up_on_its_first_call_is_traced_in_both_modes(passes):
    """The trace in the other mode (``_follow_training``) read the Proxies the first trace had left
    in ``pool.scales``: ``optimize`` failed with an fx error blamed on the pass, for any fresh R-CNN."""
    torch.manual_seed(0)
    x, boxes = torch.randn(2, 3, 64, 64), [torch.tensor([[1.0, 2.0, 30.0, 40.0]]), torch.tensor([[5.0, 5.0, 60.0, 50.0]])]
    model = _SetsUpOnFirstCall().eval()
    with pytest.warns(UserWarning, match="stores 'pool.scales'"):
        gm = trace(model)
    gm.graph.lint()
    assert model.pool.scales is None
    with torch.no_grad():
        assert torch.equal(gm(x, boxes), model(x, boxes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxslim.optimize(_SetsUpOnFirstCall().eval(), (x, boxes), passes=passes)
    assert res.report.rewritten(passes[0]) >= 1
    with torch.no_grad():
        assert res.module(x[:1], boxes[:1]).shape == (1, 8, 7, 7)


def test_trace_stores_its_own_tensor_constants_without_a_warning(recwarn):
    class Constant(nn.Module):
        def forward(self, x):
            return x + torch.tensor([1.0, 2.0])

    trace(Constant())  # the tracer keeps the tensor as _tensor_constant0 on the root
    assert not [w for w in recwarn if "stores" in str(w.message)]


class _Segmenter(nn.Module):
    """Returns an OrderedDict, as torchvision's segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        from collections import OrderedDict

        return OrderedDict(out=self.head(torch.relu(self.conv(x))), aux=x.mean((2, 3)))


def test_rewrites_return_an_ordered_dict_where_the_model_does():
    """fx writes a dict literal: after optimize, prepare and convert the output was a plain dict. (A
    GraphModule unpickled is traced again from its code, which makes a plain dict once more.)"""
    from collections import OrderedDict

    import fxslim

    torch.manual_seed(0)
    model, x = _Segmenter().eval(), torch.randn(2, 3, 16, 16)
    optimized = fxslim.optimize(model, x, passes=["haste:L=53"]).module
    qat = fxslim.calibrate(fxslim.prepare(model, x), [x]).eval()
    with torch.no_grad():
        for module in (optimized, qat, fxslim.convert(qat), copy.deepcopy(optimized)):
            out = module(x)
            assert type(out) is OrderedDict and list(out) == ["out", "aux"]
    assert type(trace(nn.Conv2d(3, 3, 1))(x)) is torch.Tensor


def test_the_trace_in_the_other_mode_watches_random_draws_too():
    """An eval-mode model whose train-mode forward draws: the second trace (for .train()) baked one
    draw into the train-mode graph and moved the caller's stream; it now stays frozen in eval mode."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _LayerDrop(lambda m: torch.rand(()))).eval()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    gm = trace(model)
    assert torch.equal(torch.rand(3), expected)
    assert gm.meta[META_FROZEN_MODE] == "eval"


def test_trace_warns_about_in_place_changes_of_list_and_dict_attributes():
    class Keeps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.history, self.stats, self.owner = nn.Conv2d(3, 3, 1), [], {}, None

        def forward(self, x):
            y = self.conv(x)
            self.history.append(y)
            self.stats["last"] = y
            return y

    model = Keeps()
    model.__dict__["owner"] = model  # a back-reference: not copied (a cycle torch.save cannot pickle)
    with pytest.warns(UserWarning, match="forward stores 'history', 'stats'"):
        gm = trace(model)
    assert "owner" not in vars(gm)


def test_another_thread_drawing_random_numbers_neither_fails_the_trace_nor_repeats_its_draws():
    """The global generators' state is shared: another thread's draws (a loader's augmentations, here
    constant) looked like the trace's own, so resnet18 came back in 16 eager pieces, and putting the
    state back replayed half of that thread's numbers."""
    import threading

    import torchvision

    import fxslim

    model, x = torchvision.models.resnet18(weights=None, num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    stop, draws = threading.Event(), []

    def drawer():
        while not stop.is_set():
            draws.append(torch.rand(()).item())

    thread = threading.Thread(target=drawer, daemon=True)
    thread.start()
    try:
        result = fxslim.optimize(model, x, passes=["haste:L=14"])
    finally:
        stop.set()
        thread.join()
    assert isinstance(result.module, fx.GraphModule) and not result.report.untraced
    assert len(set(draws)) > 0.99 * len(draws)  # none replayed (float32 collisions aside)



def test_draws_inside_the_watch_differ_and_leave_the_callers_stream_as_it_was():
    """Draws inside the watch are the caller's stream, as eager draws them (a module that redraws
    until it keeps a token must get new numbers), and nothing of it is consumed, a draw in a
    torch.cond branch included."""
    from fxslim import generators

    def branchy(x):
        y = x + torch.rand(x.shape)
        return torch.cond(x.sum() > 0, lambda t: t + torch.rand(t.shape), lambda t: t - 1, (y,))

    torch.manual_seed(0)
    state = torch.get_rng_state()
    with generators.kept() as moved:
        first, second = torch.rand(4), torch.rand(4)
        branchy(torch.ones(3))
        assert moved()
    assert not torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), first)  # the draws inside are the caller's stream, not consumed from it

def test_draws_seen_also_from_c_callers_and_reseeding_and_a_profiler_survives():
    """Review of the thread-aware watch: a Python draw made by C code (iter(random.random, ..)) was
    missed, torch.manual_seed in forward reseeded the caller's stream unseen, and the profile
    function that watched Python's draws switched the caller's cProfile off."""
    import cProfile

    class CDraw(nn.Module):
        def forward(self, x):
            return x + next(iter(random.random, -1.0))

    class Reseeds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            torch.manual_seed(123)
            return self.conv(x)

    for model in (CDraw(), Reseeds()):
        torch.manual_seed(7), random.seed(7)
        expected = (torch.rand(3), random.random())
        torch.manual_seed(7), random.seed(7)
        with pytest.raises(UnfaithfulTrace):
            trace(model)
        assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        trace(nn.Sequential(nn.Conv2d(3, 3, 1)))
        assert sys.getprofile() is profiler
    finally:
        profiler.disable()


def test_a_batch_norm_act_called_whole_keeps_its_activation():
    """Called as a leaf (for its hooks, or named in leaf_modules), it was swapped for a plain BatchNorm2d
    all the same: no activation (2.58 off) and no hook."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU)).eval(), torch.randn(2, 3, 8, 8)
    calls = []
    model[1].register_forward_hook(lambda *args: calls.append(1))
    for gm in (trace(model), trace(model, leaf_modules=[BatchNormAct2d])):
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))
    assert len(calls) >= 4  # each traced model's call, and the model's own


def test_a_model_with_the_old_weight_norm_is_captured_before_any_forward():
    # torch.nn.utils.weight_norm leaves a non-leaf `weight` attribute until a no_grad forward, and
    # copy.deepcopy refuses it: optimize, estimate and prepare failed with torch's RuntimeError
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.utils.weight_norm(nn.Conv2d(8, 8, 3, padding=1))).eval()
        x = torch.randn(1, 3, 16, 16)
        result = fxslim.optimize(model, x, passes=["haste:L=48,sparsity=0"])
    assert not model[2].weight.is_leaf  # the caller's model is as it was
    assert fxslim.estimate(model, x).total.macs == result.cost_before.total.macs > 0
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)


class _UsesShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.c = nn.Conv2d(8, 8, 1), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.c(self.pre(x)) if x.shape[-1] > 2 else x  # a branch on a size: traced in parts


class _SharedAtTwoPlaces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.other = _UsesShared()
        self.shared = self.other.c

    def forward(self, x):
        return self.shared(x) + self.other(x) if x.shape[-1] > 2 else x


def test_a_module_used_at_two_places_keeps_one_weight_in_parts_traced_apart():
    # each place was traced apart with its own copy of the weights: QAT trained the copies apart
    torch.manual_seed(0)
    model, x = _SharedAtTwoPlaces().eval(), torch.rand(1, 8, 8, 8)
    for rewritten in (fxslim.optimize(model, x, passes=["haste:L=48,sparsity=0"]).module, fxslim.prepare(model, x)):
        weights = dict(rewritten.named_parameters(remove_duplicate=False))
        shared = [w for name, w in weights.items() if name.startswith(("shared.0.", "other.c.0.")) and name.endswith("weight")]
        assert len(shared) == 2 and shared[0] is shared[1]
    assert model.shared is model.other.c  # the caller's model is as it was


class _KernelByDtype(nn.Module):
    """Research code choosing a path by a traced tensor's dtype and device (π³'s attention picks its
    SDPA kernel with ``if q.dtype == torch.bfloat16``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.stem(x)
        if y.dtype == torch.bfloat16 or y.is_cuda:
            y = y.float().relu()
        elif y.device.type == "cpu":
            y = torch.tanh(y)
        return self.conv(y)


def test_a_branch_on_a_traced_dtype_or_device_takes_the_examples_way_and_is_guarded(tmp_path):
    """A dtype or device read made the whole module an opaque leaf (HTTM never saw π³'s global
    attention). It is read from the example now, and a call of another dtype raises."""
    model = _KernelByDtype().eval()
    x = torch.randn(2, 3, 16, 16)
    res = fxslim.optimize(model, (x,), passes=["haste:L=48,s=0"])
    assert res.report.untraced == [] and res.report.rewritten("haste") == 1
    guards = [n for n in res.module.graph.nodes if n.op == "call_function" and "check_traced_attribute" in str(n.target)]
    assert {n.args[1] for n in guards} == {"dtype", "is_cuda", "device"}
    other = torch.randn(1, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(res.module(other), model(other), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="dtype torch.float32.*this call gives dtype torch.float64"):
            copy.deepcopy(res.module).double()(other.double())
    torch.save(res.module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), res.module(other))
        with pytest.raises(ValueError, match="dtype"):
            loaded.double()(other.double())
        loaded.float()
        torch.testing.assert_close(torch.compile(res.module, backend="eager")(other), res.module(other))


def test_a_dtype_read_after_a_data_dependent_op_still_keeps_the_module_eager():
    class Masked(nn.Module):
        def forward(self, x):
            kept = x[x > 0]  # its size is the data's: the fake run cannot give it
            return x * 2 if kept.dtype == torch.float32 else x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(nn.Sequential(nn.Conv2d(3, 3, 1), Masked()), (torch.randn(1, 3, 8, 8),))
    assert any(path == "1" for path, _ in captured.untraced)


class _CachedTable(nn.Module):
    """A RoPE-like leaf whose table comes from a module-level cache."""

    fxslim_leaf = True

    def forward(self, x):
        return x + _cached_table(x.shape[-1], x.dtype, x.device)


@functools.lru_cache(maxsize=None)
def _cached_table(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=dtype, device=device) / n


class _ReadsAfter(nn.Module):
    def __init__(self, mid: nn.Module, branch: bool = True) -> None:
        super().__init__()
        self.conv, self.mid, self.head, self.branch = nn.Conv2d(3, 4, 3, padding=1), mid, nn.Conv2d(4, 4, 1), branch

    def forward(self, x):
        y = self.mid(self.conv(x))
        if self.branch and y.dtype != torch.float32:
            y = y.float()
        return self.head(y + torch.arange(y.shape[-1], device=y.device, dtype=y.dtype))


def test_reading_a_dtype_runs_no_user_code_and_leaves_no_state():
    """The first version ran leaf modules on fake tensors to learn a dtype: a cache kept a fake
    tensor (the user's own model then returned fake tensors), dropout drew and BN counted a batch
    (the trace was then refused or frozen in one mode), a hook's dtype was missed; a dtype or
    device only passed to an op started that run too; and under autocast the casts of real weights
    to fake ones stayed in autocast's cache."""
    x = torch.randn(2, 3, 8, 8)
    model = _ReadsAfter(_CachedTable()).eval()
    res = fxslim.optimize(model, (x,), passes=["haste:L=48,s=0"])
    assert res.report.untraced == []
    with torch.no_grad():
        assert type(model(x)) is torch.Tensor and type(res.module(x)) is torch.Tensor
    for mid in (nn.Dropout(0.5), nn.BatchNorm2d(4)):
        for train in (False, True):
            captured = capture(_ReadsAfter(mid, branch=False).train(train), (x,))
            assert captured.untraced == [] and captured.graphs[0].gm.meta.get(META_FROZEN_MODE) is None
    hooked = _ReadsAfter(nn.Identity()).eval()
    hooked.conv.register_forward_hook(lambda module, args, out: out.double())
    with torch.no_grad():
        want = hooked(x)
    res = fxslim.optimize(hooked, (x,), passes=["haste:L=48,s=0"])  # the branch reads the hook's float64
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = fxslim.optimize(_ReadsAfter(nn.Identity()).eval(), (x,), passes=["prom"])
        with torch.no_grad():
            assert type(res.module(x)) is torch.Tensor


def test_a_prom_integer_model_keeps_no_dtype_guard_on_its_codes():
    """A guard read an activation's dtype: convert dequantized the codes for it (a float island);
    the integer model's arithmetic is fixed at convert, whatever dtype the trace saw."""
    x = torch.randn(2, 3, 8, 8)
    model = _ReadsAfter(nn.ReLU()).eval()
    qat = fxslim.calibrate(fxslim.prepare(model, (x,)), [(x,)]).eval()
    integer = fxslim.convert(qat)
    assert not [n for n in integer.graph.nodes if "check_traced_attribute" in str(n.target)]
    with torch.no_grad():
        torch.testing.assert_close(integer(x), qat(x), atol=0.05, rtol=0)
