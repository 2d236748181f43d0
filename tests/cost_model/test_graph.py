"""Graph analyses: peak activation memory by liveness over the execution order, networkx view."""

from __future__ import annotations

import torch
from torch import nn

import fxslim
from fxslim.cost_model import graph_peak_bytes


class _Skip(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv2(self.relu(self.conv1(x)))
        return y + x if self.skip else y


def test_peak_activation_bytes_hand_computed():
    x = torch.randn(1, 4, 8, 8)  # 256 fp32 = 1024 B; conv1 out 512 = 2048 B; conv2 out 256 = 1024 B
    # chain: x + conv1 (3072) -> x freed; relu is in place (no new memory); conv1 out + conv2 out = 3072
    assert fxslim.estimate(_Skip(False).eval(), x).total.peak_activation_bytes == 1024 + 2048
    # skip: x lives to the end: x + conv1 + conv2 = 4096, then x + conv2 + sum = 3072
    assert fxslim.estimate(_Skip(True).eval(), x).total.peak_activation_bytes == 1024 + 2048 + 1024


def test_peak_counts_views_as_aliases_and_uses_given_sizes():
    report = fxslim.estimate(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval(), torch.randn(2, 4, 4))
    gm = report.captured.graphs[0].gm
    # input 32 floats; flatten is a view; linear output 8 floats
    assert graph_peak_bytes(gm) == (32 + 8) * 4
    sizes = {n.name: 1000 for n in gm.graph.nodes if n.op == "call_module"}
    assert graph_peak_bytes(gm, sizes) == 32 * 4 + 1000  # the flatten view still allocates nothing


def test_networkx_view_has_nodes_edges_and_costs():
    report = fxslim.estimate(_Skip(True).eval(), torch.randn(1, 4, 8, 8))
    g = report.graph()
    assert set(g.nodes) == {n.name for n in report.captured.graphs[0].gm.graph.nodes}
    assert g.has_edge("x", "conv1") and g.has_edge("x", "add") and g.has_edge("conv2", "add")
    assert g.nodes["conv1"]["macs"] == 8 * 4 * 9 * 64 and g.nodes["conv1"]["kind"] == "conv"
    assert [n for n, d in sorted(g.nodes(data=True), key=lambda nd: nd[1]["order"])][0] == "x"
