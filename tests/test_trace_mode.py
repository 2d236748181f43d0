"""``capture.trace`` and ``self.training``: a trace reads the flag once, so where forward only passes
it on (dropout, stochastic depth) the GraphModule reads its own flag instead and follows
``.train()``/``.eval()``; where forward branches on it, the trace keeps its mode, and prepare and
optimize warn where that matters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxslim
from fxslim.capture import trace
from fxslim.ir import META_FROZEN_MODE
from fxslim.passes.prom import calibrate
from fxslim.runtime.prom_onednn import onednn_available


def _double_if(x: torch.Tensor, flags: dict) -> torch.Tensor:
    """A function that stays a call in the graph, its flag nested in a dict in a list."""
    return x * 2 if flags["double"][0] else x


fx.wrap("_double_if")


class _Dropout(nn.Module):
    """``F.dropout(y, 0.5, self.training)`` in forward (the flag as an argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(torch.relu(self.conv(torch.relu(self.stem(x)))), 0.5, self.training)
        return self.fc(y.mean((2, 3)))


class _NotTraining(nn.Module):
    """The flag negated (``not self.training``), as a keyword, and nested in a dict in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(self.conv(x), p=0.5, training=not self.training)
        return _double_if(y, {"double": [self.training]})


class _Branchy(nn.Module):
    """A structural branch on the flag: a module called in train mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.extra = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training:
            y = self.extra(y)
        return y


class _CountsInTraining(nn.Module):
    """Writes into a buffer in train mode only (traced in eval mode, the train-mode trace writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps.add_(1)
        return self.conv(x)


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8)


def _traced(model: nn.Module) -> tuple[fx.GraphModule, str | None]:
    """The trace and the mode it stays frozen in (None: it follows .train()/.eval())."""
    gm = trace(model)
    return gm, gm.meta.get(META_FROZEN_MODE)


@pytest.mark.parametrize("mode", [True, False], ids=["traced_in_train", "traced_in_eval"])
def test_dropout_follows_train_and_eval_of_the_graph_module(mode):
    model, x = _Dropout().train(mode), _x()
    gm, frozen = _traced(model)
    assert frozen is None
    assert gm.training is mode
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["training"]
    gm.eval()
    model.eval()
    with torch.no_grad():
        first, second = gm(x), gm(x)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, model(x))
        gm.train()
        assert not torch.equal(gm(x), gm(x))  # dropout of half of 4×8×8×8 activations


@pytest.mark.parametrize("mode", [True, False], ids=["traced_in_train", "traced_in_eval"])
def test_negated_and_nested_flags_follow_the_mode(mode):
    model, x = _NotTraining().train(mode), _x()
    gm, frozen = _traced(model)
    assert frozen is None
    with torch.no_grad():
        gm.train()
        model.train()
        doubled = 2 * model.conv(x)
        assert torch.equal(gm(x), gm(x))  # dropout in eval mode only
        torch.testing.assert_close(gm(x), doubled)
        torch.testing.assert_close(model(x), doubled)
        gm.eval()
        dropped = gm(x)
        assert not torch.equal(dropped, gm(x))
        kept = dropped != 0
        torch.testing.assert_close(dropped[kept], doubled[kept])  # dropout's 1 / (1 - p), not doubled


class _DropBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.conv(x), 0.5, self.training)


class _BlockInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), _DropBlock(), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


@pytest.mark.parametrize("captured", ["eval", "mixed"])
@pytest.mark.parametrize("root_training", [True, False], ids=["frozen_block", "mc_dropout"])
def test_dropout_follows_the_flag_of_the_module_that_reads_it(root_training, captured):
    """``F.dropout(x, p, self.training)`` in a block reads the block's flag: a block frozen in eval
    mode inside a model in train mode, or Monte Carlo dropout in a model in eval mode, drops out as
    the original does (the trace read the root's flag), also when captured in such a mixed mode
    (the other-mode trace flipped every module to the root's other mode, and the block kept a constant)."""
    model, x = _BlockInside().eval(), _x()
    if captured == "mixed":
        model.train(not root_training)
        model.block.train(root_training)
    gm, frozen = _traced(model)
    assert frozen is None
    for m in (model, gm):
        m.train(root_training)
        m.block.train(not root_training)
    torch.manual_seed(0)
    want = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(gm(x), want)
    assert torch.equal(gm(x), gm(x)) is root_training  # dropout only where the block is in train mode


def test_efficientnet_prepared_in_train_mode_runs_as_the_float_model_after_eval():
    """torchvision's StochasticDepth passes ``self.training`` to ``stochastic_depth``: the traced
    graph and the prepared model follow ``.eval()`` (before the fix both kept dropping rows)."""
    model, x = torchvision.models.efficientnet_b0(weights=None, num_classes=10).train(), torch.randn(4, 3, 64, 64)
    model.classifier[0].p = 0.0  # only stochastic depth is random
    gm, frozen = _traced(model)
    assert frozen is None
    depths = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]
    assert depths and all(isinstance(n.args[3], fx.Node) for n in depths)
    qat = fxslim.prepare(model, x)
    assert all(isinstance(n.args[3], fx.Node) for n in qat.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth")
    assert model.training and all(m.training for m in model.modules())
    calibrate(qat, [x])
    gm.eval()
    qat.eval()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(gm(x), gm(x))
        torch.testing.assert_close(gm(x), expected)
        assert torch.equal(qat(x), qat(x))  # no residual branch dropped (the untrained logits quantize to ~0)
        gm.train()
        assert not torch.equal(gm(x), gm(x))  # back to dropping rows (BN in train mode is deterministic)
        # convert: each block's flag read (features.1.0.stochastic_depth.training) is False there; it
        # stayed in the graph and convert failed ('bool' object has no attribute 'eval')
        integer = fxslim.convert(qat)
        assert not any(str(n.target).endswith("training") for n in integer.graph.nodes if n.op == "get_attr")
        assert torch.equal(integer(x), integer(x)) and integer(x).shape == (4, 10)


class _DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, self.training))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converting_a_model_whose_submodule_passes_its_flag_on(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), _DropoutHead()).train(mode == "train")
    x = torch.randn(4, 3, 16, 16)
    qat = calibrate(fxslim.prepare(model, x), [x]).eval()
    for runtime in ("reference", "onednn") if onednn_available() else ("reference",):
        with torch.no_grad():
            torch.testing.assert_close(fxslim.convert(qat, runtime=runtime)(x), qat(x), atol=0.05, rtol=0)


