"""benchmarks.haste_accuracy: ablation settings are kept apart, and a tiny run writes every file."""

from __future__ import annotations

import json

import pytest

from benchmarks import haste_accuracy, records
from benchmarks.resnet_checkpoints import DEFAULT_WEIGHT_DECAY, checkpoint_name


def _run(L: int, seed: int, top1: float, reduction: float, **setting) -> dict:
    values = {"top1": top1, "agreement": 99.0, "reduction": reduction, "reduction_no_overhead": reduction + 4,
              "reduction_image_std": 1.0, "overhead_share": 4.0, "buckets_ratio": 0.6, "time_ratio": 2.5}
    return {"L": L, "seed": seed, "pointwise": True, **setting, **values}


def test_settings_default_first_and_old_runs_count_as_default():
    runs = [
        _run(14, 0, 97.0, 30.0, sparsity=0.0, tile=4),
        _run(14, 0, 98.0, 28.0),  # recorded before the ablation options: the pass's defaults
        _run(14, 1, 96.0, 29.0, sparsity=2 / 3, tile=4),
        _run(14, 0, 95.0, 31.0, pointwise=False, sparsity=2 / 3, tile=2),
    ]
    keys = haste_accuracy.settings(runs)
    assert keys[0] == haste_accuracy.setting({})  # defaults first
    assert len(keys) == 3
    rows = haste_accuracy.summarize(runs)
    assert [(r["L"], r["seeds"], r["top1"], r["reduction"]) for r in rows] == [(14, 2, 97.0, 28.5)]
    dense_planes = haste_accuracy.summarize(runs, (True, 0.0, 4))
    assert [(r["seeds"], r["top1"]) for r in dense_planes] == [(1, 97.0)]
    labels = [haste_accuracy.setting_label(k) for k in keys]
    assert labels[0] == "every conv but the stem"
    assert "every conv but the stem, plane sparsity 0" in labels
    assert "1×1 convs kept dense, 2×2 tiles" in labels


def test_tiny_ablation_run_writes_runs_records_page_and_plot(tmp_path, one_thread):
    common = ["--models", "resnet18", "--width", "0.25", "--L", "12", "--seeds", "0", "--limit", "10",
              "--batch", "5", "--cache", str(tmp_path), "--out", str(tmp_path)]
    haste_accuracy.main(common)
    haste_accuracy.main([*common, "--sparsity", "0", "--resume"])
    runs_file = tmp_path / "haste_accuracy_runs.json"
    runs = json.loads(runs_file.read_text())["models"]["resnet18"]["runs"]
    assert sorted(round(r["sparsity"], 4) for r in runs) == [0.0, 0.6667]
    assert all(0 <= r["top1"] <= 100 and r["buckets_ratio"] <= 1 for r in runs)
    results = records.load("haste_accuracy", tmp_path)
    assert (tmp_path / "haste_accuracy.md").read_text() == results.markdown()
    headings = [s.heading for s in results.sections]
    assert "resnet18: every conv but the stem (1 seeds per L)" in headings
    assert "resnet18: every conv but the stem, plane sparsity 0 (1 seeds per L)" in headings
    assert (tmp_path / "haste_accuracy.png").stat().st_size > 0
    haste_accuracy.main([*common, "--sparsity", "0", "--resume"])  # nothing left to run: same runs
    assert len(json.loads(runs_file.read_text())["models"]["resnet18"]["runs"]) == 2


def test_weight_decay_names_the_checkpoint_and_the_results_section(tmp_path):
    assert checkpoint_name("resnet18", 1.0) == "resnet18_w100_mnist"
    assert checkpoint_name("resnet34", 1.0, 0.01) == "resnet34_w100_wd0.01_mnist"
    assert haste_accuracy.model_key("resnet18", DEFAULT_WEIGHT_DECAY) == "resnet18"
    assert haste_accuracy.model_key("resnet18", 0.01) == "resnet18, weight decay 0.01"
    with pytest.raises(FileNotFoundError, match=r"resnet18_w100_wd0.01_mnist.pt .*--weight-decay 0.01`"):
        haste_accuracy.load_model("resnet18", 1.0, tmp_path, 0.01)
