"""benchmarks.haste_vs_pruning: pruning matched to a MACs target, and a tiny run writes its results."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import haste_vs_pruning, records
from fxslim.models.resnet_cifar import pretrained_mnist_resnet18_small

pytest.importorskip("torch_pruning")  # the bench extra


def test_prune_to_macs_lands_within_tolerance_and_keeps_the_model():
    model = pretrained_mnist_resnet18_small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.randn(1, 1, 32, 32)
    dense = haste_vs_pruning._macs(model, example)
    pruned, ratio, macs = haste_vs_pruning.prune_to_macs(model, example, 0.7 * dense, tolerance=0.05)
    assert abs(macs - 0.7 * dense) <= 0.05 * 0.7 * dense and 0 < ratio < 0.95
    assert haste_vs_pruning._macs(pruned, example) == macs
    assert pruned.conv1.out_channels == model.conv1.out_channels  # the stem is kept
    assert pruned.fc.out_features == 10
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # never in place
    with pytest.raises(ValueError, match="target must be between 0"):
        haste_vs_pruning.prune_to_macs(model, example, 2.0 * dense)


def test_tiny_run_writes_every_variant_and_says_which_stay_within_budget(tmp_path, one_thread):
    haste_vs_pruning.main(["--models", "resnet18", "resnet34", "--width", "0.25", "--weight-decay", "5e-4",
                           "--L", "10", "--seeds", "0", "1", "--limit", "10", "--calibration", "10", "--batch", "5",
                           "--tolerance", "0.15", "--cache", str(tmp_path), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "haste_vs_pruning_runs.json").read_text())
    row = data["models"]["resnet18"]["rows"][0]
    assert set(row["runs"]) == set(haste_vs_pruning.VARIANTS)
    assert [len(row["runs"][v]) for v in haste_vs_pruning.VARIANTS] == [2, 2, 1, 2]  # L1 pruning has no seed
    assert all(0 <= r["top1"] <= 100 and r["time"] > 0 for runs in row["runs"].values() for r in runs)
    cut = row["runs"]["pruning"][0]["cut"]
    haste_cut = sum(r["cut"] for r in row["runs"]["HASTE"]) / 2
    assert abs((100 - cut) - (100 - haste_cut)) <= 0.15 * (100 - haste_cut)  # matched MACs
    text = (tmp_path / "haste_vs_pruning.md").read_text()
    assert text == records.load("haste_vs_pruning", tmp_path).markdown()
    assert "| L | MACs cut % HASTE | ± | MACs cut % pruning |" in text
    assert "**resnet18**: L = 10" in text and "within 1.25 pp of dense" in text
    assert "Not run: no checkpoint resnet34_w025_mnist.pt" in text
