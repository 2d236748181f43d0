"""View formulas: conv/linear/attention counted the same in every IR, attention chains once, MHA
with its projections (so totals equal FlopCounterMode's)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxslim
from fxslim.capture import Captured, capture_dynamo


def _all_irs(model: nn.Module, *inputs: torch.Tensor) -> dict:
    graphs = capture_dynamo(model, inputs)
    return {
        "symbolic": fxslim.estimate(model, inputs),
        "export": fxslim.estimate(model, inputs, capture="export"),
        "dynamo": fxslim.estimate(Captured(model, graphs, [], "dynamo", inputs[0].shape[0]), inputs),
    }


def _flop_counter_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(*(x.to("meta") for x in inputs))
    return counter.get_total_flops() // 2


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(4, 8, 3, padding="same", dilation=2)
        self.pw = nn.Conv2d(8, 8, 1, stride=2, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.grouped(self.pw(self.same(x)))
        return self.fc(y.permute(0, 2, 3, 1))


def test_conv_and_linear_views_same_counts_in_every_ir():
    x = torch.randn(2, 4, 9, 9)
    reports = _all_irs(_Convs().eval(), x)
    # same: 2·8·4·9·81; pw (stride 2 -> 5×5): 2·8·8·25; grouped: 2·8·4·9·25; fc rows 2·5·5: 50·8·3
    expected = 2 * 8 * 4 * 9 * 81 + 2 * 8 * 8 * 25 + 2 * 8 * 4 * 9 * 25 + 50 * 8 * 3
    for ir, report in reports.items():
        kinds = [r.kind for r in report.rows if r.macs]
        assert kinds == ["conv", "pointwise_conv", "grouped_conv", "linear"], ir
        assert report.total.macs == expected, ir
        assert report.total.params == sum(p.numel() for p in _Convs().parameters()), ir
    assert expected == _flop_counter_macs(_Convs().eval(), x)


class _SelfAttention(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * 8**-0.5
            out = attn.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("form", ["sdpa", "manual"])
def test_attention_counted_once_as_one_row(form):
    x = torch.randn(3, 10, 16)
    for ir, report in _all_irs(_SelfAttention(form).eval(), x).items():
        (att,) = [r for r in report.rows if r.kind == "attention"]
        # QK^T and AV: b·h·L·L·(d + d_v)
        assert att.macs == 3 * 2 * 10 * 10 * (8 + 8), ir
        # softmax (5) and scale (1) per score, outside FLOPs
        assert att.elementwise == 3 * 2 * 10 * 10 * 6, ir
        assert not [r for r in report.rows if r.kind == "matmul"], ir
        assert report.total.macs == 3 * 10 * 16 * 48 + att.macs, ir
    assert report.total.macs == _flop_counter_macs(_SelfAttention(form).eval(), x)


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, memory):
        return self.mha(x, memory, memory, need_weights=False)[0]


def test_mha_includes_in_and_out_projections():
    x, memory = torch.randn(3, 10, 16), torch.randn(3, 7, 16)
    # q and out projections on 3·10 rows, k and v on 3·7 rows (16×16 each), attention 3·4·10·7·(4 + 4)
    expected = 2 * 30 * 16 * 16 + 2 * 21 * 16 * 16 + 3 * 4 * 10 * 7 * 8
    for ir, report in _all_irs(_MHA().eval(), x, memory).items():
        assert report.total.macs == expected, ir
        assert report.total.params == 4 * 16 * 16 + 4 * 16, ir
        if ir != "export":  # export decomposes MHA into linears and SDPA
            (row,) = [r for r in report.rows if r.macs]
            assert (row.kind, row.info["form"]) == ("attention", "mha"), ir
    assert expected == _flop_counter_macs(_MHA().eval(), x, memory)


class _ScoresPlusMask(nn.Module):
    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-2, -1)) * 0.25 + mask).softmax(-1) @ v


class _SdpaMask(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)


def test_hand_written_attention_counts_an_added_mask_as_sdpa_does():
    """The mask added to the scores is one op per score, as SDPA's attn_mask (it went uncounted)."""
    q, k, v, mask = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16), torch.randn(10, 7)
    manual, sdpa = (fxslim.estimate(m().eval(), (q, k, v, mask)).total for m in (_ScoresPlusMask, _SdpaMask))
    assert (manual.macs, manual.elementwise) == (sdpa.macs, sdpa.elementwise) == (2 * 4 * 10 * 7 * 32, 2 * 4 * 10 * 7 * 7)
