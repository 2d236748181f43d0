"""Wall-clock of fxslim::haste_conv2d next to dense F.conv2d on the conv layers of a ResNet18.

Every distinct conv shape of the CIFAR-style ResNet18 at 32×32 input (3×3 and 1×1, stride 1 and 2,
64 to 512 channels; the 1-channel stem excluded), fed with the real inputs of that conv: MNIST-5k
test digits run through a ResNet18 (the trained checkpoint from ``train_resnet_mnist.py`` if it is
in the cache, random weights otherwise; the output says which). Dense and HASTE are timed
alternately in one run and the table shows medians over repeats and their ratio.

    python -m benchmarks.haste_op_speed [--batches 1 32] [--L 14] [--tile 4] [--repeats 7]
    python -m benchmarks.haste_op_speed --threads 1 --clock cpu   # on a busy machine

Records in ``benchmarks/results/haste_op_speed.json``, rendered to .md. ``B/C`` is the mean bucket count per
tile over the channel count; ``conv MACs`` the reduced conv's multiply-accumulates over the dense
conv's (no hashing or merging overhead included).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.app.timing import interleaved_medians
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, resnet18
from fxslim.runtime.haste import haste_conv2d, make_planes, patch_shape, record_buckets

__all__ = ["run", "main"]

_HERE = Path(__file__).resolve().parent
_LAYERS = (  # one conv per distinct shape; stage maps 32/16/8/4
    "layer1.0.conv1",
    "layer2.0.conv1",
    "layer2.0.downsample.0",
    "layer2.0.conv2",
    "layer3.0.conv1",
    "layer3.0.downsample.0",
    "layer3.0.conv2",
    "layer4.0.conv1",
    "layer4.0.downsample.0",
    "layer4.0.conv2",
)


def _model(checkpoint: Path) -> tuple[torch.nn.Module, str]:
    model = resnet18(num_classes=10, in_channels=1)
    if checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return model.eval(), f"trained ({checkpoint.name})"
    torch.manual_seed(0)
    return model.eval(), "random weights (no trained checkpoint in the cache)"


def _conv_inputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    modules, captured, handles = dict(model.named_modules()), {}, []
    for name in _LAYERS:
        hook = lambda _m, args, _out, name=name: captured.__setitem__(name, args[0].detach().clone())
        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return captured


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run(args: argparse.Namespace, command: str = "python -m benchmarks.haste_op_speed") -> Results:
    """Dense and HASTE side by side on each conv shape, per batch size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, weights = _model(args.checkpoint)
    modules = dict(model.named_modules())
    images = pad_to_32(mnist_5k().x_test[: max(args.batches)])
    inputs = _conv_inputs(model, images)
    rows = []
    for batch in args.batches:
        for index, name in enumerate(_LAYERS):
            conv = modules[name]
            x = inputs[name][:batch].contiguous()
            w, stride, padding = conv.weight.detach(), list(conv.stride), list(conv.padding)
            th, tw = patch_shape(conv.kernel_size, conv.stride, conv.dilation, args.tile)
            planes = make_planes(args.L, th * tw, args.sparsity, seed=index)
            call = lambda layer="": haste_conv2d(x, w, None, planes, stride, padding, [1, 1], args.tile, True, layer)
            with record_buckets() as record:
                call(name)
            stats = record[name]
            ms = interleaved_medians({"dense": lambda: F.conv2d(x, w, None, stride, padding), "haste": call},
                                     args.repeats, clock=_CLOCKS[args.clock])
            rows.append([batch, name, f"{conv.in_channels}→{conv.out_channels}",
                         f"{conv.kernel_size[0]}×{conv.kernel_size[1]}", conv.stride[0], f"{x.shape[2]}×{x.shape[3]}",
                         stats.buckets / stats.tiles / stats.channels,
                         stats.bucket_pixels / (stats.channels * stats.pixels),
                         1e3 * ms["dense"], 1e3 * ms["haste"], ms["haste"] / ms["dense"]])
    text = [f"Inputs: the real inputs of each conv of a ResNet18 ({weights}) on MNIST-5k test digits padded to 32×32.",
            f"HASTE: L={args.L}, sparsity={args.sparsity:.3f}, tile={args.tile}, centering on; {platform.machine()}; "
            f"{args.clock} clock, median of {args.repeats} interleaved repeats (compare within a row)."]
    table = Table(["batch", "layer", "C→O", "k", "stride", "input", "B/C", "conv MACs", "dense ms", "HASTE ms",
                   "HASTE/dense"], rows, ["d", "", "", "", "d", "", ".2f", ".2f", ".2f", ".2f", ".1f}×"])
    return Results("haste_op_speed", "HASTE op time vs dense conv2d (CPU)", command, [Section(text=text, table=table)])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--L", type=int, default=14)
    parser.add_argument("--sparsity", type=float, default=2 / 3)
    parser.add_argument("--tile", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock", choices=sorted(_CLOCKS), default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other load)",
    )
    parser.add_argument("--checkpoint", type=Path, default=_HERE / ".cache" / "resnet18_w100_mnist.pt")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.haste_op_speed", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
