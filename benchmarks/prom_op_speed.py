"""Speed of the PROM integer conv ops against fp32 convs on torchvision MobileNetV2 layer shapes.

    python -m benchmarks.prom_op_speed [--batches 1 32] [--rounds 7]

For every distinct pointwise (1×1) and depthwise conv shape of mobilenet_v2 at 224×224, each
variant runs once per round, interleaved, and the table reports the median over rounds (the
machine is shared, so only ratios measured side by side mean anything). Variants:

- fp32 conv (NCHW) and fp32 conv + BN + ReLU6 (NCHW): eager PyTorch, what a float model runs;
- fp32 conv (channels_last);
- fxslim::ternary_conv2d / fxslim::int8_conv2d: the whole integer op (uint8 in, accumulate,
  requantize, uint8 out; BN and ReLU6 are folded into it);
- oneDNN u8 conv, accumulator only: the conv part of the ternary op without requantization;
- torch._int_mm on the same GEMM ([N·H·W, C_in] @ [C_in, C_out], int8 → int32).

Records in benchmarks/results/prom_op_speed.json, rendered to .md.
"""

from __future__ import annotations

import argparse
import collections
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.app.timing import interleaved_medians
from fxslim.runtime import prom as P

__all__ = ["run", "main"]


def _layer_shapes() -> tuple[collections.Counter, collections.Counter]:
    """(pointwise, depthwise) Counters of (C_in, C_out, H, stride) over mobilenet_v2 at 224."""
    model = torchvision.models.mobilenet_v2().eval()
    pointwise, depthwise = collections.Counter(), collections.Counter()

    def hook(module, inputs, _output):
        key = (module.in_channels, module.out_channels, inputs[0].shape[-1], module.stride[0])
        if module.kernel_size == (1, 1) and module.groups == 1:
            pointwise[key] += 1
        elif module.groups == module.in_channels == module.out_channels:
            depthwise[key] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return pointwise, depthwise


def _pointwise_variants(batch: int, c_in: int, c_out: int, size: int, gen: torch.Generator) -> dict[str, Callable]:
    x = torch.randint(0, 256, (batch, c_in, size, size), generator=gen, dtype=torch.int32).to(torch.uint8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    xf = torch.randn(batch, c_in, size, size, generator=gen)
    xf_cl = xf.contiguous(memory_format=torch.channels_last)
    wf = torch.randn(c_out, c_in, 1, 1, generator=gen)
    bn = torch.nn.BatchNorm2d(c_out).eval()
    codes = torch.randint(-1, 2, (c_out, c_in), generator=gen).to(torch.int8)
    packed = P.pack_ternary(codes)
    w8 = torch.randint(-127, 128, (c_out, c_in, 1, 1), generator=gen).to(torch.int8)
    bias = torch.randint(-1000, 1000, (c_out,), generator=gen, dtype=torch.int32)
    mult = P.requant_multiplier(torch.full((c_out,), 0.02, dtype=torch.float64))
    ones, zeros = torch.ones(c_out), torch.zeros(c_out, dtype=torch.int64)
    prepacked = torch.ops.onednn.qconv_prepack(codes[:, :, None, None], ones, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    a_mm = x_cl.permute(0, 2, 3, 1).reshape(-1, c_in).to(torch.int8)
    b_mm = codes.t().contiguous()
    af_mm, bf_mm = a_mm.float(), b_mm.float()
    return {
        "fp32 conv NCHW": lambda: F.conv2d(xf, wf),
        "fp32 conv+BN+ReLU6 NCHW": lambda: F.relu6(bn(F.conv2d(xf, wf))),
        "fp32 conv CL": lambda: F.conv2d(xf_cl, wf),
        "ternary_conv2d": lambda: P.ternary_conv2d(x_cl, 3, packed, bias, mult, 23, 0, 0, 255),
        "int8_conv2d": lambda: P.int8_conv2d(x_cl, 3, w8, bias, mult, 23, 0, 0, 255),
        "oneDNN u8 acc only": lambda: torch.ops.onednn.qconv_pointwise(
            x_cl, 1.0, 0, prepacked, ones, zeros, None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], ""),
        "fp32 mm": lambda: af_mm @ bf_mm,
        "_int_mm": lambda: torch._int_mm(a_mm, b_mm),
    }


def _depthwise_variants(batch: int, channels: int, size: int, stride: int, gen: torch.Generator) -> dict[str, Callable]:
    x_cl = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.int32).to(torch.uint8)
    x_cl = x_cl.contiguous(memory_format=torch.channels_last)
    xf = torch.randn(batch, channels, size, size, generator=gen)
    xf_cl = xf.contiguous(memory_format=torch.channels_last)
    wf = torch.randn(channels, 1, 3, 3, generator=gen)
    bn = torch.nn.BatchNorm2d(channels).eval()
    w8 = torch.randint(-127, 128, (channels, 1, 3, 3), generator=gen).to(torch.int8)
    bias = torch.randint(-1000, 1000, (channels,), generator=gen, dtype=torch.int32)
    mult = P.requant_multiplier(torch.full((channels,), 0.002, dtype=torch.float64))
    s = [stride, stride]
    return {
        "fp32 conv NCHW": lambda: F.conv2d(xf, wf, None, s, 1, 1, channels),
        "fp32 conv+BN+ReLU6 NCHW": lambda: F.relu6(bn(F.conv2d(xf, wf, None, s, 1, 1, channels))),
        "fp32 conv CL": lambda: F.conv2d(xf_cl, wf, None, s, 1, 1, channels),
        "int8_conv2d": lambda: P.int8_conv2d(x_cl, 3, w8, bias, mult, 23, 0, 0, 255, s, [1, 1], [1, 1], channels),
    }


