"""HASTE on trained CIFAR-style ResNet18/34 (MNIST-5k): accuracy and FLOPs over a sweep of L and seeds.

For every model, L and seed the model is rewritten by ``fxslim.optimize(model, x, passes=[HASTE(L=L,
seed=seed)])`` (every conv but the stem, sparsity 2/3, 4×4 tiles, centring on; ``--sparsity``,
``--tile`` and ``--pointwise`` run the ablations) and run on the 1,000 MNIST-5k test digits (padded to
32×32) under ``record_buckets``. Reported per setting and L, over the seeds:

- top-1 (mean ± std) and agreement with the dense model's predictions;
- FLOPs reduction with overhead (mean ± std over seeds; in brackets the std over images): the
  operation counts of docs/methods/HASTE.md (a MAC is one op; centring, hashing, merging and filter
  merging each count their additions and divisions) from the *measured* bucket counts, over the
  whole model's conv and linear MACs (the dense stem and the classifier count in both), and the
  same without the overhead (reduced convs only);
- the mean bucket ratio B/C and the wall-clock ratio HASTE / dense (median over batches, the dense
  model timed on every ``--time-every``-th batch right next to the HASTE one).

Checkpoints come from ``python -m benchmarks.train_resnet_mnist`` (``benchmarks/.cache``); width 0.25
ResNet18 falls back to the committed checkpoint. Every run is kept in
``benchmarks/results/haste_accuracy_runs.json`` (``--resume`` skips the runs it already has,
``--render`` only summarises them again); their summary per L is recorded in ``haste_accuracy.json``,
rendered to .md, with the plot as .png.

    python -m benchmarks.haste_accuracy                                # the full experiment
    python -m benchmarks.haste_accuracy --models resnet18 --width 0.25 --L 10 14 --seeds 0 --limit 200
    python -m benchmarks.haste_accuracy --models resnet18 --L 13 --sparsity 0 --resume   # dense planes
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import fxslim
from benchmarks import records
from benchmarks.records import Results, Section, Table
from benchmarks.resnet_checkpoints import DEFAULT_WEIGHT_DECAY, checkpoint_name, weight_decay_flag
from fxslim.app.timing import interleaved_samples
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import SMALL_MNIST_CHECKPOINT, pad_to_32, resnet18, resnet34
from fxslim.runtime.haste import record_buckets
from fxslim.runtime.haste_counts import HasteCounts, HasteLayer

__all__ = ["setting", "setting_label", "settings", "model_key", "load_model", "run_one", "summarize",
           "best_within_budget", "landing_line", "to_results", "plot", "run", "main"]

_HERE = Path(__file__).resolve().parent
_RUNS = "haste_accuracy_runs.json"  # every run, in the results directory
_BUILDERS = {"resnet18": resnet18, "resnet34": resnet34}
_PAPER = {"reduction": 46.72, "drop": 1.25, "target": 40.0}  # ResNet34 / CIFAR-10 (docs/methods/HASTE.md)
_DEFAULT = {"pointwise": True, "sparsity": 2 / 3, "tile": 4}  # the pass's defaults


def setting(run: dict[str, Any]) -> tuple[bool, float, int]:
    """(pointwise, sparsity to 4 places, tile) of a run; runs recorded before the ablation options had the defaults."""
    pointwise, sparsity, tile = (run.get(key, value) for key, value in _DEFAULT.items())
    return pointwise, round(sparsity, 4), tile


_DEFAULT_KEY = setting(_DEFAULT)


def setting_label(key: tuple[bool, float, int]) -> str:
    """Section title of a setting: the scope, then whatever differs from the defaults."""
    pointwise, sparsity, tile = key
    parts = ["every conv but the stem" if pointwise else "1×1 convs kept dense"]
    if sparsity != _DEFAULT_KEY[1]:
        parts.append(f"plane sparsity {sparsity:g}")
    if tile != _DEFAULT_KEY[2]:
        parts.append(f"{tile}×{tile} tiles")
    return ", ".join(parts)


def settings(runs: list[dict[str, Any]]) -> list[tuple[bool, float, int]]:
    """The settings present in ``runs``, the pass's defaults first."""
    return sorted({setting(r) for r in runs}, key=lambda k: (k != _DEFAULT_KEY, not k[0], k[1], k[2]))


