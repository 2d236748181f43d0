"""HASTE on the bundled MNIST ResNet18 (width 0.25): rewrite, check accuracy, compare predicted and measured cost.

    python examples/haste_resnet.py [--L 12]
"""

from __future__ import annotations

import argparse
import warnings

import torch

import fxslim
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, pretrained_mnist_resnet18_small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=12)
    parser.add_argument("--digits", type=int, default=200)
    args = parser.parse_args()
    split = mnist_5k()
    x, y = pad_to_32(split.x_test[: args.digits]), split.y_test[: args.digits]
    model = pretrained_mnist_resnet18_small()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxslim.optimize(model, x[:1], passes=[fxslim.HASTE(L=args.L)])
    print(f"rewritten {res.report.rewritten('haste')} convs, skipped {dict(res.report.skipped('haste'))}")
    with torch.no_grad(), fxslim.record_buckets() as measured:
        dense_top1 = (model(x).argmax(1) == y).float().mean().item()
        haste_top1 = (res.module(x).argmax(1) == y).float().mean().item()
    print(f"top-1 on {args.digits} digits: dense {100 * dense_top1:.1f} %, HASTE L={args.L} {100 * haste_top1:.1f} %")
    # measured bucket counts next to the data-free prediction
    comp = res.compare(haste_buckets=fxslim.HasteBuckets(measured=measured))
    rows = [r for r in comp.after.rows if r.measured_macs is not None]  # the HASTE convs
    dense = sum(r.info["dense_macs"] for r in rows)
    predicted, measured = sum(r.macs for r in rows), sum(r.measured_macs for r in rows)
    overhead = sum(r.info["measured_overhead"] for r in rows)
    print(f"HASTE convs, MACs per image: dense {dense:,}; data-free prediction {predicted:,}; measured {measured:,} "
          f"(+{overhead:,} hashing and merging ops)")
    print(f"whole model: {comp.before.total.macs:,} -> {comp.after.total.macs:,} MACs predicted")
    print("  (the data-free prediction assumes channels hash like independent random vectors, the worst "
          "case for merging; real activations are correlated, so more channels share a bucket and the "
          "measured saving is larger. Only the measured count is what this input costs.)")


if __name__ == "__main__":
    main()
