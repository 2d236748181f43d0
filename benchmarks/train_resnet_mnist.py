"""Train the CIFAR-style ResNet18/34 on MNIST-5k (padded to 32×32) and save their state dicts.

    python -m benchmarks.train_resnet_mnist                                  # resnet18 + resnet34, width 1
    python -m benchmarks.train_resnet_mnist --models resnet18 --width 0.25 \\
        --epochs 10 --cache fxslim/models/checkpoints                        # the bundled small checkpoint

Checkpoints are ``<cache>/<model>_w<width·100>_mnist.pt`` (float32 state dicts, default cache
``benchmarks/.cache/``, not committed); each model's training is recorded in
``benchmarks/results/train_<model>_w<width·100>_mnist.json``, rendered to .md. ``--weight-decay`` other than the
default 5e-4 adds ``_wd<value>`` to both names. 0.01 is the decay the public CIFAR-10 model zoo
huyvnphan/PyTorch_CIFAR10 logged for its ResNets (``logs/resnet34/version_0/hparams.yaml``), and its
VGG19-BN accuracy, 93.95 %, is the baseline in the HASTE paper's CIFAR-10 table. HASTE loses far
less accuracy at a given L on the networks trained with it
(``benchmarks/results/haste_accuracy.md``). Digits are padded from 28×28 to 32×32 so the stage maps
are 32/16/8/4 as on CIFAR, the geometry HASTE was evaluated on.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks import records
from benchmarks.command import command_line
from benchmarks.records import Results, Section, Table
from benchmarks.resnet_checkpoints import DEFAULT_WEIGHT_DECAY, ZOO_WEIGHT_DECAY, checkpoint_name
from fxslim.models.data import Split, mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, resnet18, resnet34
from fxslim.models.train import FitConfig, evaluate, fit

__all__ = ["padded_mnist", "train_one", "to_results", "main"]

_BUILDERS = {"resnet18": resnet18, "resnet34": resnet34}


def padded_mnist() -> Split:
    split = mnist_5k()
    return Split(pad_to_32(split.x_train), split.y_train, pad_to_32(split.x_test), split.y_test)


def train_one(name: str, width: float, config: FitConfig, split: Split, out: Path) -> dict:
    torch.manual_seed(config.seed)
    model = _BUILDERS[name](num_classes=10, in_channels=1, width=width)
    start = time.perf_counter()
    history = fit(model, split, config, progress=sys.stdout.isatty(), description=f"{name} w{width}")
    seconds = time.perf_counter() - start
    model.eval()
    stem = checkpoint_name(name, width, config.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / f"{stem}.pt")
    return {
        "stem": stem,
        "params": sum(p.numel() for p in model.parameters()),
        "test_acc": evaluate(model, split.x_test, split.y_test),
        "seconds": seconds,
        "history": history,
        "path": out / f"{stem}.pt",
    }


def to_results(name: str, width: float, config: FitConfig, result: dict, command: str) -> Results:
    """One model's training: its size, final accuracy, time, and the per-epoch history."""
    text = [f"Parameters: {result['params']:,}. Final float test accuracy: {result['test_acc']:.2f} % "
            f"(1,000 test digits). Training time: {result['seconds']:.0f} s "
            f"({result['seconds'] / config.epochs:.0f} s/epoch, shared CPU)."]
    rows = [[e.epoch, e.loss, e.train_acc, e.test_acc, e.seconds] for e in result["history"]]
    table = Table(["epoch", "loss", "train acc %", "test acc %", "seconds"], rows, ["d", ".4f", ".2f", ".2f", ".1f"])
    title = f"{name}, width {width}, MNIST-5k (32×32), {config.epochs} epochs, weight decay {config.weight_decay:g}"
    return Results(f"train_{result['stem']}", title, command, [Section(text=text, table=table)])


def main(argv: list[str] | None = None) -> int:
    parser = records.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=sorted(_BUILDERS), default=["resnet18", "resnet34"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                        help=f"SGD weight decay (default {DEFAULT_WEIGHT_DECAY:g}; the paper's model zoo used "
                             f"{ZOO_WEIGHT_DECAY:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache",
                        help="directory the checkpoints go to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # per-epoch lines from fit()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, seed=args.seed)
    split = padded_mnist()
    command = command_line("benchmarks.train_resnet_mnist", argv)
    for name in args.models:  # each model's records as soon as it is trained
        result = train_one(name, args.width, config, split, args.cache)
        print(records.write(to_results(name, args.width, config, result, command), directory=args.out)
              .read_text(encoding="utf-8"))
        print(f"saved {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
