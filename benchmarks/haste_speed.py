"""Whole-model wall-clock of a HASTE ResNet next to the dense one, and where the HASTE time goes.

The CIFAR-style ResNet18/34 (trained MNIST checkpoints from ``train_resnet_mnist.py`` when they are
in the cache, random weights otherwise; the output says which) is rewritten by
``fxslim.optimize(model, x, passes=[HASTE(L=...)])`` and both run on MNIST-5k test digits padded to
32×32, at batch 1 and 32. Rounds alternate dense and HASTE so machine load hits both alike; the
table gives the medians and the median of the per-round ratios.

The HASTE model runs on the native kernels where a C compiler is there (``fxslim/runtime/native/``:
``haste_front.c`` patches and codes, ``haste_buckets.c`` buckets, ``haste_tiles.c`` bucket means,
merged filters in registers and reduced convs); the same model on the ATen path
(``native_kernels.disabled()``) is timed in the same rounds.

The profile runs the HASTE model with timers around each stage of the op's CPU kernel
(``fxslim.runtime.haste_kernel``): gathering the patches and hashing them (projection, centring,
bit packing; one pass per tile in the native front kernel), bucketing (sorting each tile's codes;
on the ATen path also sorting tiles by bucket count), the native tile kernel (which writes the
output map itself), or on the ATen path the sparse segment sums (bucket means of the inputs and
merged filters), the reduced conv (batched matmuls), the rest of the kernel (segment indices, im2col
of the means, restoring the tile order) and stitching the tiles into the output map.

    python -m benchmarks.haste_speed                       # resnet18, L=12, batches 1 and 32
    python -m benchmarks.haste_speed --models resnet18 resnet34 --threads 1

Records in ``benchmarks/results/haste_speed.json``, rendered to .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
import fxslim.runtime.haste_kernel as haste_kernel
from fxslim.runtime import haste_native, native_kernels
from benchmarks import records
from benchmarks.records import Results, Section, Table
from benchmarks.resnet_checkpoints import ZOO_WEIGHT_DECAY, checkpoint_name
from fxslim.app.timing import interleaved_samples, paired_ratio
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, resnet18, resnet34
from fxslim.runtime.haste import record_buckets

__all__ = ["load_model", "haste_model", "side_by_side", "stage_timers", "profile", "merge_floor", "run", "main"]

_HERE = Path(__file__).resolve().parent
_BUILDERS = {"resnet18": resnet18, "resnet34": resnet34}
# kernel helper -> stage; time inside _group is also split by the torch calls it makes
_STAGES = {"patches_and_codes": "patches and hashing", "tile_buckets": "bucketing", "_stitch": "stitching"}
_TORCH = {"addmm": "segment sums (means, filter merge)", "bmm": "reduced conv (matmul)",
          "baddbmm": "reduced conv (matmul)"}
_NATIVE = "native tile kernel (means, merge, reduced conv, output)"
_ORDER = ("patches and hashing", "bucketing", _NATIVE, "segment sums (means, filter merge)", "reduced conv (matmul)",
          "indices, im2col, tile order", "stitching")


def load_model(name: str, width: float, cache: Path,
               weight_decay: float = ZOO_WEIGHT_DECAY) -> tuple[torch.nn.Module, str]:
    """The trained checkpoint ``<cache>/<checkpoint_name>.pt`` if present, else random weights."""
    model = _BUILDERS[name](num_classes=10, in_channels=1, width=width)
    path = cache / f"{checkpoint_name(name, width, weight_decay)}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), f"trained ({path.name})"
    torch.manual_seed(0)
    return model.eval(), "random weights (no trained checkpoint in the cache)"


def haste_model(model: torch.nn.Module, example: torch.Tensor, L: int, seed: int = 0) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslim.optimize(model, example[:1], passes=[fxslim.HASTE(L=L, seed=seed)]).module


def side_by_side(dense: Callable, haste: Callable, rounds: int,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, float]:
    """Median ms of dense and HASTE over interleaved rounds, and the median per-round HASTE / dense ratio,
    on ``clock``."""
    times = interleaved_samples({"dense": dense, "haste": haste}, rounds, clock=clock)
    return (1e3 * statistics.median(times["dense"]), 1e3 * statistics.median(times["haste"]),
            paired_ratio(times["haste"], times["dense"]))


def _aten_path(fn: Callable) -> Callable:
    def run():
        with native_kernels.disabled():
            return fn()
    return run


@contextlib.contextmanager
def stage_timers() -> Iterator[dict[str, float]]:
    """Seconds per stage of the HASTE kernel while active (wrappers on its module-level helpers)."""
    totals: dict[str, float] = defaultdict(float)
    inside = {"group": 0}
    kernel_saved = {name: getattr(haste_kernel, name) for name in (*_STAGES, "_group")}
    runtime_saved = {"_haste_conv2d_cpu": haste_runtime._haste_conv2d_cpu}
    native_saved = {"tile_convs": haste_native.tile_convs, "buckets": haste_native.buckets}
    torch_saved = {name: getattr(torch, name) for name in _TORCH}

    def timed(fn: Callable, stage: str, always: bool = True) -> Callable:
        def wrapper(*args, **kwargs):
            if not (always or inside["group"]):
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[stage] += time.perf_counter() - start
        return wrapper

    def group(*args, **kwargs):
        inside["group"] += 1
        try:
            return timed(kernel_saved["_group"], "_group")(*args, **kwargs)
        finally:
            inside["group"] -= 1

    for name, fn in kernel_saved.items():
        setattr(haste_kernel, name, group if name == "_group" else timed(fn, _STAGES[name]))
    haste_runtime._haste_conv2d_cpu = timed(runtime_saved["_haste_conv2d_cpu"], "kernel")
    haste_native.tile_convs = timed(native_saved["tile_convs"], _NATIVE)
    haste_native.buckets = timed(native_saved["buckets"], "bucketing")
    for name, fn in torch_saved.items():
        setattr(torch, name, timed(fn, _TORCH[name], always=False))
    try:
        yield totals
    finally:
        for module, saved in ((haste_kernel, kernel_saved), (haste_runtime, runtime_saved), (torch, torch_saved),
                              (haste_native, native_saved)):
            for name, fn in saved.items():
                setattr(module, name, fn)
        group_total = totals.pop("_group", 0.0)
        # patches and hashing, and bucketing run inside _group too
        named = sum(totals[s] for s in {*_STAGES.values(), *_TORCH.values(), _NATIVE})  # bmm and baddbmm share a stage
        totals["indices, im2col, tile order"] = group_total - named


def profile(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> tuple[dict[str, float], float]:
    """Mean ms per forward for each stage, and the mean ms of the whole forward."""
    with torch.no_grad():
        model(x)  # warm-up, outside the timers
        with stage_timers() as totals:
            whole = sum(interleaved_samples({"forward": lambda: model(x)}, rounds, warm_up=False)["forward"])
    return {k: 1e3 * v / rounds for k, v in totals.items()}, 1e3 * whole / rounds


def merge_floor(dense: torch.nn.Module, haste: torch.nn.Module, x: torch.Tensor,
                rounds: int) -> tuple[int, float, float]:
    """(merged filter values, ms, share of the dense forward): the floor of HASTE's filter merge.

    Every tile τ of every HASTE conv writes B_τ·k²·O merged filter values; with the bucket counts this
    input really gives (``record_buckets``), time only writing that many floats, in cache-sized chunks
    as the kernel writes them, alternating with the dense forward (median per-round ratio).
    """
    with torch.no_grad(), record_buckets() as record:
        haste(x)
    values = sum(s.buckets * s.kernel_size[0] * s.kernel_size[1] * s.out_channels for s in record.values())
    chunk = haste_kernel.CHUNK_ELEMENTS
    buffer = torch.empty(chunk)

    def write() -> None:
        for start in range(0, values, chunk):
            buffer[: min(chunk, values - start)].fill_(1.0)

    with torch.no_grad():
        _, floor_ms, ratio = side_by_side(lambda: dense(x), write, rounds)
    return values, floor_ms, ratio


def run(args: argparse.Namespace, command: str = "python -m benchmarks.haste_speed") -> Results:
    """Dense and HASTE side by side, the kernel's stage profile and the merge floor, per model and batch."""
    if args.threads:
        torch.set_num_threads(args.threads)
    images = pad_to_32(mnist_5k().x_test[: max(args.batches)])
    load_before = os.getloadavg()[0]
    speed_rows, profile_rows, floor_rows, sources = [], [], [], []
    for name in args.models:
        dense, source = load_model(name, args.width, args.cache, args.weight_decay)
        sources.append(f"{name}: {source}")
        haste = haste_model(dense, images, args.L)
        with torch.no_grad():
            for batch in args.batches:
                x = images[:batch]
                times = interleaved_samples({"dense": lambda: dense(x), "haste": lambda: haste(x),
                                             "aten": _aten_path(lambda: haste(x))}, args.rounds)
                _, _, cpu_ratio = side_by_side(lambda: dense(x), lambda: haste(x), args.rounds, time.process_time)
                native, aten = haste(x), _aten_path(lambda: haste(x))()
                speed_rows.append([name, batch, *(1e3 * statistics.median(times[k]) for k in ("dense", "haste")),
                                   paired_ratio(times["haste"], times["dense"]), cpu_ratio,
                                   1e3 * statistics.median(times["aten"]), paired_ratio(times["aten"], times["dense"]),
                                   float((native - aten).abs().max() / aten.abs().max()),
                                   float((native.argmax(1) == aten.argmax(1)).float().mean()) * 100])
        for batch in args.batches:
            stages, whole = profile(haste, images[:batch], max(1, args.rounds // 2))
            kernel = stages["kernel"]
            cells = [f"{stages.get(s, 0.0):.1f} ({100 * stages.get(s, 0.0) / kernel:.0f} %)" for s in _ORDER]
            profile_rows.append([name, batch, whole, kernel, *cells])
            values, floor_ms, share = merge_floor(dense, haste, images[:batch], args.rounds)
            floor_rows.append([name, batch, values / 1e6, floor_ms, 100 * share])
    intro = Section(text=[
        f"HASTE: L={args.L}, sparsity 2/3, tile 4, centring on, every conv but the stem. "
        f"Models at width {args.width}: {'; '.join(sources)}. Inputs: MNIST-5k test digits padded to 32×32. "
        f"{platform.machine()}; wall clock (time.perf_counter), {args.rounds} interleaved rounds, medians; the "
        f"machine is shared, so compare within a row (1-minute load average {load_before:.1f} before). The last "
        "column repeats the rounds on this process's CPU time (time.process_time): on a loaded machine a longer "
        f"call is more often descheduled, which inflates wall-clock ratios and not this one. HASTE: "
        f"{haste_native.status()}; the next two columns time the same model on the ATen path, in the same rounds, "
        "and the last two compare the two paths' logits on the timed batch (max |difference| over max |logit|, "
        "and the share of equal top-1 classes). The native kernels sum in other orders: on one input each op "
        "gives the same buckets as the ATen path and outputs within float32 rounding (tests/runtime/"
        "test_haste_native.py, also against the loop reference), but through the network a rounding "
        "difference can tip a later layer's centred projection that lies within rounding of 0 into the other "
        "bucket, as any change of BLAS or thread count can."],
        table=Table(["model", "batch", "dense ms", "HASTE ms", "HASTE / dense", "HASTE / dense, CPU time",
                     "HASTE on the ATen path ms", "ATen path / dense", "native vs ATen path, logits",
                     "same top-1"], speed_rows,
                    ["", "d", ".1f", ".1f", ".2f}×", ".2f}×", ".1f", ".2f}×", ".1e", ".1f} %"]))
    stages = Section("Where the HASTE time goes", [
        "Mean ms per forward of each stage of the op's CPU kernel, summed over all HASTE layers (share of "
        "the kernel time). `forward` is the whole HASTE model (kernels, custom-op dispatch, the dense stem, "
        "batch norms, ReLUs, pooling, classifier); timers add a little to each call."],
        Table(["model", "batch", "forward ms", "HASTE kernels ms", *_ORDER], profile_rows,
              ["", "d", ".1f", ".1f", *("" for _ in _ORDER)], [False, True, True, True, *(True for _ in _ORDER)]))
    floor = Section("The floor: writing the merged filters", [
        "The ATen path writes B·k²·O merged filter values per tile (Σ over the tiles and HASTE convs of this "
        "input, bucket counts as measured) and reads them back; the native kernel keeps each in registers. "
        "Time to only write that many floats (cache-sized chunks, as the ATen path does), and its share of the "
        "dense model's forward time:"],
        Table(["model", "batch", "merged filter values", "write ms", "share of dense time"], floor_rows,
              ["", "d", ".1f} M", ".1f", ".0f} %"]))
    return Results("haste_speed", "HASTE ResNet wall-clock vs dense (CPU)", command, [intro, stages, floor])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=sorted(_BUILDERS), default=["resnet18"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=ZOO_WEIGHT_DECAY,
                        help="the checkpoint trained with this weight decay (train_resnet_mnist's flag)")
    parser.add_argument("--L", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=_HERE / ".cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.haste_speed", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