def model_key(name: str, weight_decay: float) -> str:
    """The results key of a checkpoint: the model name, plus the training decay when it is not the default."""
    return name if weight_decay == DEFAULT_WEIGHT_DECAY else f"{name}, weight decay {weight_decay:g}"


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (results files name no machine's paths)."""
    root = Path(__file__).resolve().parent.parent
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def load_model(name: str, width: float, cache: Path,
               weight_decay: float = DEFAULT_WEIGHT_DECAY) -> tuple[torch.nn.Module, str]:
    """The trained checkpoint for ``name`` at ``width`` (cache first, then the committed small one)."""
    stem = f"{checkpoint_name(name, width, weight_decay)}.pt"
    candidates = [cache / stem]
    if stem == SMALL_MNIST_CHECKPOINT:
        candidates.append(Path(fxslim.__file__).parent / "models" / "checkpoints" / stem)
    for path in candidates:
        if path.exists():
            model = _BUILDERS[name](num_classes=10, in_channels=1, width=width)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), path.name
    raise FileNotFoundError(
        f"no checkpoint {stem} in {_shown(cache)}; train it with `python -m benchmarks.train_resnet_mnist "
        f"--models {name} --width {width}{weight_decay_flag(weight_decay)}`"
    )


def run_one(dense: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, dense_pred: torch.Tensor,
            dense_macs: int, L: int, seed: int, config: tuple[bool, float, int], batch: int,
            time_every: int, calibration: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """One (L, seed) at ``config`` = (pointwise, sparsity, tile); with ``calibration`` batches, the
    hashed model's BN statistics are re-estimated on them first (no longer data-free).

    Returns accuracy, agreement, measured FLOPs reduction, bucket ratio and speed ratio.
    """
    pointwise, sparsity, tile = config
    haste_config = fxslim.HASTE(L=L, seed=seed, include_pointwise=pointwise, sparsity=sparsity, tile=tile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxslim.optimize(dense, images[:1], passes=[haste_config])
    haste = res.module if calibration is None else fxslim.reestimate_bn_statistics(res.module, calibration)
    layers = {e.info["layer"]: e.info for e in res.report.entries("haste") if e.status == "rewritten"}
    preds, ratios = [], []
    with torch.no_grad(), record_buckets() as rec:
        for i, start in enumerate(range(0, len(images), batch)):
            x = images[start : start + batch]
            outputs = []
            if i % time_every == 0:  # time both on this batch, in alternating order
                fns = {"dense": lambda: dense(x), "haste": lambda: outputs.append(haste(x))}
                order = ("dense", "haste") if i // time_every % 2 == 0 else ("haste", "dense")
                times = interleaved_samples({name: fns[name] for name in order}, 1, warm_up=False)
                ratios.append(times["haste"][0] / times["dense"][0])
            else:
                outputs.append(haste(x))
            preds.append(outputs[0].argmax(1))
    pred = torch.cat(preds)
    n = len(images)
    total, per_image = HasteCounts(), torch.zeros(n, dtype=torch.float64)
    for name, info in layers.items():
        stats = rec[name]
        layer = HasteLayer.of_stats(stats, info["nnz"], info["center"])
        total = total + layer.measured(stats)
        tiles, pixels = stats.tiles / stats.samples, stats.pixels / stats.samples
        for i, (b, bp) in enumerate(zip(stats.sample_buckets, stats.sample_bucket_pixels)):
            per_image[i] += layer.counts(tiles, pixels, b, bp).ops
    untouched = dense_macs - total.dense / n  # stem conv and classifier, per image
    image_reduction = 1 - (untouched + per_image) / dense_macs
    buckets = sum(rec[k].buckets for k in layers) / sum(rec[k].tiles * rec[k].channels for k in layers)
    return {
        "L": L, "seed": seed, "pointwise": pointwise, "sparsity": sparsity, "tile": tile,
        "top1": 100 * float((pred == labels).float().mean()),
        "agreement": 100 * float((pred == dense_pred).float().mean()),
        "reduction": 100 * (1 - (untouched * n + total.ops) / (dense_macs * n)),
        "reduction_no_overhead": 100 * (1 - (untouched * n + total.reduced_conv) / (dense_macs * n)),
        "reduction_image_std": 100 * float(image_reduction.std()),
        "overhead_share": 100 * total.overhead / (dense_macs * n), "buckets_ratio": buckets,
        "time_ratio": statistics.median(ratios), "layers": len(layers),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]], key: tuple[bool, float, int] = _DEFAULT_KEY) -> list[dict[str, Any]]:
    """Per L: means and stds over the seeds of the runs at setting ``key`` (see ``setting``)."""
    by_l: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if setting(r) == key:
            by_l[r["L"]].append(r)
    out = []
    for L in sorted(by_l):
        rs = by_l[L]
        row = {"L": L, "seeds": len(rs)}
        for key in ("top1", "agreement", "reduction", "reduction_no_overhead", "reduction_image_std",
                    "overhead_share", "buckets_ratio", "time_ratio"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in rs])
        out.append(row)
    return out