def _section(title: str, rows: list[tuple[str, int, dict[str, float]]], columns: list[str], ours: list[str]) -> Section:
    """ms per call of every variant per layer shape, each op's speed-up, and the count-weighted sum."""
    base = "fp32 conv+BN+ReLU6 NCHW"
    table = []
    for name, count, medians in [*rows, ("**all layers (count-weighted sum)**", sum(r[1] for r in rows),
                                         {c: sum(n * m[c] for _, n, m in rows) for c in columns})]:
        table.append([name, count, *(medians[c] for c in columns), *(medians[base] / medians[o] for o in ours)])
    return Section(title, table=Table(["layer (C_in→C_out @H, stride)", "count", *columns,
                                       *(f"{o} speed-up vs {base}" for o in ours)],
                                      table, ["", "d", *(".3f" for _ in columns), *(".2f}×" for _ in ours)]))


def run(args: argparse.Namespace, command: str = "python -m benchmarks.prom_op_speed") -> Results:
    """Every variant on every layer shape, per batch size, interleaved."""
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    pointwise, depthwise = _layer_shapes()
    pw_columns = ["fp32 conv NCHW", "fp32 conv+BN+ReLU6 NCHW", "fp32 conv CL", "ternary_conv2d", "int8_conv2d",
                  "oneDNN u8 acc only", "fp32 mm", "_int_mm"]
    dw_columns = ["fp32 conv NCHW", "fp32 conv+BN+ReLU6 NCHW", "fp32 conv CL", "int8_conv2d"]
    sections = [Section(text=[
        f"Medians over {args.rounds} interleaved rounds, milliseconds per call, {platform.machine()}. Speed-ups "
        "compare each fxslim op (BN and ReLU6 folded in, uint8 in and out) with the "
        "eager fp32 conv + BN + ReLU6 it replaces. `_int_mm` and `fp32 mm` run the same GEMM ([N·H·W, C_in] @ "
        "[C_in, C_out]) for the int8-vs-fp32 matmul comparison."])]
    for batch in args.batches:
        rows = []
        for (c_in, c_out, size, _stride), count in sorted(pointwise.items(), key=lambda kv: -kv[0][2]):
            medians = interleaved_medians(_pointwise_variants(batch, c_in, c_out, size, gen), args.rounds)
            rows.append((f"{c_in}→{c_out} @{size}", count, {k: 1e3 * v for k, v in medians.items()}))
        sections.append(_section(f"pointwise 1×1 convs (batch {batch})", rows, pw_columns,
                                 ["ternary_conv2d", "int8_conv2d"]))
        rows = []
        for (c_in, _c_out, size, stride), count in sorted(depthwise.items(), key=lambda kv: -kv[0][2]):
            medians = interleaved_medians(_depthwise_variants(batch, c_in, size, stride, gen), args.rounds)
            rows.append((f"{c_in} dw @{size}, s{stride}", count, {k: 1e3 * v for k, v in medians.items()}))
        sections.append(_section(f"depthwise 3×3 convs (batch {batch})", rows, dw_columns, ["int8_conv2d"]))
    return Results("prom_op_speed", "PROM integer ops vs fp32 convs (MobileNetV2 layer shapes)", command, sections)


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_op_speed", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