@pytest.mark.parametrize("mode", [True, False], ids=["traced_in_train", "traced_in_eval"])
def test_structural_branch_keeps_the_traced_mode(mode):
    model, x = _Branchy().train(mode), _x()
    gm, frozen = _traced(model)
    assert frozen == ("train" if mode else "eval")
    assert any(n.target == "extra" for n in gm.graph.nodes) is mode
    gm.train(not mode)
    model.train(mode)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))  # the traced mode's graph, whatever gm's flag


def _mode_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in record if "self.training" in str(w.message)]


@pytest.mark.parametrize("mode", [True, False], ids=["traced_in_train", "traced_in_eval"])
def test_frozen_mode_warns_where_it_matters(mode):
    """prepare (the model will train) warns in either mode; an inference rewrite only of a graph
    frozen in train mode, never of an eval model's."""
    model, x = _Branchy().train(mode), _x()
    for_training = _mode_warnings(lambda: fxslim.prepare(model, x))
    assert len(for_training) == 1
    assert "_Branchy" in for_training[0] and f"follows {'train' if mode else 'eval'} mode" in for_training[0]
    assert ".train() or .eval()" in for_training[0]
    assert len(_mode_warnings(lambda: fxslim.optimize(model, x, passes=["haste:L=12"]))) == int(mode)


def test_write_in_the_other_mode_keeps_the_mode_and_is_undone():
    model, x = _CountsInTraining().eval(), _x()
    gm, frozen = _traced(model)
    assert frozen == "eval"
    assert gm.steps.item() == 0 and model.steps.item() == 0  # the train-mode trace's write, undone
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_users_model_keeps_its_training_flags_and_tensors():
    model = nn.Sequential(_Dropout(), nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), _Branchy()).train()
    model[0].eval()
    model[0].conv.train()
    model[1][1].eval()
    model[2].conv.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inner, frozen = _traced(model[0])  # follows the flag
    assert frozen is None
    whole = trace(nn.Sequential(model[0], model[1]))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not inner.training and inner.get_submodule("conv").training
    assert not whole.get_submodule("1.1").training and whole.get_submodule("1.0").training


def test_optimize_with_haste_and_cost_model_handle_the_flag():
    model, x = _Dropout().train(), torch.randn(2, 3, 16, 16)
    res = fxslim.optimize(model, x, passes=["haste:L=12"])
    assert res.report.rewritten("haste") == 1
    res.compare()
    fxslim.estimate(res.module, x)
    res.module.eval()
    with torch.no_grad():
        assert torch.equal(res.module(x), res.module(x))
        res.module.train()
        assert not torch.equal(res.module(x), res.module(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_of_a_model_with_dropout(mode):
    """The integer model is inference only: dropout is the identity whatever mode it was traced in."""
    model, x = _Dropout().train(mode == "train"), _x()
    qat = calibrate(fxslim.prepare(model, x), [x]).eval()
    int_model = fxslim.convert(qat)
    with torch.no_grad():
        torch.testing.assert_close(int_model(x), qat(x))


class _DropoutRate(nn.Module):
    """timm's idiom: the rate chosen by the flag (``p if self.training else 0.``), not passed as a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3))
        return self.fc(F.dropout(y, 0.5 if self.training else 0.0))


@pytest.mark.parametrize("model_class", [_Branchy, _DropoutRate])
def test_a_graph_frozen_in_eval_warns_when_it_runs_in_train_mode(model_class, tmp_path):
    # an inference rewrite of an eval model warned about nothing, and a later .train() silently kept
    # eval-mode code (no dropout, no train-only branch)
    model, x = model_class().eval(), _x()
    rewritten = fxslim.optimize(model, x, passes=["haste:L=12"]).module
    assert _mode_warnings(lambda: rewritten(x)) == []
    rewritten.train()
    for copy_of in (lambda m: m, copy.deepcopy, lambda m: _saved_and_loaded(m, tmp_path)):
        said = _mode_warnings(lambda: copy_of(rewritten)(x))
        assert len(said) == 1 and "traced in eval mode" in said[0] and "runs in train mode" in said[0]
        assert model_class.__name__ in said[0]


def _saved_and_loaded(model: nn.Module, tmp_path) -> nn.Module:
    torch.save(model, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=False)


def test_an_integer_model_from_a_graph_frozen_in_train_says_nothing_at_each_call():
    # prepare warned once; the integer model runs in eval mode only, by design
    model, x = _Branchy().train(), _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxslim.prepare(model, x)
        qat(x)
        integer = fxslim.convert(calibrate(qat, [x]).eval())
    assert _mode_warnings(lambda: integer(x)) == []
