"""Train the float MobileNetMNIST on MNIST-5k and write the checkpoint shipped with fxslim.

    python -m benchmarks.train_mobilenet_mnist            # writes fxslim/models/checkpoints/mobilenet_mnist.pt

Records the per-epoch history, the float top-1 on the 1,000 test digits and the checkpoint size in
``benchmarks/results/train_mobilenet_mnist.json``, rendered to .md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.models.data import mnist_5k
from fxslim.models.mobilenet_mnist import CHECKPOINT, MobileNetMNIST
from fxslim.models.train import FitConfig, evaluate, fit

__all__ = ["run", "main"]

_DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "fxslim" / "models" / CHECKPOINT
_MAX_BYTES = 5 * 1024 * 1024


def run(args: argparse.Namespace, command: str = "python -m benchmarks.train_mobilenet_mnist") -> Results:
    """Train, save the checkpoint (refusing one over the size limit), record the training."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    split = mnist_5k()
    model = MobileNetMNIST().to(memory_format=torch.channels_last)
    config = FitConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    start = time.perf_counter()
    history = fit(model, split, config, description="MobileNetMNIST float")
    seconds = time.perf_counter() - start
    top1 = evaluate(model, split.x_test, split.y_test)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.checkpoint)
    size = args.checkpoint.stat().st_size
    if size >= _MAX_BYTES:
        raise SystemExit(f"checkpoint {args.checkpoint} is {size} bytes, over the {_MAX_BYTES}-byte limit")
    text = [f"Float top-1 on the MNIST-5k test split: {top1:.2f} % ({len(split.y_test)} images). Training time: "
            f"{seconds:.0f} s for {args.epochs} epochs. Checkpoint `{args.checkpoint.name}`: {size / 1024:.0f} KiB."]
    rows = [[e.epoch, e.loss, e.train_acc, e.test_acc, e.seconds] for e in history]
    table = Table(["epoch", "loss", "train acc %", "test acc %", "seconds"], rows, ["d", ".4f", ".2f", ".2f", ".1f"])
    return Results("train_mobilenet_mnist", f"MobileNetMNIST, MNIST-5k, {args.epochs} epochs", command,
                   [Section(text=text, table=table)])


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=4e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small tensors on a shared 2-core machine)")
    parser.add_argument("--checkpoint", type=Path, default=_DEFAULT_CHECKPOINT)
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.train_mobilenet_mnist", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