def best_within_budget(rows: list[dict[str, Any]], dense_top1: float) -> dict[str, Any] | None:
    """The L with the largest mean reduction whose mean top-1 drop is at most the paper's 1.25 pp."""
    ok = [r for r in rows if dense_top1 - r["top1"] <= _PAPER["drop"] + 1e-9]
    return max(ok, key=lambda r: r["reduction"]) if ok else None


def landing_line(name: str, rows: list[dict[str, Any]], dense_top1: float) -> str:
    best = best_within_budget(rows, dense_top1)
    paper = f"paper (ResNet34, CIFAR-10): −{_PAPER['reduction']} % FLOPs at −{_PAPER['drop']} pp"
    if best is None:
        return f"**{name}**: no L keeps the mean top-1 drop within {_PAPER['drop']} pp ({paper})."
    met = "met" if best["reduction"] >= _PAPER["target"] else "not met"
    return (f"**{name}** at ≤ {_PAPER['drop']} pp: L = {best['L']}, −{best['reduction']:.2f} ± "
            f"{best['reduction_std']:.2f} % FLOPs (with overhead) at {best['top1'] - dense_top1:+.2f} pp top-1 "
            f"({paper}); target ≥ {_PAPER['target']:.0f} %: {met}.")


_COLUMNS = ["L", "top-1 %", "±", "Δ top-1 pp", "agreement %", "±", "FLOPs reduction % (with overhead)",
            "±", "[± images]", "without overhead %", "overhead % of dense", "B/C", "HASTE / dense time"]
_FORMATS = ["d", ".2f", ".2f", "+.2f", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f", ".3f", ".2f}×"]


def to_results(data: dict[str, Any], command: str) -> Results:
    """The summary per model, setting and L of the recorded runs (``data``, as in the runs file)."""
    commands = " and ".join(f"`{c}`" for c in data["commands"])
    sections = [Section(text=[f"Runs recorded by {commands}.", "", data["setup"]])]
    for name, model in sorted(data["models"].items()):  # each model beside its other recipe
        dense = model["dense_top1"]
        sections.append(Section(f"{name} (width {model['width']}, checkpoint `{model['checkpoint']}`)", [
            f"Dense: top-1 {dense:.2f} %, {model['dense_macs']:,} MACs per image (convs and classifier). "
            "± is the std over seeds, [± images] the std over images."]))
        for key in settings(model["runs"]):
            rows = summarize(model["runs"], key)
            scope = setting_label(key)
            table = [[r["L"], r["top1"], r["top1_std"], r["top1"] - dense, r["agreement"], r["agreement_std"],
                      r["reduction"], r["reduction_std"], r["reduction_image_std"], r["reduction_no_overhead"],
                      r["overhead_share"], r["buckets_ratio"], r["time_ratio"]] for r in rows]
            sections.append(Section(f"{name}: {scope} ({rows[0]['seeds']} seeds per L)",
                                    table=Table(_COLUMNS, table, _FORMATS),
                                    after=[landing_line(f"{name}, {scope}", rows, dense)]))
    sections.append(Section(text=["![top-1 change vs FLOPs reduction](haste_accuracy.png)"]))
    return Results("haste_accuracy", "HASTE accuracy vs FLOPs on MNIST-5k (CIFAR-style ResNets)", command, sections)


