"""PROM models saved whole (torch.save / pickle): the integer model comes back as itself, and a
prepared model that lost its shapes says how to convert it."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import fxslim
from fxslim.runtime.prom_onednn import onednn_available


class Net(nn.Module):
    """A BN after a softmax stays a float island: train() would switch it to batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn(torch.softmax(self.conv(x), 1))).mean((2, 3))


def _reloaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(scope="module")
def qat():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return fxslim.calibrate(fxslim.prepare(Net().eval(), x), [x]).eval(), x


def test_an_integer_model_saved_whole_stays_inference_only_with_its_report_and_shapes(qat):
    model, x = qat
    integer = fxslim.convert(model)
    loaded = _reloaded(integer)
    assert isinstance(loaded, fxslim.passes.prom_convert.IntegerModel)
    assert fxslim.convert_report(loaded) == fxslim.convert_report(integer)
    with torch.no_grad():
        expected = integer(x)
        with pytest.warns(UserWarning, match="keeps it in eval mode"):
            loaded.train()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(fxslim.micro_batched(loaded)(x), expected, rtol=0, atol=0)  # needs node shapes


def test_a_prepared_model_saved_whole_says_how_to_convert_it(qat):
    model, _ = qat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _reloaded(model)
    with pytest.raises(ValueError, match=r"no shape metadata .*save qat\.state_dict\(\)"):
        fxslim.convert(loaded)


def _int8_buffer(model: nn.Module) -> str:
    return next(name for name, b in model.named_buffers() if b.dtype == torch.int8)


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN's int8 convs")
def test_micro_batched_follows_weights_loaded_or_changed_after_its_first_call(qat):
    """Its lowered copy reads the weights once: it gave the old model's outputs after load_state_dict
    (20 output steps apart on a 4-conv model) until it was built again."""
    model, x = qat
    fast = fxslim.micro_batched(fxslim.convert(model, runtime="onednn"))
    with torch.no_grad():
        before = fast(x)
        state = fast.state_dict()
        name = f"module.{_int8_buffer(fast.module)}"
        state[name] = -state[name]
        fast.load_state_dict(state)
        loaded = fast(x)
        assert not torch.equal(loaded, before)
        assert torch.equal(loaded, fxslim.micro_batched(fast.module)(x))
        fast.module.get_buffer(_int8_buffer(fast.module)).neg_()  # back, in place
        assert torch.equal(fast(x), before)


def test_integer_model_refuses_the_state_of_one_converted_with_other_constants(qat):
    """Scales and zero points are literals of the graph's code, not buffers: loading the buffers of a
    model calibrated on other data gave a hybrid 9 output steps from either model, without a word."""
    model, x = qat
    integer = fxslim.convert(model)
    integer.load_state_dict(fxslim.convert(model).state_dict())  # the same constants: loads
    other = fxslim.calibrate(fxslim.prepare(Net().eval(), x), [3 * x]).eval()  # another model's constants
    before = {k: v.clone() for k, v in integer.state_dict().items()}
    with pytest.raises(ValueError, match="other quantization constants.*prepare"):
        integer.load_state_dict(fxslim.convert(other).state_dict())
    assert all(torch.equal(before[k], v) for k, v in integer.state_dict().items())  # refused before any copy


@pytest.mark.parametrize("strict", [True, False])
def test_integer_model_refuses_its_tensors_without_the_constants_digest(qat, strict):
    """A checkpoint filtered to tensors skipped the digest check: strict=True overwrote the weights and
    then raised, strict=False loaded another model's weights under this model's constants (1.0 off both)."""
    model, x = qat
    integer = fxslim.convert(model)
    other = fxslim.calibrate(fxslim.prepare(Net().eval(), x), [3 * x]).eval()
    tensors = {k: v for k, v in fxslim.convert(other).state_dict().items() if k != "_extra_state"}
    before = {k: v.clone() for k, v in integer.state_dict().items()}
    with pytest.raises(ValueError, match="without '_extra_state'"):
        integer.load_state_dict(tensors, strict=strict)
    assert all(torch.equal(before[k], v) for k, v in integer.state_dict().items())
    unrelated = {"some.other.weight": torch.zeros(1)}  # nothing of this model: strict=False loads nothing
    assert integer.load_state_dict(unrelated, strict=False).unexpected_keys == ["some.other.weight"]


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN's int8 convs")
def test_integer_model_names_another_runtime_when_refusing_its_state(qat):
    model, _ = qat
    with pytest.raises(ValueError, match="another runtime"):
        fxslim.convert(model, runtime="onednn").load_state_dict(fxslim.convert(model).state_dict())


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN's int8 convs")
def test_micro_batched_follows_a_state_dict_assigned_to_its_module(qat):
    """``load_state_dict(assign=True)`` replaces the tensors, which their versions do not show."""
    model, x = qat
    fast = fxslim.micro_batched(fxslim.convert(model, runtime="onednn"))
    with torch.no_grad():
        before = fast(x)
        state = {k: v.clone() for k, v in fast.module.state_dict().items()}
        name = _int8_buffer(fast.module)
        state[name] = -state[name]
        fast.module.load_state_dict(state, assign=True)
        assert not torch.equal(fast(x), before)
        assert torch.equal(fast(x), fxslim.micro_batched(fast.module)(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.pw = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return x + self.pw(torch.relu(self.bn(self.conv(x))))


class _Parts(nn.Module):
    """A float stem before two blocks traced apart (the root has an assert)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.b2, self.head = nn.Conv2d(3, 8, 3, padding=1), _Block(), _Block(), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        assert x.shape[1] == 8
        return self.head(self.b2(self.b1(x)).mean((2, 3)))


def test_model_converted_in_parts_refuses_other_constants_before_loading_anything():
    """The refusal came from the part's own load, after the modules before it (the stem) had been
    overwritten: outputs moved by 0.055 although load_state_dict raised."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    ours = fxslim.convert(fxslim.calibrate(fxslim.prepare(_Parts().eval(), x), [x]).eval())
    theirs = fxslim.convert(fxslim.calibrate(fxslim.prepare(_Parts().eval(), x), [3 * x]).eval())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="other quantization constants"):
        ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
