"""Canonical views: one view per node whatever the IR (symbolic, dynamo, export)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.capture import capture, capture_dynamo
from fxslim.ir import AttentionView, ConvView, LinearView, resolve_padding, views


def _graphs(model: nn.Module, x: torch.Tensor):
    """The same model in all three IRs."""
    return {
        "symbolic": capture(model, (x,)).graphs[0].gm,
        "export": capture(model, (x,), method="export").graphs[0].gm,
        "dynamo": capture_dynamo(model, (x,))[0].gm,
    }


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(4, 8, 3, padding="same", dilation=2)
        self.pw_strided = nn.Conv2d(8, 8, 1, stride=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(self.dw(self.pw_strided(self.same(x))))


@pytest.mark.parametrize("ir", ["symbolic", "export", "dynamo"])
def test_conv_view_every_ir_same_fields(ir):
    gm = _graphs(_Convs().eval(), torch.randn(2, 4, 9, 9))[ir]
    convs = [v for v in views(gm) if isinstance(v, ConvView)]
    assert [c.fqn for c in convs] == ["same", "pw_strided", "dw", "up"]
    same, pw, dw, up = convs
    assert (same.kernel, same.padding, same.dilation, same.groups) == ((3, 3), (2, 2), (2, 2), 1)
    assert same.output_shape == (2, 8, 9, 9)
    assert pw.is_pointwise and pw.stride == (2, 2) and pw.bias is None
    assert dw.is_depthwise and not dw.is_pointwise and dw.macs == 2 * 8 * 1 * 9 * 5 * 5
    assert up.transposed and (up.in_channels, up.out_channels) == (8, 4)
    # MACs: N·C_out·(C_in/groups)·k·k·H_out·W_out
    assert same.macs == 2 * 8 * 4 * 9 * 9 * 9
    assert pw.macs == 2 * 8 * 8 * 5 * 5


@pytest.mark.parametrize("ir", ["symbolic", "export", "dynamo"])
def test_conv_view_weight_resolves_to_module_parameter(ir):
    model = _Convs().eval()
    graphs = capture_dynamo(model, (torch.randn(1, 4, 9, 9),)) if ir == "dynamo" else None
    if ir == "dynamo":
        graph = graphs[0]
        values = graph.placeholder_values
        gm = graph.gm
    else:
        gm = capture(model, (torch.randn(1, 4, 9, 9),), method=ir).graphs[0].gm
        values = {}
    conv = next(v for v in views(gm) if isinstance(v, ConvView))
    weight = conv.weight.tensor(gm, values)
    assert torch.equal(weight, model.same.weight)


def test_resolve_padding_same_and_valid():
    assert resolve_padding("same", (3, 5), (1, 1)) == ((1, 2), "same")
    assert resolve_padding("valid", (3, 3), (1, 1)) == ((0, 0), "valid")
    assert resolve_padding(2, (3, 3), (1, 1)) == ((2, 2), None)
    with pytest.raises(ValueError, match="padding"):
        resolve_padding("full", (3, 3), (1, 1))


class _Attn(nn.Module):
    """Three attention forms over [B, H, L, d], plus linear attention (no softmax: not attention)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.form == "manual":
            attn = (q @ k.transpose(-2, -1)) * 8**-0.5
            out = attn.softmax(dim=-1) @ v
        else:  # linear attention: k^T v first, no softmax over tokens
            out = q @ (k.transpose(-2, -1) @ v)
        return out.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("ir", ["symbolic", "export", "dynamo"])
@pytest.mark.parametrize("form", ["sdpa", "manual"])
def test_attention_view_forms_every_ir(form, ir):
    gm = _graphs(_Attn(form).eval(), torch.randn(3, 10, 16))[ir]
    (att,) = [v for v in views(gm) if isinstance(v, AttentionView)]
    assert (att.batch, att.heads, att.q_len, att.kv_len, att.head_dim) == (3, 2, 10, 10, 8)
    assert att.macs == 3 * 2 * 10 * 10 * (8 + 8)


@pytest.mark.parametrize("ir", ["symbolic", "export", "dynamo"])
def test_linear_attention_is_not_an_attention_view(ir):
    gm = _graphs(_Attn("linear").eval(), torch.randn(3, 10, 16))[ir]
    assert not [v for v in views(gm) if isinstance(v, AttentionView)]


@pytest.mark.parametrize("ir", ["symbolic", "dynamo"])
def test_mha_view_batch_first_and_heads(ir):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    gm = _graphs(M().eval(), torch.randn(3, 10, 16))[ir]
    (att,) = [v for v in views(gm) if isinstance(v, AttentionView)]
    assert (att.form, att.batch, att.heads, att.q_len, att.head_dim) == ("mha", 3, 4, 10, 4)


@pytest.mark.parametrize("ir", ["symbolic", "export", "dynamo"])
def test_linear_view_rows_and_features(ir):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4, bias=False)).eval()
    gm = _graphs(model, torch.randn(5, 7, 16))[ir]
    lins = [v for v in views(gm) if isinstance(v, LinearView)]
    assert [(l.in_features, l.out_features, l.rows) for l in lins] == [(16, 32, 35), (32, 4, 35)]
    assert lins[1].bias is None


class _PerSampleConv(nn.Module):
    """timm's CondConv2d: weights mixed per sample, the batch folded into channels, groups = batch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.route = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.experts = nn.Parameter(torch.randn(4, 8 * 8 * 9) * 0.1)

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        weight = (torch.sigmoid(self.route(y.mean((2, 3)))) @ self.experts).view(b * 8, c, 3, 3)
        return F.conv2d(y.reshape(1, b * c, h, w), weight, padding=1, groups=b).view(b, 8, h, w)


def test_a_conv_whose_groups_forward_computes_is_no_layer_view():
    """``groups=b`` is a node of the trace: taking it for an int raised a TypeError in optimize,
    prepare and estimate. It is no fixed layer, so no pass rewrites it, and it is counted by its shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _PerSampleConv().eval()
    for passes in (["haste"], ["prom"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fxslim.optimize(model, torch.randn(1, 3, 16, 16), passes=passes)
        assert all(e.fqn != "conv2d" for e in res.report.passes[0].entries)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(res.module(x), model(x), rtol=0.1, atol=0.1)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        assert fxslim.estimate(model, x).total.macs == counter.get_total_flops() // 2


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_a_parametrized_weight_is_read_without_an_fx_warning(wrap, recwarn):
    """A parametrized conv's weight is a property: the rewrite reads it through a get_attr (so it
    follows the parametrization), and fx warned the user to register it, which nobody can act on."""
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), getattr(parametrizations, wrap)(nn.Conv2d(16, 16, 3, padding=1)))
    res = fxslim.optimize(model.eval(), torch.randn(2, 3, 16, 16), passes=["haste:L=48,s=0"])
    assert res.report.rewritten("haste") == 1
    assert not [w for w in recwarn if "get_attr" in str(w.message)]
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)
