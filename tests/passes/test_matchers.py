"""Matchers find the same convs, pointwise convs and attention in every IR of real models."""

from __future__ import annotations

from collections import Counter

import pytest

from fxslim.capture import capture, capture_dynamo
from fxslim.passes.matchers import match_all, match_attention, match_pointwise_convs
from benchmarks.zoo import by_name

# (convs, pointwise convs, global attention, local attention)
EXPECTED = {
    "tv:mobilenet_v2": (52, 34, 0, 0),
    "tv:resnet18": (20, 3, 0, 0),
    "tv:vit_small_mha": (1, 0, 2, 0),  # nn.MultiheadAttention form
    "timm:vit_tiny_patch16_224": (1, 0, 4, 0),  # scaled_dot_product_attention form
    # manual/wrapped chain; at 224x224 the last stage's 7x7 map is one 7x7 window, so its two
    # attentions span the whole image and are global; the other ten are windowed (local)
    "tv:swin_t": (1, 0, 2, 10),
}


def build(name):
    model = by_name(name)
    return model.build().eval(), model.inputs()


def _counts(graphs, batch):
    kinds = Counter(m.kind for g in graphs for m in match_all(g.gm, batch))
    convs = sum(v for k, v in kinds.items() if k.endswith("conv"))
    return convs, kinds["pointwise_conv"], kinds["global_attention"], kinds["local_attention"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_matchers_same_counts_in_every_ir(name):
    model, inputs = build(name)
    batch = inputs[0].shape[0]
    found = {
        "symbolic": _counts(capture(model, inputs).graphs, batch),
        "export": _counts(capture(model, inputs, method="export").graphs, batch),
        "dynamo": _counts(capture_dynamo(model, inputs), batch),
    }
    assert found == {ir: EXPECTED[name] for ir in found}


def test_pointwise_matcher_gives_reason_for_each_other_conv():
    model, inputs = build("tv:mobilenet_v2")
    matches = match_pointwise_convs(capture(model, inputs).graphs[0].gm)
    assert Counter(m.reason for m in matches) == Counter({"": 34, "grouped": 17, "kernel_not_1x1": 1})


def test_swin_windowed_attention_is_local_at_larger_maps():
    """At 256x256 every Swin stage has more than one window: no attention is global."""
    import torch
    import torchvision

    model = torchvision.models.swin_t().eval()
    gm = capture(model, (torch.randn(1, 3, 256, 256),)).graphs[0].gm
    matches = match_attention(gm, batch_size=1)
    assert len(matches) == 12
    assert all(m.reason == "local_attention" for m in matches)
