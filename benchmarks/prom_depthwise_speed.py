"""PROM's native depthwise kernel against oneDNN 3.2's int8 depthwise primitive, per MobileNetV2 layer.

    python -m benchmarks.prom_depthwise_speed [--batches 1 16] [--rounds 40 8] [--threads 1]

For every distinct 3×3 depthwise conv of torchvision mobilenet_v2 at 224×224 (``prom_op_speed``'s
shapes), a direct plan (``prom_direct``) of the run a PROM model holds there, 1×1 expansion →
depthwise → 1×1 projection, is built twice: once as the runtime builds it (the depthwise conv as
``prom_depthwise``'s C kernel where the plan takes it), once with native kernels off while planning
(``native_kernels.disabled()``: the depthwise conv as a oneDNN primitive). The plans' depthwise steps
alone are timed, interleaved round by round, each called as the plan calls it (between the plan's
own buffers, so that nothing else runs); the table gives median µs per call and oneDNN's time over
the kernel's (> 1: the kernel is faster), the median of per-round ratios. Narrow convs, which the
plan leaves to oneDNN, are timed too (the kernel called on its own buffers) to show why. Random u8
codes and int8 weights: speed does not depend on their values. Records in
benchmarks/results/prom_depthwise_speed.json, rendered to .md.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.fx as fx

from benchmarks import records
from benchmarks.prom_op_speed import _layer_shapes
from benchmarks.records import Results, Section, Table
from fxslim.app.timing import interleaved_samples, paired_ratio
from fxslim.runtime import native_kernels, onednn_capi, prom_depthwise
from fxslim.runtime import prom_direct as D
from fxslim.runtime import prom_lowered as L
from fxslim.runtime.prom import conv_output_size
from fxslim.runtime.prom_onednn import QUANTIZED_CONV, ConvWeights, as_qtensor, quiet_qtensor_warning

__all__ = ["run", "main"]

_EXTRA = ((16, 112, 1), (24, 56, 1), (24, 112, 1))  # narrower than the plan takes: near the threshold


def _weights(c_in: int, c_out: int, k: int, stride: int, groups: int, gen: torch.Generator) -> ConvWeights:
    weight = torch.randint(-128, 128, (c_out, c_in // groups, k, k), generator=gen).to(torch.int8)
    return ConvWeights(weight, 0.001 + 0.01 * torch.rand(c_out, generator=gen), torch.randn(c_out, generator=gen),
                       (stride, stride), (k // 2, k // 2), (1, 1), groups)


def _segment(weights: dict[str, ConvWeights]) -> D.DirectSegment:
    """The direct segment of expansion → depthwise (ReLU) → projection, as the lowering builds it."""
    graph = fx.Graph()
    y = graph.placeholder("x0")
    for name, op, scale, zero_point in (("expand", "relu", 0.05, 0), ("depthwise", "relu", 0.06, 0),
                                        ("project", "none", 0.1, 128)):
        y = graph.call_function(QUANTIZED_CONV[op], (y, graph.get_attr(name), scale, zero_point))
    graph.output((y,))
    return D.DirectSegment(L.QuantizedSegment(graph, {k: w.pack() for k, w in weights.items()}, weights))


def _depthwise_step(segment: D.DirectSegment, x: torch.Tensor) -> tuple[Callable[[], object], str]:
    """The planned depthwise step of ``segment`` (planned now, on ``x``) as a call, and what runs it."""
    segment(x)
    (plan,) = [p for p in segment._plans.values() if p is not None]
    fn, arguments = plan.steps[1]
    return (lambda: (plan, fn(*arguments))), getattr(fn, "__name__", "")  # the plan (its buffers) lives on


def _variants(batch: int, channels: int, size: int, stride: int, gen: torch.Generator) -> dict[str, Callable]:
    weights = {"expand": _weights(16, channels, 1, 1, 1, gen),
               "depthwise": _weights(channels, channels, 3, stride, channels, gen),
               "project": _weights(channels, 16, 1, 1, 1, gen)}
    codes = torch.randint(0, 256, (batch, 16, size, size), generator=gen, dtype=torch.int32).to(torch.uint8)
    x = as_qtensor(codes.contiguous(memory_format=torch.channels_last), 0.05, 3)
    native, native_name = _depthwise_step(_segment(weights), x)
    with native_kernels.disabled():
        onednn, onednn_name = _depthwise_step(_segment(weights), x)
    if onednn_name == "prom_depthwise3x3":
        raise RuntimeError("the plan built with native kernels off still calls the depthwise kernel")
    fns = {"oneDNN primitive": onednn}
    if native_name == "prom_depthwise3x3":
        fns["native kernel"] = native
    else:  # below prom_direct.NATIVE_DEPTHWISE_CHANNELS: the kernel on buffers of its own
        fns["native kernel"] = _standalone_kernel(weights["depthwise"], batch, channels, size, stride, gen)
    return fns


def _standalone_kernel(weights: ConvWeights, batch: int, channels: int, size: int, stride: int,
                       gen: torch.Generator) -> Callable[[], object]:
    src = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.int32).to(torch.uint8)
    src = src.contiguous(memory_format=torch.channels_last)
    out_size = conv_output_size(size, 3, stride, 1, 1)
    dst = torch.empty((batch, channels, out_size, out_size), dtype=torch.uint8, memory_format=torch.channels_last)
    step = prom_depthwise.DepthwiseStep(weights, tuple(src.shape), tuple(dst.shape), 0.05, 3, 0.06, 0, True,
                                        src.data_ptr(), dst.data_ptr())
    return lambda: (src, dst, step())  # the tensors live as long as the call


def run(args: argparse.Namespace, command: str = "python -m benchmarks.prom_depthwise_speed") -> Results:
    """Both forms of every depthwise layer, per batch size, interleaved."""
    if not prom_depthwise.available() or not onednn_capi.available():
        raise SystemExit("prom_depthwise_speed needs the kernel's vector form (AVX-512 VNNI) and oneDNN's C library "
                         "(the onednn extra)")
    torch.set_num_threads(args.threads)
    quiet_qtensor_warning()
    gen = torch.Generator().manual_seed(0)
    shapes = sorted({(c_in, size, stride) for c_in, _, size, stride in _layer_shapes()[1]} | set(_EXTRA),
                    key=lambda s: (-s[1], s[0]))
    sections = [Section(text=[
        f"{args.threads} thread(s). µs per call, medians over interleaved rounds; ratio: the median over rounds "
        "of oneDNN's time / the kernel's (> 1: the kernel is faster). The plan runs the kernel from "
        f"{D.NATIVE_DEPTHWISE_CHANNELS} channels on; the narrower rows time it on buffers of its own."])]
    for batch, rounds in zip(args.batches, args.rounds + args.rounds[-1:] * len(args.batches)):
        rows = []
        for channels, size, stride in shapes:
            samples = interleaved_samples(_variants(batch, channels, size, stride, gen), rounds, shuffle=True)
            median = {k: 1e6 * statistics.median(v) for k, v in samples.items()}
            in_plan = "yes" if channels >= D.NATIVE_DEPTHWISE_CHANNELS else "no (oneDNN)"
            rows.append([f"{channels} @ {size}, stride {stride}", in_plan, median["native kernel"],
                         median["oneDNN primitive"],
                         paired_ratio(samples["oneDNN primitive"], samples["native kernel"])])
        sections.append(Section(f"batch {batch}", table=Table(
            ["depthwise conv (channels @ size)", "kernel in the plan", "native kernel µs", "oneDNN primitive µs",
             "oneDNN / kernel"], rows, ["", "", ".1f", ".1f", ".2f}×"])))
    return Results("prom_depthwise_speed", "PROM's depthwise kernel vs oneDNN's primitive (MobileNetV2 layers)",
                   command, sections)


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, nargs="+", default=[40, 8], help="per batch size, in order")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_depthwise_speed", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
