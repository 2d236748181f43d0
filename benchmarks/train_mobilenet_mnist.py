"""Train the float MobileNetMNIST on MNIST-5k and write the checkpoint shipped with fxslim.

    python -m benchmarks.train_mobilenet_mnist            # writes fxslim/models/checkpoints/mobilenet_mnist.pt

Prints the per-epoch log, the float top-1 on the 1,000 test digits and the checkpoint size.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from fxslim.models.data import mnist_5k
from fxslim.models.mobilenet_mnist import CHECKPOINT, MobileNetMNIST
from fxslim.models.train import FitConfig, evaluate, fit

_DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fxslim" / "models" / CHECKPOINT
_MAX_BYTES = 5 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=4e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small tensors on a shared 2-core machine)")
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    split = mnist_5k()
    model = MobileNetMNIST().to(memory_format=torch.channels_last)
    config = FitConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    start = time.perf_counter()
    fit(model, split, config, description="MobileNetMNIST float")
    seconds = time.perf_counter() - start
    top1 = evaluate(model, split.x_test, split.y_test)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    size = args.out.stat().st_size
    if size >= _MAX_BYTES:
        raise SystemExit(f"checkpoint {args.out} is {size} bytes, over the {_MAX_BYTES}-byte limit")
    print(f"float top-1 on the MNIST-5k test split: {top1:.2f}% ({len(split.y_test)} images)")
    print(f"training time: {seconds:.0f} s for {args.epochs} epochs, {torch.get_num_threads()} thread(s)")
    print(f"checkpoint: {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
