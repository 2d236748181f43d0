"""Round trips of optimized models: torch.export save/load, state_dict save/load into a freshly
optimized module, torch.compile (fullgraph=True, dynamic=True, and around a graph break) — outputs
identical to the optimized model run eagerly — and identical outputs across runs with fixed seeds.

One small model per pass: HASTE on a width-1/8 CIFAR ResNet18, a converted PROM integer net, HTTM
on the tiny VGGT (two blocks). torch.compile uses the aot_eager backend: the fxslim ops are opaque
custom ops, so any backend runs the same kernels; aot_eager keeps this file fast.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxslim
from fxslim.models.resnet_cifar import resnet18
from fxslim.models.vggt import vggt_tiny

_CASES = ("haste", "prom", "httm")


pytestmark = pytest.mark.usefixtures("one_thread_module")


class _PromNet(nn.Module):
    """conv-BN-ReLU, a residual block of pointwise and 3x3 convs, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.expand(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class _Case:
    build: Callable[[int], nn.Module]  # seed -> optimized module
    inputs: Callable[[int, int], tuple]  # (size, seed) -> inputs; size: batch or frame count
    sizes: tuple[int, int]


def _image(n: int, seed: int) -> tuple:
    return (torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),)


def _frames(frames: int, seed: int) -> tuple:
    return (torch.rand(1, frames, 3, 28, 28, generator=torch.Generator().manual_seed(seed)),)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _haste(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = resnet18(width=0.125).eval()
    return _quiet(fxslim.optimize, model, _image(2, 0), passes=["haste:L=8"]).module


def _prom_qat(seed: int, calibrated: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    qat = _quiet(fxslim.prepare, _PromNet().eval(), _image(2, 0))
    return fxslim.calibrate(qat, [_image(8, 1)]) if calibrated else qat


def _prom(seed: int) -> nn.Module:
    return fxslim.convert(_prom_qat(seed))


def _httm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = vggt_tiny(depth=2).eval()
    return fxslim.optimize(model, _frames(3, 0), passes=["httm:n_s=4,n_t=2,q=0.5,kv=0.5"], strict=True).module


_BUILDERS = {"haste": _Case(_haste, _image, (2, 3)), "prom": _Case(_prom, _image, (2, 3)),
             "httm": _Case(_httm, _frames, (3, 4))}
_BUILT: dict[str, nn.Module] = {}


def _optimized(name: str) -> nn.Module:
    if name not in _BUILT:
        _BUILT[name] = _BUILDERS[name].build(0)
    return _BUILT[name]


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _flat(out[key])]
    return [t for o in out for t in _flat(o)]


def _assert_identical(got, want, exact: bool = True) -> None:
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want) and got
    for g, w in zip(got, want):
        if exact:
            assert torch.equal(g, w)
        else:  # a compiled graph may reorder float sums around the custom ops
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _eager(module: nn.Module, inputs: tuple):
    with torch.no_grad():
        return module(*inputs)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _CASES)
def test_round_trip_torch_export_save_load_identical(name, tmp_path):
    module, inputs = _optimized(name), _BUILDERS[name].inputs(_BUILDERS[name].sizes[0], 5)
    with torch.no_grad():
        ep = torch.export.export(module, inputs)
    torch.export.save(ep, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    assert any(str(n.target).startswith("fxslim.") for n in loaded.graph.nodes)  # the ops survive
    _assert_identical(_eager(loaded.module(), inputs), _eager(module, inputs))


@pytest.mark.parametrize("name", ["haste", "httm"])
def test_round_trip_state_dict_into_freshly_optimized_module_identical(name, tmp_path):
    case = _BUILDERS[name]
    module, inputs = _optimized(name), case.inputs(case.sizes[0], 6)
    torch.save(module.state_dict(), tmp_path / "state.pt")
    fresh = case.build(1)  # other random weights, same architecture and pass
    assert not all(torch.equal(a, b) for a, b in zip(_flat(_eager(fresh, inputs)), _flat(_eager(module, inputs))))
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    _assert_identical(_eager(fresh, inputs), _eager(module, inputs))


def test_round_trip_prom_qat_state_dict_into_fresh_prepared_model_converts_identically(tmp_path):
    # the converted model keeps zero points, shifts and scales as op arguments in its graph, so the
    # state that round trips is the QAT model's (weights, BN statistics, observer ranges)
    inputs = _image(2, 6)
    torch.save(_prom_qat(0).state_dict(), tmp_path / "qat.pt")
    fresh = _prom_qat(1, calibrated=False)
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt"))
    _assert_identical(_eager(fxslim.convert(fresh), inputs), _eager(_optimized("prom"), inputs))


@pytest.mark.parametrize("name", _CASES)
def test_round_trip_compile_fullgraph_identical(name):
    module, inputs = _optimized(name), _BUILDERS[name].inputs(_BUILDERS[name].sizes[0], 7)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    _assert_identical(_eager(compiled, inputs), _eager(module, inputs), exact=False)


@pytest.mark.parametrize("name", ["haste", "prom", pytest.param("httm", marks=pytest.mark.slow)])  # httm: ~1 min
def test_round_trip_compile_dynamic_two_sizes_identical(name):
    case = _BUILDERS[name]
    module = _optimized(name)
    torch._dynamo.reset()
    compiled = torch.compile(module, dynamic=True, backend="aot_eager")
    for size in case.sizes:  # batch (HASTE, PROM) or frame count (HTTM) changes without recompiling
        inputs = case.inputs(size, 8)
        _assert_identical(_eager(compiled, inputs), _eager(module, inputs), exact=False)


class _WithBreak(nn.Module):
    """The optimized module between two graph breaks."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        x = x * 1.0
        torch._dynamo.graph_break()
        out = self.inner(x)
        torch._dynamo.graph_break()
        return out


@pytest.mark.parametrize("name", _CASES)
def test_round_trip_compile_with_graph_break_identical(name):
    module, inputs = _optimized(name), _BUILDERS[name].inputs(_BUILDERS[name].sizes[0], 9)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(_WithBreak(module), backend="aot_eager")
    _assert_identical(_eager(compiled, inputs), _eager(module, inputs), exact=False)
    assert sum(counts["graph_break"].values()) >= 2


@pytest.mark.parametrize("name", _CASES)
def test_round_trip_fixed_seeds_identical_across_builds_and_runs(name):
    case = _BUILDERS[name]
    inputs = case.inputs(case.sizes[0], 10)
    first = _eager(_optimized(name), inputs)
    _assert_identical(_eager(_optimized(name), inputs), first)  # same module, second run
    _assert_identical(_eager(case.build(0), inputs), first)  # rebuilt from the same seeds
