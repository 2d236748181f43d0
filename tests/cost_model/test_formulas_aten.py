"""aten formulas: matmuls without a view, convs inside leaf modules, elementwise/norm/softmax/pooling
counts, zero-cost data movement, and unknown ops reported instead of counted as 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim


def _rows(model: nn.Module, *inputs: torch.Tensor, **kw):
    report = fxslim.estimate(model.eval(), inputs, **kw)
    return report, {r.node: r for r in report.rows}


class _Matmuls(nn.Module):
    def forward(self, a, b, c, d):
        return (a @ b).sum() + torch.mm(c, d).sum()


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_matmul_without_attention_counted_as_matmul(capture):
    a, b, c, d = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(6, 7), torch.randn(7, 8)
    report = fxslim.estimate(_Matmuls().eval(), (a, b, c, d), capture=capture)
    matmuls = [r for r in report.rows if r.kind == "matmul"]
    # [2, 3, 4] @ [2, 4, 5]: 2·3·4·5; [6, 7] @ [7, 8]: 6·7·8
    assert sorted(r.macs for r in matmuls) == [2 * 3 * 4 * 5, 6 * 7 * 8]
    assert report.total.macs == 2 * 3 * 4 * 5 + 6 * 7 * 8


class _Block(nn.Module):
    """A module the tracer keeps opaque (leaf): its convs are only seen as aten ops."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


def test_conv_inside_leaf_module_counted_from_aten_convolution():
    report, rows = _rows(nn.Sequential(_Block()), torch.randn(2, 8, 9, 9), leaf_modules=(_Block,))
    (row,) = [r for r in report.rows if r.macs]
    assert row.op == "_Block"
    # dw: out 5×5 (stride 2, dilation 2, pad 2): 2·8·1·9·25; pw: 2·16·8·25
    assert row.macs == 2 * 8 * 1 * 9 * 25 + 2 * 16 * 8 * 25
    assert row.kind == "depthwise_conv"  # the first MAC op decides the row kind
    assert row.params == 8 * 9 + 8 + 16 * 8 + 16


class _Elementwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(6)

    def forward(self, x):
        y = torch.relu(self.bn(x)) + 1
        z = self.ln(y)
        p = F.max_pool2d(z, 2) + F.avg_pool2d(z, 2)
        return F.softmax(p, dim=-1), F.adaptive_avg_pool2d(z, 1)


def test_elementwise_norm_softmax_pool_counts_follow_documented_constants():
    x = torch.randn(2, 4, 6, 6)
    n = x.numel()  # 288
    report, rows = _rows(_Elementwise(), x)
    assert rows["bn"].elementwise == 2 * n  # scale and shift
    assert rows["relu"].elementwise == n and rows["add"].elementwise == n
    assert rows["ln"].elementwise == 5 * n  # mean, var, normalise, affine (weight present)
    pooled = 2 * 4 * 3 * 3
    assert rows["max_pool2d"].elementwise == pooled * 3  # k−1 comparisons, k = 4
    assert rows["avg_pool2d"].elementwise == pooled * 4  # k per output
    assert rows["softmax"].elementwise == 5 * pooled
    assert rows["adaptive_avg_pool2d"].elementwise == n  # one per input element
    assert report.total.macs == 0 and not report.unknown_ops
    assert {rows["bn"].kind, rows["ln"].kind, rows["softmax"].kind, rows["max_pool2d"].kind} == {"norm", "softmax", "pool"}


class _LoneKernelSizes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):  # x [2, 4, 6, 6]
        pooled = F.avg_pool2d(x, [3]) + F.max_pool2d(x, [3])
        return self.gn(x), pooled, F.max_pool1d(x.flatten(2), 3), F.avg_pool3d(x.unsqueeze(1), 2)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_pool_window_of_a_lone_size_and_group_norm_affine_in_every_ir(capture):
    """``[3]`` is a 3×3 window (counted as 3 taps), an int kernel of a 1-d or 3-d pool is k or k³ taps
    (it was k²), and export's ``aten.group_norm`` has its weight third (its affine went uncounted)."""
    x = torch.randn(2, 4, 6, 6)
    report = fxslim.estimate(_LoneKernelSizes().eval(), (x,), capture=capture)
    pools = ("avg_pool2d", "max_pool2d", "max_pool1d", "avg_pool3d")
    counts: dict[str, int] = {}
    for row in report.rows:
        key = "norm" if row.kind == "norm" else next((p for p in pools if p in str(row.op) + row.node), None)
        if key:
            counts[key] = counts.get(key, 0) + row.elementwise
    pool2d = 2 * 4 * 2 * 2
    assert counts == {"avg_pool2d": pool2d * 9, "max_pool2d": pool2d * 8,
                      "max_pool1d": 2 * 4 * 12 * 2,  # 36 → 12 per row, 2 comparisons each
                      "avg_pool3d": 2 * 2 * 3 * 3 * 8,  # [2, 1, 4, 6, 6] → [2, 1, 2, 3, 3], 8 taps
                      "norm": 5 * x.numel()}


