"""MNIST-5k top-1 of each int8 peer's post-training quantization beside PROM's, on the committed MobileNetMNIST.

    python -m benchmarks.prom_peers_accuracy [--epochs 5]    # needs the peers: the 'bench' extra

The committed float MobileNetMNIST (benchmarks/train_mobilenet_mnist.py) on the 1,000 test digits
of MNIST-5k. Every post-training quantization is calibrated on the same 1,000 training digits:

- the peers of ``prom_vs_peers``, built by ``prom_peers`` (PT2E X86InductorQuantizer + compile,
  ONNX Runtime static QDQ, OpenVINO + NNCF): 8-bit everywhere, per-channel weights;
- PROM PTQ: ``fxslim.prepare`` (ternary 1×1 convs, 8-bit elsewhere) with observers calibrated, no training;
- PROM QAT: the same ``fit`` as ``prom_accuracy`` (TWN, ``--epochs`` epochs, seed 0).

PROM's rows give the fake-quant model and the integer models of both runtimes: ``convert``'s
reference ops and the oneDNN runtime as users run it (``micro_batched``: lowered, its convs as
oneDNN primitives when the ``onednn`` extra is installed). Agreement: argmax equal to the float
model's. A peer that cannot be installed is skipped with its reason. Records in
benchmarks/results/prom_peers_accuracy.json, rendered to .md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks import prom_peers, records
from benchmarks.records import Results, Section, Table
from fxslim.api import prepare
from fxslim.models.data import mnist_5k
from fxslim.models.mobilenet_mnist import load_mobilenet_mnist
from fxslim.models.train import FitConfig, fit, predict
from fxslim.passes.prom import PROM, calibrate
from fxslim.passes.prom_batching import micro_batched
from fxslim.passes.prom_convert import convert
from fxslim.runtime.prom_onednn import onednn_available

__all__ = ["run", "main"]

_PEERS: dict[str, Callable] = {"PT2E int8 + compile": prom_peers.pt2e_int8, "ONNX Runtime int8": prom_peers.ort_int8,
                               "OpenVINO + NNCF int8": prom_peers.openvino_int8}


def run(args: argparse.Namespace, command: str = "python -m benchmarks.prom_peers_accuracy") -> Results:
    torch.set_num_threads(args.threads)
    split = mnist_5k()
    model = load_mobilenet_mnist()
    x, y = split.x_test, split.y_test
    calibration = split.x_train[:1000]
    with torch.no_grad():
        reference = model(x).argmax(1)

    rows: list[list] = []

    def row(name: str, logits: torch.Tensor | None, note: str = "") -> None:
        if logits is None:
            rows.append([name, None, None, note])
            return
        predicted = logits.argmax(1)
        rows.append([name, 100.0 * float((predicted == y).float().mean()),
                     100.0 * float((predicted == reference).float().mean()), note])

    with torch.no_grad():
        row("float (committed checkpoint)", model(x))
        for name, build in _PEERS.items():
            try:
                infer = build(model, x, [calibration])  # static shapes: the 1,000 test digits in one batch
            except prom_peers.PeerUnavailable as error:
                row(name, None, f"skipped: {error}")
                continue
            row(f"{name} (PTQ)", prom_peers.logits(infer()))

    example = x[:2]
    ptq = calibrate(prepare(model, example), list(calibration.split(250)))
    torch.manual_seed(args.seed)
    qat = prepare(model, example, PROM(ternary="twn"))
    fit(qat, split, FitConfig(epochs=args.epochs, lr=args.lr, weight_decay=4e-5, seed=args.seed), description="PROM QAT twn")
    for label, prepared in (("PROM PTQ", ptq), (f"PROM QAT, TWN ({args.epochs} epochs)", qat)):
        with torch.no_grad():
            row(f"{label}: fake-quant", predict(prepared, x))
            row(f"{label}: integer, reference runtime", predict(convert(prepared), x))
            if onednn_available():
                row(f"{label}: integer, oneDNN runtime (micro_batched)",
                    predict(micro_batched(convert(prepared, runtime="onednn")), x))
    text = [
        "MobileNetMNIST (committed float checkpoint), MNIST-5k: 1,000 test digits; every post-training quantization "
        "calibrated on the same 1,000 training digits. Peers quantize every layer to 8 bits (per-channel weights); PROM "
        "makes the 1×1 convs ternary and the rest 8-bit, and its QAT trains from the float checkpoint "
        f"(SGD Nesterov, one-cycle, peak lr {args.lr}, weight decay 4e-5, batch 64, seed {args.seed}). 'agreement': "
        "argmax equal to the float model's."]
    table = Table(["model", "top-1 (%)", "agreement with float (%)", "note"], rows, ["", ".2f", ".1f", ""])
    return Results("prom_peers_accuracy", "Int8 peers' PTQ beside PROM on MNIST-5k (MobileNetMNIST)", command,
                   [Section(text=text, table=table)])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="PROM QAT epochs")
    parser.add_argument("--lr", type=float, default=0.02, help="PROM QAT peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.prom_peers_accuracy", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