def plot(data: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = [(name, model, key) for name, model in sorted(data["models"].items())  # a model beside its other recipe
              for key in settings(model["runs"])]
    colors = matplotlib.colormaps["tab20"].colors  # more series than the default cycle's 10 colours
    for (name, model, key), color in zip(series, itertools.cycle(colors)):
        rows = summarize(model["runs"], key)
        default = key == _DEFAULT_KEY
        xs = [r["reduction"] for r in rows]
        ys = [r["top1"] - model["dense_top1"] for r in rows]
        ax.errorbar(xs, ys, xerr=[r["reduction_std"] for r in rows], yerr=[r["top1_std"] for r in rows],
                    marker="o" if default else "s", capsize=3, linestyle="-" if default else "--", color=color,
                    label=name if default else f"{name}, {setting_label(key).split(', ', 1)[-1]}")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"L={r['L']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(-_PAPER["drop"], color="grey", linestyle=":", label=f"−{_PAPER['drop']} pp budget")
    ax.plot([_PAPER["reduction"]], [-_PAPER["drop"]], marker="*", markersize=12, color="black", linestyle="none",
            label="paper: ResNet34, CIFAR-10")
    ax.axvline(_PAPER["target"], color="grey", linestyle="--", linewidth=0.8, label=f"target {_PAPER['target']:.0f} %")
    ax.set_xlabel("FLOPs reduction with overhead (%, measured)")
    ax.set_ylabel("top-1 change vs dense (pp)")
    ax.set_title("HASTE on MNIST-5k: mean ± std over seeds per L")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace,
        command: str = "python -m benchmarks.haste_accuracy") -> tuple[Results, dict[str, Any]]:
    """The runs not yet recorded (all of them without ``--resume``, none with ``--render``), then the summary
    of every recorded run."""
    runs_path = args.out / _RUNS
    if args.render or (args.resume and runs_path.exists()):
        data = json.loads(runs_path.read_text())
    else:
        data = {"models": {}}
    if not args.render:
        data["commands"] = [c for c in data.get("commands", []) if c != command] + [command]
        if args.threads:
            torch.set_num_threads(args.threads)
        split = mnist_5k()
        images, labels = pad_to_32(split.x_test[: args.limit]), split.y_test[: args.limit]
        data["setup"] = (
            f"HASTE: sparsity 2/3, 4×4 output tiles, centring on, the stem conv kept dense, unless a section "
            f"names another setting. "
            f"{len(images)} MNIST-5k test digits (32×32), batches of {args.batch}; "
            f"torch {torch.__version__}, {platform.machine()}, threads as each command's --threads sets them "
            f"(the time ratios of runs with different thread counts do not compare)."
        )
        for name in args.models:
            dense, checkpoint = load_model(name, args.width, args.cache, args.weight_decay)
            with torch.no_grad():
                dense_pred = torch.cat([dense(images[s : s + args.batch]).argmax(1)
                                        for s in range(0, len(images), args.batch)])
            label = model_key(name, args.weight_decay)
            model = data["models"].setdefault(label, {"runs": []})
            model.update(width=args.width, checkpoint=checkpoint,
                         dense_top1=100 * float((dense_pred == labels).float().mean()),
                         dense_macs=int(fxslim.estimate(dense, images[:1]).total.macs))
            done = {(r["L"], r["seed"], setting(r)) for r in model["runs"]}
            variants = {"include": (True,), "exclude": (False,), "both": (True, False)}[args.pointwise]
            for pointwise, L, seed in ((p, L, s) for p in variants for L in args.L for s in args.seeds):
                config = (pointwise, args.sparsity, args.tile)
                key = setting(dict(zip(_DEFAULT, config)))
                if (L, seed, key) in done:
                    continue
                one = run_one(dense, images, labels, dense_pred, model["dense_macs"], L, seed, config,
                              args.batch, args.time_every)
                model["runs"].append(one)
                runs_path.parent.mkdir(parents=True, exist_ok=True)
                runs_path.write_text(json.dumps(data, indent=1))
                print(f"{label} L={L} seed={seed} ({setting_label(key)}): top-1 {one['top1']:.2f} %, "
                      f"reduction {one['reduction']:.2f} %, time ×{one['time_ratio']:.2f}", flush=True)
    return to_results(data, command), {"": plot(data)}


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=sorted(_BUILDERS), default=["resnet18", "resnet34"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--L", type=int, nargs="+", default=[8, 10, 12, 14, 16, 18, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pointwise", choices=("include", "exclude", "both"), default="include",
                        help="replace the 1×1 convs too (default), keep them dense, or run both")
    parser.add_argument("--sparsity", type=float, default=2 / 3, help="share of zero plane entries (default 2/3)")
    parser.add_argument("--tile", type=int, default=4, help="output tile side (default 4)")
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                        help="use the checkpoint trained with this SGD weight decay (train_resnet_mnist's flag)")
    parser.add_argument("--limit", type=int, default=1000, help="test digits used (all 1,000 by default)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--time-every", type=int, default=4, help="time the dense model on every n-th batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=_HERE / ".cache")
    parser.add_argument("--resume", action="store_true", help="keep the runs already recorded, add the rest")
    parser.add_argument("--render", action="store_true", help="only summarise the recorded runs again")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.haste_accuracy", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
