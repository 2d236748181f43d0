"""HASTE against data-free channel pruning (Torch-Pruning) at matched MACs, each with and without BN statistics.

On the full-width CIFAR-style ResNets trained on MNIST-5k with weight decay 0.01 (checkpoints from
``train_resnet_mnist.py --weight-decay 0.01``; a model whose checkpoint is missing is reported as such),
for every L and seed:

- HASTE (``fxslim.optimize(model, x, passes=[HASTE(L, seed)])``): no data at all;
- HASTE + BN statistics: the hashed model's BN statistics re-estimated
  (``fxslim.reestimate_bn_statistics``) on ``--calibration`` unlabelled training digits;
- pruning: Torch-Pruning ``MagnitudePruner`` with L1 importance, stem conv and classifier kept,
  its ratio bisected until the pruned model's conv and classifier MACs are within 1 % of HASTE's
  measured ops at that L (mean over seeds, hashing and merging overhead counted, as in
  ``haste_accuracy``); the weights as pruned, no data;
- pruning + BN statistics: the pruned model's BN statistics re-estimated on the same digits.

The calibration digits are drawn per seed from the training split (never the test digits); L1
pruning itself is deterministic, so its no-data row has no spread. Top-1 is on ``--limit`` MNIST-5k
test digits, wall clock is the median over batches of the variant's time over the dense model's,
timed back to back.

    python -m benchmarks.haste_vs_pruning                                   # resnet18 and resnet34
    python -m benchmarks.haste_vs_pruning --models resnet18 --L 12 --seeds 0 --limit 200

Needs ``torch-pruning`` (the ``bench`` extra). Every run is kept in
``benchmarks/results/haste_vs_pruning_runs.json``; their summary per L is recorded in
``haste_vs_pruning.json``, rendered to .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

import fxslim
from benchmarks import records
from benchmarks.haste_accuracy import _DEFAULT, load_model, run_one, setting
from benchmarks.records import Results, Section, Table
from benchmarks.resnet_checkpoints import ZOO_WEIGHT_DECAY
from fxslim.app.timing import interleaved_samples
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32

__all__ = ["VARIANTS", "prune_to_macs", "to_results", "run", "main"]

_HERE = Path(__file__).resolve().parent
_BUDGET = 1.25  # pp of top-1, the paper's
VARIANTS = ("HASTE", "HASTE + BN statistics", "pruning", "pruning + BN statistics")


def _macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    return int(fxslim.estimate(model, example).total.macs)


def prune_to_macs(model: torch.nn.Module, example: torch.Tensor, target: float, tolerance: float = 0.01,
                  steps: int = 20) -> tuple[torch.nn.Module, float, int]:
    """(pruned copy, pruning ratio, MACs): L1 magnitude pruning of every conv group but the stem's and
    the classifier's, its ratio bisected until the copy's MACs are within ``tolerance`` of ``target``.

    Raises ValueError when no ratio gets that close (channels come off whole: a narrow network's
    MACs move in steps)."""
    import torch_pruning as tp

    if not 0 < target < _macs(model, example):
        raise ValueError(f"prune_to_macs: target must be between 0 and the model's MACs, got {target}")
    low, high, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (low + high) / 2
        pruned = copy.deepcopy(model).eval()
        tp.pruner.MagnitudePruner(
            pruned, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
            ignored_layers=[pruned.conv1, pruned.fc],
        ).step()
        macs = _macs(pruned, example)
        if best is None or abs(macs - target) < abs(best[2] - target):
            best = (pruned, ratio, macs)
        if abs(macs - target) <= tolerance * target:
            break
        low, high = (ratio, high) if macs > target else (low, ratio)
    if abs(best[2] - target) > tolerance * target:
        raise ValueError(f"prune_to_macs: no ratio within {tolerance:.0%} of {target:,.0f} MACs "
                         f"(closest {best[2]:,} at ratio {best[1]:.4f})")
    return best


def _evaluate(model: torch.nn.Module, dense: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              batch: int) -> tuple[float, float]:
    """(top-1 %, median per-batch time over the dense model's, the two timed back to back, order alternating)."""
    correct, ratios = 0, []
    with torch.no_grad():
        for i, start in enumerate(range(0, len(images), batch)):
            x, outputs = images[start : start + batch], []
            fns = {"model": lambda: outputs.append(model(x)), "dense": lambda: dense(x)}
            order = ("model", "dense") if i % 2 == 0 else ("dense", "model")
            times = interleaved_samples({name: fns[name] for name in order}, 1, warm_up=False)
            correct += int((outputs[0].argmax(1) == labels[start : start + batch]).sum())
            ratios.append(times["model"][0] / times["dense"][0])
    return 100 * correct / len(images), statistics.median(ratios)


def _calibration(train: torch.Tensor, count: int, seed: int, batch: int) -> list[torch.Tensor]:
    """``count`` training digits drawn with ``seed``, in batches (no labels)."""
    chosen = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]]
    return list(pad_to_32(chosen).split(batch))


