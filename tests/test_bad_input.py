"""Bad input everywhere a user can reach fxslim: config values, example inputs, models with nothing
to match or that do not trace, NaN/inf, empty batches, unknown names in strings and on the command
line. Each gives a clear error (naming what, expected, got) or the behaviour docs/INVARIANTS.md
documents, and the user's model is never modified.

Complements test_api.py, test_config.py, test_backend.py, test_cli*.py and the per-pass tests,
which check the basic cases of each (unknown pass name, empty pass list, bad backend options).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim import CaptureError  # the public name docs/INVARIANTS.md uses
from fxslim.capture import capture_dynamo
from fxslim.app.cli import main
from fxslim.runtime.prom_qat import ActFakeQuant

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """stem conv -> ReLU -> conv -> ReLU -> pool -> linear: something for every pass but HTTM."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class _Branchy(nn.Module):
    """Python control flow on a tensor value: symbolic tracing cannot follow it (and there is no
    submodule to trace instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.weight) if x.sum() > 0 else -x


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> tuple:
    """What must not change: weights and buffers, train/eval mode, the module tree."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [(name, type(m)) for name, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, state: tuple) -> None:
    tensors, training, tree = state
    now = model.state_dict()
    assert now.keys() == tensors.keys() and all(torch.equal(now[k], v) for k, v in tensors.items())
    assert model.training is training
    assert [(name, type(m)) for name, m in model.named_modules()] == tree


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Config values out of range, through every entry point


_BAD_SPECS = [
    ("haste:L=0", r"HASTE.L: expected 1 <= L <= 53, got 0"),
    ("haste:L=54", r"HASTE.L: expected 1 <= L <= 53, got 54"),
    ("haste:sparsity=1", r"HASTE.sparsity: expected 0.0 <= sparsity < 1.0, got 1.0"),
    ("haste:tile=0", r"HASTE.tile: expected 1 <= tile <= 64, got 0"),
    ("haste:L=1.5", r"HASTE.L: expected an integer, got '1.5'"),
    ("httm:q=0", r"HTTM.q: expected 0.0 < q <= 1.0, got 0.0"),
    ("httm:kv=1.5", r"HTTM.kv: expected 0.0 < kv <= 1.0, got 1.5"),
    ("httm:q=0.2,outliers=0.3", r"HTTM.outliers: expected 0.0 <= outliers < 0.2, got 0.3"),
    ("httm:mode=sideways", r"HTTM.mode: expected one of \('headwise', 'uniform', 'global'\), got 'sideways'"),
    ("prom:momentum=1", r"PROM.momentum: expected 0.0 <= momentum < 1.0, got 1.0"),
    ("prom:ternary=bwn", r"PROM.ternary: expected one of \('twn', 'absmean'\), got 'bwn'"),
    ("haste:Q=3", r"HASTE: unknown option 'Q'; allowed: L, center"),
    ("haste:L", r"HASTE.from_string: expected key=value, got 'L'"),
    ("hasty:L=3", r"passes: unknown pass 'hasty'; known passes: haste, httm, prom"),
]


@pytest.mark.parametrize("spec,message", _BAD_SPECS)
def test_optimize_bad_pass_string_raises_value_error_and_leaves_model(spec, message):
    model = _net()
    state = _state(model)
    with pytest.raises(ValueError, match=message):
        fxslim.optimize(model, _x(), passes=[spec])
    _assert_unchanged(model, state)


@pytest.mark.parametrize("spec,message", _BAD_SPECS[:4] + _BAD_SPECS[-2:])
def test_backend_bad_pass_string_raises_value_error_naming_field(spec, message):
    compiled = torch.compile(_net(), backend="fxslim", options={"passes": [spec], "inner": "eager"})
    with pytest.raises(Exception, match=f"ValueError: {message}"):  # dynamo wraps it in BackendCompilerFailed
        compiled(_x())


