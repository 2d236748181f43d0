"""Cross-checks against other counters: FLOPs equal FlopCounterMode's on meta tensors (where CPU
SDPA is not counted as 0) for torchvision and timm models, attention models among them; MACs equal
fvcore's conv and linear counts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxslim
from benchmarks.zoo import by_name


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, depth=2, img_size=64)


# name -> (builder, input shape, attention rows); small resolutions keep the file fast
MODELS = {
    "resnet18": (torchvision.models.resnet18, (1, 3, 64, 64), 0),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, (1, 3, 64, 64), 0),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, (1, 3, 64, 64), 0),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, (1, 3, 64, 64), 0),
    "squeezenet1_0": (torchvision.models.squeezenet1_0, (1, 3, 64, 64), 0),
    "shufflenet_v2_x0_5": (torchvision.models.shufflenet_v2_x0_5, (1, 3, 64, 64), 0),
    "convnext_tiny": (torchvision.models.convnext_tiny, (1, 3, 32, 32), 0),
    "mnasnet0_5": (torchvision.models.mnasnet0_5, (1, 3, 64, 64), 0),
    "swin_t": (torchvision.models.swin_t, (1, 3, 64, 64), 12),  # windowed attention behind torch.fx.wrap
    "tv_vit_mha": (by_name("tv:vit_small_mha").build, (2, 3, 64, 64), 2),  # nn.MultiheadAttention
    "timm_vit_tiny": (lambda: _timm("vit_tiny_patch16_224"), (1, 3, 64, 64), 2),  # SDPA
    "timm_deit_tiny": (lambda: _timm("deit_tiny_patch16_224"), (1, 3, 64, 64), 2),
}


def _flop_counter(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_flops_equal_flop_counter_mode_on_meta(name):
    builder, shape, attention = MODELS[name]
    with torch.device("meta"):  # no weight initialisation: counting needs shapes only
        model, x = builder().eval(), torch.empty(shape)
    report = fxslim.estimate(model, x)
    assert report.total.flops == _flop_counter(model, x)
    assert report.total.flops > 0 and not report.unknown_ops
    assert len([r for r in report.rows if r.kind == "attention" and r.macs > 0]) == attention


def _fvcore_ops(model: nn.Module, x: torch.Tensor) -> dict:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, x)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(analysis.by_operator())


def test_macs_equal_fvcore_on_conv_linear_only_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, groups=8),
                          nn.Flatten(), nn.Linear(16 * 15 * 15, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert fxslim.estimate(model, x).total.macs == sum(_fvcore_ops(model, x).values())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_conv_and_linear_macs_equal_fvcore(name):
    builder, shape, _ = MODELS[name]
    model, x = builder().eval(), torch.randn(shape)
    ops = _fvcore_ops(model, x)
    report = fxslim.estimate(model, x)
    convs = sum(r.macs for r in report.rows if r.kind.endswith("conv"))
    linears = sum(r.macs for r in report.rows if r.kind == "linear")
    assert (convs, linears) == (ops["conv"], ops["linear"])


class _BroadcastQueryAttention(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


class _Sdpa(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _SlicedQkv(nn.Module):
    """Single-head attention on q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2] of a [B, 3, L, C] tensor."""

    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.manual, self.qkv = manual, nn.Linear(16, 48)

    def forward(self, x):
        qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 16).transpose(1, 2)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        if self.manual:
            return (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("model, inputs", [
    (nn.Conv2d(3, 8, 3), (torch.randn(3, 20, 11),)),  # unbatched: the batch was read from C_out
    (nn.Conv2d(4, 6, 3, stride=2, groups=2), (torch.randn(4, 9, 12),)),
    # one query shared by 4 heads: the heads were read from q alone
    (_BroadcastQueryAttention(), (torch.randn(2, 1, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 6))),
    (_BroadcastQueryAttention(), (torch.randn(1, 10, 8), torch.randn(6, 12, 8), torch.randn(6, 12, 8))),
    (_Sdpa(), (torch.randn(1, 1, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8))),
    (_Sdpa(), (torch.randn(1, 10, 8), torch.randn(6, 12, 8), torch.randn(6, 12, 8))),
    # q = qkv[:, 0] of [B, 3, L, C]: the 3 was taken for heads
    (_SlicedQkv(manual=False), (torch.randn(2, 10, 16),)),
    (_SlicedQkv(manual=True), (torch.randn(2, 10, 16),)),
], ids=["unbatched_conv", "unbatched_grouped_conv", "broadcast_query_attention", "broadcast_3d_query_attention",
        "broadcast_query_sdpa", "broadcast_3d_query_sdpa", "sliced_qkv_sdpa", "sliced_qkv_attention"])
def test_flops_equal_flop_counter_mode_on_unbatched_and_broadcast_inputs(model, inputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*inputs)  # (the CPU flash kernel counts as 0)
    assert fxslim.estimate(model.eval(), inputs).total.flops == counter.get_total_flops()


class _OverFrames(nn.Module):
    """Attention over the frames of each token: q [B, N, T, d], so the heads dim is a named size."""

    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


def test_a_heads_dim_that_is_a_named_size_stays_in_the_formula():
    # heads were read as int(shape[-3]): the formula was the example's constant, with no condition
    from torch.nn.attention import SDPBackend, sdpa_kernel

    report = fxslim.estimate(_OverFrames(), torch.randn(1, 5, 8, 16), symbolic={"tokens": 1})
    for tokens in (5, 9, 20):
        x = torch.randn(1, tokens, 8, 16)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            _OverFrames()(x)
        assert report.evaluate(tokens=tokens).total.flops == counter.get_total_flops() > 0


class _MemoryAttention(nn.Module):
    """Attention over learned memory slots, its scores scaled by a learned temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.keys, self.values = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32, 16))
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return ((x @ self.keys) * self.temperature).softmax(-1) @ self.values


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_weights_read_inside_an_attention_chain_are_counted(capture):
    # only the softmax anchor's weights were attributed: learned keys and values, XCiT's temperature vanished
    model = _MemoryAttention().eval()
    report = fxslim.estimate(model, torch.randn(2, 10, 16), capture=capture)
    assert report.total.params == sum(p.numel() for p in model.parameters()) == 1025