def run_model(name: str, args: argparse.Namespace, split) -> dict[str, Any]:
    """Every variant at every L and seed on one model: the rows of its table."""
    dense, checkpoint = load_model(name, args.width, args.cache, args.weight_decay)
    images, labels = pad_to_32(split.x_test[: args.limit]), split.y_test[: args.limit]
    example = images[:1]
    dense_macs = _macs(dense, example)
    with torch.no_grad():
        dense_pred = torch.cat([dense(images[s : s + args.batch]).argmax(1) for s in range(0, len(images), args.batch)])
    dense_top1 = 100 * float((dense_pred == labels).float().mean())
    config = setting(_DEFAULT)
    rows = []
    for L in args.L:
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for seed in args.seeds:
            calibration = _calibration(split.x_train, args.calibration, seed, args.batch)
            for variant, batches in (("HASTE", None), ("HASTE + BN statistics", calibration)):
                run = run_one(dense, images, labels, dense_pred, dense_macs, L, seed, config, args.batch, 1, batches)
                runs[variant].append({"top1": run["top1"], "cut": run["reduction"], "time": run["time_ratio"]})
        target = dense_macs * (1 - statistics.mean(r["cut"] for r in runs["HASTE"]) / 100)
        pruned, ratio, macs = prune_to_macs(dense, example, target, args.tolerance)
        cut = 100 * (1 - macs / dense_macs)
        top1, time_ratio = _evaluate(pruned, dense, images, labels, args.batch)
        runs["pruning"].append({"top1": top1, "cut": cut, "time": time_ratio})
        for seed in args.seeds:
            calibrated = fxslim.reestimate_bn_statistics(pruned, _calibration(split.x_train, args.calibration, seed, args.batch))
            top1, time_ratio = _evaluate(calibrated, dense, images, labels, args.batch)
            runs["pruning + BN statistics"].append({"top1": top1, "cut": cut, "time": time_ratio})
        rows.append({"L": L, "pruning_ratio": ratio, "runs": runs})
        print(f"{name} L={L}: " + ", ".join(
            f"{v} {statistics.mean(r['top1'] for r in runs[v]):.2f} %" for v in VARIANTS), flush=True)
    return {"checkpoint": checkpoint, "dense_top1": dense_top1, "dense_macs": dense_macs, "rows": rows}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and std (None for a single value: L1 pruning without data is deterministic)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def landing(name: str, model: dict[str, Any]) -> str:
    """Which variants stay within the paper's 1.25 pp at each L, plainly."""
    dense, lines = model["dense_top1"], []
    for row in model["rows"]:
        within = [v for v in VARIANTS if dense - statistics.mean(r["top1"] for r in row["runs"][v]) <= _BUDGET + 1e-9]
        cut = statistics.mean(r["cut"] for r in row["runs"]["HASTE"])
        lines.append(f"L = {row['L']} (−{cut:.1f} % MACs): within {_BUDGET} pp of dense: "
                     f"{', '.join(within) if within else 'none'}")
    return f"**{name}**: " + "; ".join(lines) + "."


COLUMNS = ["L", "MACs cut % HASTE", "±", "MACs cut % pruning",
           "HASTE top-1 %", "±", "HASTE + BN stats", "±", "pruning (L1)", "±", "pruning + BN stats", "±",
           "HASTE / dense time", "±", "HASTE + stats time", "±", "pruned / dense time", "±"]
_FORMATS = ["d", ".1f", ".1f", ".1f", *(".2f" for _ in range(8)), *(".2f}×" for _ in range(6))]


