"""An integer model's tensors on one version counter (``prom_versions``): values kept, a write to any
tensor seen through the one version ``micro_batched`` reads before every call, and the tensors still
ordinary ones to copies, saves, exports and compiles."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxslim
from fxslim.passes.prom_versions import share_version_counter, watched
from fxslim.runtime.prom_onednn import onednn_available

ONEDNN = onednn_available()
RUNTIMES = ["reference", pytest.param("onednn", marks=pytest.mark.skipif(not ONEDNN, reason="needs oneDNN"))]
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="needs oneDNN's int8 convs")


class Net(nn.Module):
    """A residual add, a float island (BN after a softmax) and a hardswish table (a uint8 buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.pw = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.island, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = F.hardswish(y + self.pw(y))
        return self.head(self.island(torch.softmax(y, 1))).mean((2, 3))


@pytest.fixture(scope="module")
def qat():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return fxslim.calibrate(fxslim.prepare(Net().eval(), x), [x]).eval(), x


def _versions(module: nn.Module) -> list[int]:
    return [t._version for t in watched(module)]


def _int8_weights(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in module.buffers() if t.dtype == torch.int8 and t.dim() == 4]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_converted_model_is_watched_through_one_version_counter(qat, runtime):
    model, _ = qat
    integer = fxslim.convert(model, runtime=runtime)
    tensors = [*integer.buffers(), *integer.parameters()]
    assert len(tensors) > 5
    assert runtime != "reference" or torch.uint8 in {t.dtype for t in tensors}  # the hardswish table
    assert len(watched(integer)) == 1
    for t in tensors:  # a write to each one moves the watched version
        before = _versions(integer)
        with torch.no_grad():
            t.add_(0) if t.dtype != torch.bool else t.logical_not_().logical_not_()
        assert _versions(integer) != before


@needs_onednn
def test_micro_batched_follows_an_in_place_write_to_each_weight(qat):
    model, x = qat
    fast = fxslim.micro_batched(fxslim.convert(model, runtime="onednn"))
    with torch.no_grad():
        before = fast(x)
        for i, weight in enumerate(_int8_weights(fast.module)):
            weight.neg_()
            assert torch.equal(fast(x), fxslim.micro_batched(fast.module)(x)), i
            assert not torch.equal(fast(x), before), i
            weight.neg_()
        assert torch.equal(fast(x), before)


def _reloaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@needs_onednn
def test_a_copy_shares_a_counter_of_its_own(qat):
    model, x = qat
    original = fxslim.micro_batched(fxslim.convert(model, runtime="onednn"))
    with torch.no_grad():
        before = original(x)
        for copied in (copy.deepcopy(original.module), _reloaded(original.module)):
            assert len(watched(copied)) == 1
            fast = fxslim.micro_batched(copied)
            assert torch.equal(fast(x), before)
            _int8_weights(copied)[0].neg_()
            assert not torch.equal(fast(x), before)  # the copy's write is seen by its wrapper ...
            assert torch.equal(original(x), before)  # ... and not by the original


@needs_onednn
def test_tensors_assigned_after_conversion_are_watched_one_by_one(qat):
    model, x = qat
    fast = fxslim.micro_batched(fxslim.convert(model, runtime="onednn"))
    with torch.no_grad():
        before = fast(x)
        fast.module.load_state_dict({k: v.clone() for k, v in fast.module.state_dict().items()}, assign=True)
        assert torch.equal(fast(x), before)
        assert len(watched(fast.module)) > 1
        _int8_weights(fast.module)[0].neg_()
        assert not torch.equal(fast(x), before)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_tensors_stay_ordinary_to_saves_exports_and_compiles(qat, runtime):
    """Each keeps a storage of its own: views of one storage were refused by torch.save across
    dtypes and warned about by torch.export.save."""
    model, x = qat
    integer = fxslim.convert(model, runtime=runtime)
    with torch.no_grad():
        expected = integer(x)
        state = io.BytesIO()
        torch.save(integer.state_dict(), state)
        assert len(state.getvalue()) < 2 * sum(t.nbytes for t in integer.buffers()) + 100_000
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            saved = io.BytesIO()
            torch.export.save(torch.export.export(integer, (x,)), saved)
        saved.seek(0)
        torch.testing.assert_close(torch.export.load(saved).module()(x), expected, rtol=0, atol=0)
        compiled = torch.compile(integer, backend="aot_eager", dynamic=True)
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(compiled(x[:3]), integer(x[:3]), rtol=0, atol=0)


_DTYPES = (torch.float32, torch.int8, torch.int32, torch.uint8, torch.float64, torch.bool)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3), st.booleans()),
                min_size=1, max_size=8), st.data())
def test_sharing_keeps_values_names_and_parameters_and_sees_every_write(specs, data):
    root, leaves = nn.Module(), []
    for i, (dtype, shape, as_parameter) in enumerate(specs):
        owner = root if i % 2 else root.add_module(f"m{i}", nn.Module()) or getattr(root, f"m{i}")
        value = (torch.rand(shape) * 10).to(dtype)
        if as_parameter:
            owner.register_parameter(f"t{i}", nn.Parameter(value, requires_grad=dtype.is_floating_point))
        else:
            owner.register_buffer(f"t{i}", value)
        leaves.append((owner, f"t{i}", value.clone(), as_parameter))
    root.alias = root.m0  # a module reached under two names (i = 0 always makes m0)
    share_version_counter(root)
    for owner, name, value, as_parameter in leaves:
        t = getattr(owner, name)
        assert torch.equal(t, value) and t.dtype == value.dtype and t.untyped_storage().nbytes() == value.nbytes
        assert isinstance(t, nn.Parameter) == as_parameter
    assert len(watched(root)) == 1
    owner, name, *_ = data.draw(st.sampled_from(leaves))
    before = _versions(root)
    with torch.no_grad():
        t = getattr(owner, name)
        t.logical_not_() if t.dtype == torch.bool else t.add_(0)
    assert _versions(root) != before
