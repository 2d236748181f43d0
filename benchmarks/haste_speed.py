"""Whole-model wall-clock of a HASTE ResNet next to the dense one, and where the HASTE time goes.

The CIFAR-style ResNet18/34 (trained MNIST checkpoints from ``train_resnet_mnist.py`` when they are
in the cache, random weights otherwise; the output says which) is rewritten by
``fxslim.optimize(model, x, passes=[HASTE(L=...)])`` and both run on MNIST-5k test digits padded to
32×32, at batch 1 and 32. Rounds alternate dense and HASTE so machine load hits both alike; the
table gives the medians and the median of the per-round ratios.

The profile runs the HASTE model with timers around each stage of the op's CPU kernel
(``fxslim.runtime.haste``): gathering the patches, hashing (projection, centring, bit packing),
bucketing (sorting codes), merging (bucket sums of the inputs), sorting tiles by bucket count and
restoring their order, im2col of the merged inputs with the per-chunk set-up (sparse assignment
indices, weight blocks), filter merging (the sparse assignment times the weights), the reduced
conv (batched matmuls) and stitching the tiles into the output map.

    python -m benchmarks.haste_speed                       # resnet18, L=14, batches 1 and 32
    python -m benchmarks.haste_speed --models resnet18 resnet34 --threads 1

Writes ``benchmarks/results/haste_speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import fxslim
import fxslim.runtime.haste as haste_runtime
from benchmarks.command import command_line
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, resnet18, resnet34

_HERE = Path(__file__).resolve().parent
_BUILDERS = {"resnet18": resnet18, "resnet34": resnet34}
# kernel helper -> stage; time inside _reduced_conv is split by the torch calls it makes
_STAGES = {
    "_patches": "patches", "_hash_codes": "hashing", "_buckets": "bucketing",
    "_bucket_sums": "merging (input sums)", "_stitch": "stitching",
}
_REDUCED = {"addmm": "filter merge", "bmm": "reduced conv (matmul)", "baddbmm": "reduced conv (matmul)"}
_ORDER = ("patches", "hashing", "bucketing", "merging (input sums)", "tile sorting and reordering",
          "im2col and chunk set-up", "filter merge", "reduced conv (matmul)", "stitching")


def load_model(name: str, width: float, cache: Path) -> tuple[torch.nn.Module, str]:
    """The trained checkpoint ``<cache>/<name>_w<width·100>_mnist.pt`` if present, else random weights."""
    model = _BUILDERS[name](num_classes=10, in_channels=1, width=width)
    path = cache / f"{name}_w{round(width * 100):03d}_mnist.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), f"trained ({path.name})"
    torch.manual_seed(0)
    return model.eval(), "random weights (no trained checkpoint in the cache)"


def haste_model(model: torch.nn.Module, example: torch.Tensor, L: int, seed: int = 0) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, example[:1], passes=[fxslim.HASTE(L=L, seed=seed)]).module


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def side_by_side(dense: Callable, haste: Callable, rounds: int) -> tuple[float, float, float]:
    """Median ms of dense and HASTE over alternating rounds, and the median per-round ratio."""
    dense(), haste()  # warm-up
    times = []
    for i in range(rounds):
        if i % 2 == 0:
            d = _ms(dense)
            h = _ms(haste)
        else:
            h = _ms(haste)
            d = _ms(dense)
        times.append((d, h))
    ratio = statistics.median(h / d for d, h in times)
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), ratio


@contextlib.contextmanager
def stage_timers() -> Iterator[dict[str, float]]:
    """Seconds per stage of the HASTE kernel while active (wrappers on its module-level helpers)."""
    totals: dict[str, float] = defaultdict(float)
    depth = {"reduced": 0}
    saved = {name: getattr(haste_runtime, name) for name in (*_STAGES, "_reduced_conv", "_haste_conv2d_cpu")}
    saved_torch = {name: getattr(torch, name) for name in _REDUCED}

    def timed(name: str, fn: Callable, stage: str | None) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                if name == "_reduced_conv":
                    depth["reduced"] += 1
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if name == "_reduced_conv":
                    depth["reduced"] -= 1
                totals[stage or name] += elapsed
        return wrapper

    def timed_torch(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if not depth["reduced"]:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[_REDUCED[name]] += time.perf_counter() - start
        return wrapper

    for name, fn in saved.items():
        setattr(haste_runtime, name, timed(name, fn, _STAGES.get(name)))
    for name, fn in saved_torch.items():
        setattr(torch, name, timed_torch(name, fn))
    try:
        yield totals
    finally:
        for name, fn in saved.items():
            setattr(haste_runtime, name, fn)
        for name, fn in saved_torch.items():
            setattr(torch, name, fn)
        kernel = totals.pop("_haste_conv2d_cpu", 0.0)
        reduced = totals.pop("_reduced_conv", 0.0)
        inside = sum(totals[s] for s in set(_REDUCED.values()))
        totals["im2col and chunk set-up"] = reduced - inside  # copies, assignment indices, weight blocks
        named = sum(v for k, v in totals.items() if k in _ORDER and k != "tile sorting and reordering")
        totals["tile sorting and reordering"] = kernel - named
        totals["kernel"] = kernel


def profile(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> tuple[dict[str, float], float]:
    """Mean ms per forward for each stage, and the mean ms of the whole forward."""
    with torch.no_grad():
        model(x)
        with stage_timers() as totals:
            whole = sum(_ms(lambda: model(x)) for _ in range(rounds))
    return {k: 1e3 * v / rounds for k, v in totals.items()}, whole / rounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(_BUILDERS), default=["resnet18"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--L", type=int, default=14)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=_HERE / ".cache")
    parser.add_argument("--out", type=Path, default=_HERE / "results" / "haste_speed.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = pad_to_32(mnist_5k().x_test[: max(args.batches)])
    speed_rows, profile_rows, sources = [], [], []
    for name in args.models:
        dense, source = load_model(name, args.width, args.cache)
        sources.append(f"{name}: {source}")
        haste = haste_model(dense, images, args.L)
        with torch.no_grad():
            for batch in args.batches:
                x = images[:batch]
                d_ms, h_ms, ratio = side_by_side(lambda: dense(x), lambda: haste(x), args.rounds)
                speed_rows.append(f"| {name} | {batch} | {d_ms:.1f} | {h_ms:.1f} | {ratio:.2f}× |")
        for batch in args.batches:
            stages, whole = profile(haste, images[:batch], max(1, args.rounds // 2))
            kernel = stages["kernel"]
            cells = [f"{stages.get(s, 0.0):.1f} ({100 * stages.get(s, 0.0) / kernel:.0f} %)" for s in _ORDER]
            profile_rows.append(f"| {name} | {batch} | {whole:.1f} | {kernel:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join([
        "# HASTE ResNet wall-clock vs dense (CPU)",
        "",
        f"Generated by `{command_line('benchmarks.haste_speed', argv)}`.",
        "",
        f"HASTE: L={args.L}, sparsity 2/3, tile 4, centring on, every conv but the stem. "
        f"Models at width {args.width}: {'; '.join(sources)}. Inputs: MNIST-5k test digits padded to 32×32. "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}; wall clock "
        f"(time.perf_counter), {args.rounds} alternating rounds, medians; the machine is shared, so compare "
        "within a row.",
        "",
        "| model | batch | dense ms | HASTE ms | HASTE / dense |",
        "| --- | ---: | ---: | ---: | ---: |",
        *speed_rows,
        "",
        "## Where the HASTE time goes",
        "",
        "Mean ms per forward of each stage of the op's CPU kernel, summed over all HASTE layers (share of "
        "the kernel time). `forward` is the whole HASTE model (kernels, custom-op dispatch, the dense stem, "
        "batch norms, ReLUs, pooling, classifier); timers add a little to each call.",
        "",
        "| model | batch | forward ms | HASTE kernels ms | " + " | ".join(_ORDER) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in _ORDER) + " |",
        *profile_rows,
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
