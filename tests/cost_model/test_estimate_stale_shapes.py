"""``estimate`` of a GraphModule whose nodes already hold shapes from another call: the inputs given
are what is costed. It used the shapes in the node meta whenever every node had one, so a graph
shape-propagated at 16 px (or the rewritten aggregator of vggt_tiny at 4 frames) was costed at
that size whatever the inputs said."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxslim


def test_a_graph_propagated_at_another_size_is_costed_at_the_given_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    gm = torch.fx.symbolic_trace(model)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(torch.randn(1, 3, 16, 16))
    for size in (16, 32):
        x = torch.randn(1, 3, size, size)
        assert fxslim.estimate(gm, x).total.macs == fxslim.estimate(model, x).total.macs


def test_a_rewritten_graph_is_costed_at_each_frame_count():
    from fxslim.models.vggt import vggt_tiny

    torch.manual_seed(0)
    model = vggt_tiny(depth=2).eval()
    images = lambda frames: torch.rand(1, frames, 3, 28, 28)  # noqa: E731
    result = fxslim.optimize(model, images(4), passes=["httm:q=1,kv=1,outliers=0"])
    costs = [fxslim.estimate(result.module.aggregator, images(frames)).total.macs for frames in (2, 4, 8)]
    assert costs[0] < costs[1] < costs[2]