@pytest.mark.parametrize("spec,message", [_BAD_SPECS[0], _BAD_SPECS[5], _BAD_SPECS[11], _BAD_SPECS[13]])
def test_cli_bad_pass_string_exits_2_with_the_message(spec, message, capsys):
    assert main(["report", "torchvision:resnet18", "--input", "1x3x32x32", "--passes", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxslim report: error:") and __import__("re").search(message, err)


def test_pass_objects_validate_on_construction_too():
    with pytest.raises(ValueError, match="HASTE.L: expected 1 <= L <= 53, got 99"):
        fxslim.HASTE(L=99)
    with pytest.raises(ValueError, match=r"HTTM.special_tokens: expected <= tokens_per_frame=2, got 3"):
        fxslim.HTTM(special_tokens=3, tokens_per_frame=2)
    with pytest.raises(TypeError, match="prepare: config must be a PROM config, got HASTE"):
        fxslim.prepare(_net(), _x(), fxslim.HASTE())


# ----------------------------------------------------------------------------------------------
# Wrong example inputs


def test_optimize_example_inputs_of_wrong_shape_raise_pytorchs_error_naming_the_layer():
    # documented: capture runs the model on fake tensors; PyTorch's error names the failing layer
    model = _net()
    state = _state(model)
    with pytest.raises(RuntimeError, match=r"expected input\[2, 4, 8, 8\] to have 3 channels, but got 4"):
        fxslim.optimize(model, torch.randn(2, 4, 8, 8), passes=["haste"])
    with pytest.raises(RuntimeError, match=r"expected input\[2, 4, 8, 8\] to have 3 channels"):
        fxslim.estimate(model, torch.randn(2, 4, 8, 8))
    _assert_unchanged(model, state)


def test_optimize_and_estimate_of_a_scripted_model_say_to_pass_the_module():
    # register_forward_pre_hook is not supported on ScriptModules, from deep inside capture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        scripted = torch.jit.script(_net())
    for run in (lambda: fxslim.optimize(scripted, _x(), passes=["haste"]), lambda: fxslim.estimate(scripted, _x())):
        with pytest.raises(CaptureError, match=r"TorchScript.*pass the nn.Module it was scripted from"):
            run()


def test_optimize_without_a_required_keyword_only_argument_names_it():
    # RuntimeError: Expected positional argument for parameter gain, from deep inside the trace
    class Gained(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x, *, gain):
            return self.conv(x) * gain

    model, x = Gained().eval(), _x()
    with pytest.raises(ValueError, match=r"requires the keyword-only argument\(s\) \['gain'\].*\(x, gain,\)"):
        fxslim.optimize(model, x, passes=["haste"])
    result = _quiet(fxslim.optimize, model, (x, 2.0), passes=["haste:L=53"])
    with torch.no_grad():
        torch.testing.assert_close(result.module(x, gain=2.0), model(x, gain=2.0))


class _Flipped(nn.Module):
    """A keyword-only flag a Python branch reads: the root does not trace, so it runs on its example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, *, flip, gain=1.0):
        h = self.conv(x)
        if flip:
            h = h.flip(-1)
        return self.head(h) * gain


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_keyword_only_arguments_of_a_root_that_runs_on_its_example(capture):
    # the error above says to pass them after the others; doing so, the untraced root was run as
    # root(x, True): "forward() takes 2 positional arguments but 3 were given"
    model, x = _Flipped().eval(), _x()
    for example, kwargs in (((x, True), {"flip": True}), ((x, False, 2.0), {"flip": False, "gain": 2.0})):
        result = _quiet(fxslim.optimize, model, example, passes=["haste:L=53"], capture=capture)
        assert result.report.rewritten("haste") == 1  # the head; the stem stays dense
        with torch.no_grad():
            torch.testing.assert_close(result.module(x, **kwargs), model(x, **kwargs))
        assert fxslim.estimate(model, example, capture=capture).total.macs > 0


def test_keyword_only_arguments_after_optional_positional_ones():
    # the message asked for (x, flip) and the value went to scale; the dynamo capture of a compiled
    # wrapper, whose signature is (*args, **kwargs), passed the flag positionally
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x, scale=1.0, *, flip):
            h = self.conv(x) * scale
            return h.flip(-1) if flip else h

    model, x = Scaled().eval(), _x()
    with pytest.raises(ValueError, match=r"keyword-only argument\(s\) \['flip'\].*\(x, scale, flip,\)"):
        fxslim.optimize(model, (x, True), passes=["haste"])
    result = _quiet(fxslim.optimize, model, (x, 2.0, True), passes=["haste:L=53"])
    with torch.no_grad():
        torch.testing.assert_close(result.module(x, 2.0, flip=True), model(x, 2.0, flip=True))
    assert len(capture_dynamo(model, (x, 2.0, True))) == 1


def test_export_capture_of_a_model_nothing_of_which_exports_raises_capture_error():
    # torch's GuardOnDataDependentSymNode came out bare, where capture='symbolic' names the fixes
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3))

        def forward(self, x):
            h = F.conv2d(x, self.w, padding=1)
            return h * 2 if h.mean() > 0 else h

    with pytest.raises(CaptureError, match=r"capture='export': Branching does not export.*Fix: capture='symbolic'"):
        fxslim.optimize(Branching().eval(), _x(), passes=["haste"], capture="export")


def test_optimize_too_many_example_inputs_raise_value_error():
    with pytest.raises(ValueError, match=r"example_inputs: the model takes 1 input\(s\) \['x'\], got 2"):
        fxslim.optimize(_net(), (_x(), _x()), passes=["haste"])


def test_optimize_example_inputs_missing_or_not_tensors_raise():
    with pytest.raises(ValueError, match="example_inputs are required for an nn.Module"):
        fxslim.optimize(_net(), None, passes=["haste"])
    with pytest.raises(TypeError, match="conv2d"):
        fxslim.optimize(_net(), ("not a tensor",), passes=["haste"])
    with pytest.raises(TypeError, match="capture: model must be an nn.Module, GraphModule or ExportedProgram, got function"):
        fxslim.optimize(lambda x: x, _x(), passes=["haste"])
    with pytest.raises(ValueError, match="capture: method must be 'symbolic' or 'export', got 'jit'"):
        fxslim.optimize(_net(), _x(), passes=["haste"], capture="jit")


def test_optimized_model_called_with_other_shape_raises_like_the_original():
    res = fxslim.optimize(_net(), _x(), passes=["haste:L=4"])
    with pytest.raises(RuntimeError, match="channels"):
        _net()(torch.randn(2, 5, 8, 8))
    with pytest.raises((RuntimeError, ValueError), match="channels|C=3"):
        res.module(torch.randn(2, 5, 8, 8))


# ----------------------------------------------------------------------------------------------
# Nothing to match, untraceable models


@pytest.mark.parametrize("spec,reason", [("haste", "stem"), ("httm", "no candidates")])
def test_model_with_nothing_to_match_warns_with_reasons_and_returns_equal_copy(spec, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    state, x = _state(model), _x()
    with pytest.warns(UserWarning, match=rf"pass '{spec}' rewrote nothing in Sequential \(skipped: .*{reason}"):
        res = fxslim.optimize(model, x, passes=[spec])
    assert res.report.rewritten(spec) == 0
    if reason != "no candidates":
        assert res.report.skipped(spec) == {reason: 1}  # the report says why, per candidate
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=0)
    assert res.module is not model
    _assert_unchanged(model, state)
    with pytest.raises(ValueError, match="rewrote nothing"):
        fxslim.optimize(model, x, passes=[spec], strict=True)


def test_prom_on_a_model_without_convs_or_linears_warns_and_convert_refuses():
    model = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    with pytest.warns(UserWarning, match="pass 'prom' rewrote nothing"):
        qat = fxslim.prepare(model, _x())
    with pytest.raises(TypeError, match="convert: expected the GraphModule returned by fxslim.prepare"):
        fxslim.convert(qat)


class _AssertsShape(nn.Module):
    """An ``assert`` on the input's shape keeps forward from tracing; its convs trace on their own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        assert x.shape[1] == 3
        return self.b(torch.relu(self.a(x)))


def test_a_pass_that_rewrote_nothing_in_a_partly_traced_model_says_what_did_not_trace_and_the_fix():
    with pytest.warns(UserWarning, match=r"rewrote nothing in _AssertsShape .*_AssertsShape\.forward could not be "
                                         r"traced \(TraceError.*torch\._assert instead of assert.*capture='export'"):
        qat = fxslim.prepare(_AssertsShape().eval(), _x())
    with pytest.raises(TypeError, match="when prepare rewrote nothing, its warning says why"):
        fxslim.convert(qat)


def test_untraceable_model_raises_capture_error_with_fixes_but_compiles_through_backend():
    model = _Branchy().eval()
    state = _state(model)
    with pytest.raises(CaptureError, match="could not be traced.*leaf_modules=.*capture='export'.*backend='fxslim'"):
        fxslim.optimize(model, _x(), passes=["haste"])
    with pytest.raises(CaptureError, match="could not be traced"):
        fxslim.estimate(model, _x())
    _assert_unchanged(model, state)
    # the backend sees the graphs around the graph break: eager results
    compiled = torch.compile(model, backend="fxslim", options={"passes": ["haste"], "inner": "eager"})
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_untraceable_torch_module_as_the_whole_model_names_fixes_that_work():
    # leaf_modules=(nn.LSTM,) cannot help when the LSTM is the model itself; export and a wrapper do
    lstm, x = nn.LSTM(8, 16, batch_first=True), torch.randn(2, 5, 8)
    with pytest.raises(CaptureError, match=r"LSTM could not be traced.*the whole model.*capture='export'.*wrap it") as err:
        fxslim.estimate(lstm, x)
    assert "leaf_modules" not in str(err.value)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            return self.lstm(x)

    exported = _quiet(fxslim.estimate, lstm, x, capture="export").total
    assert exported.macs == fxslim.estimate(Wrapped(), x).total.macs == 2 * 5 * 4 * 16 * (8 + 16)


def test_untraceable_submodule_stays_eager_and_is_reported():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(3, 3, 3, padding=1))
    model = nn.Sequential(body, _Branchy()).eval()
    res = _quiet(fxslim.optimize, model, _x(), passes=["haste:L=48,sparsity=0"])
    assert [path for path, _ in res.report.untraced] == ["1"]  # the branchy block: a leaf of the root graph
    assert res.report.graphs == [""]
    assert res.report.rewritten("haste") == 1
    with torch.no_grad():
        torch.testing.assert_close(res.module(_x()), model(_x()), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# NaN / inf inputs and empty batches (documented in docs/INVARIANTS.md)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("spec", ["haste:L=4", "prom"])
def test_non_finite_input_stays_in_its_sample(spec, bad):
    # like the dense model, a NaN/inf pixel makes its own sample non-finite and never another one
    model, x = _net(), _x(3)
    res = _quiet(fxslim.optimize, model, x, passes=[spec])
    if spec == "prom":
        fxslim.calibrate(res.module, [x])
        res.module.eval()
    y_ok = res.module(x).detach()
    x_bad = x.clone()
    x_bad[1, 0, 4, 4] = bad
    with torch.no_grad():
        y = res.module(x_bad)
        dense = model(x_bad)
    assert not torch.isfinite(dense[1]).all() and torch.isfinite(dense[[0, 2]]).all()
    if spec != "prom" or bad != bad:  # PROM's fake quantization clamps inf to its grid but passes NaN through
        assert not torch.isfinite(y[1]).all()
    torch.testing.assert_close(y[[0, 2]], y_ok[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_prom_observer_seeing_non_finite_values_raises_value_error(bad):
    qat = _quiet(fxslim.prepare, _net(), _x())
    x = _x()
    x[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"ActFakeQuant: expected finite activations to observe"):
        fxslim.calibrate(qat, [x])


def test_non_finite_example_inputs_do_not_matter_for_capture():
    # capture reads shapes only: NaN example values give the same rewrite
    x = _x()
    x[0] = float("nan")
    res = _quiet(fxslim.optimize, _net(), x, passes=["haste:L=4"])
    ref = _quiet(fxslim.optimize, _net(), _x(), passes=["haste:L=4"])
    assert res.module.code == ref.module.code


@pytest.mark.parametrize("spec", ["haste:L=4", "prom"])
def test_empty_batch_as_example_or_at_run_time_gives_empty_output(spec):
    model = _net()
    state = _state(model)
    empty = torch.randn(0, 3, 8, 8)
    for example in (empty, _x()):
        res = _quiet(fxslim.optimize, model, example, passes=[spec])
        with torch.no_grad():
            y = res.module(empty)
        assert y.shape == (0, 4)
    assert fxslim.estimate(model, empty).total.macs == 0
    _assert_unchanged(model, state)


def test_prom_empty_batch_is_not_observed_and_converts_after_calibration():
    qat = _quiet(fxslim.prepare, _net(), _x())
    fxslim.calibrate(qat, [torch.randn(0, 3, 8, 8)])
    assert not any(bool(m.initialized) for m in qat.modules() if isinstance(m, ActFakeQuant))
    fxslim.calibrate(qat, [_x()])
    int_model = fxslim.convert(qat)
    assert int_model(torch.randn(0, 3, 8, 8)).shape == (0, 4)


@pytest.mark.parametrize("runtime", ["reference", "onednn"])
def test_prom_integer_model_refuses_a_dtype_change_of_its_float_tensors_and_still_moves(runtime):
    """.double() failed deep in the oneDNN ops ("w_scale: expected a float32 tensor"): its float32 scales
    and biases are the model's arithmetic, so a dtype change is refused, naming it. The reference
    runtime's model holds integer tensors only: a cast changes nothing there, and is taken."""
    if runtime == "onednn" and not fxslim.runtime.prom_onednn.onednn_available():
        pytest.skip("needs oneDNN quantized ops")
    qat = fxslim.calibrate(_quiet(fxslim.prepare, _net(), _x()), [_x()])
    int_model = fxslim.convert(qat, runtime=runtime)
    x = _x()
    with torch.no_grad():
        before = int_model(x)
    casts = (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.float64))
    if runtime == "onednn":
        for cast in casts:
            with pytest.raises(ValueError, match="leave its dtype"):
                cast(int_model)
        with pytest.raises(ValueError, match="leave its dtype"):
            fxslim.micro_batched(int_model).double()
    else:
        assert not [t for t in int_model.state_dict().values() if t.is_floating_point()]
        for cast in casts:
            cast(int_model)
    for same in (lambda m: m.float(), lambda m: m.to("cpu", torch.float32), lambda m: m.to("cpu")):
        same(int_model)  # float32 stays float32
    with torch.no_grad():
        assert torch.equal(int_model(x.double()), before)


# ----------------------------------------------------------------------------------------------
# Unknown names on the command line


@pytest.mark.parametrize("argv,message", [
    (["inspect", "torchvision:no_such_net", "--input", "1x3x8x8"], "unknown torchvision model 'no_such_net'"),
    (["inspect", "timm:no_such_net", "--input", "1x3x8x8"], "unknown timm model 'no_such_net'"),
    (["inspect", "fxslim:no_such_net", "--input", "1x3x8x8"], "unknown fxslim model 'no_such_net'"),
    (["inspect", "keras:resnet", "--input", "1x3x8x8"], "unknown source 'keras'"),
    (["inspect", "torchvision:resnet18", "--input", "1x3x-2x32"], "--input: expected sizes >= 1"),
    (["report", "torchvision:resnet18", "--input", "1x3x32x32", "--deploy", "int3"], "deploy: expected a preset"),
])
def test_cli_unknown_names_exit_2_naming_them(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["nonsense"], ["inspect", "torchvision:resnet18", "--input", "1x3x8x8", "--ir", "jit"]])
def test_cli_unknown_command_or_choice_is_an_argparse_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_graph_module_and_exported_program_inputs_are_never_modified():
    model = _net()
    gm = fx.symbolic_trace(model)
    ep = torch.export.export(copy.deepcopy(model), (_x(),))
    code, ep_code = gm.code, ep.graph_module.code
    _quiet(fxslim.optimize, gm, _x(), passes=["haste:L=4"])
    _quiet(fxslim.optimize, ep, _x(), passes=["haste:L=4"])
    assert gm.code == code and ep.graph_module.code == ep_code


# ----------------------------------------------------------------------------------------------
# Arguments of the wrong kind (each used to give a bare Python error, or to be ignored)


@pytest.mark.parametrize("passes, message", [
    (None, "passes: expected a pass, a string like 'haste:L=14', or a list of them; got NoneType"),
    (5, "passes: expected a pass, .* got int"),
    ({"haste": 1}, "passes: expected a pass, .* got dict"),
    (fxslim.HASTE, r"passes: got the class HASTE; pass an instance, e.g. HASTE\(\), or a string like 'haste'"),
    ([fxslim.HASTE], "passes: got the class HASTE"),
])
def test_passes_of_the_wrong_kind_raise_value_error_naming_passes(passes, message):
    with pytest.raises(ValueError, match=message):
        fxslim.optimize(_net(), _x(), passes=passes)
    compiled = torch.compile(_net(), backend="fxslim", options={"passes": passes, "inner": "eager"})
    with pytest.raises(Exception, match=message):
        compiled(_x())


def test_example_inputs_of_the_wrong_kind_raise_value_error_naming_them():
    numpy = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=r"example_inputs: expected a tensor .* got ndarray \(torch.from_numpy"):
        fxslim.optimize(_net(), numpy.zeros((2, 3, 8, 8), dtype="float32"), passes=["haste"])
    with pytest.raises(ValueError, match=r"example_inputs: expected a tensor .* got int"):
        fxslim.estimate(_net(), 3)
    with pytest.raises(ValueError, match=r"example_inputs: _Net.forward takes \['x'\], got 0 input\(s\)"):
        fxslim.optimize(_net(), (), passes=["haste"])


def test_leaf_modules_take_a_class_or_classes_and_refuse_anything_else():
    one = fxslim.optimize(_net(), _x(), passes=["haste"], leaf_modules=nn.Conv2d)
    assert one.report.rewritten("haste") == fxslim.optimize(_net(), _x(), passes=["haste"],
                                                            leaf_modules=(nn.Conv2d,)).report.rewritten("haste") == 1
    with pytest.raises(ValueError, match="leaf_modules: expected nn.Module subclasses .* got 'Conv2d'"):
        fxslim.optimize(_net(), _x(), passes=["haste"], leaf_modules=["Conv2d"])


def test_flags_that_are_not_booleans_raise_value_error():
    with pytest.raises(ValueError, match="strict: expected True or False, got 'no'"):
        fxslim.optimize(_net(), _x(), passes=["haste"], strict="no")
    qat = fxslim.calibrate(fxslim.prepare(_net(), _x()), [_x()])
    with pytest.raises(ValueError, match="fuse_adds must be True or False, got 'no'"):
        fxslim.convert(qat, fuse_adds="no")


def test_overrides_as_strings_apply_and_unmatched_keys_warn():
    """A string override was silently ignored: conv kept the pass's L=12."""
    result = fxslim.optimize(_net(), _x(), passes=["haste:L=12"], overrides={"conv": "haste:L=4"})
    (entry,) = [e for e in result.report.entries("haste") if e.status == "rewritten"]
    assert entry.fqn == "conv" and entry.info["L"] == 4
    with pytest.warns(UserWarning, match=r"overrides \['cnv'\] named no module or kind a pass considered"):
        fxslim.optimize(_net(), _x(), passes=["haste"], overrides={"cnv": None})


def test_calibrate_restores_every_modules_mode_and_refuses_what_it_cannot_observe():
    """It left the model in eval mode when a batch failed, and set every module to the root's mode."""
    qat = fxslim.prepare(_net().train(), _x())
    qat.get_submodule("fc").eval()  # a module the user froze
    modes = {name: m.training for name, m in qat.named_modules()}
    with pytest.raises(RuntimeError):
        fxslim.calibrate(qat, [torch.zeros(2, 5, 8, 8)])  # wrong channel count: fails in the first conv
    assert {name: m.training for name, m in qat.named_modules()} == modes
    fxslim.calibrate(qat, [_x()])
    assert {name: m.training for name, m in qat.named_modules()} == modes
    with pytest.raises(ValueError, match="batches: expected an iterable of batches, .* got a tensor"):
        fxslim.calibrate(qat, _x())
    with pytest.raises(ValueError, match="calibrate: _Net has no ActFakeQuant observers"):
        fxslim.calibrate(_net(), [_x()])


def test_micro_batched_refuses_what_it_cannot_wrap():
    with pytest.raises(ValueError, match="int_model: expected the GraphModule fxslim.convert returned, got _Net"):
        fxslim.micro_batched(_net())
    integer = fxslim.convert(fxslim.calibrate(fxslim.prepare(_net(), _x()), [_x()]))
    with pytest.raises(ValueError, match="max_activation_bytes: expected a positive integer .* got '1MB'"):
        fxslim.micro_batched(integer, "1MB")


def test_an_example_of_the_wrong_shape_raises_without_a_logged_traceback(capfd):
    """FakeTensorMode logged an 18-line traceback on stderr before the error was raised."""
    with pytest.raises(RuntimeError, match="same reduction dim"):
        fxslim.optimize(nn.Sequential(nn.Linear(8, 4)), torch.randn(2, 9), passes=["haste"])
    assert "fake_tensor.py" not in capfd.readouterr().err