def to_results(data: dict[str, Any], command: str) -> Results:
    """The summary per model and L of the recorded runs (``data``, as in the runs file): means ± std over seeds."""
    sections = []
    for name, model in data["models"].items():
        if "missing" in model:
            sections.append(Section(name, [model["missing"]]))
            continue
        recorded = [f"Runs recorded by `{model['command']}`.", "", model["setup"], ""]
        rows = []
        for row in model["rows"]:
            runs = row["runs"]
            rows.append([row["L"], *_mean_std([r["cut"] for r in runs["HASTE"]]), runs["pruning"][0]["cut"],
                         *(x for v in VARIANTS for x in _mean_std([r["top1"] for r in runs[v]])),
                         *(x for v in ("HASTE", "HASTE + BN statistics", "pruning + BN statistics")
                           for x in _mean_std([r["time"] for r in runs[v]]))])
        sections.append(Section(
            f"{name} (checkpoint `{model['checkpoint']}`)",
            [*recorded, f"Dense: top-1 {model['dense_top1']:.2f} %, {model['dense_macs']:,} MACs per image. Top-1 and time are "
             "mean ± std over seeds (the calibration digits and, for HASTE, the planes); time is the variant's over "
             "the dense model's."],
            Table(COLUMNS, rows, _FORMATS), [landing(name, model)]))
    return Results("haste_vs_pruning", "HASTE vs data-free channel pruning at matched MACs (MNIST-5k, CIFAR-style "
                   "ResNets)", command, sections)


def _recorded_models(runs_path: Path) -> dict[str, Any]:
    """The models of the runs file, each with the command and set-up of its run (a file written
    before runs were kept per model has one of each for all)."""
    if not runs_path.is_file():
        return {}
    data = json.loads(runs_path.read_text())
    return {name: model if "missing" in model else {"command": data.get("command"), "setup": data.get("setup")} | model
            for name, model in data["models"].items()}


def run(args: argparse.Namespace, command: str = "python -m benchmarks.haste_vs_pruning") -> Results:
    """Every variant at every L and seed on each model (all recorded in the runs file), then their summary."""
    runs_path = args.out / "haste_vs_pruning_runs.json"
    if args.render:
        return to_results({"models": _recorded_models(runs_path)}, command)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_pruning

    split = mnist_5k()
    load = os.getloadavg()[0]
    # the models this run leaves out keep their recorded runs
    data: dict[str, Any] = {"models": _recorded_models(runs_path)}
    fresh = {}
    for name in args.models:
        try:
            fresh[name] = run_model(name, args, split)
        except FileNotFoundError as missing:  # e.g. ResNet34, slow to train on 2 cores
            fresh[name] = {"missing": f"Not run: {missing}."}
    setup = (
        f"HASTE: sparsity 2/3, 4×4 tiles, centring on, stem kept dense. Pruning: Torch-Pruning "
        f"{torch_pruning.__version__} MagnitudePruner, L1 importance, local ratio, stem and classifier kept. "
        f"BN statistics: re-estimated on {args.calibration} unlabelled MNIST-5k training digits drawn per seed. "
        f"{args.limit} test digits (32×32), batches of {args.batch}; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads; 1-minute load average {load:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (a shared machine: compare times within a row)."
    )
    for name, model in fresh.items():
        data["models"][name] = model | ({} if "missing" in model else {"command": command, "setup": setup})
    data["models"] = {name: data["models"][name] for name in ("resnet18", "resnet34") if name in data["models"]}
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    runs_path.write_text(json.dumps(data, indent=1))
    return to_results(data, command)


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=("resnet18", "resnet34"), default=["resnet18", "resnet34"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=ZOO_WEIGHT_DECAY,
                        help="the checkpoints trained with this weight decay (train_resnet_mnist's flag)")
    parser.add_argument("--L", type=int, nargs="+", default=[10, 11, 12])  # the deep cuts: L <= 12
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration", type=int, default=500, help="unlabelled training digits for BN statistics")
    parser.add_argument("--tolerance", type=float, default=0.01, help="pruned MACs within this share of HASTE's")
    parser.add_argument("--limit", type=int, default=1000, help="test digits used (all 1,000 by default)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=_HERE / ".cache")
    parser.add_argument("--render", action="store_true", help="only summarise the recorded runs again")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.haste_vs_pruning", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