class _Moves(nn.Module):
    def forward(self, x):
        y = x.permute(0, 2, 1).reshape(2, -1)
        z = torch.cat([y, y[:, :3]], dim=1)
        return z.unsqueeze(0).transpose(0, 1).contiguous().flatten(1)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_data_movement_zero_cost_and_not_unknown(capture):
    report = fxslim.estimate(_Moves().eval(), (torch.randn(2, 3, 4),), capture=capture)
    assert report.total.macs == 0 and report.total.elementwise == 0
    assert not report.unknown_ops
    assert {r.kind for r in report.rows} == {"data"}


class _Accumulates(nn.Module):
    """Writes at indices, once combining with what is there and once not."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):  # x [2, 2, 6, 6]: 72 values per sample
        flat, index = x.flatten(1), torch.zeros(2, 72, dtype=torch.long)
        if self.kind == "scatter_add":
            return torch.zeros(2, 10).scatter_add(1, index, flat)
        if self.kind == "scatter_reduce":
            return torch.zeros(2, 10).scatter(1, index, flat, reduce="add")
        if self.kind == "scatter":
            return torch.zeros(2, 10).scatter(1, index[:, :10], flat[:, :10])
        if self.kind == "index_add":
            return torch.zeros(4, 72).index_add(0, torch.zeros(2, dtype=torch.long), flat)
        if self.kind == "index_put":
            return torch.zeros(10).index_put((index.flatten(),), flat.flatten(), accumulate=True)
        return F.fold(F.unfold(x, 3), (6, 6), 3)


@pytest.mark.parametrize(("kind", "ops"), [("scatter_add", 2 * 72), ("scatter_reduce", 2 * 72), ("scatter", 0),
                                           ("index_add", 2 * 72), ("index_put", 2 * 72), ("fold", 2 * 18 * 16)])
def test_writes_that_accumulate_count_one_op_per_value(kind, ops):
    """scatter with reduce, index_put with accumulate and F.fold's overlapping patches add: they were
    counted as data movement, and scatter_add / index_add were unknown."""
    report = fxslim.estimate(_Accumulates(kind).eval(), (torch.randn(2, 2, 6, 6),))
    assert report.total.elementwise == ops and not report.unknown_ops and report.total.macs == 0


class _AttendsEagerly(nn.Module):
    """Stays eager (a value branch), so its nn.MultiheadAttention runs the fused inference op."""

    def __init__(self, eager: bool) -> None:
        super().__init__()
        self.eager = eager
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        if self.eager and x.sum() > 1e30:
            x = x * 0
        return self.attn(x, x, x, need_weights=False)[0]


def test_fused_multihead_attention_counts_as_the_traced_one():
    """aten._native_multi_head_attention (eval, no grad) was an unknown op: 0 MACs for the layer."""
    x = torch.randn(2, 9, 32)
    eager, traced = (fxslim.estimate(_AttendsEagerly(e).eval(), (x,)) for e in (True, False))
    assert not eager.unknown_ops and eager.untraced
    assert eager.total.macs == traced.total.macs == 4 * 2 * 9 * 32 * 32 + 2 * 9 * 9 * 2 * 32


class _Sorts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return torch.sort(self.fc(x), dim=-1).values


def test_op_without_formula_reported_in_unknown_ops():
    report, rows = _rows(_Sorts(), torch.randn(3, 5))
    assert report.unknown_ops == {"aten.sort.default": ["sort"]}
    assert rows["sort"].unknown == ("aten.sort.default",)
    assert report.total.macs == 3 * 5 * 5  # what is known is still counted
    assert "aten.sort.default" in report.to_markdown()


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

    def forward(self, q, kv):
        return self.mha(q, kv, kv, need_weights=False)[0]


def test_multihead_attention_with_other_key_and_value_sizes_is_attention():
    """``kdim``/``vdim`` other than ``embed_dim`` made the module an unknown matmul row: the ``prom``
    deploy preset priced its scores in int8, where convert keeps attention in float32."""
    q, kv = torch.randn(2, 56, 16), torch.randn(2, 64, 8)
    report = fxslim.estimate(_CrossAttention().eval(), (q, kv), deploy="prom")
    (row,) = [r for r in report.rows if r.macs]
    assert row.kind == "attention"
    projections = 2 * (2 * 56 * 16 * 16) + 2 * (2 * 64 * 8 * 16)  # q and out; k and v from 8 to 16 channels
    assert row.macs == 2 * 2 * 56 * 64 * (8 + 8) + projections
    assert set(report.total.ops) == {("mul", "fp32"), ("add", "fp32")}
